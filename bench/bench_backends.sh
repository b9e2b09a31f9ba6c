#!/usr/bin/env bash
# bench_backends.sh - the file and RAM backends driven directly through
# devio_submit() (bench/backend_bench.c, the path every front end uses),
# beside fio doing the same random I/O on the same file, in one run on this
# machine.  Prints a table of IOPS and the ratio devio/fio (best of two
# alternating runs each, since the machine may be busy).
#   bench/bench_backends.sh [SECONDS_PER_RUN] [IMAGE_DIR]
# (release build in build-release-backends; image of 1 GiB in IMAGE_DIR,
# default /var/tmp, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-3}
DIR=${2:-/var/tmp}
BUILD=build-release-backends
if [ ! -f $BUILD/build.ninja ]; then
  meson setup $BUILD --buildtype=release -Dtests=disabled >/dev/null
fi
ninja -C $BUILD libdevio.a >/dev/null
WORK=$(mktemp -d "$DIR/devio-bench-backends-XXXXXX")
SHM=$(mktemp -d /dev/shm/devio-bench-backends-XXXXXX)
trap 'rm -rf "$WORK" "$SHM"' EXIT
cc -O2 -Wall -D_GNU_SOURCE -Iinclude -o "$WORK/backend_bench" bench/backend_bench.c $BUILD/libdevio.a -luring -lpthread
B="$WORK/backend_bench"
IMG="$WORK/bench.img"
dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none
cat "$IMG" >/dev/null
head -c $((512 << 20)) /dev/zero >"$SHM/ram.img"

fio_iops() { # RW ENGINE DEPTH JOBS DIRECT FILE
  fio --name=b --filename="$6" --rw="$1" --bs=4k --ioengine="$2" --iodepth="$3" --numjobs="$4" \
      --direct="$5" --invalidate=0 --time_based --runtime="$SECS" --group_reporting \
      --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' '{ print ($8 > 0 ? $8 : 0) + ($49 > 0 ? $49 : 0) }'
}
devio_iops() { # SOURCE RW DEPTH THREADS MODE [direct]
  "$B" "$1" "$2" 4096 "$3" "$4" "$SECS" "$5" ${6:-} | awk '{ printf "%d", $1 }'
}

warm() { cat "$IMG" >/dev/null; }
row() { # LABEL "DEVIO ARGS" "FIO ARGS": alternating runs, best of two each
  local d1 f1 d2 f2 d f
  d1=$(eval "$2"); f1=$(eval "$3"); f2=$(eval "$3"); d2=$(eval "$2")
  d=$((d1 > d2 ? d1 : d2)); f=$((f1 > f2 ? f1 : f2))
  printf '%-52s %12d %12d %7.2f\n' "$1" "$d" "$f" "$(echo "$d / $f" | bc -l)"
}

echo "best of two alternating runs of ${SECS}s each; image on $(df --output=fstype "$WORK" | tail -1)"
printf '%-52s %12s %12s %7s\n' "4 KiB random I/O" "devio IOPS" "fio IOPS" "ratio"
warm
row "file read, page cache, QD32 x1 (submit/fio io_uring)" \
  'devio_iops "$IMG" read 32 1 async' 'fio_iops randread io_uring 32 1 0 "$IMG"'
row "file read, page cache, QD32 x2 (submit/fio io_uring)" \
  'devio_iops "$IMG" read 32 2 async' 'fio_iops randread io_uring 32 2 0 "$IMG"'
row "file write, page cache, QD1 x2 (pwrite/fio psync)" \
  'devio_iops "$IMG" write 1 2 sync' 'fio_iops randwrite psync 1 2 0 "$IMG"'
row "file read, O_DIRECT, QD32 x1 (submit/fio io_uring)" \
  'devio_iops "$IMG" read 32 1 async direct' 'fio_iops randread io_uring 32 1 1 "$IMG"'
row "file write, O_DIRECT, QD32 x1 (submit/fio io_uring)" \
  'devio_iops "$IMG" write 32 1 async direct' 'fio_iops randwrite io_uring 32 1 1 "$IMG"'
row "file read, O_DIRECT, QD1 x2 (pread/fio psync)" \
  'devio_iops "$IMG" read 1 2 sync direct' 'fio_iops randread psync 1 2 1 "$IMG"'
row "ram:512M read vs tmpfs file, x2 (callbacks/fio psync)" \
  'devio_iops ram:512M read 1 2 sync' 'fio_iops randread psync 1 2 0 "$SHM/ram.img"'
row "ram:512M write vs tmpfs file, x2 (callbacks/fio psync)" \
  'devio_iops ram:512M write 1 2 sync' 'fio_iops randwrite psync 1 2 0 "$SHM/ram.img"'
