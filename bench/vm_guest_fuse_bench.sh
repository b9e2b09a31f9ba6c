# vm_guest_fuse_bench.sh - runs inside the guest (bench/bench_fuse_vm.sh
# boots it via tests/vm/run.sh with fio packed in): `devio serve IMG --fuse
# DIR --loop` over a file on the guest's tmpfs, once with the kernel's FUSE
# ring (enable_uring=Y, set here and restored) and once with the /dev/fuse
# threads (enable_uring=N), fio on the loop device: 4 KiB random reads and
# writes at queue depth 32, 1 MiB sequential reads and writes.  The two
# transports alternate BENCH_REPS (2) times in this one boot.  Prints
# "BENCH VARIANT WORKLOAD REP VALUE CPU_US_PER_IO BUSY_PCT GUEST_US_PER_IO"
# (IOPS for 4 KiB, MiB/s for 1 MiB; the server's user+system CPU per I/O
# from /proc/PID/stat; how busy the guest's CPUs were, and their busy
# time per I/O, from /proc/stat).
. /guest-lib.sh
cd /tmp
PARAM=/sys/module/fuse/parameters/enable_uring
REPS=${BENCH_REPS:-2}
SECS=${BENCH_SECS:-5}
MB=${BENCH_MB:-256}
HZ=100 # USER_HZ: the unit of utime/stime in /proc/PID/stat

if [ ! -e "$PARAM" ]; then
  echo "FAIL fuse-bench (kernel $(uname -r) has no FUSE over io_uring: $PARAM missing)"
  exit 0
fi
orig=$(cat "$PARAM")
command -v fio >/dev/null || { echo "FAIL fuse-bench (no fio in the guest: VM_EXTRA_BINS=fio)"; exit 0; }
dd if=/dev/urandom of=/tmp/fb.img bs=1M count="$MB" 2>/dev/null # every block allocated: reads are real
mkdir -p /tmp/fb

cpu_ticks() { awk '{ print $14 + $15 }' /proc/"$1"/stat; }
# the whole guest's busy and total CPU ticks (every CPU; idle and iowait
# are not busy): is the guest CPU-bound, and how much is the server's?
guest_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# job NAME RW BS DEPTH: one fio run on $LOOP; prints "VALUE IOS".
job() {
  fio --name="$1" --filename="$LOOP" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring --direct=1 \
    --runtime="$SECS" --time_based --ramp_time=1 --size="$((MB - 16))M" --randrepeat=0 --minimal 2>/tmp/fio.err |
    awk -F';' -v bs="$3" '{ r = $8 + $49; kb = $6 + $47; bw = $7 + $48;
      if (bs == "4k") printf "%d %d\n", r, (kb * 1024) / 4096; else printf "%.1f %d\n", bw / 1024, kb / 1024 }'
}

# diag TRANSPORT: what shapes the request flow, once per transport: CPUs,
# the loop device's direct I/O and queue depth, the FUSE connection's
# background limits (fusectl; loop's direct I/O are background requests).
diag() {
  d=/sys/block/${LOOP#/dev/}
  grep -qs fusectl /proc/mounts || mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null
  c=$(ls -d /sys/fs/fuse/connections/[0-9]* 2>/dev/null | tail -n 1)
  echo "INFO $1: cpus online $(cat /sys/devices/system/cpu/online) possible $(cat /sys/devices/system/cpu/possible)," \
    "loop dio $(cat $d/loop/dio 2>/dev/null) nr_requests $(cat $d/queue/nr_requests 2>/dev/null)" \
    "hw queues $(ls $d/mq 2>/dev/null | wc -l), fuse max_background $(cat $c/max_background 2>/dev/null)" \
    "congestion_threshold $(cat $c/congestion_threshold 2>/dev/null)"
}

# run_one VARIANT REP: VARIANT is uring, dev, or uring-NAME / dev-NAME
# whose extra `devio serve` options and environment are in BENCH_VAR_NAME
# (words separated by commas; NAME=VALUE words go to the environment).
run_one() {
  tr=$1 rp=$2 kind=${1%%-*} extra=
  [ "$tr" != "$kind" ] && eval "extra=\${BENCH_VAR_${tr#*-}:-}"
  echo "$([ "$kind" = uring ] && echo Y || echo N)" >"$PARAM"
  rm -f /tmp/fb.out # not the last server's line: the shell truncates it only in the child
  env $(echo "$extra" | tr , "\n" | grep = | tr "\n" " ") devio serve /tmp/fb.img --fuse /tmp/fb --loop \
    $(echo "${BENCH_ARGS:-},$extra" | tr , "\n" | grep -v = | tr "\n" " ") >/tmp/fb.out 2>/tmp/fb.$tr.log &
  SRV=$!
  if ! wait_for 60 grep -q '^/dev/loop' /tmp/fb.out; then
    echo "FAIL fuse-bench ($tr server did not start)"; show_log /tmp/fb.$tr.log; stop_server KILL; return
  fi
  LOOP=$(head -n 1 /tmp/fb.out)
  wait_for 10 sh -c 'devio status >/tmp/fb.status 2>&1 && grep -q "fuse transport" /tmp/fb.status'
  grep -q "fuse transport $([ "$kind" = uring ] && echo io_uring || echo /dev/fuse)" /tmp/fb.status ||
    echo "FAIL fuse-bench ($tr: wrong transport: $(grep 'fuse transport' /tmp/fb.status))"
  [ "$rp" = 1 ] && diag "$tr"
  for w in "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd32 randwrite 4k 32" \
           "seqread-1M read 1M 8" "seqwrite-1M write 1M 8"; do
    set -- $w
    c0=$(cpu_ticks "$SRV") g0=$(guest_ticks)
    out=$(job "$1" "$2" "$3" "$4")
    c1=$(cpu_ticks "$SRV") g1=$(guest_ticks)
    [ -n "$out" ] || { echo "FAIL fuse-bench ($tr $1: fio: $(tail -n 2 /tmp/fio.err | tr '\n' ' '))"; continue; }
    # ramp_time is not counted by fio, but its CPU is: a small overestimate, the same for both
    # fields: value, server CPU us per I/O, guest busy %, guest busy CPU us per I/O
    echo "BENCH $tr $1 $rp ${out%% *} $(awk -v t=$((c1 - c0)) -v n="${out##* }" -v hz=$HZ -v g0="$g0" -v g1="$g1" \
      'BEGIN { split(g0, a, " "); split(g1, b, " "); busy = b[1] - a[1]; all = b[2] - a[2];
        if (n > 0) printf "%.1f %.0f %.1f", t * 1e6 / hz / n, all ? 100 * busy / all : 0, busy * 1e6 / hz / n;
        else print "- - -" }')"
  done
  stop_server TERM
  grep 'requests over the io_uring\|queue [0-9]* served' /tmp/fb.$tr.log | sed "s/^/INFO $tr: /"
}

VARIANTS=$(echo "${BENCH_VARIANTS:-uring,dev}" | tr , " ")
REVERSED=; for v in $VARIANTS; do REVERSED="$v $REVERSED"; done
for rep in $(seq "$REPS"); do # the order alternates: neither side always goes first
  if [ $((rep % 2)) = 1 ]; then order=$VARIANTS; else order=$REVERSED; fi
  for v in $order; do run_one "$v" "$rep"; done
done
echo "$orig" >"$PARAM"
echo "INFO enable_uring restored to $(cat "$PARAM")"
rm -f /tmp/fb.img
