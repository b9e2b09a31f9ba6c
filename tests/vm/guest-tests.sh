# guest-tests.sh - the scenarios run inside the guest kernel (see
# tests/vm/run.sh and docs/testing-vm.md).  Each prints PASS/FAIL NAME.
. /guest-lib.sh
cd /tmp

# ublk over the file backend: a file system round trip, then the image
# itself checks clean, and the device is gone after SIGTERM.
t=ublk-file-fs
truncate -s 64M /tmp/u.img
if start_ublk /tmp/u.log /tmp/u.img --ublk --queues 2; then
  fs_roundtrip "$DEV"; r=$?
  stop_server TERM
  if [ $r -ne 0 ]; then fail $t "file system round trip"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
  elif [ -e "$DEV" ] || [ -e /sys/block/${DEV#/dev/} ]; then fail $t "$DEV left behind"
  elif ! e2fsck -fn /tmp/u.img >/dev/null 2>&1; then fail $t "image fails fsck"
  else pass $t; fi
  grep 'ublk' /tmp/u.log | sed 's/^/INFO /'
else
  fail $t "server did not start"; stop_server KILL
fi
rm -f /tmp/u.img

# ublk over an image on ext4, whose page cache io_uring reads without a
# worker (on tmpfs the backend reads synchronously): with the cache
# dropped, the file backend's reads go on the queue's own ring (one ring,
# no hand-off), counted as backend_ios_on_ring in the exit summary; the
# bytes read with O_DIRECT are the image's, and so are those written.
t=ublk-file-on-ring
truncate -s 96M /tmp/e.img
EL=$(/usr/bin/losetup -f --show /tmp/e.img 2>/dev/null)
mkdir -p /tmp/e
if [ -n "$EL" ] && mkfs.ext4 -q -F "$EL" >/dev/null 2>&1 && mount -t ext4 "$EL" /tmp/e; then
  dd if=/dev/urandom of=/tmp/e/img bs=1M count=32 2>/dev/null
  dd if=/dev/urandom of=/tmp/e.patch bs=1M count=4 2>/dev/null
  sync; echo 3 >/proc/sys/vm/drop_caches
  if start_ublk /tmp/e.log /tmp/e/img --ublk --queues 2; then
    r=
    want=$(sha256sum </tmp/e/img | cut -d' ' -f1)
    echo 3 >/proc/sys/vm/drop_caches
    got=$(/usr/bin/dd if="$DEV" bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || r="direct read differs"
    /usr/bin/dd if=/tmp/e.patch of="$DEV" bs=1M seek=3 oflag=direct conv=fsync 2>/dev/null || r=${r:-"direct write failed"}
    echo 3 >/proc/sys/vm/drop_caches
    got=$(/usr/bin/dd if="$DEV" bs=1M skip=3 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$got" = "$(sha256sum </tmp/e.patch | cut -d' ' -f1)" ] || r=${r:-"written bytes differ"}
    stop_server TERM
    n=$(sed -n 's/.*backend_ios_on_ring \([0-9]*\).*/\1/p' /tmp/e.log | awk '{s += $1} END {print s + 0}')
    if [ -n "$r" ]; then fail $t "$r"
    elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
    elif [ "$n" -eq 0 ]; then fail $t "no backend I/O went on the queue rings"
    else pass $t; fi
    info "$t: $n backend I/Os on the queue rings"
  else
    fail $t "server did not start"; stop_server KILL
  fi
  umount /tmp/e
else
  fail $t "no ext4 on a loop device"
fi
[ -n "$EL" ] && /usr/bin/losetup -d "$EL"
rm -f /tmp/e.img /tmp/e.patch

# ublk over ram:, the driver copying into our buffers (classic mode).
t=ublk-ram-fs
if start_ublk /tmp/r.log ram:64M --ublk=kernel-copy --queues 2; then
  fs_roundtrip "$DEV"; r=$?
  stop_server TERM
  if [ $r -ne 0 ]; then fail $t "file system round trip"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
  elif [ -e "$DEV" ]; then fail $t "$DEV left behind"
  else pass $t; fi
else
  fail $t "server did not start"; cat /tmp/r.log; stop_server KILL
fi

# blkdiscard on the device punches holes in the image file.
t=ublk-discard-file
truncate -s 64M /tmp/d.img
if start_ublk /tmp/d.log /tmp/d.img --ublk; then
  dd if=/dev/urandom of="$DEV" bs=1M count=16 conv=fsync 2>/dev/null
  before=$(stat -c %b /tmp/d.img)
  /usr/bin/blkdiscard "$DEV"; rd=$?
  sync
  after=$(stat -c %b /tmp/d.img)
  stop_server TERM
  info "$t: image blocks before $before after $after (blkdiscard rc $rd)"
  if [ $rd -ne 0 ]; then fail $t "blkdiscard failed"; show_log /tmp/d.log
  elif [ "$before" -lt 16384 ]; then fail $t "writes did not reach the image ($before blocks)"
  elif [ "$after" -gt $((before / 4)) ]; then fail $t "no holes: $before -> $after blocks"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
rm -f /tmp/d.img

# blkdiscard on a RAM disk gives the memory back.
t=ublk-discard-ram
if start_ublk /tmp/dr.log ram:64M --ublk; then
  dd if=/dev/urandom of="$DEV" bs=1M count=32 conv=fsync 2>/dev/null
  before=$(vm_rss_kb "$SRV")
  /usr/bin/blkdiscard "$DEV"; rd=$?
  usleep 300000
  after=$(vm_rss_kb "$SRV")
  stop_server TERM
  info "$t: server RSS before ${before} KiB after ${after} KiB (blkdiscard rc $rd)"
  if [ $rd -ne 0 ]; then fail $t "blkdiscard failed"
  elif [ $((before - after)) -lt 16384 ]; then fail $t "RSS did not shrink: $before -> $after KiB"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi

# Two queues busy at once: readers pinned to each CPU; both queue threads
# must have served requests.
t=ublk-two-queues
if start_ublk /tmp/q.log ram:64M --ublk --queues 2; then
  taskset -c 0 dd if="$DEV" of=/dev/null bs=64k count=400 2>/dev/null &
  p0=$!
  taskset -c 1 dd if="$DEV" of=/dev/null bs=64k skip=500 count=400 2>/dev/null &
  p1=$!
  wait $p0; r0=$?
  wait $p1; r1=$?
  stop_server TERM
  q0=$(counter /tmp/q.log 0); q1=$(counter /tmp/q.log 1)
  info "$t: queue 0 served ${q0:-?}, queue 1 served ${q1:-?}"
  if [ $r0 -ne 0 ] || [ $r1 -ne 0 ]; then fail $t "readers failed ($r0/$r1)"
  elif [ "${q0:-0}" -eq 0 ] || [ "${q1:-0}" -eq 0 ]; then fail $t "a queue served nothing ($q0/$q1)"
  else pass $t; fi
  grep 'served' /tmp/q.log | sed 's/^/INFO /'
else
  fail $t "server did not start"; stop_server KILL
fi

# The legacy (plain number) opcodes, as a pre-6.5 driver needs them, in
# kernel-copy mode: what is written reads back.
t=ublk-legacy-opcodes
if start_ublk /tmp/l.log ram:16M --ublk=kernel-copy,legacy-opcodes; then
  dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
  dd if=/tmp/pattern of="$DEV" bs=1M conv=fsync 2>/dev/null; wr=$?
  echo 3 >/proc/sys/vm/drop_caches
  back=$(dd if="$DEV" bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1)
  want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
  stop_server TERM
  if ! grep -q 'legacy opcodes' /tmp/l.log; then fail $t "legacy opcodes not in use"; show_log /tmp/l.log
  elif [ $wr -ne 0 ] || [ "$back" != "$want" ]; then fail $t "data did not read back"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
rm -f /tmp/pattern

# A read-only export: reads serve the image, writes fail, and the kernel
# marks the disk read-only.
t=ublk-readonly
dd if=/dev/urandom of=/tmp/ro.img bs=1M count=8 2>/dev/null
if start_ublk /tmp/ro.log /tmp/ro.img -r --ublk; then
  back=$(dd if="$DEV" bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
  want=$(sha256sum </tmp/ro.img | cut -d' ' -f1)
  ro=$(cat /sys/block/${DEV#/dev/}/ro)
  dd if=/dev/zero of="$DEV" bs=4k count=1 conv=fsync 2>/dev/null; wr=$?
  stop_server TERM
  if [ "$back" != "$want" ]; then fail $t "read back differs from the image"
  elif [ "$ro" != 1 ]; then fail $t "disk not marked read-only"
  elif [ $wr -eq 0 ]; then fail $t "a write succeeded"
  elif [ "$(sha256sum </tmp/ro.img | cut -d' ' -f1)" != "$want" ]; then fail $t "image changed"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
rm -f /tmp/ro.img

# SIGTERM with I/O in flight: the server still stops cleanly (exit 0, the
# device deleted) within a bounded time, and the writer sees the error.
t=ublk-stop-under-load
if start_ublk /tmp/s.log ram:64M --ublk --queues 2; then
  ( while :; do /usr/bin/dd if=/dev/zero of="$DEV" bs=64k count=512 conv=fsync,nocreat 2>/dev/null || exit 1; done ) &
  writer=$!
  sleep 2
  kill -TERM "$SRV"
  if wait_for 60 dead "$SRV"; then
    wait "$SRV"; rc=$?
    wait_for 60 dead $writer || kill -KILL $writer
    wait $writer; wrc=$?
    id=${DEV#/dev/ublkb}
    if [ $rc -ne 0 ]; then fail $t "server exit $rc"; show_log /tmp/s.log
    elif [ $wrc -eq 0 ]; then fail $t "writer did not see an error"
    elif [ -e /dev/ublkc$id ] || [ -e /sys/block/ublkb$id ]; then fail $t "device left behind"
    else pass $t; fi
  else
    fail $t "server still running 60 s after SIGTERM"; show_log /tmp/s.log
    stop_server KILL; kill -KILL $writer; vmtool ublk-del "$DEV"
  fi
else
  fail $t "server did not start"; stop_server KILL
fi

# kill -9 with I/O in flight: the I/O fails within a bounded time and the
# device can be removed by another process.
t=ublk-kill9
if start_ublk /tmp/k.log ram:64M --ublk; then
  ( while :; do /usr/bin/dd if=/dev/urandom of="$DEV" bs=64k count=256 conv=fsync,nocreat 2>/dev/null || exit 1; done ) &
  writer=$!
  sleep 2
  kill -KILL "$SRV"; wait "$SRV" 2>/dev/null
  if wait_for 60 dead $writer; then
    wait $writer; wrc=$?
    id=${DEV#/dev/ublkb}
    devio detach "$DEV" >/tmp/del.log 2>&1; drc=$?
    if [ $wrc -eq 0 ]; then fail $t "writer did not see an error"
    elif [ $drc -ne 0 ]; then cat /tmp/del.log; fail $t "delete failed"
    elif ! wait_for 10 test ! -e /dev/ublkc$id; then fail $t "/dev/ublkc$id left behind"
    elif ! wait_for 10 test ! -e /sys/block/ublkb$id; then fail $t "ublkb$id left behind"
    else pass $t; fi
  else
    kill -KILL $writer; fail $t "I/O still hanging 60 s after the server died"
    vmtool ublk-del "$DEV"
  fi
else
  fail $t "server did not start"; stop_server KILL
fi

# Feature detection: the server logs once what the driver offers and the
# data path it took (user copy on 6.5+), and `devio status` says it too.
t=ublk-features
if start_ublk /tmp/f.log ram:16M --ublk; then
  wait_for 10 devio status >/tmp/fs.out 2>&1
  devio status >/tmp/fs.out 2>&1
  stop_server TERM
  grep 'driver features' /tmp/f.log | sed 's/^/INFO /'
  if [ "$(grep -c 'ublk: driver features' /tmp/f.log)" != 1 ]; then fail $t "features not logged once"
  elif ! grep -q 'data path: user copy' /tmp/f.log; then fail $t "user copy not chosen"
  elif ! grep -q "ublk $DEV data path: user copy" /tmp/fs.out; then cat /tmp/fs.out; fail $t "devio status does not say the data path"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi

# Recovery (RECOVER_N kill -9 / --recover cycles, default 5; the issue's
# figure is 20: VM_ENV=RECOVER_N=20): ext4 on a --recovery device, a writer
# rewriting files with known patterns, each write fsync'd, never stopping
# while the server is killed and taken over.  No write may fail, every
# file must hold the pattern of its last acknowledged write, fsck clean;
# `devio detach` refuses while it is mounted and works after.
RN=${RECOVER_N:-5}
for v in 0 1 2 3; do dd if=/dev/urandom of=/tmp/pat$v bs=64k count=8 2>/dev/null; done
t=ublk-recover-ext4
truncate -s 128M /tmp/rc.img
if start_ublk /tmp/rc.log /tmp/rc.img --ublk --queues 2 --recovery && mkfs.ext4 -q -F "$DEV" >/dev/null 2>&1 &&
   mount -t ext4 "$DEV" /mnt; then
  id=${DEV#/dev/ublkb}
  fsync_writer /tmp/rc /tmp/pat
  recover_cycles "$RN" /tmp/rc.log /tmp/rc.img "$id" /tmp/rc.prog; rr=$?
  stop_writer /tmp/rc; wrc=$WRITER_RC
  sync; echo 3 >/proc/sys/vm/drop_caches
  bad=$(files_wrong /tmp/rc /tmp/pat)
  devio detach "$DEV" >/tmp/rcd.log 2>&1; busy=$?
  umount /mnt
  e2fsck -fn "$DEV" >/tmp/rc.fsck 2>&1; fsck=$?
  devio detach "$DEV" >>/tmp/rcd.log 2>&1; drc=$?
  wait_for 60 dead $SRV; wait $SRV; SRV_RC=$?
  info "$t: $RN takeovers, $(grep -c '^[0-9]' /tmp/rc.prog) fsync'd writes, $bad files wrong"
  if [ $rr -ne 0 ]; then fail $t "$RECOVER_ERR"
  elif [ $wrc -ne 0 ]; then fail $t "a write failed: $(grep ERR /tmp/rc.prog) $(cat /tmp/rc.dd)"
  elif [ $bad -ne 0 ]; then fail $t "$bad files differ from their last acknowledged write"
  elif [ $busy -eq 0 ]; then fail $t "detach did not refuse a mounted device"
  elif [ $fsck -ne 0 ]; then cat /tmp/rc.fsck; fail $t "fsck"
  elif [ $drc -ne 0 ]; then cat /tmp/rcd.log; fail $t "detach after umount failed"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC after detach"; show_log /tmp/rc.log.$((RN - 1))
  elif [ -e /sys/block/ublkb$id ]; then fail $t "ublkb$id left behind"
  else pass $t; fi
  sed 's/^/INFO detach: /' /tmp/rcd.log
else
  fail $t "server did not start or no ext4"; show_log /tmp/rc.log; umount /mnt 2>/dev/null; stop_server KILL
  vmtool ublk-del "$DEV" 2>/dev/null
fi
rm -f /tmp/rc.img /tmp/rc.log.*

# Recovery on the raw device: a writer puts 64 KiB blocks of known
# patterns (O_DIRECT) and reads each back at once while the server is
# killed and taken over RECOVER_N times; then every block is checked
# against its last acknowledged write.
t=ublk-recover-verify
truncate -s 32M /tmp/rv.img
for v in 0 1 2 3; do dd if=/dev/urandom of=/tmp/big$v bs=64k count=127 2>/dev/null; done
if start_ublk /tmp/rv.log /tmp/rv.img --ublk --recovery; then
  id=${DEV#/dev/ublkb}
  direct_writer /tmp/rv /tmp/big "$DEV"
  recover_cycles "$RN" /tmp/rv.log /tmp/rv.img "$id" /tmp/rv.prog; rr=$?
  stop_writer /tmp/rv; wrc=$WRITER_RC
  blocks_wrong /tmp/rv /tmp/big "$DEV"; bad=$BLOCKS_BAD n=$BLOCKS_N
  stop_server TERM
  info "$t: $RN takeovers, $(grep -c '^[0-9]' /tmp/rv.prog) blocks written and read back, $n blocks verified at the end, $bad wrong"
  if [ $rr -ne 0 ]; then fail $t "$RECOVER_ERR"
  elif [ $wrc -ne 0 ]; then fail $t "$(grep ERR /tmp/rv.prog)"
  elif [ $bad -ne 0 ] || [ $n -eq 0 ]; then fail $t "$bad of $n blocks differ from their last acknowledged write"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
rm -f /tmp/rv.img /tmp/rv.log.* /tmp/big? /tmp/pat?

# --recovery=fail-io (6.13+): with the server dead the device stays but I/O
# fails at once instead of waiting; after --recover it works again.  A
# kernel without UBLK_F_USER_RECOVERY_FAIL_IO must refuse it clearly.
t=ublk-recover-fail-io
truncate -s 16M /tmp/fi.img
devio serve /tmp/fi.img --ublk --recovery=fail-io >/tmp/fi.log 2>&1 &
SRV=$!
if wait_for 30 grep -q 'ublk: /dev/ublkb[0-9]*: \|no UBLK_F_USER_RECOVERY_FAIL_IO' /tmp/fi.log; then
  if grep -q 'no UBLK_F_USER_RECOVERY_FAIL_IO' /tmp/fi.log; then
    wait_for 30 dead $SRV; wait $SRV; rc=$?
    if [ $rc -ne 0 ]; then pass $t; info "$t: refused on this kernel: $(grep FAIL_IO /tmp/fi.log)"
    else fail $t "server went on without FAIL_IO"; fi
  else
    DEV=$(sed -n 's|.*ublk: \(/dev/ublkb[0-9]*\): .*|\1|p' /tmp/fi.log | head -n 1); id=${DEV#/dev/ublkb}
    dd if=/dev/urandom of=/tmp/fi.pat bs=64k count=4 2>/dev/null
    /usr/bin/dd if=/tmp/fi.pat of="$DEV" bs=64k oflag=direct 2>/dev/null; w1=$?
    kill -KILL $SRV; wait $SRV 2>/dev/null
    sleep 1
    /usr/bin/dd if="$DEV" of=/dev/null bs=64k count=1 iflag=direct 2>/dev/null; dead_rc=$?
    test -b "$DEV"; still=$?
    if start_ublk /tmp/fi2.log /tmp/fi.img --ublk=$id --recover; then
      /usr/bin/dd if="$DEV" of=/tmp/fi.got bs=64k count=4 iflag=direct 2>/dev/null
      cmp -s /tmp/fi.pat /tmp/fi.got; same=$?
      stop_server TERM
      if [ $w1 -ne 0 ]; then fail $t "first write failed"
      elif [ $still -ne 0 ]; then fail $t "device gone with its server"
      elif [ $dead_rc -eq 0 ]; then fail $t "read succeeded with no server"
      elif [ $same -ne 0 ]; then fail $t "data differs after takeover"
      elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
      else pass $t; fi
    else
      fail $t "takeover failed"; show_log /tmp/fi2.log; vmtool ublk-del "$DEV"
    fi
  fi
else
  fail $t "server did not start"; show_log /tmp/fi.log; stop_server KILL
fi
rm -f /tmp/fi.img /tmp/fi.pat /tmp/fi.got

# ublk in front of a remote backend: a second devio server's NBD export
# (its client backend completes on its own threads), file-system round
# trip, then the image behind both passes fsck.
t=ublk-over-nbd-remote
truncate -s 64M /tmp/x.img
devio serve /tmp/x.img --nbd unix:/tmp/x.sock >/tmp/x.log 2>&1 &
XSRV=$!
if wait_for 30 test -S /tmp/x.sock && start_ublk /tmp/xb.log "nbd+unix:///?socket=/tmp/x.sock" --ublk --queues 2; then
  fs_roundtrip "$DEV"; r=$?
  stop_server TERM
  if [ $r -ne 0 ]; then fail $t "file system round trip"; show_log /tmp/xb.log
  elif [ "$SRV_RC" != 0 ]; then fail $t "ublk server exit $SRV_RC"; show_log /tmp/xb.log
  elif ! e2fsck -fn /tmp/x.img >/dev/null 2>&1; then fail $t "image fails fsck"
  else pass $t; fi
else
  fail $t "servers did not start"; show_log /tmp/x.log; show_log /tmp/xb.log; stop_server KILL
fi
SRV=$XSRV; stop_server TERM
rm -f /tmp/x.img

# The kernel's nbd client attached to this project's NBD server: the file
# backend allows multi-conn, so attach opens one connection per CPU (two
# here) by itself; the same file-system round trip, then detach.
t=kernel-nbd
truncate -s 64M /tmp/n.img
devio serve /tmp/n.img --nbd unix:/tmp/nbd.sock >/tmp/n.log 2>&1 &
SRV=$!
if wait_for 30 test -S /tmp/nbd.sock; then
  s0=$(ls -l /proc/$SRV/fd | grep -c socket)
  if devio attach "nbd+unix:///?socket=/tmp/nbd.sock" --nbd-device /dev/nbd0 >/tmp/a.log 2>&1; then
    wait_for 10 test "$(cat /sys/block/nbd0/size)" -gt 0
    s1=$(ls -l /proc/$SRV/fd | grep -c socket)
    fs_roundtrip /dev/nbd0; r=$?
    devio detach /dev/nbd0 >>/tmp/a.log 2>&1
    wait_for 20 test "$(cat /sys/block/nbd0/size)" = 0; gone=$?
    stop_server TERM
    info "$t: server sockets before attach $s0, after $s1"
    if [ $r -ne 0 ]; then cat /tmp/a.log; fail $t "file system round trip"
    elif [ $((s1 - s0)) -ne 2 ]; then fail $t "want 2 connections, server has $((s1 - s0)) more sockets"
    elif [ $gone -ne 0 ]; then fail $t "/dev/nbd0 still attached after detach"
    elif ! e2fsck -fn /tmp/n.img >/dev/null 2>&1; then fail $t "image fails fsck"
    else pass $t; fi
  else
    show_log /tmp/a.log; fail $t "attach failed"; stop_server TERM
  fi
else
  cat /tmp/n.log; fail $t "NBD server did not start"; stop_server KILL
fi
rm -f /tmp/n.img

# Over TCP on the guest's loopback (port 10809 = 0x2A39 in /proc/net/tcp),
# letting the kernel pick a free nbd device: what is written reads back,
# detach frees the device.
t=kernel-nbd-tcp
devio serve ram:32M --nbd tcp:127.0.0.1:10809 >/tmp/nt.log 2>&1 &
SRV=$!
if wait_for 30 grep -q ':2A39 00000000:0000 0A' /proc/net/tcp && devio attach nbd://127.0.0.1:10809 --nbd-device >/tmp/nta.out 2>/tmp/nta.log; then
  nbd=$(head -n 1 /tmp/nta.out)
  dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
  dd if=/tmp/pattern of="$nbd" bs=1M oflag=direct 2>/dev/null; wr=$?
  back=$(dd if="$nbd" bs=1M count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
  devio detach "$nbd" >>/tmp/nta.log 2>&1
  wait_for 20 test "$(cat /sys/block/${nbd#/dev/}/size)" = 0; gone=$?
  stop_server TERM
  info "$t: attached as $nbd"
  if ! [ -b "$nbd" ]; then fail $t "attach printed '$nbd'"
  elif [ $wr -ne 0 ] || [ "$back" != "$want" ]; then fail $t "data did not read back"
  elif [ $gone -ne 0 ]; then fail $t "$nbd still attached after detach"
  else pass $t; fi
else
  show_log /tmp/nta.log; fail $t "attach failed"; stop_server TERM
fi
rm -f /tmp/pattern

# More scenarios, one file per area (tests/vm/scenarios/*.sh), in name order.
for f in /scenarios/*.sh; do
  [ -f "$f" ] && . "$f"
done

# No server log from the scenarios above holds a sanitizer report (with a
# sanitized build; a plain build trivially passes).
t=sanitizer-reports
bad=$(grep -l -E 'AddressSanitizer|LeakSanitizer|runtime error:' /tmp/*.log 2>/dev/null)
if [ -n "$bad" ]; then
  for f in $bad; do grep -m 5 -E 'AddressSanitizer|LeakSanitizer|runtime error:|#[0-9] ' "$f" | sed "s|^|INFO $f: |"; done
  fail $t "reports in: $(echo $bad)"
else
  pass $t
fi
