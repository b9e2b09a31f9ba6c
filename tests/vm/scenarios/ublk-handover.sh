# ublk-handover.sh - live hand-over of a ublk device between servers
# (sourced by tests/vm/guest-tests.sh; alone: tests/vm/run.sh --script
# THIS_FILE).  A --recovery device carries a mounted ext4 that a writer
# keeps rewriting (fsync'd), and a raw device gets O_DIRECT blocks read
# back at once; HANDOVER_N times (default 5) `devio detach --handover`
# makes the server quiesce the device (UBLK_F_QUIESCE, 7.x) or, where the
# kernel has no quiesce (6.12), close its queues for the driver to reissue
# what was in flight, and exit 0 leaving the device; `devio serve IMG
# --ublk=ID --recover` takes over.  No write or read may fail, every file
# and block must hold its last acknowledged data, the file system stays
# mounted read-write and checks clean.
. /guest-lib.sh
cd /tmp

HN=${HANDOVER_N:-5}

# handover_cycles N LOG SOURCE ID PROGRESS: restart_cycles (guest-lib.sh)
# whose action is `devio detach --handover`, whose server must exit 0
# having said how it handed over (quiesce when the driver offers it), and
# a takeover with --recover (log LOG.I).  Sets SRV and HANDOVER_HOW; 0, or
# 1 with the reason in HANDOVER_ERR.
handover_cycles() {
  _ho_log=$2 _ho_src=$3 _ho_id=$4 _ho_cur=$2
  restart_cycles "$1" "$5" _handover_one; _ho_r=$?
  HANDOVER_ERR=$CYCLE_ERR
  return $_ho_r
}

_handover_one() {
  if ! devio detach --handover "/dev/ublkb$_ho_id" >/tmp/ho.detach 2>&1; then
    CYCLE_ERR="detach --handover $1 failed: $(cat /tmp/ho.detach)"; show_log "$_ho_cur"; return 1
  fi
  wait_for 30 dead "$SRV"; wait "$SRV"; _ho_rc=$?
  if [ $_ho_rc -ne 0 ]; then CYCLE_ERR="server $1 exit $_ho_rc after the hand-over"; show_log "$_ho_cur"; return 1; fi
  # quiesce where the driver offers it, except with batched commands
  # (QUIESCE_DEV there would fail the I/O that comes meanwhile)
  if grep -q 'driver features.* quiesce' "$_ho_log" && ! grep -q 'ublk: commands: batch' "$_ho_log"; then
    _ho_how='quiesced in'
  else
    _ho_how='hand-over without quiesce'
  fi
  if ! grep -q "$_ho_how" "$_ho_cur"; then CYCLE_ERR="server $1 did not log '$_ho_how'"; show_log "$_ho_cur"; return 1; fi
  grep -q 'handed over (the device stays' "$_ho_cur" || { CYCLE_ERR="server $1: no hand-over at exit"; show_log "$_ho_cur"; return 1; }
  HANDOVER_HOW=$(grep -o 'quiesced in [0-9]* ms\|hand-over without quiesce ([^)]*)' "$_ho_cur" | head -n 1)
  _ho_cur=$_ho_log.$1
  start_ublk "$_ho_cur" "$_ho_src" --ublk="$_ho_id" --recover && return 0
  CYCLE_ERR="takeover $1 failed"; show_log "$_ho_cur"; return 1
}

