#!/usr/bin/env bash
# bench_shm.sh - the shared-memory transport against the other ways to reach
# a devio server, in one run: one `devio serve` per target (a RAM disk, a
# tmpfs file) with shm:NAME,slots=1, shm:NAME (32 slots), the devio stream
# on a Unix socket and on TCP, and NBD on a Unix socket; the load generator
# is bench/backend_bench.c opening each as a backend (devio+shm://,
# devio+unix://, devio://, nbd+unix://) and, as the limit, the target
# itself in-process.  Random 4 KiB reads at QD1 and QD32, 1 MiB reads and
# writes at QD4.  Prints MiB/s (best of three interleaved rounds) and the
# ratio to in-process.
#   bench/bench_shm.sh [SECONDS_PER_RUN]
# QD32 is one thread with 32 requests in flight for clients that submit
# asynchronously (shm, NBD); the devio stream client has no asynchronous
# path and a pool of 4 connections, so it gets 32 threads (QD4: 4).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-1}
BUILD=build-release-shm
if [ ! -f $BUILD/build.ninja ]; then
  meson setup $BUILD --buildtype=release -Dtests=disabled >/dev/null
fi
ninja -C $BUILD devio libdevio.a >/dev/null
WORK=$(mktemp -d /tmp/devio-bench-shm-XXXXXX)
SHMDIR=$(mktemp -d /dev/shm/devio-bench-shm-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK" "$SHMDIR"
}
trap cleanup EXIT
cc -O2 -Wall -D_GNU_SOURCE -Iinclude -o "$WORK/backend_bench" bench/backend_bench.c $BUILD/libdevio.a -luring -lpthread
B="$WORK/backend_bench"
DEVIO=$BUILD/devio
SIZE=$((256 << 20))
head -c $SIZE /dev/zero | tr '\0' '\245' >"$SHMDIR/disk.img"

SRV=
# shellcheck disable=SC2317
srv_ticks() { # the server's user + system time so far, in clock ticks
  if [ -n "$SRV" ]; then awk '{ print $14 + $15 }' "/proc/$SRV/stat"; else echo 0; fi
}
mibs() { # SOURCE RW BS DEPTH THREADS MODE -> "MiB/s CPU-us-per-request" (client + server)
  local t0 t1 out
  t0=$(srv_ticks)
  out=$("$B" "$1" "$2" "$3" "$4" "$5" "$SECS" "$6")
  t1=$(srv_ticks)
  awk -v o="$out" -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {
    split(o, f, " "); srv = f[1] > 0 ? d * 1e6 / hz / (f[1] * '"$SECS"') : 0
    printf "%.0f %.2f", f[2], f[3] + srv }'
}

