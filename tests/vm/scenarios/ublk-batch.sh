# ublk-batch.sh - batched ublk commands (UBLK_F_BATCH_IO: PREP_IO_CMDS,
# multishot FETCH_IO_CMDS, COMMIT_IO_CMDS) where the driver offers them
# (7.x), the per-tag FETCH_REQ/COMMIT_AND_FETCH_REQ where it does not
# (6.12) or where `--ublk-batch off` says so (sourced by
# tests/vm/guest-tests.sh; helpers from /guest-lib.sh).  Data is checked
# with fio verify where fio is packed (VM_EXTRA_BINS=fio), else with dd
# and sha256; each data path (auto-buf-reg, REGISTER_IO_BUF, user copy,
# kernel copy) is run over batch; kill -9 + --recover cycles keep batch.
# Alone: tests/vm/run.sh --script THIS_FILE (VM_EXTRA_BINS=fio for fio).
. /guest-lib.sh
cd /tmp

# bt_offered LOG: 1 if the driver features the server logged have
# UBLK_F_BATCH_IO (bit 15).
bt_offered() {
  _f=$(sed -n 's/.*driver features \(0x[0-9a-f]*\).*/\1/p' "$1" | head -n 1)
  echo $((${_f:-0} >> 15 & 1))
}

# bt_total FIELD LINE: FIELD summed over every queue of an exit summary.
bt_total() {
  echo "$2" | awk -v f="$1" '{ for (i = 1; i < NF; i++) if ($i == f) n += $(i + 1) } END { print n + 0 }'
}

# bt_verify DEV: 4 KiB random read/write at QD32 and 1 MiB sequential
# writes, each verified (fio crc32c, fatal on the first mismatch); dd and
# sha256 over 4 KiB and 1 MiB direct writes where fio is not packed.
bt_verify() {
  if command -v fio >/dev/null 2>&1; then
    fio --name=r4k --filename="$1" --direct=1 --ioengine=libaio --rw=randrw --bs=4k --iodepth=32 \
      --size=24M --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/tmp/bt-fio1.log 2>&1 || {
      tail -n 20 /tmp/bt-fio1.log; return 1; }
    fio --name=s1m --filename="$1" --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 \
      --size=48M --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/bt-fio2.log 2>&1 || {
      tail -n 20 /tmp/bt-fio2.log; return 1; }
    return 0
  fi
  info "fio not packed (VM_EXTRA_BINS=fio): dd + sha256 instead"
  dd if=/dev/urandom of=/tmp/bt.src bs=1M count=16 2>/dev/null
  /usr/bin/dd if=/tmp/bt.src of="$1" bs=1M oflag=direct conv=fsync 2>/dev/null || return 1
  /usr/bin/dd if=/tmp/bt.src of="$1" bs=4k count=512 skip=100 seek=1000 oflag=direct conv=notrunc 2>/dev/null || return 1
  dd if=/tmp/bt.src of=/tmp/bt.src bs=4k count=512 skip=100 seek=1000 conv=notrunc 2>/dev/null
  echo 3 >/proc/sys/vm/drop_caches
  [ "$(/usr/bin/dd if="$1" bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)" = \
    "$(sha256sum </tmp/bt.src | cut -d' ' -f1)" ]
}

# bt_run NAME WANT FS SOURCE SERVE-ARGS...: serve SOURCE with --queues 2,
# verify the data (FS=fs: also the ext4 round trip), check that the log,
# `devio status` and the exit summary say commands WANT (batch|per-tag)
# and, for batch with fio's QD32 (dd alone may keep one request in
# flight), that commits were gathered (fewer COMMIT_IO_CMDS than requests).
bt_run() {
  _t=$1; _want=$2; _fs=$3; _src=$4; shift 4
  if ! start_ublk /tmp/bt-$_t.log "$_src" --ublk --queues 2 "$@"; then
    show_log /tmp/bt-$_t.log; fail $_t "server did not start"; stop_server KILL; return
  fi
  _why=
  bt_verify "$DEV" || _why="data did not verify"
  [ -z "$_why" ] && [ "$_fs" = fs ] && { fs_roundtrip "$DEV" || _why="ext4 round trip failed"; }
  devio status >/tmp/bt-st.out 2>&1
  stop_server TERM
  _sum=$(grep "queue 0 served" /tmp/bt-$_t.log | tail -n 1)
  _served=$(bt_total served "$_sum"); _cmds=$(bt_total commit_cmds "$_sum")
  info "$_t: $(grep 'ublk: commands' /tmp/bt-$_t.log | head -n 1 | sed 's/.*ublk: //'); $_served requests, $_cmds commit commands, $(bt_total partial_commits "$_sum") partial"
  if [ -n "$_why" ]; then show_log /tmp/bt-$_t.log; fail $_t "$_why"
  elif [ "$SRV_RC" != 0 ]; then show_log /tmp/bt-$_t.log; fail $_t "server exited $SRV_RC"
  elif ! grep -q "ublk device $DEV .* commands $_want\$" /tmp/bt-st.out; then cat /tmp/bt-st.out; fail $_t "devio status does not say commands $_want"
  elif ! echo "$_sum" | grep -q " commands $_want mode "; then fail $_t "exit summary does not say commands $_want"
  elif [ "$_want" = batch ] && ! grep -q 'ublk: commands: batch' /tmp/bt-$_t.log; then fail $_t "batch not logged"
  elif [ "$_want" = batch ] && command -v fio >/dev/null 2>&1 && [ "$_cmds" -ge "$_served" ]; then
    fail $_t "no commits gathered at QD32 ($_cmds commands for $_served requests)"
  else pass $_t; fi
}

