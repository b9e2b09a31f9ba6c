#!/usr/bin/env bash
# bench_formats.sh - image formats served by devio against qemu-nbd and
# nbdkit in one run: the same fully allocated data (each server its own
# copy, on /dev/shm) as a qcow2 file served by devio and `qemu-nbd -f
# qcow2`, as a dynamic VHD served by devio and `qemu-nbd -f vpc`, and as a
# raw file served by devio and nbdkit's file plugin (the "within 85% of
# raw reads" rows; nbdkit 1.32 has no qcow2 or VHD reader), all over NBD
# on a Unix socket; fio's nbd engine: 4 KiB random read/write at QD32 and
# 1 MiB sequential read/write.  Prints IOPS, MiB/s and the server's CPU
# time per request (utime + stime over the job / requests: steadier than
# IOPS on a shared machine) per job and server, devio's ratio to the peer
# serving the same format and to devio raw.  OLD=REV adds devio built
# from REV (a temporary worktree) serving the qcow2 and the VHD, for an
# A/B in the same run (ratio new/old).  Afterwards every written qcow2
# image must pass `qemu-img check`.
#
#   bench/bench_formats.sh                   # release build in build-release-formats
#   RUNTIME=5 SIZE=1G bench/bench_formats.sh
#   REPEAT=3 bench/bench_formats.sh          # best of 3, interleaved
#   OLD=HEAD~3 bench/bench_formats.sh        # and the build of HEAD~3
#   OLD_DEVIO=/path/to/old/devio bench/bench_formats.sh
#   SERVERS="devio-qcow2 qemu-nbd-qcow2" bench/bench_formats.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=bench_formats
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-512M}
BUILD=${BUILD:-build-release-formats}
REPEAT=${REPEAT:-1}
. bench/lib.sh

bench_need fio qemu-nbd qemu-img nbdinfo nbdkit
bench_build "$BUILD"

WORK=$(mktemp -d /dev/shm/devio-bench-formats.XXXXXX)
OLD_SRC=""
OLD_DEVIO=${OLD_DEVIO:-} # or a devio binary built already
if [ -n "${OLD:-}" ]; then
  OLD_SRC=$(mktemp -d /var/tmp/devio-bench-formats-old.XXXXXX)
  git worktree add -q --detach "$OLD_SRC/src" "$OLD"
  meson setup "$OLD_SRC/build" "$OLD_SRC/src" --buildtype=release -Dtests=disabled >/dev/null
  ninja -C "$OLD_SRC/build" devio >/dev/null
  OLD_DEVIO="$OLD_SRC/build/devio"
fi
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
SERVERS=${SERVERS:-"devio-qcow2 qemu-nbd-qcow2 devio-vhd qemu-nbd-vhd devio-raw nbdkit-raw devio-qcow2-t2${OLD_DEVIO:+ devio-old-qcow2 devio-old-vhd}"}

declare -A URI PID
cleanup() {
  bench_stop "${PID[@]}"
  rm -rf "$WORK"
  if [ -n "$OLD_SRC" ]; then
    git worktree remove --force "$OLD_SRC/src" 2>/dev/null || true
    rm -rf "$OLD_SRC"
  fi
}
trap cleanup EXIT INT TERM

# One image of random data, every cluster allocated (what an installed
# guest's disk looks like), copied for each server.
dd if=/dev/urandom of="$WORK/data.raw" bs=1M count=$(( $(numfmt --from=iec "$SIZE") >> 20 )) status=none
qemu-img convert -f raw -O qcow2 "$WORK/data.raw" "$WORK/data.qcow2"
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$WORK/data.raw" "$WORK/data.vhd"

