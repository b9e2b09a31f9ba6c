# vm_guest_fuse_trace.sh - runs inside the guest (bench/trace_fuse_vm.sh
# boots it with the fuse and sched_switch tracepoints enabled on the kernel
# command line): `devio serve IMG --fuse DIR --loop` over a file on tmpfs,
# once per transport (TRACE_TRANSPORTS, default "uring dev"), fio on the
# loop device (TRACE_RW, TRACE_BS, TRACE_QD; default 1 MiB reads at QD8)
# and TRACE_US microseconds of trace (default 1000000) taken in the
# middle of the run by switching tracing_on only (writing an event's
# enable at run time patches kernel text, which TCG may oops on).  Prints
# "INFO TRANSPORT fio: ..." and the trace as "TRACE TRANSPORT LINE".
. /guest-lib.sh
cd /tmp
PARAM=/sys/module/fuse/parameters/enable_uring
T=/sys/kernel/tracing
mount -t tracefs nodev $T 2>/dev/null
if [ ! -e "$PARAM" ] || [ ! -d $T/events/fuse ]; then
  echo "FAIL fuse-trace (kernel $(uname -r): no FUSE over io_uring or no fuse tracepoints)"
  exit 0
fi
orig=$(cat "$PARAM")
dd if=/dev/urandom of=/tmp/ft.img bs=1M count=256 2>/dev/null
mkdir -p /tmp/ft
for tr in ${TRACE_TRANSPORTS:-uring dev}; do
  echo "$([ "$tr" = uring ] && echo Y || echo N)" >"$PARAM"
  rm -f /tmp/ft.out
  devio serve /tmp/ft.img --fuse /tmp/ft --loop >/tmp/ft.out 2>/tmp/ft.$tr.log &
  SRV=$!
  if ! wait_for 60 grep -q '^/dev/loop' /tmp/ft.out; then
    echo "FAIL fuse-trace ($tr server did not start)"; show_log /tmp/ft.$tr.log; stop_server KILL; continue
  fi
  LOOP=$(head -n 1 /tmp/ft.out)
  echo 0 > $T/tracing_on
  echo > $T/trace
  fio --name=t --filename="$LOOP" --rw="${TRACE_RW:-read}" --bs="${TRACE_BS:-1M}" --iodepth="${TRACE_QD:-8}" \
    --ioengine=io_uring --direct=1 --runtime=3 --time_based --size=240M --minimal >/tmp/fio.out 2>&1 &
  FIO=$!
  sleep 1
  echo 1 > $T/tracing_on
  usleep "${TRACE_US:-1000000}"
  echo 0 > $T/tracing_on
  wait $FIO
  info "$tr fio: $(awk -F';' '{ printf "%d IOPS %.1f MiB/s", $8, $7 / 1024 }' /tmp/fio.out)"
  grep -v '^#' $T/trace | sed "s/^/TRACE $tr /"
  stop_server TERM
  grep 'queue [0-9]* served' /tmp/ft.$tr.log | sed "s/^/INFO $tr: /"
done
echo "$orig" >"$PARAM"
rm -f /tmp/ft.img
