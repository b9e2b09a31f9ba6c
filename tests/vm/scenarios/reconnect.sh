# reconnect.sh - attached devices outlive restarts of their remote server:
# `devio attach nbd+unix://... --ublk` (the nbd:// backend behind a ublk
# device) and `devio attach ... --nbd-device --reconnect` (the kernel's nbd
# client, reconfigured with a new socket by the attach process), each
# while the far `devio serve` is killed with SIGKILL and started again on
# the same socket RC_RESTARTS times (default 3) during dd writes; every
# dd succeeds and every byte reads back (sha256).  Sourced by
# tests/vm/guest-tests.sh with /guest-lib.sh's helpers.

type pass >/dev/null 2>&1 || . /guest-lib.sh # run alone (tests/vm/run.sh --script)
RC_RESTARTS=${RC_RESTARTS:-3}

# rc_far_start: `devio serve /tmp/rc.img --nbd unix:/tmp/rc.sock`; sets FAR.
rc_far_start() {
  rm -f /tmp/rc.sock
  devio serve /tmp/rc.img --nbd unix:/tmp/rc.sock >>/tmp/rc-far.log 2>&1 &
  FAR=$!
  wait_for 30 test -S /tmp/rc.sock
}

# rc_sanitizer LOG...: 0 (and the lines shown) when a log holds a sanitizer report.
rc_sanitizer() {
  grep -h -m 5 -E 'AddressSanitizer|LeakSanitizer|runtime error:' "$@" 2>/dev/null | sed 's/^/INFO   | /' | grep .
}

rc_far_kill() {
  kill -KILL "$FAR" 2>/dev/null
  wait "$FAR" 2>/dev/null
}

