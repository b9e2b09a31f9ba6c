#!/usr/bin/env bash
# bench_ab.sh - A/B of two builds of devio on the same jobs, interleaved, in
# one run: the NBD server over a Unix socket (fio's nbd engine, 4 KiB random
# QD32, RAM disk and a file on tmpfs) and the file backend alone with
# O_DIRECT (bench/backend_bench.c, QD32); and a window (--offset) of the
# file, 4 KiB reads and 1 MiB (spliced) writes.  For refactors: prints each
# build's runs and the ratio of medians new/old; for the NBD rows also the
# server's CPU time per request (utime + stime over the job / requests, a
# steadier figure than IOPS on a shared machine) and its ratio new/old.
#   bench/bench_ab.sh OLD_REV [REPEAT] [SECONDS]
# OLD_REV (e.g. the last landed commit) is built in a temporary worktree;
# the new build is the working tree.  Release builds, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/bench_ab.sh OLD_REV [REPEAT] [SECONDS]}
REPEAT=${2:-3}
SECS=${3:-3}
T=$(mktemp -d /var/tmp/devio-ab-XXXXXX)
SHM=$(mktemp -d /dev/shm/devio-ab-XXXXXX)
cleanup() {
  jobs -p | xargs -r kill 2>/dev/null || true
  git worktree remove --force "$T/old-src" 2>/dev/null || true
  rm -rf "$T" "$SHM"
}
trap cleanup EXIT
git worktree add -q --detach "$T/old-src" "$OLD"
build() { # SRC OUT
  meson setup "$2" "$1" --buildtype=release -Dtests=disabled >/dev/null
  ninja -C "$2" devio libdevio.a >/dev/null
  cc -O2 -D_GNU_SOURCE -I"$1/include" -o "$2/backend_bench" "$1/bench/backend_bench.c" "$2/libdevio.a" \
     -luring -lpthread $(extra_libs "$2")
}
extra_libs() { # BUILD: what a build's libdevio.a needs beyond liburing (the rbd backend's Ceph libraries)
  if nm "$1/libdevio.a" 2>/dev/null | grep ' U rbd_open' >/dev/null; then echo -lrbd -lrados; fi
}
build "$T/old-src" "$T/old"
build "$PWD" "$T/new"
truncate -s 512M "$SHM/f.img"
dd if=/dev/urandom of="$T/direct.img" bs=1M count=512 status=none

nbd_iops() { # BUILD SOURCE RW [BS [SERVE-OPTIONS...]]
  local sock="$SHM/s.sock" p t0 t1 b="$1" src="$2" rw="$3" bs="${4:-4k}"
  shift 3; [ $# -gt 0 ] && shift
  rm -f "$sock"
  "$b/devio" serve "$src" "$@" --nbd "unix:$sock" >/dev/null 2>&1 &
  p=$!
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  t0=$(cpu_ticks "$p")
  fio --name=ab --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" --iodepth=32 \
      --size=256M --time_based --runtime="$SECS" --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' 'NF > 50 { print int(($8 > 0 ? $8 : 0) + ($49 > 0 ? $49 : 0)) }' > "$T/iops"
  t1=$(cpu_ticks "$p")
  kill "$p"; wait "$p" 2>/dev/null || true
  cat "$T/iops"
  awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v s="$SECS" '{ printf "%.2f\n", $1 ? t / hz * 1e6 / ($1 * s) : 0 }' \
    "$T/iops" >> "$T/cpu.$(basename "$b")"
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
direct_iops() { # BUILD RW
  "$1/backend_bench" "$T/direct.img" "$2" 4096 32 1 "$SECS" async direct | awk '{ printf "%d\n", $1 }'
}
median() { tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
row() { # LABEL CMD-WITH-@ (@ = the build)
  local o=() n=() mo mn co cn
  rm -f "$T/cpu.old" "$T/cpu.new"
  for _ in $(seq "$REPEAT"); do
    o+=("$(eval "${2//@/$T/old}")"); n+=("$(eval "${2//@/$T/new}")")
  done
  mo=$(echo "${o[*]}" | median); mn=$(echo "${n[*]}" | median)
  printf '%-34s old %-24s new %-24s %5.2f\n' "$1" "${o[*]}" "${n[*]}" "$(echo "$mn / $mo" | bc -l)"
  if [ -f "$T/cpu.old" ] && [ -f "$T/cpu.new" ]; then
    co=$(median < "$T/cpu.old"); cn=$(median < "$T/cpu.new")
    printf '%-34s old %-24s new %-24s %5.2f\n' "  server CPU us/request" "$(echo $(cat "$T/cpu.old"))" \
      "$(echo $(cat "$T/cpu.new"))" "$(echo "$cn / $co" | bc -l)"
  fi
}
echo "A/B: $OLD (old) vs the working tree (new), ${REPEAT} interleaved runs of ${SECS}s; last column new/old of medians"
row "nbd unix ram 4K randread QD32" 'nbd_iops @ ram:512M randread'
row "nbd unix ram 4K randwrite QD32" 'nbd_iops @ ram:512M randwrite'
row "nbd unix file(tmpfs) 4K randread" 'nbd_iops @ "$SHM/f.img" randread'
row "nbd unix file(tmpfs) 4K randwrite" 'nbd_iops @ "$SHM/f.img" randwrite'
row "nbd unix file --offset 1M 4K randrd" 'nbd_iops @ "$SHM/f.img" randread 4k --offset 1M'
row "nbd unix file --offset 1M 1M write" 'nbd_iops @ "$SHM/f.img" randwrite 1m --offset 1M'
row "file O_DIRECT 4K write QD32" 'direct_iops @ write'
row "file O_DIRECT 4K read QD32" 'direct_iops @ read'
