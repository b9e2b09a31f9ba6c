# guest-lib.sh - helpers the in-guest scenario scripts source: result
# lines, bounded waits, starting/stopping a devio server, a file-system
# round trip.  Runs under busybox sh inside the guest (tests/vm/run.sh).
# Busybox's sh prefers its own applets to PATH: tools where the real
# (util-linux, e2fsprogs) one matters are called as /usr/bin/NAME.

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+ ($2)}"; }
info() { echo "INFO $*"; }
# show_log FILE: the last lines of a server log, as INFO lines.
show_log() { tail -n 15 "$1" | sed 's/^/INFO   | /'; }

# wait_for SECONDS CMD...: poll CMD every 0.1 s; 0 when it succeeded.
wait_for() {
  _n=$(($1 * 10)); shift
  while [ $_n -gt 0 ]; do
    "$@" 2>/dev/null && return 0
    usleep 100000; _n=$((_n - 1))
  done
  return 1
}

alive() { kill -0 "$1" 2>/dev/null; }
dead() { ! kill -0 "$1" 2>/dev/null; }

# start_ublk LOG SERVE-ARGS...: start `devio serve`, wait for its ublk
# device; sets SRV (pid) and DEV (/dev/ublkbN).
start_ublk() {
  _log=$1; shift
  DEV=
  devio serve "$@" >"$_log" 2>&1 &
  SRV=$!
  wait_for 60 grep -q 'ublk: /dev/ublkb[0-9]*: ' "$_log" || { cat "$_log"; return 1; }
  DEV=$(sed -n 's|.*ublk: \(/dev/ublkb[0-9]*\): .*|\1|p' "$_log" | head -n 1)
  wait_for 20 test -b "$DEV" && return 0
  echo "no block device $DEV: $(ls -l "$DEV" 2>&1)"
  return 1
}

# stop_server [SIGNAL]: stop $SRV within 60 s (SIGKILL after); sets SRV_RC.
stop_server() {
  kill -"${1:-TERM}" "$SRV" 2>/dev/null
  wait_for 60 dead "$SRV" || kill -KILL "$SRV" 2>/dev/null
  wait "$SRV"; SRV_RC=$?
}

# fs_roundtrip DEV: mkfs.ext4, write checksummed files, sync, unmount,
# fsck -fn, mount again and compare.  0 on success.
fs_roundtrip() {
  _fs_roundtrip "$@"; _r=$?
  grep -q ' /mnt ' /proc/mounts && { umount /mnt || umount -l /mnt; } # never leave it mounted
  return $_r
}

_fs_roundtrip() {
  _dev=$1; _r=0
  mkfs.ext4 -q -F "$_dev" >/tmp/mkfs.log 2>&1 || { cat /tmp/mkfs.log; return 1; }
  mount -t ext4 "$_dev" /mnt || return 1
  for _i in 1 2 3 4; do
    dd if=/dev/urandom of=/mnt/f$_i bs=64k count=$((_i * 8)) 2>/dev/null || _r=1
  done
  mkdir -p /mnt/dir && echo hello >/mnt/dir/small
  (cd /mnt && sha256sum f1 f2 f3 f4 dir/small) >/tmp/sums
  sync
  umount /mnt || return 1
  e2fsck -fn "$_dev" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; _r=1; }
  mount -t ext4 "$_dev" /mnt || return 1
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/sumcheck.log 2>&1 || { cat /tmp/sumcheck.log; _r=1; }
  umount /mnt || _r=1
  return $_r
}

# vm_rss_kb PID: resident memory of PID in KiB.
vm_rss_kb() { awk '/^VmRSS:/{print $2}' /proc/"$1"/status; }

# counter LOG QUEUE: requests queue QUEUE served, from the exit summary.
counter() { sed -n "s/.*queue $2 served \([0-9]*\) .*/\1/p" "$1" | tail -n 1; }

# _grew FILE N: FILE has more than N lines.
_grew() { [ "$(wc -l <"$1")" -gt "$2" ]; }

# recover_cycles N LOG SOURCE ID PROGRESS: N times, once the workload has
# made progress (PROGRESS, a file it appends a line to per acknowledged
# step, grew), kill -9 the server $SRV and take /dev/ublkbID over with
# `devio serve SOURCE --ublk=ID --recover` (log LOG.i).  Sets SRV; 0 when
# every takeover came up, else 1 with the reason in RECOVER_ERR.  (Its
# variables have names of their own: busybox sh has no locals, and
# wait_for/start_ublk use _n and _log.)
recover_cycles() {
  _rc_n=$1 _rc_rlog=$2 _rc_src=$3 _rc_id=$4 _rc_prog=$5 _rc_i=0
  while [ $_rc_i -lt "$_rc_n" ]; do
    _rc_before=$(wc -l <"$_rc_prog")
    if ! wait_for 60 _grew "$_rc_prog" "$_rc_before"; then
      RECOVER_ERR="no progress before kill $_rc_i"; return 1
    fi
    kill -KILL "$SRV"; wait "$SRV" 2>/dev/null
    if ! start_ublk "$_rc_rlog.$_rc_i" "$_rc_src" --ublk="$_rc_id" --recover; then
      RECOVER_ERR="takeover $_rc_i failed"; show_log "$_rc_rlog.$_rc_i"; return 1
    fi
    _rc_i=$((_rc_i + 1))
  done
  return 0
}
