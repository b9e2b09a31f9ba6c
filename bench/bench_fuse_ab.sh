#!/usr/bin/env bash
# bench_fuse_ab.sh - A/B of two builds of devio behind FUSE + a loop device,
# the same fio jobs as bench_fuse.sh (io_uring engine, direct=1: 4 KiB
# random read/write QD32, 1 MiB sequential read/write QD8), interleaved
# old/new in one run.  Sources: a RAM disk and a file on tmpfs over the
# FUSE ring, the tmpfs file over /dev/fuse, and a file on ext4 (an image on
# a loop device on tmpfs) whose page cache is dropped before every job, so
# that its reads miss it (the file backend's I/O on the FUSE queue's ring).
# The order alternates (old first, then new first) so that neither build
# always meets what the other one's writes left behind.  Prints every run
# and min/median/max of new/old over the repeats, for the throughput and
# for the server's CPU time per request (utime+stime of the devio process,
# all its threads, over the job / requests: what a loaded machine's noise
# hides least).
#   bench/bench_fuse_ab.sh OLD [REPEAT] [SECONDS]      (root; ONLY=REGEX picks cases)
# OLD is a revision (built in a temporary worktree) or a directory holding a
# release build's `devio`; the new build is the working tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/bench_fuse_ab.sh OLD_REV|OLD_BUILD_DIR [REPEAT] [SECONDS]}
REPEAT=${2:-3}
SECS=${3:-3}
SIZE_MB=${SIZE_MB:-512}
ENABLE=/sys/module/fuse/parameters/enable_uring
ORIG_URING=$(cat $ENABLE 2>/dev/null || echo N)
T=$(mktemp -d /var/tmp/devio-fuse-ab-XXXXXX)
EXT4LOOP=

