# vm_guest_fuse_bench.sh - runs inside the guest (bench/bench_fuse_vm.sh
# boots it via tests/vm/run.sh with fio packed in): `devio serve IMG --fuse
# DIR --loop` over a file on the guest's tmpfs, once with the kernel's FUSE
# ring (enable_uring=Y, set here and restored) and once with the /dev/fuse
# threads (enable_uring=N), fio on the loop device: 4 KiB random reads and
# writes at queue depth 32, 1 MiB sequential reads and writes.  The two
# transports alternate BENCH_REPS (2) times in this one boot.  Prints
# "BENCH TRANSPORT WORKLOAD REP VALUE CPU_US_PER_IO" (IOPS for 4 KiB, MiB/s
# for 1 MiB; the server's user+system CPU per I/O from /proc/PID/stat).
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

# job NAME RW BS DEPTH: one fio run on $LOOP; prints "VALUE IOS".
job() {
  fio --name="$1" --filename="$LOOP" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring --direct=1 \
    --runtime="$SECS" --time_based --ramp_time=1 --size="$((MB - 16))M" --randrepeat=0 --minimal 2>/tmp/fio.err |
    awk -F';' -v bs="$3" '{ r = $8 + $49; kb = $6 + $47; bw = $7 + $48;
      if (bs == "4k") printf "%d %d\n", r, (kb * 1024) / 4096; else printf "%.1f %d\n", bw / 1024, kb / 1024 }'
}

run_one() { # run_one TRANSPORT REP
  tr=$1 rp=$2
  echo "$([ "$tr" = uring ] && echo Y || echo N)" >"$PARAM"
  rm -f /tmp/fb.out # not the last server's line: the shell truncates it only in the child
  devio serve /tmp/fb.img --fuse /tmp/fb --loop $(echo "${BENCH_ARGS:-}" | tr , " ") >/tmp/fb.out 2>/tmp/fb.$tr.log &
  SRV=$!
  if ! wait_for 60 grep -q '^/dev/loop' /tmp/fb.out; then
    echo "FAIL fuse-bench ($tr server did not start)"; show_log /tmp/fb.$tr.log; stop_server KILL; return
  fi
  LOOP=$(head -n 1 /tmp/fb.out)
  wait_for 10 sh -c 'devio status >/tmp/fb.status 2>&1 && grep -q "fuse transport" /tmp/fb.status'
  grep -q "fuse transport $([ "$tr" = uring ] && echo io_uring || echo /dev/fuse)" /tmp/fb.status ||
    echo "FAIL fuse-bench ($tr: wrong transport: $(grep 'fuse transport' /tmp/fb.status))"
  for w in "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd32 randwrite 4k 32" \
           "seqread-1M read 1M 8" "seqwrite-1M write 1M 8"; do
    set -- $w
    c0=$(cpu_ticks "$SRV")
    out=$(job "$1" "$2" "$3" "$4")
    c1=$(cpu_ticks "$SRV")
    [ -n "$out" ] || { echo "FAIL fuse-bench ($tr $1: fio: $(tail -n 2 /tmp/fio.err | tr '\n' ' '))"; continue; }
    # ramp_time is not counted by fio, but its CPU is: a small overestimate, the same for both
    echo "BENCH $tr $1 $rp ${out%% *} $(awk -v t=$((c1 - c0)) -v n="${out##* }" -v hz=$HZ \
      'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }')"
  done
  stop_server TERM
  grep 'requests over the io_uring\|queue [0-9]* served' /tmp/fb.$tr.log | sed "s/^/INFO $tr: /"
}

for rep in $(seq "$REPS"); do
  if [ $((rep % 2)) = 1 ]; then run_one uring "$rep"; run_one dev "$rep"
  else run_one dev "$rep"; run_one uring "$rep"; fi
done
echo "$orig" >"$PARAM"
echo "INFO enable_uring restored to $(cat "$PARAM")"
rm -f /tmp/fb.img
