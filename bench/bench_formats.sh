#!/usr/bin/env bash
# bench_formats.sh - image formats served by devio against qemu-nbd in one
# run: the same fully allocated qcow2 file (each server its own copy, on
# /dev/shm) served by devio and by `qemu-nbd -f qcow2`, plus devio serving
# the same data as a raw file (the "within 85% of raw reads" row), all over
# NBD on a Unix socket; fio's nbd engine: 4 KiB random read/write at QD32
# and 1 MiB sequential read/write.  Prints IOPS and MiB/s per job and
# server, devio's ratio to qemu-nbd and to devio raw.  Afterwards every
# written qcow2 image must pass `qemu-img check`.
#
#   bench/bench_formats.sh                   # release build in build-release-formats
#   RUNTIME=5 SIZE=1G bench/bench_formats.sh
#   REPEAT=3 bench/bench_formats.sh          # best of 3, interleaved
#   SERVERS="devio-qcow2 qemu-nbd-qcow2" bench/bench_formats.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-512M}
BUILD=${BUILD:-build-release-formats}
REPEAT=${REPEAT:-1}
PY=/usr/bin/python3

for tool in fio qemu-nbd qemu-img nbdinfo; do
  command -v $tool >/dev/null || { echo "bench_formats: $tool is missing (scripts/deps.sh installs it)"; exit 1; }
done
if [ ! -f "$BUILD/build.ninja" ]; then
  meson setup "$BUILD" --buildtype=release >/dev/null
fi
ninja -C "$BUILD" >/dev/null
DEVIO="$ROOT/$BUILD/devio"

WORK=$(mktemp -d /dev/shm/devio-bench-formats.XXXXXX)
RESULTS="$WORK/results.tsv"
# name rw bs iodepth
JOBS=(
  "4k-randread-qd32 randread 4k 32"
  "4k-randwrite-qd32 randwrite 4k 32"
  "1m-read-qd8 read 1m 8"
  "1m-write-qd8 write 1m 8"
)
# devio-qcow2-t2: the same with --threads 2 (a pool as large as this
# machine's CPUs instead of the default 8), to show what the pool costs
SERVERS=${SERVERS:-"devio-qcow2 qemu-nbd-qcow2 devio-raw devio-qcow2-t2"}

declare -A URI PID
cleanup() {
  for name in "${!PID[@]}"; do
    kill "${PID[$name]}" 2>/dev/null || true
    wait "${PID[$name]}" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# One image of random data, every cluster allocated (what an installed
# guest's disk looks like), copied for each server.
dd if=/dev/urandom of="$WORK/data.raw" bs=1M count=$(( $(numfmt --from=iec "$SIZE") >> 20 )) status=none
qemu-img convert -f raw -O qcow2 "$WORK/data.raw" "$WORK/data.qcow2"

start_server() {
  local name=$1 sock="$WORK/$1.sock"
  URI[$name]="nbd+unix:///?socket=$sock"
  case "$name" in
    devio-qcow2)    cp "$WORK/data.qcow2" "$WORK/$name.img"; "$DEVIO" serve "$WORK/$name.img" -q --nbd "unix:$sock" & ;;
    qemu-nbd-qcow2) cp "$WORK/data.qcow2" "$WORK/$name.img"; qemu-nbd -t -e 8 -f qcow2 -x '' -k "$sock" "$WORK/$name.img" & ;;
    devio-raw)      cp "$WORK/data.raw" "$WORK/$name.img"; "$DEVIO" serve "$WORK/$name.img" -q --nbd "unix:$sock" & ;;
    devio-qcow2-t2) cp "$WORK/data.qcow2" "$WORK/$name.img"; "$DEVIO" serve "$WORK/$name.img" -q --threads 2 --nbd "unix:$sock" & ;;
  esac
  PID[$name]=$!
  for _ in $(seq 100); do
    nbdinfo --size "${URI[$name]}" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench_formats: $name did not come up" >&2
  return 1
}

run_job() {
  local name=$1 job=$2
  fio --name="$job" --ioengine=nbd --uri="${URI[$name]}" --rw="$3" --bs="$4" --iodepth="$5" \
    --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 --norandommap \
    --output-format=json >"$WORK/fio.json" 2>"$WORK/fio.err" ||
    { echo "bench_formats: fio $job against $name failed: $(tail -3 "$WORK/fio.err")" >&2; return 0; }
  $PY - "$WORK/fio.json" "$job" "$name" >>"$RESULTS" <<'PY'
import json, sys
path, job, server = sys.argv[1:]
text = open(path).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
io = j["read"] if j["read"]["io_bytes"] else j["write"]
print(f"{job}\t{server}\t{io['iops']:.0f}\t{io['bw'] / 1024:.1f}")
PY
}

echo "bench_formats: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ${RUNTIME}s per job, best of $REPEAT, size $SIZE, $(fio --version), $(qemu-nbd --version | head -1)"
for name in $SERVERS; do
  start_server "$name"
done
for j in "${JOBS[@]}"; do
  for _ in $(seq "$REPEAT"); do
    for name in $SERVERS; do
      run_job "$name" $j
    done
  done
done
# every image written through its server must still be sound
for name in $SERVERS; do
  [ "${name#devio-raw}" = "$name" ] || continue
  kill "${PID[$name]}"; wait "${PID[$name]}" 2>/dev/null || true; unset "PID[$name]"
  qemu-img check -q "$WORK/$name.img" || echo "bench_formats: qemu-img check of $name's image FAILED" >&2
done

$PY - "$RESULTS" <<'PY'
import sys
best = {}
for line in open(sys.argv[1]):
    job, server, iops, mibs = line.split("\t")
    cur = best.setdefault(job, {}).get(server)
    if not cur or float(iops) > cur[0]:
        best[job][server] = (float(iops), float(mibs))
print()
print(f"{'job':18} {'server':15} {'IOPS':>9} {'MiB/s':>8} {'vs qemu-nbd':>12} {'vs devio raw':>13}")
for job, servers in best.items():
    q = servers.get("qemu-nbd-qcow2", (0, 0))[0]
    raw = servers.get("devio-raw", (0, 0))[0]
    for s, (iops, mibs) in servers.items():
        rq = f"{iops / q:.2f}x" if q and s != "qemu-nbd-qcow2" else "-"
        rr = f"{iops / raw:.2f}x" if raw and s.startswith("devio-qcow2") else "-"
        print(f"{job:18} {s:15} {iops:9.0f} {mibs:8.1f} {rq:>12} {rr:>13}")
PY