cleanup() {
  set +e
  [ -f "$T/pids" ] && while read -r p; do kill "$p" 2>/dev/null; done < "$T/pids" # the servers started
  sleep 1
  for m in "$T"/m-*; do
    [ -d "$m" ] && losetup -j "$m/disk" -O NAME -n 2>/dev/null | xargs -r -n1 losetup -d
    mountpoint -q "$m" && umount -l "$m"
  done
  mountpoint -q "$T/ext4" && umount "$T/ext4"
  [ -n "$EXT4LOOP" ] && losetup -d "$EXT4LOOP"
  mountpoint -q "$T/shm" && umount -l "$T/shm"
  [ -w $ENABLE ] && echo "$ORIG_URING" > $ENABLE
  git worktree remove --force "$T/old-src" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT

build() { # SRC OUT
  meson setup "$2" "$1" --buildtype=release -Dtests=disabled >/dev/null
  ninja -C "$2" devio >/dev/null
}
if [ -x "$OLD/devio" ]; then
  OLDBIN=$OLD/devio
else
  git worktree add -q --detach "$T/old-src" "$OLD"
  build "$T/old-src" "$T/old"
  OLDBIN=$T/old/devio
fi
build "$PWD" "$T/new"
NEWBIN=$T/new/devio

mkdir -p "$T/shm" "$T/ext4"
mount -t tmpfs -o size=$((SIZE_MB * 3 + 256))m tmpfs "$T/shm"
truncate -s ${SIZE_MB}M "$T/shm/tmpfs.img"
truncate -s $((SIZE_MB + 128))M "$T/shm/ext4.fs"
mkfs.ext4 -q -F "$T/shm/ext4.fs"
EXT4LOOP=$(losetup -f --show "$T/shm/ext4.fs")
mount "$EXT4LOOP" "$T/ext4"
dd if=/dev/urandom of="$T/ext4/disk.img" bs=1M count=$SIZE_MB status=none # data, not unwritten extents

# CASES: name transport source; JOBS: name rw bs iodepth
CASES=("uring-ram uring ram:${SIZE_MB}M" "uring-tmpfs uring $T/shm/tmpfs.img"
       "dev-tmpfs dev $T/shm/tmpfs.img" "uring-ext4-cold uring $T/ext4/disk.img")
JOBS=("randread-4k randread 4k 32" "randwrite-4k randwrite 4k 32" "seqread-1M read 1M 8" "seqwrite-1M write 1M 8")

run_fio() { # dev rw bs qd -> "IOPS (4k) or MiB/s (1M)" "requests"
  fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring --direct=1 \
      --time_based --runtime="$SECS" --size=${SIZE_MB}M --norandommap --randrepeat=0 \
      --output-format=json 2>/dev/null |
    /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.0f %d" % (d["iops"] if sys.argv[1] == "4k" else d["bw_bytes"]/1048576, d["total_ios"]))' "$3"
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # utime + stime of every thread

# one server, every job once: prints "job=value ..."
one_run() { # BIN transport source
  local m="$T/m-run" log="$T/run.log" pid dev out=""
  mkdir -p "$m"
  [ "$2" = uring ] && echo Y > $ENABLE
  "$1" serve "$3" --fuse "$m" --loop --fuse-transport "$2" > "$log" 2>&1 &
  pid=$!
  echo "$pid" >> "$T/pids" # one_run runs in a subshell: cleanup finds them here
  for _ in $(seq 300); do dev=$(grep -m1 -E '^/dev/loop[0-9]+$' "$log" || true); [ -n "$dev" ] && break; sleep 0.1; done
  [ -n "$dev" ] || { cat "$log" >&2; exit 1; }
  for j in "${JOBS[@]}"; do
    set -- $j
    sync # the last job's writes: not in this job's time
    dd if="$T/ext4/disk.img" iflag=nocache count=0 status=none # cold page cache for the ext4 case
    c0=$(cpu_ticks "$pid")
    read -r v n < <(run_fio "$dev" "$2" "$3" "$4")
    c1=$(cpu_ticks "$pid")
    out+="$1=$v cpu-$1=$(echo "($c1 - $c0) * 1000000 / $(getconf CLK_TCK) / ($n + 1)" | bc -l | xargs printf '%.2f') "
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$out"
}

declare -A RES
echo "A/B: $OLDBIN (old) vs $NEWBIN (new), ${REPEAT} interleaved runs of ${SECS}s per job, ${SIZE_MB} MiB"
for c in "${CASES[@]}"; do
  set -- $c
  [[ $1 =~ ${ONLY:-.} ]] || continue
  for i in $(seq "$REPEAT"); do
    order="old new"; [ $((i % 2)) = 0 ] && order="new old"
    for side in $order; do
      bin=$OLDBIN; [ $side = new ] && bin=$NEWBIN
      for kv in $(one_run "$bin" "$2" "$3"); do
        RES["$1/${kv%%=*}/$side"]+="${kv#*=} "
      done
    done
  done
done
printf '\n%-16s %-17s %-30s %-30s %s\n' case job "old runs" "new runs" "new/old per repeat: min median max"
printf '%-16s %-17s %s\n' "" "" "(IOPS for 4k, MiB/s for 1M; cpu-JOB: server CPU microseconds per request)"
for c in "${CASES[@]}"; do
  set -- $c
  [[ $1 =~ ${ONLY:-.} ]] || continue
  for j in "${JOBS[@]}" "${JOBS[@]/#/cpu-}"; do
    set -- "${c%% *}" $j
    o=${RES["$1/$2/old"]}; n=${RES["$1/$2/new"]}
    /usr/bin/python3 - "$1" "$2" "$o" "$n" <<'PY'
import statistics, sys
case, job, o, n = sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3].split()], [float(x) for x in sys.argv[4].split()]
r = sorted(b / a for a, b in zip(o, n) if a)
fmt = lambda v: " ".join(("%.0f" if x >= 100 else "%.2f") % x for x in v)
print("%-16s %-17s %-30s %-30s %.2f %.2f %.2f" % (case, job, fmt(o), fmt(n), r[0], statistics.median(r), r[-1]))
PY
  done
done