rm -f /tmp/bt.img; truncate -s 64M /tmp/bt.img
# what the driver offers decides the default
devio serve ram:16M --ublk >/tmp/bt-probe.log 2>&1 &
SRV=$!
wait_for 60 grep -q 'ublk: /dev/ublkb[0-9]*: ' /tmp/bt-probe.log
stop_server TERM
BT=$(bt_offered /tmp/bt-probe.log)
t=ublk-batch-default
if [ "$BT" = 1 ]; then
  bt_run $t batch fs /tmp/bt.img # a plain file: auto-buf-reg zero copy over batch
  for m in register-buf:zero-copy user:user-copy kernel:kernel-copy; do
    rm -f /tmp/bt.img; truncate -s 64M /tmp/bt.img
    bt_run ublk-batch-${m#*:} batch nofs /tmp/bt.img --ublk-copy ${m%%:*}
  done
  bt_run ublk-batch-ram batch nofs ram:64M # user copy for a backend without fixed buffers
  rm -f /tmp/bt.img; truncate -s 64M /tmp/bt.img
  bt_run ublk-batch-off per-tag nofs /tmp/bt.img --ublk-batch off
else
  # 6.12: not offered, the per-tag commands serve (a pass, said so)
  bt_run $t per-tag fs /tmp/bt.img
  grep -q 'batch not offered by this driver' /tmp/bt-$t.log && info "$t: UBLK_F_BATCH_IO not offered by $(uname -r): per-tag commands"
  t=ublk-batch-on-refused
  devio serve ram:16M --ublk --ublk-batch on >/tmp/bt-on.log 2>&1 &
  SRV=$!
  if wait_for 30 dead $SRV && ! wait $SRV && grep -q 'has no UBLK_F_BATCH_IO' /tmp/bt-on.log; then pass $t
  else show_log /tmp/bt-on.log; stop_server KILL; fail $t "--ublk-batch on not refused without UBLK_F_BATCH_IO"; fi
fi

# batch (where offered) across kill -9 and --recover: fio verify runs on,
# every takeover keeps the device's commands; then a final verify pass.
t=ublk-batch-recover
BN=${RECOVER_N:-5}
rm -f /tmp/bt.img; truncate -s 64M /tmp/bt.img
if start_ublk /tmp/bt-rc.log /tmp/bt.img --ublk --queues 2 --recovery; then
  id=${DEV#/dev/ublkb}
  : >/tmp/bt-rc.prog
  ( i=0
    while [ ! -e /tmp/bt-rc.stop ]; do
      if command -v fio >/dev/null 2>&1; then
        fio --name=rc --filename="$DEV" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 \
          --size=8M --offset=$(( (i % 4) * 8 ))M --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
          >/tmp/bt-rc.fio 2>&1 || { echo "ERR $i" >>/tmp/bt-rc.prog; exit 1; }
      else
        bt_verify "$DEV" || { echo "ERR $i" >>/tmp/bt-rc.prog; exit 1; }
      fi
      echo $i >>/tmp/bt-rc.prog; i=$((i + 1))
    done ) &
  writer=$!
  recover_cycles "$BN" /tmp/bt-rc.log /tmp/bt.img "$id" /tmp/bt-rc.prog; rr=$?
  touch /tmp/bt-rc.stop
  wait_for 300 dead $writer || kill -KILL $writer
  wait $writer; wrc=$?
  _want=per-tag; [ "$BT" = 1 ] && _want=batch
  _nb=$(cat /tmp/bt-rc.log.* 2>/dev/null | grep -c "ublk: /dev/ublkb$id: .* $_want commands")
  stop_server TERM
  info "$t: $BN takeovers, $(grep -c '^[0-9]' /tmp/bt-rc.prog) verified rounds, $_nb takeovers with $_want commands"
  if [ $rr -ne 0 ]; then fail $t "$RECOVER_ERR"
  elif [ $wrc -ne 0 ]; then tail -n 15 /tmp/bt-rc.fio 2>/dev/null | sed 's/^/INFO   | /'; fail $t "a verify round failed: $(grep ERR /tmp/bt-rc.prog)"
  elif [ "$_nb" != "$BN" ]; then fail $t "$_nb of $BN takeovers said $_want commands"
  elif [ "$SRV_RC" != 0 ]; then fail $t "server exit $SRV_RC"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
rm -f /tmp/bt.img /tmp/bt.src /tmp/bt-rc.log.* /tmp/bt-rc.stop
