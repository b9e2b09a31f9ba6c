#!/usr/bin/env bash
# bench_fuse.sh - the --fuse front end through a loop device against its
# peers, in one run on this machine: devio over FUSE-io_uring and over
# /dev/fuse (RAM disk and a file on tmpfs), nbdfuse + nbdkit memory, and a
# loop device straight on a tmpfs file (the kernel's own limit).  fio,
# direct=1, io_uring engine: 4 KiB random read/write at QD32 and 1 MiB
# sequential read/write at QD8.  Prints a table with ratios.
#   usage: bench/bench_fuse.sh [SECONDS_PER_JOB]   (root; builds build-release-fuse)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-5}
SIZE_MB=${SIZE_MB:-1024}
BUILD=$ROOT/build-release-fuse
ENABLE=/sys/module/fuse/parameters/enable_uring
WORK=$(mktemp -d /tmp/bench-fuse.XXXXXX)
ORIG_URING=$(cat $ENABLE 2>/dev/null || echo N)
PIDS=()

cleanup() {
  set +e
  for m in "$WORK"/m-*; do [ -d "$m" ] && losetup -j "$m/disk" -O NAME -n 2>/dev/null | xargs -r -n1 losetup -d; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  for m in "$WORK"/m-* "$WORK"/shm; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
  for l in $(losetup -j "$WORK/shm/loop.img" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
  [ -w $ENABLE ] && echo "$ORIG_URING" > $ENABLE
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -f "$BUILD/build.ninja" ]; then
  meson setup "$BUILD" --buildtype=release -Dtests=disabled >/dev/null
fi
ninja -C "$BUILD" >/dev/null
DEVIO=$BUILD/devio
mkdir -p "$WORK/shm"
mount -t tmpfs -o size=$((SIZE_MB * 3 + 64))m tmpfs "$WORK/shm"

# jobs: name rw bs iodepth
JOBS=("seqwrite-1M write 1M 8" "randwrite-4k randwrite 4k 32" "seqread-1M read 1M 8" "randread-4k randread 4k 32")

run_fio() { # dev rw bs qd -> "iops MiB/s"
  fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring --direct=1 \
      --time_based --runtime="$SECS" --ramp_time=1 --size=${SIZE_MB}M --norandommap --randrepeat=0 \
      --output-format=json 2>/dev/null |
    /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.0f %.1f" % (d["iops"], d["bw_bytes"]/1048576))'
}

declare -A IOPS MBS
NAMES=()
bench_dev() { # name dev
  NAMES+=("$1")
  for j in "${JOBS[@]}"; do
    set -- "$1" "$2" $j
    read -r iops mbs < <(run_fio "$2" "$4" "$5" "$6")
    IOPS["$1/$3"]=$iops
    MBS["$1/$3"]=$mbs
    echo "  $1 $3: $iops IOPS, $mbs MiB/s" >&2
  done
  set -- "$1"
}

wait_line() { # file pattern -> the first matching line (30 s)
  for _ in $(seq 300); do
    l=$(grep -m1 -E "$2" "$1" 2>/dev/null || true)
    [ -n "$l" ] && { echo "$l"; return 0; }
    sleep 0.1
  done
  echo "timed out waiting for $2 in $1" >&2; cat "$1" >&2; return 1
}

devio_case() { # name transport source
  local m="$WORK/m-$1"
  mkdir -p "$m"
  [ "$2" = uring ] && echo Y > $ENABLE
  "$DEVIO" serve "$3" --fuse "$m" --loop --fuse-transport "$2" -q > "$WORK/$1.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  local dev
  dev=$(wait_line "$WORK/$1.log" '^/dev/loop[0-9]+$')
  echo "$1: $dev" >&2
  bench_dev "$1" "$dev"
  kill "$pid"; wait "$pid" || true
}

echo "== devio (release build $DEVIO), $SECS s per job, ${SIZE_MB} MiB" >&2
devio_case devio-uring-ram uring ram:${SIZE_MB}M
devio_case devio-dev-ram dev ram:${SIZE_MB}M
truncate -s ${SIZE_MB}M "$WORK/shm/devio.img"
devio_case devio-uring-tmpfs uring "$WORK/shm/devio.img"
devio_case devio-dev-tmpfs dev "$WORK/shm/devio.img"
rm -f "$WORK/shm/devio.img"

echo "== nbdfuse + nbdkit memory" >&2
nbdkit -U "$WORK/nbdkit.sock" -P "$WORK/nbdkit.pid" memory ${SIZE_MB}M
PIDS+=("$(cat "$WORK/nbdkit.pid")")
mkdir -p "$WORK/m-nbdfuse"
nbdfuse -P "$WORK/nbdfuse.pid" "$WORK/m-nbdfuse/disk" --unix "$WORK/nbdkit.sock" &
for _ in $(seq 100); do [ -s "$WORK/nbdfuse.pid" ] && break; sleep 0.1; done
PIDS+=("$(cat "$WORK/nbdfuse.pid")")
NBDLOOP=$(losetup -f --show --direct-io=on "$WORK/m-nbdfuse/disk")
bench_dev nbdfuse-nbdkit "$NBDLOOP"
losetup -d "$NBDLOOP"

echo "== loop on a tmpfs file" >&2
truncate -s ${SIZE_MB}M "$WORK/shm/loop.img"
TLOOP=$(losetup -f --show --direct-io=on "$WORK/shm/loop.img")
bench_dev tmpfs-loop "$TLOOP"
losetup -d "$TLOOP"

printf '\n%-18s %12s %12s %12s %12s   %s\n' "config" "randread-4k" "randwrite-4k" "seqread-1M" "seqwrite-1M" "(IOPS for 4k, MiB/s for 1M)"
for n in "${NAMES[@]}"; do
  printf '%-18s %12s %12s %12s %12s\n' "$n" "${IOPS[$n/randread-4k]}" "${IOPS[$n/randwrite-4k]}" \
    "${MBS[$n/seqread-1M]}" "${MBS[$n/seqwrite-1M]}"
done
printf '\nratios: 4k vs nbdfuse-nbdkit (goal >= 3), 1M vs tmpfs-loop (goal >= 0.5)\n'
for n in "${NAMES[@]}"; do
  case $n in devio-*) ;; *) continue ;; esac
  /usr/bin/python3 - "$n" "${IOPS[$n/randread-4k]}" "${IOPS[nbdfuse-nbdkit/randread-4k]}" \
    "${IOPS[$n/randwrite-4k]}" "${IOPS[nbdfuse-nbdkit/randwrite-4k]}" \
    "${MBS[$n/seqread-1M]}" "${MBS[tmpfs-loop/seqread-1M]}" \
    "${MBS[$n/seqwrite-1M]}" "${MBS[tmpfs-loop/seqwrite-1M]}" <<'PY'
import sys
n, a = sys.argv[1], [float(x) for x in sys.argv[2:]]
r = lambda x, y: x / y if y else float("nan")
print("%-18s %11.2fx %11.2fx %11.2fx %11.2fx" % (n, r(a[0], a[1]), r(a[2], a[3]), r(a[4], a[5]), r(a[6], a[7])))
PY
done
