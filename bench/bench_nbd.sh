#!/usr/bin/env bash
# bench_nbd.sh - the devio NBD server against nbdkit and qemu-nbd in one
# run on this machine: the same fio jobs (fio's nbd engine, over a Unix
# socket and over TCP on loopback) for a RAM disk (devio ram: vs nbdkit's
# memory plugin) and for a file on tmpfs (devio vs nbdkit's file plugin
# vs qemu-nbd).  Prints IOPS and MiB/s per job and the ratio of each
# server to the best peer (nbdkit / qemu-nbd) of that row, and each
# server's CPU time per request: utime + stime of the server process over
# the job (ramp included) divided by the requests it served in that time
# (fio's IOPS x (ramp + runtime)): a figure the client cannot hide when it
# saturates first.
#
#   bench/bench_nbd.sh                 # release build in build-release-nbd
#   RUNTIME=5 SIZE=512M bench/bench_nbd.sh
#   TRANSPORTS=unix BACKENDS=ram bench/bench_nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-512M}
TRANSPORTS=${TRANSPORTS:-"unix tcp"}
BACKENDS=${BACKENDS:-"ram file"}
BUILD=${BUILD:-build-release-nbd}
REPEAT=${REPEAT:-1}
BENCH=bench_nbd
. bench/lib.sh

bench_need fio nbdkit qemu-nbd nbdinfo
bench_build "$BUILD"

WORK=$(mktemp -d /dev/shm/devio-bench-nbd.XXXXXX)
RESULTS="$WORK/results.tsv"
# name rw bs iodepth [connections]
JOBS=(
  "4k-randread-qd1 randread 4k 1"
  "4k-randread-qd32 randread 4k 32"
  "4k-randwrite-qd1 randwrite 4k 1"
  "4k-randwrite-qd32 randwrite 4k 32"
  "4k-randread-qd32x2 randread 4k 32 2"
  "1m-read-qd8 read 1m 8"
  "1m-write-qd8 write 1m 8"
)

declare -A URI PID
# start_server NAME BACKEND TRANSPORT: every server has its own socket and
# its own copy of the image, so that all of them run side by side and each
# fio job is measured against each server in turn (fair under noise).
start_server() {
  local name=$1 backend=$2 transport=$3 sock="$WORK/$1.sock" port img="$WORK/$1.img"
  local listen_devio listen_nbdkit listen_qemu
  port=$(free_port)
  rm -f "$sock"
  if [ "$transport" = unix ]; then
    URI[$name]="nbd+unix:///?socket=$sock"
    listen_devio="unix:$sock"; listen_nbdkit=(-U "$sock"); listen_qemu=(-k "$sock")
  else
    URI[$name]="nbd://127.0.0.1:$port/"
    listen_devio="tcp:127.0.0.1:$port"; listen_nbdkit=(-i 127.0.0.1 -p "$port"); listen_qemu=(-b 127.0.0.1 -p "$port")
  fi
  if [ "$backend" = file ]; then
    # a fully written file, as an installed image would be
    dd if=/dev/urandom of="$img" bs=1M count=$(( $(numfmt --from=iec "$SIZE") >> 20 )) status=none
  fi
  case "$name/$backend" in
    devio/ram)    "$DEVIO" serve "ram:$SIZE" -q --nbd "$listen_devio" & ;;
    devio/file)   "$DEVIO" serve "$img" -q --nbd "$listen_devio" & ;;
    nbdkit/ram)   nbdkit -f "${listen_nbdkit[@]}" memory "$SIZE" & ;;
    nbdkit/file)  nbdkit -f "${listen_nbdkit[@]}" file "$img" & ;;
    qemu-nbd/file) qemu-nbd -t -e 8 -f raw -x '' "${listen_qemu[@]}" "$img" & ;;
    *) return 1 ;;
  esac
  PID[$name]=$!
  for _ in $(seq 100); do
    if nbdinfo --size "${URI[$name]}" >/dev/null 2>&1; then
      if [ "$backend" = ram ]; then
        # fill the RAM disks so reads see data, not holes
        fio --name=fill --ioengine=nbd --uri="${URI[$name]}" --rw=write --bs=1m --iodepth=8 --size="$SIZE" \
          --output-format=terse >/dev/null 2>&1 || true
      fi
      return 0
    fi
    sleep 0.1
  done
  echo "bench_nbd: $name did not come up on ${URI[$name]}" >&2
  return 1
}

stop_servers() {
  for name in "${!PID[@]}"; do
    kill "${PID[$name]}" 2>/dev/null || true
    wait "${PID[$name]}" 2>/dev/null || true
    rm -f "$WORK/$name.img"
  done
  PID=()
}
cleanup() {
  stop_servers
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# run_job NAME BACKEND TRANSPORT JOB RW BS IODEPTH [CONNECTIONS]: a row
# "BACKEND TRANSPORT JOB NAME IOPS MiB/s CPU" (lib.sh; with several
# connections, their sum)
run_job() {
  fio_nbd_row "$2"$'\t'"$3"$'\t'"$4"$'\t'"$1" "${PID[$1]}" "${URI[$1]}" "${@:4}"
}

echo "bench_nbd: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ${RUNTIME}s per job, best of $REPEAT, size $SIZE, $(fio --version)"
for backend in $BACKENDS; do
  if [ "$backend" = file ]; then
    servers="devio nbdkit qemu-nbd"
  else
    servers="devio nbdkit"
  fi
  for transport in $TRANSPORTS; do
    for name in $servers; do
      start_server "$name" "$backend" "$transport"
    done
    for j in "${JOBS[@]}"; do
      for _ in $(seq "$REPEAT"); do
        for name in $servers; do
          run_job "$name" "$backend" "$transport" $j
        done
      done
    done
    stop_servers
  done
done

$PY - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for backend, transport, job, server, iops, mibs, cpu in rows:
    cur = by.setdefault((backend, transport, job), {}).get(server)
    if not cur or float(iops) > cur[0]:
        by[(backend, transport, job)][server] = (float(iops), float(mibs), float(cpu))
print()
print(f"{'backend':7} {'transport':9} {'job':18} {'server':9} {'IOPS':>9} {'MiB/s':>8} {'vs best peer':>12}"
      f" {'CPU us/req':>10}")
for (backend, transport, job), servers in by.items():
    peers = [v for s, v in servers.items() if s != "devio"]
    best = max((v[0] for v in peers), default=0)
    for s, (iops, mibs, cpu) in servers.items():
        ratio = f"{iops / best:.2f}x" if best else "-"
        print(f"{backend:7} {transport:9} {job:18} {s:9} {iops:9.0f} {mibs:8.1f} {ratio:>12} {cpu:10.2f}")
PY