# A mounted ext4, files rewritten with 4 known patterns, each write fsync'd.
t=ublk-handover-ext4
for v in 0 1 2 3; do dd if=/dev/urandom of=/tmp/hp$v bs=64k count=8 2>/dev/null; done
truncate -s 128M /tmp/ho.img
if start_ublk /tmp/ho.log /tmp/ho.img --ublk --queues 2 --recovery && mkfs.ext4 -q -F "$DEV" >/dev/null 2>&1 &&
   mount -t ext4 "$DEV" /mnt; then
  id=${DEV#/dev/ublkb}
  devio status >/tmp/ho.status 2>&1
  fsync_writer /tmp/ho /tmp/hp
  handover_cycles "$HN" /tmp/ho.log /tmp/ho.img "$id" /tmp/ho.prog; hr=$?
  stop_writer /tmp/ho; wrc=$WRITER_RC
  rw=$(awk '$2 == "/mnt" {print substr($4, 1, 2)}' /proc/mounts)
  echo after >/mnt/after && sync; after=$?
  sync; echo 3 >/proc/sys/vm/drop_caches
  bad=$(files_wrong /tmp/ho /tmp/hp)
  umount /mnt
  e2fsck -fn "$DEV" >/tmp/ho.fsck 2>&1; fsck=$?
  stop_server TERM
  info "$t: $HN hand-overs (last: ${HANDOVER_HOW:-?}), $(grep -c '^[0-9]' /tmp/ho.prog) fsync'd writes, $bad files wrong; $(grep 'recovery' /tmp/ho.status)"
  if [ $hr -ne 0 ]; then fail $t "$HANDOVER_ERR"
  elif [ $wrc -ne 0 ]; then fail $t "a write failed: $(grep ERR /tmp/ho.prog) $(cat /tmp/ho.dd)"
  elif [ $bad -ne 0 ]; then fail $t "$bad files differ from their last acknowledged write"
  elif [ "$rw" != rw ] || [ $after -ne 0 ]; then fail $t "the file system is not read-write any more ($rw)"
  elif [ $fsck -ne 0 ]; then tail -n 5 /tmp/ho.fsck; fail $t "fsck"
  elif [ "$SRV_RC" != 0 ]; then fail $t "last server exit $SRV_RC"
  elif [ -e /sys/block/ublkb$id ]; then fail $t "ublkb$id left behind after SIGTERM"
  else pass $t; fi
else
  fail $t "server did not start or no ext4"; show_log /tmp/ho.log; umount /mnt 2>/dev/null; stop_server KILL
  vmtool ublk-del "$DEV" 2>/dev/null
fi
rm -f /tmp/ho.img /tmp/ho.log.* /tmp/hp?

# The raw device: 64 KiB blocks of 4 random patterns written O_DIRECT at
# rotating offsets and read back at once; every block checked at the end.
t=ublk-handover-verify
truncate -s 32M /tmp/hv.img
for v in 0 1 2 3; do dd if=/dev/urandom of=/tmp/hb$v bs=64k count=127 2>/dev/null; done
# per-tag commands here, so that the hand-over by quiesce stays covered on
# 7.x (batched ones, above, hand over without it)
if start_ublk /tmp/hv.log /tmp/hv.img --ublk --recovery --ublk-batch off; then
  id=${DEV#/dev/ublkb}
  direct_writer /tmp/hv /tmp/hb "$DEV"
  handover_cycles "$HN" /tmp/hv.log /tmp/hv.img "$id" /tmp/hv.prog; hr=$?
  stop_writer /tmp/hv; wrc=$WRITER_RC
  blocks_wrong /tmp/hv /tmp/hb "$DEV"; bad=$BLOCKS_BAD n=$BLOCKS_N
  stop_server TERM
  info "$t: $HN hand-overs (last: ${HANDOVER_HOW:-?}), $(grep -c '^[0-9]' /tmp/hv.prog) blocks written and read back, $n verified at the end, $bad wrong"
  if [ $hr -ne 0 ]; then fail $t "$HANDOVER_ERR"
  elif [ $wrc -ne 0 ]; then fail $t "$(grep ERR /tmp/hv.prog)"
  elif [ $bad -ne 0 ] || [ $n -eq 0 ]; then fail $t "$bad of $n blocks differ from their last acknowledged write"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
rm -f /tmp/hv.img /tmp/hv.log.* /tmp/hb? /tmp/hv.exp /tmp/hv.got

# Refusals: a device made without --recovery cannot be handed over (the
# server says so and keeps serving), nor can a non-ublk target.
t=ublk-handover-refused
if start_ublk /tmp/hr.log ram:16M --ublk; then
  devio detach --handover "$DEV" >/tmp/hr.detach 2>&1 &
  det=$!
  wait_for 10 grep -q 'hand-over refused' /tmp/hr.log; said=$?
  alive "$SRV"; up=$?
  /usr/bin/dd if="$DEV" of=/dev/null bs=64k count=4 iflag=direct 2>/dev/null; rd=$?
  kill $det 2>/dev/null; wait $det 2>/dev/null
  devio detach --handover /tmp >/tmp/hr2.detach 2>&1; nonublk=$?
  stop_server TERM
  if [ $said -ne 0 ]; then fail $t "no refusal logged"; show_log /tmp/hr.log
  elif [ $up -ne 0 ] || [ $rd -ne 0 ]; then fail $t "the server stopped serving"
  elif [ $nonublk -eq 0 ]; then fail $t "--handover of a non-ublk target succeeded"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
  elif [ -e "$DEV" ]; then fail $t "$DEV left behind after SIGTERM"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
