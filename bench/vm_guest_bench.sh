# vm_guest_bench.sh - runs inside the guest (bench/bench_vm.sh boots it via
# tests/vm/run.sh): the same workloads on a loop device over a tmpfs
# file, ublk over that same file (zero copy where the kernel has it, user
# copy, kernel copy) and over the RAM backend, and the kernel nbd client
# on devio's NBD server of that file; plus the ublk server's io_uring_enter
# calls per request, and (where the kernel offers UBLK_F_BATCH_IO) the
# batched commands against the per-tag ones (--ublk-batch off) for the
# zero-copy file and the RAM disk.  BENCH_SET=batch runs only the loop
# device and those four.  Sequential 1 MiB and 4 KiB QD1 with coreutils dd,
# 4 KiB random QD32 with fio (io_uring, direct) when it was packed
# (VM_EXTRA_BINS=fio).  Each figure is the best of BENCH_REPS (3) runs.
# Prints "BENCH DEVICE WORKLOAD MiB/s" and "BENCH-SYSCALLS ..." lines for
# the host to tabulate.
. /guest-lib.sh
DD=/usr/bin/dd        # coreutils dd: iflag/oflag=direct and a timing line
MB=${BENCH_MB:-128}
cd /tmp

# dd_rate ARGS...: MiB/s of one coreutils dd run.
dd_rate() {
  "$DD" "$@" 2>&1 | awk -F', ' '/copied/ { split($(NF-1), t, " "); split($1, b, " ");
    if (t[1] > 0) printf "%.1f\n", b[1] / t[1] / 1048576; else print "0" }'
}

# now_cs: uptime in centiseconds.
now_cs() { awk '{ split($1, a, "."); print a[1] * 100 + a[2] }' /proc/uptime; }

# par_read DEV: four direct 4 KiB readers at once; MiB/s over all.
par_read() {
  _n=2048; _t0=$(now_cs)
  for _i in 0 1 2 3; do
    "$DD" if="$1" of=/dev/null bs=4k count=$_n skip=$((_i * _n)) iflag=direct 2>/dev/null &
  done
  wait
  _t1=$(now_cs)
  awk -v n=$((4 * _n)) -v cs=$((_t1 - _t0)) 'BEGIN { if (cs < 1) cs = 1; printf "%.1f\n", n * 4096 / 1048576 / (cs / 100) }'
}

REPS=${BENCH_REPS:-3}

# best CMD...: the highest of $REPS results of CMD (host load only slows
# a TCG guest down, so the best run is the least disturbed one).
best() {
  _b=0
  for _k in $(seq $REPS); do
    _v=$("$@")
    _b=$(awk -v a="$_b" -v b="${_v:-0}" 'BEGIN { print (b > a ? b : a) }')
  done
  echo "$_b"
}

# fio_rate RW BS QD DEV: MiB/s of one fio run (direct, io_uring), 5 s.
fio_rate() {
  fio --name=b --filename="$4" --rw="$1" --bs="$2" --iodepth="$3" --ioengine=io_uring --direct=1 \
    --size=${MB}M --runtime=5 --time_based --group_reporting --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' 'NF > 50 { r = $7 + $48; printf "%.1f\n", r / 1024 }' # read + write KiB/s
}

run_workloads() { # run_workloads NAME DEV
  echo "BENCH $1 seq-write-1M $(best dd_rate if=/dev/zero of="$2" bs=1M count=$MB oflag=direct)"
  echo "BENCH $1 seq-read-1M $(best dd_rate if="$2" of=/dev/null bs=1M count=$MB iflag=direct)"
  echo "BENCH $1 read-4k-qd1 $(best dd_rate if="$2" of=/dev/null bs=4k count=4096 iflag=direct)"
  echo "BENCH $1 read-4k-4jobs $(best par_read "$2")"
  if command -v fio >/dev/null; then
    echo "BENCH $1 randread-4k-qd32 $(best fio_rate randread 4k 32 "$2")"
    echo "BENCH $1 randwrite-4k-qd32 $(best fio_rate randwrite 4k 32 "$2")"
  fi
}

syscalls() { # syscalls NAME LOG: io_uring_enter per request from the exit summary
  awk -v name="$1" '/queue [0-9]+ served/ { for (i = 1; i <= NF; i++) {
      if ($i == "served") s += $(i + 1); if ($i == "io_uring_enter") e += $(i + 1);
      if ($i == "copy_syscalls") c += $(i + 1); if ($i == "zero_copy") z += $(i + 1);
      if ($i == "commit_cmds") k += $(i + 1);
      if ($i == "max_batch" && $(i + 1) > m) m = $(i + 1) } }
    END { if (s) printf "BENCH-SYSCALLS %s requests %d io_uring_enter %d (%.3f per request) copy pread/pwrite %d (%.3f per request) zero-copy %d commit commands %d (%.3f per request) max-batch %d\n", name, s, e, e / s, c, c / s, z, k, k / s, m }' "$2"
}

# ublk_row NAME LOG SOURCE ARGS...: one ublk device's workloads and calls.
# (its own variable names: the workload helpers use _n and friends)
ublk_row() {
  _ur_name=$1 _ur_log=$2; shift 2
  if start_ublk "$_ur_log" "$@" --ublk --queues 2; then
    run_workloads "$_ur_name" "$DEV"
    stop_server TERM
    syscalls "$_ur_name" "$_ur_log"
  else
    echo "BENCH $_ur_name failed: $(grep error "$_ur_log" | head -n 1)"
  fi
}

# One tmpfs file, written through once so that reads find pages, behind
# every device below.
IMG=/tmp/bench.img
dd if=/dev/urandom of=$IMG bs=1M count=$MB 2>/dev/null

# loop device over the file: the in-kernel reference
LOOP=$(/usr/bin/losetup -f --show $IMG)
run_workloads loop "$LOOP"
/usr/bin/losetup -d "$LOOP"

# ublk over the same file: zero copy (the best mode this kernel has for a
# plain file: auto-buf-reg on 7.x), user copy, kernel copy; the default
# commands (batch where offered), and the per-tag ones for comparison
SET=${BENCH_SET:-all}
ublk_row ublk-file-zero /tmp/u.log $IMG --ublk-copy zero
BATCH=0
grep -q 'ublk: commands: batch' /tmp/u.log && BATCH=1
[ $BATCH = 1 ] && ublk_row ublk-file-zero-pertag /tmp/u.log $IMG --ublk-copy zero --ublk-batch off
if [ "$SET" = all ]; then
  ublk_row ublk-file-user /tmp/u.log $IMG --ublk-copy user
  ublk_row ublk-file-kernel /tmp/u.log $IMG --ublk-copy kernel
fi
ublk_row ublk-ram /tmp/r.log ram:${MB}M
[ $BATCH = 1 ] && ublk_row ublk-ram-pertag /tmp/r.log ram:${MB}M --ublk-batch off
[ "$SET" = all ] || { rm -f $IMG; exit 0; }

devio serve $IMG --nbd unix:/tmp/b.sock >/tmp/n.log 2>&1 &
SRV=$!
if wait_for 30 test -S /tmp/b.sock &&
   devio attach "nbd+unix:///?socket=/tmp/b.sock" --nbd-device /dev/nbd0 --connections 2 >/tmp/a.log 2>&1; then
  run_workloads kernel-nbd /dev/nbd0
  devio detach /dev/nbd0 >/dev/null 2>&1
else
  echo "BENCH kernel-nbd failed"
fi
stop_server TERM
rm -f $IMG