# WORKLOAD -> "RW BS DEPTH THREADS" for async clients / for the stream client
async_args() {
  case $1 in
    4k-qd1) echo "read 4096 1 1" ;; 4k-qd32) echo "read 4096 32 1" ;;
    1m-read-qd4) echo "read 1048576 4 1" ;; 1m-write-qd4) echo "write 1048576 4 1" ;;
  esac
}
stream_args() {
  case $1 in
    4k-qd1) echo "read 4096 1 1" ;; 4k-qd32) echo "read 4096 1 32" ;;
    1m-read-qd4) echo "read 1048576 1 4" ;; 1m-write-qd4) echo "write 1048576 1 4" ;;
  esac
}
run() { # SOURCE WORKLOAD stream|async
  local a
  if [ "$3" = stream ]; then a=$(stream_args "$2"); else a=$(async_args "$2"); fi
  # shellcheck disable=SC2086
  set -- "$1" $a
  if [[ $1 == */* ]]; then SRV=${PIDS[-1]}; else SRV=; fi # a server's, or in-process
  mibs "$1" "$2" "$3" "$4" "$5" async
}

PORT=$((20000 + RANDOM % 20000))
WORKLOADS="4k-qd1 4k-qd32 1m-read-qd4 1m-write-qd4"
echo "bench_shm.sh: ${SECS}s per run, $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg); MiB/s (ratio to in-process)"
printf '%-6s %-13s %9s %15s %15s %15s %15s %15s\n' target workload in-proc shm-1slot shm-32slots stream-unix stream-tcp nbd-unix
declare -A R C
for target in ram tmpfs; do
  if [ $target = ram ]; then src=ram:256M; else src="$SHMDIR/disk.img"; fi
  n=bench-$$-$target
  "$DEVIO" serve "$src" -q --devio "shm:$n-1,slots=1" --devio "shm:$n-32,slots=32" \
    --devio "unix:$WORK/$target.sock" --devio "tcp:127.0.0.1:$PORT" --nbd "unix:$WORK/$target.nbd" &
  PIDS+=($!)
  for _ in $(seq 100); do [ -S "$WORK/$target.nbd" ] && break; sleep 0.05; done
  if [ $target = ram ]; then # a disk in use: no reads of holes
    head -c $SIZE /dev/zero | tr '\0' '\245' | "$DEVIO" write "devio+shm://$n-32" 2>/dev/null
  fi
  for w in $WORKLOADS; do
    # best of three rounds, the six clients interleaved in each round: a
    # busy machine slows runs, it never speeds them up
    best=(0 0 0 0 0 0) cpu=(1e9 1e9 1e9 1e9 1e9 1e9)
    for _ in 1 2 3; do
      i=0
      for c in "$src async" "devio+shm://$n-1 async" "devio+shm://$n-32 async" \
               "devio+unix://$WORK/$target.sock stream" "devio://127.0.0.1:$PORT stream" \
               "nbd+unix:///?socket=$WORK/$target.nbd async"; do
        # shellcheck disable=SC2086
        read -r v u <<<"$(run ${c% *} "$w" ${c##* })"
        [ "$v" -gt "${best[$i]}" ] && best[$i]=$v
        cpu[$i]=$(awk -v a="$u" -v b="${cpu[$i]}" 'BEGIN { print (a < b ? a : b) }')
        i=$((i + 1))
      done
    done
    lim=${best[0]} s1=${best[1]} s32=${best[2]} su=${best[3]} st=${best[4]} nu=${best[5]}
    R[$target-$w]="$lim $s1 $s32 $su $st $nu"
    C[$target-$w]="${cpu[*]}"
    pct() { awk -v a="$1" -v b="$lim" 'BEGIN { printf "%d (%3.0f%%)", a, (b > 0 ? 100 * a / b : 0) }'; }
    printf '%-6s %-13s %9d %15s %15s %15s %15s %15s\n' $target "$w" "$lim" "$(pct "$s1")" "$(pct "$s32")" \
      "$(pct "$su")" "$(pct "$st")" "$(pct "$nu")"
  done
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
  PORT=$((PORT + 1))
done
echo
echo "CPU per request, client + server, in microseconds (best of three; ratio: in-process CPU / this CPU)"
printf '%-6s %-13s %9s %15s %15s %15s %15s %15s\n' target workload in-proc shm-1slot shm-32slots stream-unix stream-tcp nbd-unix
for target in ram tmpfs; do
  for w in $WORKLOADS; do
    # shellcheck disable=SC2086
    set -- ${C[$target-$w]}
    awk -v t=$target -v w="$w" -v l="$1" -v a="$2" -v b="$3" -v c="$4" -v d="$5" -v e="$6" 'function f(x) {
      return sprintf("%7.2f (%3.0f%%)", x, x > 0 ? 100 * l / x : 0) }
      BEGIN { printf "%-6s %-13s %9.2f %15s %15s %15s %15s %15s\n", t, w, l, f(a), f(b), f(c), f(d), f(e) }'
  done
done
echo
echo "aims: shm QD32 >= 2x the Unix-socket stream and >= NBD on a Unix socket; 1 MiB >= 80% of in-process"
for target in ram tmpfs; do
  read -r lim s1 s32 su st nu <<<"${R[$target-4k-qd32]}"
  read -r clim c1 c32 cu ct cn <<<"${C[$target-4k-qd32]}"
  awk -v t=$target -v s=$s32 -v u=$su -v n=$nu -v cs=$c32 -v cu=$cu -v cn=$cn \
    'BEGIN { printf "%-6s 4k-qd32: shm/stream-unix %.2fx (CPU per request %.2fx less), shm/nbd-unix %.2fx (%.2fx less)\n",
             t, s / u, cu / cs, s / n, cn / cs }'
  for w in 1m-read-qd4 1m-write-qd4; do
    read -r lim s1 s32 su st nu <<<"${R[$target-$w]}"
    read -r clim c1 c32 cu ct cn <<<"${C[$target-$w]}"
    awk -v t=$target -v w=$w -v s=$s32 -v l=$lim -v cs=$c32 -v cl=$clim \
      'BEGIN { printf "%-6s %s: shm %.0f%% of in-process (CPU: %.0f%%)\n", t, w, 100 * s / l, 100 * cl / cs }'
  done
done
