#!/usr/bin/env bash
# bench_stream.sh - the devio stream front end at QD1 (the protocol allows
# one request in flight per connection): 4 KiB and 1 MiB reads and writes
# over TCP and Unix sockets, against `devio serve ram:...` and a tmpfs
# image, each printed beside the same transfers answered by a bare sink
# server (bench/stream_bench.c: same request/response pattern and byte
# counts, no storage) as a ratio of that transport limit.
#   bench/bench_stream.sh [SECONDS_PER_RUN]      (release build in build-release-stream)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-1}
BUILD=build-release-stream
if [ ! -f $BUILD/build.ninja ]; then
  meson setup $BUILD --buildtype=release -Dtests=disabled >/dev/null
fi
ninja -C $BUILD devio >/dev/null
WORK=$(mktemp -d /dev/shm/devio-bench-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
cc -O2 -Wall -o "$WORK/stream_bench" bench/stream_bench.c
B="$WORK/stream_bench"
DEVIO=$BUILD/devio

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_addr() { # ADDR
  for _ in $(seq 200); do
    case $1 in
      unix:*) [ -S "${1#unix:}" ] && return 0 ;;
      tcp:*) (exec 3<>/dev/tcp/127.0.0.1/${1#tcp:}) 2>/dev/null && return 0 ;;
    esac
    sleep 0.05
  done
  echo "server at $1 did not start" >&2; exit 1
}
addr() { # TRANSPORT NAME
  if [ "$1" = tcp ]; then echo "tcp:$(free_port)"; else echo "unix:$WORK/$2.sock"; fi
}
start_sink() { "$B" sink "$1" & PIDS+=($!); wait_addr "$1"; LASTPID=$!; }
start_devio() { "$DEVIO" serve "$1" --devio "$2" -q & PIDS+=($!); wait_addr "$2"; LASTPID=$!; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # server CPU (user+system), clock ticks
HZ=$(getconf CLK_TCK)

truncate -s 1G "$WORK/disk.img"
printf '%-5s %-6s %-5s %-6s %11s %11s %7s %11s %11s %7s\n' transp target op block \
  "sink MiB/s" "devio MiB/s" ratio "sink cpu/op" "devio cpu/op" "cpu x"
for t in tcp unix; do
  sink=$(addr $t sink); start_sink "$sink"; sinkpid=$LASTPID
  ram=$(addr $t ram); start_devio ram:1G "$ram"; rampid=$LASTPID
  img=$(addr $t img); start_devio "$WORK/disk.img" "$img"; imgpid=$LASTPID
  for op in write read; do
    for bs in 4096 1048576; do
      for target in ram tmpfs; do
        a=$ram; pid=$rampid
        [ $target = tmpfs ] && { a=$img; pid=$imgpid; }
        # Alternate sink and devio runs and keep the best throughput of
        # each: the machine may be busy with other work, and noise only
        # slows runs.  Server CPU time per request (summed over all runs)
        # is the steadier measure of what the server itself costs.
        smb=0; dmb=0; sops=0; dops=0; sticks=0; dticks=0
        for _ in 1 2 3; do
          t0=$(ticks $sinkpid)
          set -- $("$B" client "$sink" $op $bs "$SECS")
          sticks=$((sticks + $(ticks $sinkpid) - t0)); sops=$((sops + $1))
          [ "$(echo "$2 > $smb" | bc)" = 1 ] && smb=$2
          t0=$(ticks $pid)
          set -- $("$B" client "$a" $op $bs "$SECS")
          dticks=$((dticks + $(ticks $pid) - t0)); dops=$((dops + $1))
          [ "$(echo "$2 > $dmb" | bc)" = 1 ] && dmb=$2
        done
        scpu=$(echo "$sticks * 1000000 / $HZ / $sops" | bc -l)
        dcpu=$(echo "$dticks * 1000000 / $HZ / $dops" | bc -l)
        printf '%-5s %-6s %-5s %-6s %11s %11s %6.0f%% %9.1fus %9.1fus %6.2fx\n' $t $target $op \
          $([ $bs = 4096 ] && echo 4K || echo 1M) "$smb" "$dmb" \
          "$(echo "100 * $dmb / $smb" | bc -l)" "$scpu" "$dcpu" \
          "$(echo "if ($scpu > 0) $dcpu / $scpu else 0" | bc -l)"
      done
    done
  done
done
