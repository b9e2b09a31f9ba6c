#!/usr/bin/env bash
# cluster.sh - a one-node Ceph cluster on loopback for the RBD tests and
# benchmark: one monitor and one OSD (memstore: the data lives in the OSD's
# memory) under DIR, cephx on, pool size 1.  Started from Debian's packages
# (ceph-mon, ceph-osd, ceph-common); no manager daemon (librbd and the rbd
# command do not need one).  Nothing outside DIR is touched.  The daemons
# run in the foreground as children of this script, which waits for them:
# SIGTERM (or SIGINT, or the end of the script) stops them and reaps them,
# so a stop leaves no process behind, not even a zombie.
#
#   tests/ceph/cluster.sh run DIR [POOL]   # prints "READY /path/ceph.conf" once the pool takes I/O,
#                                          # then serves until SIGTERM; exit 1 with a reason
# Env: CEPH_START_TIMEOUT (seconds, default 90), CEPH_OSD_BYTES (memstore size, default 1G).
set -euo pipefail

die() { echo "ceph cluster: $*" >&2; stop; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_until SECONDS WHAT CMD...: run CMD until it succeeds or time runs out.
wait_until() {
  local end=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out waiting for $what (logs in $D/log)"
    sleep 0.5
  done
}

write_conf() {
  cat >"$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = v1:127.0.0.1:$PORT
public addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $D/admin.keyring
run dir = $D/run
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
osd client watch timeout = 10
[mon]
mon data = $D/mon.\$id
admin socket = $D/run/\$name.asok
[osd]
osd data = $D/osd.\$id
admin socket = $D/run/\$name.asok
keyring = $D/osd.\$id/keyring
osd objectstore = memstore
memstore device bytes = ${CEPH_OSD_BYTES:-1073741824}
osd max object name len = 256
osd max object namespace len = 64
CONF
}

start() {
  local timeout=${CEPH_START_TIMEOUT:-90} pool=${POOL:-rbd} uuid
  [ -e "$D/ceph.conf" ] && die "$D already holds a cluster"
  mkdir -p "$D"/{run,log,mon.a,osd.0}
  FSID=$(cat /proc/sys/kernel/random/uuid)
  PORT=$(free_port)
  write_conf
  ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$D/admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$D/mon.keyring" --import-keyring "$D/admin.keyring" >/dev/null
  monmaptool --create --fsid "$FSID" --addv a "v1:127.0.0.1:$PORT" "$D/monmap" >/dev/null
  ceph-mon -c "$D/ceph.conf" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" ||
    die "ceph-mon --mkfs failed"
  ceph-mon -f -c "$D/ceph.conf" -i a 2>>"$D/log/mon-start.log" &
  PIDS+=($!)
  wait_until "$timeout" "the monitor" ceph -c "$D/ceph.conf" --connect-timeout 5 mon stat
  uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph -c "$D/ceph.conf" osd new "$uuid" >/dev/null || die "ceph osd new failed"
  ceph-osd -c "$D/ceph.conf" -i 0 --mkfs --mkkey --no-mon-config --osd-uuid "$uuid" >"$D/log/osd-mkfs.log" 2>&1 ||
    die "ceph-osd --mkfs failed (see $D/log/osd-mkfs.log)"
  ceph -c "$D/ceph.conf" auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$D/osd.0/keyring" >/dev/null 2>&1 || die "ceph auth add osd.0 failed"
  ceph -c "$D/ceph.conf" osd crush add-bucket localhost host >/dev/null 2>&1
  ceph -c "$D/ceph.conf" osd crush move localhost root=default >/dev/null 2>&1
  ceph -c "$D/ceph.conf" osd crush add osd.0 1.0 host=localhost >/dev/null 2>&1 || die "crush add failed"
  ceph-osd -f -c "$D/ceph.conf" -i 0 2>>"$D/log/osd-start.log" &
  PIDS+=($!)
  wait_until "$timeout" "the OSD to come up" sh -c "ceph -c '$D/ceph.conf' osd dump | grep -q '^osd.0 up'"
  ceph -c "$D/ceph.conf" osd pool create "$pool" 8 8 >/dev/null 2>&1 || die "pool create failed"
  ceph -c "$D/ceph.conf" osd pool application enable "$pool" rbd >/dev/null 2>&1
  # The pool is usable once an object can be written and read back.
  wait_until "$timeout" "the pool to accept I/O" sh -c \
    "echo ok | timeout 10 rados -c '$D/ceph.conf' -p '$pool' put probe - && timeout 10 rados -c '$D/ceph.conf' -p '$pool' rm probe"
  echo "READY $D/ceph.conf"
}

PIDS=()
stop() {
  trap - TERM INT EXIT
  [ ${#PIDS[@]} -eq 0 ] && return 0
  kill "${PIDS[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "${PIDS[@]}" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
}

[ $# -ge 2 ] && [ "$1" = run ] || die "usage: $0 run DIR [POOL]"
D=$(realpath -m "$2")
POOL=${3:-rbd}
trap 'stop; exit 0' TERM INT
trap stop EXIT
start
wait -n "${PIDS[@]}"
die "a daemon exited (logs in $D/log)"
