#!/usr/bin/env bash
# bench_devio_tls.sh - the devio protocol over TLS (--devio tls:, the
# devio+tls:// client) against the same protocol in plaintext (--devio
# tcp:, devio://), in one run on loopback: the cost of TLS for the devio
# protocol.  Each server serves a fully written file on tmpfs; the client
# is the devio:// / devio+tls:// backend (its pool of up to 4 connections)
# re-exported over an NBD Unix socket and driven by fio's nbd engine, so
# requests run in parallel as a kernel or qemu client would send them.
# Prints IOPS and MiB/s per job and tls/plain per job; PSK (no certificate
# checks in the way).  Rounds alternate plain and TLS; medians printed.
#
#   bench/bench_devio_tls.sh                 # release build in build-release
#   RUNTIME=5 SIZE=256M ROUNDS=3 bench/bench_devio_tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-256M}
ROUNDS=${ROUNDS:-3}
BUILD=${BUILD:-build-release}
PY=/usr/bin/python3

for tool in fio nbdinfo psktool; do
  command -v $tool >/dev/null || { echo "bench_devio_tls: $tool is missing (scripts/deps.sh installs it)"; exit 1; }
done
if [ ! -f "$BUILD/build.ninja" ]; then
  meson setup "$BUILD" --buildtype=release >/dev/null
fi
ninja -C "$BUILD" >/dev/null
DEVIO="$ROOT/$BUILD/devio"

WORK=$(mktemp -d /dev/shm/devio-bench-devio-tls.XXXXXX)
RESULTS="$WORK/results.tsv"
JOBS=(
  "1m-read-qd8 read 1m 8"
  "1m-write-qd8 write 1m 8"
  "4k-randread-qd16 randread 4k 16"
  "4k-randwrite-qd16 randwrite 4k 16"
)
declare -a PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_up() {
  for _ in $(seq 100); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench_devio_tls: $1 did not come up" >&2
  return 1
}

declare -A URI
# far: the devio server (tcp: or tls:); near: its client, re-exported over NBD
start_pair() {
  local name=$1 port img="$WORK/$1.img" sock="$WORK/$1.sock" far
  port=$(free_port)
  dd if=/dev/urandom of="$img" bs=1M count=$(( $(numfmt --from=iec "$SIZE") >> 20 )) status=none
  case "$name" in
    plain) "$DEVIO" serve "$img" -q --devio "tcp:127.0.0.1:$port" & far="devio://127.0.0.1:$port" ;;
    tls)   "$DEVIO" serve "$img" -q --devio "tls:127.0.0.1:$port" --tls-psk "$WORK/keys.psk" &
           far="devio+tls://alice@localhost:$port?tls-psk-file=$WORK/keys.psk" ;;
  esac
  PIDS+=($!)
  for _ in $(seq 100); do
    "$DEVIO" info "$far" >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$DEVIO" serve "$far" -q --nbd "unix:$sock" &
  PIDS+=($!)
  URI[$name]="nbd+unix:///?socket=$sock"
  wait_up "${URI[$name]}"
}

run_job() {
  local name=$1 job=$2
  fio --name="$job" --ioengine=nbd --uri="${URI[$name]}" --rw="$3" --bs="$4" --iodepth="$5" \
    --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 --norandommap \
    --output-format=json >"$WORK/fio.json" 2>"$WORK/fio.err" ||
    { echo "bench_devio_tls: fio $job against $name failed: $(tail -3 "$WORK/fio.err")" >&2; return 0; }
  $PY - "$WORK/fio.json" "$job" "$name" >>"$RESULTS" <<'PY'
import json, sys
path, job, name = sys.argv[1:]
text = open(path).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
io = j["read"] if j["read"]["io_bytes"] else j["write"]
print(f"{job}\t{name}\t{io['iops']:.0f}\t{io['bw'] / 1024:.1f}")
PY
}

psktool -u alice -p "$WORK/keys.psk" >/dev/null 2>&1
echo "bench_devio_tls: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ${RUNTIME}s per job, size $SIZE," \
  "$ROUNDS rounds, $(fio --version), GnuTLS $(psktool --version | awk 'NR==1{print $NF}')"
start_pair plain
start_pair tls
for _ in $(seq "$ROUNDS"); do
  for j in "${JOBS[@]}"; do
    for name in plain tls; do   # each job against each in turn: fair under noise
      run_job "$name" $j
    done
  done
done

$PY - "$RESULTS" <<'PY'
import statistics, sys
by = {}
for line in open(sys.argv[1]):
    if line.strip():
        job, name, iops, mibs = line.rstrip("\n").split("\t")
        by.setdefault(job, {}).setdefault(name, []).append((float(iops), float(mibs)))
print()
print(f"{'job':18} {'plain IOPS':>10} {'plain MiB/s':>11} {'tls IOPS':>9} {'tls MiB/s':>9} {'tls/plain':>9}")
for job, s in by.items():
    p = [statistics.median(v) for v in zip(*s.get("plain", [(0, 0)]))]
    t = [statistics.median(v) for v in zip(*s.get("tls", [(0, 0)]))]
    ratio = f"{t[0] / p[0]:.2f}x" if p[0] else "-"
    print(f"{job:18} {p[0]:10.0f} {p[1]:11.1f} {t[0]:9.0f} {t[1]:9.1f} {ratio:>9}")
PY
