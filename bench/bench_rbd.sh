#!/usr/bin/env bash
# bench_rbd.sh - devio serving an RBD image against qemu-nbd serving one
# through qemu's rbd driver (qemu-block-extra), in one run on this machine:
# a one-node Ceph cluster (tests/ceph/cluster.sh, memstore OSD) with two
# images of the same size and content (devio holds its image's exclusive
# lock for good, so the two servers cannot share one), the same fio jobs
# (fio's nbd engine over a Unix socket) against each server in turn.
# Prints IOPS, MiB/s and the server process's CPU time per request (the
# OSD's not counted) per job and each server's ratio to qemu-nbd as it
# runs by default (write-back cache) and with --cache=none.
#
#   bench/bench_rbd.sh                  # release build in build-release-rbd
#   RUNTIME=5 SIZE=256M REPEAT=3 bench/bench_rbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-256M}
REPEAT=${REPEAT:-1}
BUILD=${BUILD:-build-release-rbd}
BENCH=bench_rbd
. bench/lib.sh
bench_need fio qemu-nbd nbdinfo rbd ceph-mon ceph-osd
bench_build "$BUILD"

WORK=$(mktemp -d /tmp/devio-bench-rbd.XXXXXX)
RESULTS="$WORK/results.tsv"
declare -A URI PID
CLUSTER_PID=

cleanup() {
  bench_stop "${PID[@]}" ${CLUSTER_PID:+"$CLUSTER_PID"}
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# The cluster runs until cleanup; its first line says where its conf is.
mkfifo "$WORK/ready"
CEPH_OSD_BYTES=$((4 * $(numfmt --from=iec "$SIZE") + (512 << 20))) \
  bash tests/ceph/cluster.sh run "$WORK/ceph" >"$WORK/ready" 2>"$WORK/cluster.err" &
CLUSTER_PID=$!
read -r -t 180 word CONF <"$WORK/ready" || true
[ "${word:-}" = READY ] || { echo "bench_rbd: the Ceph cluster did not come up: $(tail -5 "$WORK/cluster.err")"; exit 1; }

# Two images with the same bytes: one written, the other a copy of it.
rbd -c "$CONF" create --size "$SIZE" rbd/devio
rbd -c "$CONF" bench --io-type write --io-pattern seq --io-size 4M --io-total "$SIZE" rbd/devio >/dev/null
rbd -c "$CONF" cp --no-progress rbd/devio rbd/qemu
rbd -c "$CONF" cp --no-progress rbd/devio rbd/qemu-none

start() { # start NAME
  local sock="$WORK/$1.sock"
  URI[$1]="nbd+unix:///?socket=$sock"
  case $1 in
    devio) "$DEVIO" serve rbd:rbd/devio --ceph-conf "$CONF" -q --nbd "unix:$sock" & ;;
    # qemu-nbd as it runs by default (--cache=writeback: a write is
    # acknowledged from librbd's cache), and with --cache=none (acknowledged
    # once the OSDs hold it, as devio does).
    qemu-nbd) qemu-nbd -t -e 8 -f raw -x '' -k "$sock" "rbd:rbd/qemu:conf=$CONF" & ;;
    qemu-nbd-none) qemu-nbd -t -e 8 -f raw -x '' --cache=none -k "$sock" "rbd:rbd/qemu-none:conf=$CONF" & ;;
  esac
  PID[$1]=$!
  bench_wait_nbd "${URI[$1]}" 300
}

# name rw bs iodepth
JOBS=(
  "4k-randread-qd32 randread 4k 32"
  "4k-randwrite-qd32 randwrite 4k 32"
  "1m-read-qd8 read 1m 8"
  "1m-write-qd8 write 1m 8"
)

# run_job SERVER JOB RW BS IODEPTH: a row "JOB SERVER IOPS MiB/s CPU" (lib.sh;
# the CPU time of the server process alone, not of the OSD)
run_job() {
  fio_nbd_row "$2"$'\t'"$1" "${PID[$1]}" "${URI[$1]}" "$2" "$3" "$4" "$5"
}

echo "bench_rbd: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ${RUNTIME}s per job, best of $REPEAT, size $SIZE, $(ceph-osd --version | cut -d' ' -f1-3), memstore OSD"
SERVERS="devio qemu-nbd qemu-nbd-none"
for s in $SERVERS; do start "$s"; done
for j in "${JOBS[@]}"; do
  for _ in $(seq "$REPEAT"); do
    for s in $SERVERS; do run_job "$s" $j; done
  done
done

$PY - "$RESULTS" <<'PY'
import sys
best = {}
for line in open(sys.argv[1]):
    job, server, iops, mibs, cpu = line.split("\t")
    cur = best.setdefault(job, {}).get(server)
    if not cur or float(iops) > cur[0]:
        best[job][server] = (float(iops), float(mibs), float(cpu))
print()
print(f"{'job':18} {'server':13} {'IOPS':>9} {'MiB/s':>8} {'CPU us/req':>10} {'vs qemu-nbd':>11} {'vs --cache=none':>15}")
for job, servers in best.items():
    q = servers.get("qemu-nbd", (0, 0, 0))[0]
    qn = servers.get("qemu-nbd-none", (0, 0, 0))[0]
    for s, (iops, mibs, cpu) in servers.items():
        print(f"{job:18} {s:13} {iops:9.0f} {mibs:8.1f} {cpu:10.2f} {(f'{iops / q:.2f}x' if q else '-'):>11}"
              f" {(f'{iops / qn:.2f}x' if qn else '-'):>15}")
PY
