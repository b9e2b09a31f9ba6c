# fuse-uring.sh - FUSE over io_uring in the guest kernel (sourced by
# tests/vm/guest-tests.sh; alone: tests/vm/run.sh --script THIS_FILE).
# `devio serve IMG --fuse DIR --loop` with the kernel's enable_uring set by
# this test (never by the server): the ring transport is the default and
# carries the requests (devio status and the exit summary say so), raw
# bytes and an ext4 round trip through the loop device; with enable_uring
# off the same runs over the /dev/fuse threads.  A kernel without the
# parameter (FUSE-over-io_uring came in 6.14) is reported as not
# applicable, after checking that auto really falls back to /dev/fuse.
. /guest-lib.sh
cd /tmp

FU_PARAM=/sys/module/fuse/parameters/enable_uring

# fu_serve LOG IMG: devio serve IMG --fuse /tmp/fu --loop; sets SRV and LOOP.
fu_serve() {
  LOOP=
  mkdir -p /tmp/fu
  rm -f /tmp/fu.out # never the previous server's line (the redirect truncates it in the child)
  devio serve "$2" --fuse /tmp/fu --loop >/tmp/fu.out 2>"$1" &
  SRV=$!
  wait_for 60 grep -q '^/dev/loop' /tmp/fu.out || { show_log "$1"; return 1; }
  LOOP=$(head -n 1 /tmp/fu.out)
  wait_for 10 test -b "$LOOP"
}

# fu_check NAME LOG TRANSPORT: raw bytes through the loop device, an ext4
# round trip, SIGTERM; then the transport in `devio status` and in the
# exit summary, and fsck of the image.  Prints PASS/FAIL NAME.
fu_check() {
  _t=$1 _log=$2 _tr=$3 _why=
  wait_for 10 sh -c 'devio status >/tmp/fu.status 2>&1 && grep -q "fuse transport" /tmp/fu.status' # written once serving
  dd if=/dev/urandom of=/tmp/fu.pat bs=1M count=16 2>/dev/null
  /usr/bin/dd if=/tmp/fu.pat of="$LOOP" bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || _why="direct write failed"
  echo 3 >/proc/sys/vm/drop_caches
  _got=$(/usr/bin/dd if="$LOOP" bs=1M skip=8 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$_got" = "$(sha256sum </tmp/fu.pat | cut -d' ' -f1)" ] || _why=${_why:-"bytes read back differ (sha256)"}
  fs_roundtrip "$LOOP" || _why=${_why:-"ext4 round trip"}
  stop_server TERM
  _ring=$(sed -n 's/.* \([0-9]*\) requests over the io_uring, \([0-9]*\) over \/dev\/fuse.*/\1/p' "$_log" | tail -n 1)
  _dev=$(sed -n 's/.* \([0-9]*\) requests over the io_uring, \([0-9]*\) over \/dev\/fuse.*/\2/p' "$_log" | tail -n 1)
  info "$_t: ${_ring:-?} requests over the io_uring, ${_dev:-?} over /dev/fuse; $(grep 'fuse transport' /tmp/fu.status)"
  if [ -n "$_why" ]; then fail "$_t" "$_why"; show_log "$_log"
  elif [ "$SRV_RC" != 0 ]; then fail "$_t" "server exit $SRV_RC"; show_log "$_log"
  elif ! grep -q "fuse transport $_tr" /tmp/fu.status; then fail "$_t" "devio status does not say $_tr"; cat /tmp/fu.status
  elif [ "$_tr" = io_uring ] && { [ "${_ring:-0}" -lt 100 ] || [ "${_ring:-0}" -lt $((${_dev:-0} * 10)) ]; }; then
    fail "$_t" "only ${_ring:-0} requests went over the ring (${_dev:-?} over /dev/fuse)"
  elif [ "$_tr" = /dev/fuse ] && [ "${_ring:-1}" != 0 ]; then fail "$_t" "${_ring:-?} requests went over the ring"
  elif grep -q ' /tmp/fu ' /proc/mounts; then fail "$_t" "the FUSE mount was left behind"
  elif ! e2fsck -fn /tmp/fu.img >/tmp/fu.fsck 2>&1; then fail "$_t" "image fails fsck"; tail -n 5 /tmp/fu.fsck
  else pass "$_t"; fi
}

if [ -e "$FU_PARAM" ]; then
  fu_orig=$(cat "$FU_PARAM")
  info "fuse-uring: this kernel has FUSE over io_uring ($FU_PARAM was $fu_orig)"

  t=fuse-uring-ring
  echo Y >"$FU_PARAM"
  truncate -s 96M /tmp/fu.img
  if fu_serve /tmp/fu.log /tmp/fu.img; then
    if ! grep -q 'over io_uring' /tmp/fu.log; then
      fail $t "auto did not take the ring with enable_uring on"; show_log /tmp/fu.log; stop_server TERM
    else
      fu_check $t /tmp/fu.log io_uring
    fi
  else
    fail $t "server did not start"; stop_server KILL
  fi
  rm -f /tmp/fu.img

  t=fuse-uring-off-threads
  echo N >"$FU_PARAM"
  truncate -s 96M /tmp/fu.img
  if fu_serve /tmp/fu2.log /tmp/fu.img; then
    fu_check $t /tmp/fu2.log /dev/fuse
  else
    fail $t "server did not start"; stop_server KILL
  fi
  rm -f /tmp/fu.img

  echo "$fu_orig" >"$FU_PARAM"
  t=fuse-uring-param-restored
  if [ "$(cat "$FU_PARAM")" = "$fu_orig" ]; then pass $t; else fail $t "enable_uring is $(cat "$FU_PARAM"), was $fu_orig"; fi
else
  # No parameter: no FUSE-over-io_uring in this kernel.  auto must still
  # work over /dev/fuse, and --fuse-transport uring must refuse clearly.
  t=fuse-uring-ring
  truncate -s 96M /tmp/fu.img
  if fu_serve /tmp/fu.log /tmp/fu.img; then
    fu_check fuse-dev-threads /tmp/fu.log /dev/fuse
  else
    fail fuse-dev-threads "server did not start"; stop_server KILL
  fi
  rm -f /tmp/fu.img
  truncate -s 16M /tmp/fu.img
  devio serve /tmp/fu.img --fuse /tmp/fu --fuse-transport uring >/dev/null 2>/tmp/fu3.log &
  SRV=$!
  if wait_for 30 dead $SRV; then
    wait $SRV; rc=$?
    if [ $rc -ne 0 ] && grep -q 'FUSE over io_uring off' /tmp/fu3.log; then
      pass $t
      info "$t: not applicable: kernel $(uname -r) has no $FU_PARAM (FUSE over io_uring is 6.14+); --fuse-transport uring refused: $(grep -o 'the kernel has.*' /tmp/fu3.log | head -n 1)"
    else
      fail $t "--fuse-transport uring without kernel support: exit $rc"; show_log /tmp/fu3.log
    fi
  else
    fail $t "--fuse-transport uring kept running on a kernel without it"; stop_server KILL
  fi
  grep -q ' /tmp/fu ' /proc/mounts && umount /tmp/fu
  rm -f /tmp/fu.img
fi
rm -f /tmp/fu.pat /tmp/fu.out