start_server() {
  local name=$1 sock="$WORK/$1.sock"
  URI[$name]="nbd+unix:///?socket=$sock"
  case "$name" in
    devio-qcow2)    cp "$WORK/data.qcow2" "$WORK/$name.img"; "$DEVIO" serve "$WORK/$name.img" -q --nbd "unix:$sock" & ;;
    qemu-nbd-qcow2) cp "$WORK/data.qcow2" "$WORK/$name.img"; qemu-nbd -t -e 8 -f qcow2 -x '' -k "$sock" "$WORK/$name.img" & ;;
    devio-raw)      cp "$WORK/data.raw" "$WORK/$name.img"; "$DEVIO" serve "$WORK/$name.img" -q --nbd "unix:$sock" & ;;
    devio-qcow2-t2) cp "$WORK/data.qcow2" "$WORK/$name.img"; "$DEVIO" serve "$WORK/$name.img" -q --threads 2 --nbd "unix:$sock" & ;;
    devio-vhd)      cp "$WORK/data.vhd" "$WORK/$name.img"; "$DEVIO" serve "$WORK/$name.img" -q --nbd "unix:$sock" & ;;
    qemu-nbd-vhd)   cp "$WORK/data.vhd" "$WORK/$name.img"; qemu-nbd -t -e 8 -f vpc -x '' -k "$sock" "$WORK/$name.img" & ;;
    nbdkit-raw)     cp "$WORK/data.raw" "$WORK/$name.img"; nbdkit -f -U "$sock" file "$WORK/$name.img" & ;;
    devio-old-qcow2) cp "$WORK/data.qcow2" "$WORK/$name.img"; "$OLD_DEVIO" serve "$WORK/$name.img" -q --nbd "unix:$sock" & ;;
    devio-old-vhd)  cp "$WORK/data.vhd" "$WORK/$name.img"; "$OLD_DEVIO" serve "$WORK/$name.img" -q --nbd "unix:$sock" & ;;
    *) echo "bench_formats: unknown server $name" >&2; return 1 ;;
  esac
  PID[$name]=$!
  bench_wait_nbd "${URI[$name]}"
}

# run_job SERVER JOB RW BS IODEPTH: a row "JOB SERVER IOPS MiB/s CPU" (lib.sh)
run_job() {
  fio_nbd_row "$2"$'\t'"$1" "${PID[$1]}" "${URI[$1]}" "$2" "$3" "$4" "$5"
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
  case "$name" in *qcow2*) ;; *) continue ;; esac
  kill "${PID[$name]}"; wait "${PID[$name]}" 2>/dev/null || true; unset "PID[$name]"
  qemu-img check -q "$WORK/$name.img" || echo "bench_formats: qemu-img check of $name's image FAILED" >&2
done

$PY - "$RESULTS" <<'PY'
import sys
best, cpus = {}, {}
for line in open(sys.argv[1]):
    job, server, iops, mibs, cpu = line.split("\t")
    cpus.setdefault((job, server), []).append(float(cpu))
    cur = best.setdefault(job, {}).get(server)
    if not cur or float(iops) > cur[0]:
        best[job][server] = (float(iops), float(mibs))

def fmt_of(s):
    return "qcow2" if "qcow2" in s else "vhd" if "vhd" in s else "raw"

def peer_of(s):
    return {"qcow2": "qemu-nbd-qcow2", "vhd": "qemu-nbd-vhd", "raw": "nbdkit-raw"}[fmt_of(s)]

def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"

print()
print("IOPS: best of the runs; CPU: the server's us per request, median; vs peer: the other server of the same format")
print(f"{'job':18} {'server':16} {'IOPS':>9} {'MiB/s':>8} {'CPU us':>7} {'vs peer':>8} {'peer CPU/':>9} {'vs raw':>7} {'new/old':>8}")
for job, servers in best.items():
    raw = servers.get("devio-raw", (0, 0))[0]
    for s, (iops, mibs) in servers.items():
        c = sorted(cpus[(job, s)])[len(cpus[(job, s)]) // 2]
        peer = servers.get(peer_of(s), (0, 0))[0] if s.startswith("devio") else 0
        pc = cpus.get((job, peer_of(s)))
        pcpu = sorted(pc)[len(pc) // 2] if pc and s.startswith("devio") else 0
        rr = ratio(iops, raw) if s.startswith("devio") and fmt_of(s) != "raw" else "-"
        old = servers.get("devio-old-" + fmt_of(s), (0, 0))[0] if s in ("devio-qcow2", "devio-vhd") else 0
        print(f"{job:18} {s:16} {iops:9.0f} {mibs:8.1f} {c:7.2f} {ratio(iops, peer):>8} "
              f"{ratio(pcpu, c) if pcpu and c else '-':>9} {rr:>7} {ratio(iops, old):>8}")
PY