# rc_rounds DEV NAME: RC_RESTARTS rounds of a 4 MiB dd write (oflag=direct,
# at a new offset each round) with the far server killed and restarted
# meanwhile; then every round's bytes are read back.  0 when all is well.
rc_rounds() {
  _dev=$1; _r=0; _i=0
  while [ $_i -lt "$RC_RESTARTS" ]; do
    dd if=/dev/urandom of=/tmp/rc-pat$_i bs=64k count=64 2>/dev/null
    dd if=/tmp/rc-pat$_i of="$_dev" bs=64k seek=$((_i * 64)) oflag=direct conv=notrunc 2>/tmp/rc-dd.log &
    _dd=$!
    usleep $((100000 + _i * 70000))
    rc_far_kill
    usleep 300000
    rc_far_start || { info "round $_i: far server did not restart"; _r=1; }
    wait $_dd || { info "round $_i: dd failed: $(cat /tmp/rc-dd.log)"; _r=1; }
    _i=$((_i + 1))
  done
  _i=0
  while [ $_i -lt "$RC_RESTARTS" ]; do
    _want=$(sha256sum </tmp/rc-pat$_i | cut -d' ' -f1)
    _got=$(dd if="$_dev" bs=64k skip=$((_i * 64)) count=64 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$_want" = "$_got" ] || { info "round $_i: read back differs"; _r=1; }
    _i=$((_i + 1))
  done
  rm -f /tmp/rc-pat*
  return $_r
}

t=reconnect-ublk
truncate -s 64M /tmp/rc.img
: >/tmp/rc-far.log
if rc_far_start; then
  devio attach "nbd+unix:///?socket=/tmp/rc.sock" --ublk --timeout 60 >/tmp/rc-ublk.log 2>&1 &
  SRV=$!
  if wait_for 60 grep -q 'ublk: /dev/ublkb[0-9]*: ' /tmp/rc-ublk.log; then
    DEV=$(sed -n 's|.*ublk: \(/dev/ublkb[0-9]*\): .*|\1|p' /tmp/rc-ublk.log | head -n 1)
    wait_for 20 test -b "$DEV"
    rc_rounds "$DEV"; r=$?
    lost=$(grep -c 'connection lost' /tmp/rc-ublk.log)
    back=$(grep -c 'reconnected after' /tmp/rc-ublk.log)
    stop_server TERM
    info "$t: $lost losses, $back reconnections seen by the attach process"
    if [ $r -ne 0 ]; then show_log /tmp/rc-ublk.log; fail $t "I/O failed or data differs"
    elif rc_sanitizer /tmp/rc-ublk.log /tmp/rc-far.log; then fail $t "sanitizer report"
    elif [ "$SRV_RC" != 0 ]; then show_log /tmp/rc-ublk.log; fail $t "attach exit $SRV_RC"
    elif [ "$lost" -lt 1 ] || [ "$back" != "$lost" ]; then show_log /tmp/rc-ublk.log; fail $t "losses/reconnections"
    else pass $t; fi
  else
    show_log /tmp/rc-ublk.log; fail $t "attach --ublk did not start"; stop_server KILL
  fi
  rc_far_kill
else
  show_log /tmp/rc-far.log; fail $t "far server did not start"
fi
rm -f /tmp/rc.img

# The kernel's nbd client: attach stays as the monitor (--reconnect), the
# kernel waits dead_conn_timeout for new sockets, which the monitor gives
# with NBD_CMD_RECONFIGURE after each NBD_CMD_LINK_DEAD.  Two connections
# (the file backend allows multi-conn), both lost at each kill.
t=reconnect-nbd-device
truncate -s 64M /tmp/rc.img
if rc_far_start; then
  devio attach "nbd+unix:///?socket=/tmp/rc.sock" --nbd-device /dev/nbd1 --reconnect --timeout 60 \
    >/tmp/rc-nbd.out 2>/tmp/rc-nbd.log &
  MON=$!
  if wait_for 30 grep -q '^/dev/nbd1$' /tmp/rc-nbd.out && wait_for 10 test "$(cat /sys/block/nbd1/size)" -gt 0; then
    rc_rounds /dev/nbd1; r=$?
    back=$(grep -c 'reconnected after' /tmp/rc-nbd.log)
    devio detach /dev/nbd1 >>/tmp/rc-nbd.log 2>&1
    wait_for 20 dead $MON; gone=$?
    info "$t: $back reconnections by the monitor"
    if [ $r -ne 0 ]; then show_log /tmp/rc-nbd.log; fail $t "I/O failed or data differs"
    elif rc_sanitizer /tmp/rc-nbd.log /tmp/rc-far.log; then fail $t "sanitizer report"
    elif [ "$back" -lt 1 ]; then show_log /tmp/rc-nbd.log; fail $t "no reconnection logged"
    elif [ $gone -ne 0 ]; then fail $t "the monitor did not end after detach"; kill -KILL $MON
    else pass $t; fi
  else
    show_log /tmp/rc-nbd.log; fail $t "attach --nbd-device --reconnect failed"; kill -KILL $MON 2>/dev/null
  fi
  rc_far_kill
else
  show_log /tmp/rc-far.log; fail $t "far server did not start"
fi
rm -f /tmp/rc.img

# Past the timeout: with the far server gone for longer than --timeout 3,
# a write to /dev/nbd2 fails (EIO, not a hang), the monitor says so and
# keeps trying; once the server is back the device reads again.
t=reconnect-nbd-device-timeout
truncate -s 64M /tmp/rc.img
if rc_far_start; then
  devio attach "nbd+unix:///?socket=/tmp/rc.sock" --nbd-device /dev/nbd2 --reconnect --timeout 3 \
    >/tmp/rc-nbt.out 2>/tmp/rc-nbt.log &
  MON=$!
  if wait_for 30 grep -q '^/dev/nbd2$' /tmp/rc-nbt.out && wait_for 10 test "$(cat /sys/block/nbd2/size)" -gt 0; then
    dd if=/dev/urandom of=/dev/nbd2 bs=64k count=1 oflag=direct 2>/dev/null; w0=$?
    rc_far_kill
    timeout 90 dd if=/dev/urandom of=/dev/nbd2 bs=64k count=1 seek=10 oflag=direct 2>/tmp/rc-dd.log; w1=$?
    rc_far_start
    wait_for 60 dd if=/dev/nbd2 of=/dev/null bs=4k count=1 skip=20 iflag=direct; back=$?
    devio detach /dev/nbd2 >>/tmp/rc-nbt.log 2>&1
    wait_for 20 dead $MON; gone=$?
    info "$t: write with no server: exit $w1 ($(head -c 120 /tmp/rc-dd.log | tr '\n' ' '))"
    if [ $w0 -ne 0 ]; then fail $t "the first write failed"
    elif [ $w1 -eq 0 ] || [ $w1 -ge 124 ]; then fail $t "want an I/O error, got exit $w1"
    elif ! grep -q 'no server for 3 s' /tmp/rc-nbt.log; then show_log /tmp/rc-nbt.log; fail $t "expiry not logged"
    elif [ $back -ne 0 ]; then show_log /tmp/rc-nbt.log; fail $t "the device did not come back"
    elif [ $gone -ne 0 ]; then fail $t "the monitor did not end after detach"; kill -KILL $MON
    elif rc_sanitizer /tmp/rc-nbt.log /tmp/rc-far.log; then fail $t "sanitizer report"
    else pass $t; fi
  else
    show_log /tmp/rc-nbt.log; fail $t "attach --nbd-device --reconnect failed"; kill -KILL $MON 2>/dev/null
  fi
  rc_far_kill
else
  show_log /tmp/rc-far.log; fail $t "far server did not start"
fi
rm -f /tmp/rc.img
