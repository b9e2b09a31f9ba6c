#!/usr/bin/env bash
# bench_devio_tls.sh - the devio protocol over TLS (--devio tls:, the
# devio+tls:// client) against the same protocol in plaintext (--devio
# tcp:, devio://), in one run on loopback: the cost of TLS for the devio
# protocol.  Each server serves a fully written file on tmpfs; the client
# is the devio:// / devio+tls:// backend (its pool of up to 4 connections)
# re-exported over an NBD Unix socket and driven by fio's nbd engine, so
# requests run in parallel as a kernel or qemu client would send them.
# Prints IOPS, MiB/s and the CPU time per request of both devio processes
# (server and client, utime + stime over the job / requests) per job, and
# tls/plain of IOPS and of CPU per job; PSK (no certificate checks in the
# way).  Rounds alternate plain and TLS; medians printed.
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
BENCH=bench_devio_tls
. bench/lib.sh
bench_need fio nbdinfo psktool
bench_build "$BUILD"

WORK=$(mktemp -d /dev/shm/devio-bench-devio-tls.XXXXXX)
RESULTS="$WORK/results.tsv"
JOBS=(
  "1m-read-qd8 read 1m 8"
  "1m-write-qd8 write 1m 8"
  "4k-randread-qd16 randread 4k 16"
  "4k-randwrite-qd16 randwrite 4k 16"
)
# per pair: the NBD URI fio drives, and the pids of its two devio processes
declare -A URI PIDS

cleanup() {
  # shellcheck disable=SC2068 # each entry holds two pids
  bench_stop ${PIDS[@]}
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

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
  PIDS[$name]=$!
  for _ in $(seq 100); do
    "$DEVIO" info "$far" >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$DEVIO" serve "$far" -q --nbd "unix:$sock" &
  PIDS[$name]+=" $!"
  URI[$name]="nbd+unix:///?socket=$sock"
  bench_wait_nbd "${URI[$name]}"
}

# run_job NAME JOB RW BS IODEPTH: a row "JOB NAME IOPS MiB/s CPU" (lib.sh;
# the CPU time of both devio processes, the server and its client)
run_job() {
  fio_nbd_row "$2"$'\t'"$1" "${PIDS[$1]}" "${URI[$1]}" "$2" "$3" "$4" "$5"
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
        job, name, iops, mibs, cpu = line.rstrip("\n").split("\t")
        by.setdefault(job, {}).setdefault(name, []).append((float(iops), float(mibs), float(cpu)))
print()
print(f"{'job':18} {'plain IOPS':>10} {'plain MiB/s':>11} {'plain CPU':>9} {'tls IOPS':>9} {'tls MiB/s':>9}"
      f" {'tls CPU':>7} {'tls/plain':>9} {'CPU tls/plain':>13}")
for job, s in by.items():
    p = [statistics.median(v) for v in zip(*s.get("plain", [(0, 0, 0)]))]
    t = [statistics.median(v) for v in zip(*s.get("tls", [(0, 0, 0)]))]
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
    print(f"{job:18} {p[0]:10.0f} {p[1]:11.1f} {p[2]:9.2f} {t[0]:9.0f} {t[1]:9.1f} {t[2]:7.2f}"
          f" {ratio(t[0], p[0]):>9} {ratio(t[2], p[2]):>13}")
print("(CPU: us per request of both devio processes, server and client, medians)")
PY
