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

# handover_cycles N LOG SOURCE ID PROGRESS: like recover_cycles (guest-lib.sh)
# but each takeover follows `devio detach --handover`, whose server must
# exit 0 having said how it handed over (quiesce when the driver offers it).
# Sets SRV; 0, or 1 with the reason in HANDOVER_ERR.
handover_cycles() {
  _ho_n=$1 _ho_log=$2 _ho_src=$3 _ho_id=$4 _ho_prog=$5 _ho_i=0 _ho_cur=$2
  while [ $_ho_i -lt "$_ho_n" ]; do
    _ho_before=$(wc -l <"$_ho_prog")
    if ! wait_for 60 _grew "$_ho_prog" "$_ho_before"; then
      HANDOVER_ERR="no progress before hand-over $_ho_i"; return 1
    fi
    if ! devio detach --handover "/dev/ublkb$_ho_id" >/tmp/ho.detach 2>&1; then
      HANDOVER_ERR="detach --handover $_ho_i failed: $(cat /tmp/ho.detach)"; show_log "$_ho_cur"; return 1
    fi
    wait_for 30 dead "$SRV"; wait "$SRV"; _ho_rc=$?
    if [ $_ho_rc -ne 0 ]; then HANDOVER_ERR="server $_ho_i exit $_ho_rc after the hand-over"; show_log "$_ho_cur"; return 1; fi
    # quiesce where the driver offers it, except with batched commands
    # (QUIESCE_DEV there would fail the I/O that comes meanwhile)
    if grep -q 'driver features.* quiesce' "$_ho_log" && ! grep -q 'ublk: commands: batch' "$_ho_log"; then
      _ho_how='quiesced in'
    else
      _ho_how='hand-over without quiesce'
    fi
    if ! grep -q "$_ho_how" "$_ho_cur"; then HANDOVER_ERR="server $_ho_i did not log '$_ho_how'"; show_log "$_ho_cur"; return 1; fi
    grep -q 'handed over (the device stays' "$_ho_cur" || { HANDOVER_ERR="server $_ho_i: no hand-over at exit"; show_log "$_ho_cur"; return 1; }
    HANDOVER_HOW=$(grep -o 'quiesced in [0-9]* ms\|hand-over without quiesce ([^)]*)' "$_ho_cur" | head -n 1)
    _ho_cur=$_ho_log.$_ho_i
    if ! start_ublk "$_ho_cur" "$_ho_src" --ublk="$_ho_id" --recover; then
      HANDOVER_ERR="takeover $_ho_i failed"; show_log "$_ho_cur"; return 1
    fi
    _ho_i=$((_ho_i + 1))
  done
  return 0
}

# A mounted ext4, files rewritten with 4 known patterns, each write fsync'd.
t=ublk-handover-ext4
for v in 0 1 2 3; do dd if=/dev/urandom of=/tmp/hp$v bs=64k count=8 2>/dev/null; done
truncate -s 128M /tmp/ho.img
rm -f /tmp/ho.stop /tmp/ho.prog
if start_ublk /tmp/ho.log /tmp/ho.img --ublk --queues 2 --recovery && mkfs.ext4 -q -F "$DEV" >/dev/null 2>&1 &&
   mount -t ext4 "$DEV" /mnt; then
  id=${DEV#/dev/ublkb}
  devio status >/tmp/ho.status 2>&1
  : >/tmp/ho.prog
  ( i=0
    while [ ! -e /tmp/ho.stop ]; do
      /usr/bin/dd if=/tmp/hp$((i % 4)) of=/mnt/f$((i % 61)) bs=64k conv=fsync 2>/tmp/ho.dd || { echo "ERR $i" >>/tmp/ho.prog; exit 1; }
      echo $i >>/tmp/ho.prog; i=$((i + 1))
    done ) &
  writer=$!
  handover_cycles "$HN" /tmp/ho.log /tmp/ho.img "$id" /tmp/ho.prog; hr=$?
  touch /tmp/ho.stop
  wait_for 120 dead $writer || kill -KILL $writer
  wait $writer; wrc=$?
  rw=$(awk '$2 == "/mnt" {print substr($4, 1, 2)}' /proc/mounts)
  echo after >/mnt/after && sync; after=$?
  sync; echo 3 >/proc/sys/vm/drop_caches
  bad=0
  for kv in $(awk '/^[0-9]/{p[$1 % 61] = $1 % 4} END {for (k in p) print k ":" p[k]}' /tmp/ho.prog); do
    cmp -s /mnt/f${kv%:*} /tmp/hp${kv#*:} || bad=$((bad + 1))
  done
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
# Per-tag commands (--ublk-batch off) so that the quiesce path is the one
# taken where the driver has it.
t=ublk-handover-verify
truncate -s 32M /tmp/hv.img
rm -f /tmp/hv.stop /tmp/hv.prog
for v in 0 1 2 3; do dd if=/dev/urandom of=/tmp/hb$v bs=64k count=127 2>/dev/null; done
# per-tag commands here, so that the hand-over by quiesce stays covered on
# 7.x (batched ones, above, hand over without it)
if start_ublk /tmp/hv.log /tmp/hv.img --ublk --recovery --ublk-batch off; then
  id=${DEV#/dev/ublkb}
  : >/tmp/hv.prog
  ( i=0
    while [ ! -e /tmp/hv.stop ]; do
      b=$((i % 127)); v=$((i % 4))
      dd if=/tmp/hb$v of=/tmp/hv.exp bs=64k skip=$b count=1 2>/dev/null
      /usr/bin/dd if=/tmp/hv.exp of="$DEV" bs=64k seek=$b count=1 oflag=direct conv=notrunc 2>/dev/null || { echo "ERR write $i" >>/tmp/hv.prog; exit 1; }
      /usr/bin/dd if="$DEV" of=/tmp/hv.got bs=64k skip=$b count=1 iflag=direct 2>/dev/null || { echo "ERR read $i" >>/tmp/hv.prog; exit 1; }
      cmp -s /tmp/hv.exp /tmp/hv.got || { echo "ERR verify $i" >>/tmp/hv.prog; exit 1; }
      echo $i >>/tmp/hv.prog; i=$((i + 1))
    done ) &
  writer=$!
  handover_cycles "$HN" /tmp/hv.log /tmp/hv.img "$id" /tmp/hv.prog; hr=$?
  touch /tmp/hv.stop
  wait_for 120 dead $writer || kill -KILL $writer
  wait $writer; wrc=$?
  bad=0; n=0
  for kv in $(awk '/^[0-9]/{p[$1 % 127] = $1 % 4} END {for (k in p) print k ":" p[k]}' /tmp/hv.prog); do
    b=${kv%:*}; n=$((n + 1))
    dd if=/tmp/hb${kv#*:} of=/tmp/hv.exp bs=64k skip=$b count=1 2>/dev/null
    /usr/bin/dd if="$DEV" of=/tmp/hv.got bs=64k skip=$b count=1 iflag=direct 2>/dev/null
    cmp -s /tmp/hv.exp /tmp/hv.got || bad=$((bad + 1))
  done
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
