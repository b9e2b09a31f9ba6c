# guest-lib.sh - helpers the in-guest scenario scripts source: result
# lines, bounded waits, starting/stopping a devio server, a file-system
# round trip.  Runs under busybox sh inside the guest (tests/vm/run.sh).
# Busybox's sh prefers its own applets to PATH: tools where the real
# (util-linux, e2fsprogs) one matters are called as /usr/bin/NAME.

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+ ($2)}"; }
info() { echo "INFO $*"; }
# show_log FILE: the last lines of a server log, as INFO lines.
show_log() { tail -n 15 "$1" | sed 's/^/INFO   | /'; }

# wait_for SECONDS CMD...: poll CMD every 0.1 s; 0 when it succeeded.
wait_for() {
  _n=$(($1 * 10)); shift
  while [ $_n -gt 0 ]; do
    "$@" 2>/dev/null && return 0
    usleep 100000; _n=$((_n - 1))
  done
  return 1
}

alive() { kill -0 "$1" 2>/dev/null; }
dead() { ! kill -0 "$1" 2>/dev/null; }

# start_ublk LOG SERVE-ARGS...: start `devio serve`, wait for its ublk
# device; sets SRV (pid) and DEV (/dev/ublkbN).
start_ublk() {
  _log=$1; shift
  DEV=
  devio serve "$@" >"$_log" 2>&1 &
  SRV=$!
  wait_for 60 grep -q 'ublk: /dev/ublkb[0-9]*: ' "$_log" || { cat "$_log"; return 1; }
  DEV=$(sed -n 's|.*ublk: \(/dev/ublkb[0-9]*\): .*|\1|p' "$_log" | head -n 1)
  wait_for 20 test -b "$DEV" && return 0
  echo "no block device $DEV: $(ls -l "$DEV" 2>&1)"
  return 1
}

# stop_server [SIGNAL]: stop $SRV within 60 s (SIGKILL after); sets SRV_RC.
stop_server() {
  kill -"${1:-TERM}" "$SRV" 2>/dev/null
  wait_for 60 dead "$SRV" || kill -KILL "$SRV" 2>/dev/null
  wait "$SRV"; SRV_RC=$?
}

# fs_roundtrip DEV: mkfs.ext4, write checksummed files, sync, unmount,
# fsck -fn, mount again and compare.  0 on success.
fs_roundtrip() {
  _fs_roundtrip "$@"; _r=$?
  grep -q ' /mnt ' /proc/mounts && { umount /mnt || umount -l /mnt; } # never leave it mounted
  return $_r
}

_fs_roundtrip() {
  _dev=$1; _r=0
  mkfs.ext4 -q -F "$_dev" >/tmp/mkfs.log 2>&1 || { cat /tmp/mkfs.log; return 1; }
  mount -t ext4 "$_dev" /mnt || return 1
  for _i in 1 2 3 4; do
    dd if=/dev/urandom of=/mnt/f$_i bs=64k count=$((_i * 8)) 2>/dev/null || _r=1
  done
  mkdir -p /mnt/dir && echo hello >/mnt/dir/small
  (cd /mnt && sha256sum f1 f2 f3 f4 dir/small) >/tmp/sums
  sync
  umount /mnt || return 1
  e2fsck -fn "$_dev" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; _r=1; }
  mount -t ext4 "$_dev" /mnt || return 1
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/sumcheck.log 2>&1 || { cat /tmp/sumcheck.log; _r=1; }
  umount /mnt || _r=1
  return $_r
}

# vm_rss_kb PID: resident memory of PID in KiB.
vm_rss_kb() { awk '/^VmRSS:/{print $2}' /proc/"$1"/status; }

# counter LOG QUEUE: requests queue QUEUE served, from the exit summary.
counter() { sed -n "s/.*queue $2 served \([0-9]*\) .*/\1/p" "$1" | tail -n 1; }

# _grew FILE N: FILE has more than N lines.
_grew() { [ "$(wc -l <"$1")" -gt "$2" ]; }

# restart_cycles N PROGRESS ACTION: N times, once the workload has made
# progress (PROGRESS, a file it appends a line to per acknowledged step,
# grew), run `ACTION I` (I = 0..N-1): it restarts or replaces the server
# $SRV and returns non-zero with the reason in CYCLE_ERR when that failed.
# 0 when every action succeeded, else 1 with the reason in CYCLE_ERR.
# (Its variables have names of their own: busybox sh has no locals, and
# wait_for/start_ublk use _n and _log.)
restart_cycles() {
  _cy_n=$1 _cy_prog=$2 _cy_act=$3 _cy_i=0
  while [ $_cy_i -lt "$_cy_n" ]; do
    _cy_before=$(wc -l <"$_cy_prog")
    if ! wait_for 60 _grew "$_cy_prog" "$_cy_before"; then
      CYCLE_ERR="no progress before restart $_cy_i"; return 1
    fi
    "$_cy_act" "$_cy_i" || return 1
    _cy_i=$((_cy_i + 1))
  done
  return 0
}

# recover_cycles N LOG SOURCE ID PROGRESS: restart_cycles whose action
# kills the server $SRV with -9 and takes /dev/ublkbID over with
# `devio serve SOURCE --ublk=ID --recover` (log LOG.I).  Sets SRV; 0 when
# every takeover came up, else 1 with the reason in RECOVER_ERR.
recover_cycles() {
  _rc_rlog=$2 _rc_src=$3 _rc_id=$4
  restart_cycles "$1" "$5" _recover_one; _rc_r=$?
  RECOVER_ERR=$CYCLE_ERR
  return $_rc_r
}

_recover_one() {
  kill -KILL "$SRV"; wait "$SRV" 2>/dev/null
  start_ublk "$_rc_rlog.$1" "$_rc_src" --ublk="$_rc_id" --recover && return 0
  CYCLE_ERR="takeover $1 failed"; show_log "$_rc_rlog.$1"; return 1
}

# The workloads that run while the server is restarted.  Each runs in the
# background until PREFIX.stop exists, appends its step number to
# PREFIX.prog per acknowledged step (the PROGRESS of restart_cycles), and
# on a failed step writes "ERR ..." there and exits 1; sets WRITER.
# fsync_writer PREFIX PATS: rewrites /mnt/f(I % 61) with PATS(I % 4) (4
# files of 512 KiB), each write fsync'd (dd's errors in PREFIX.dd).
fsync_writer() {
  rm -f "$1.stop"; : >"$1.prog"
  ( i=0
    while [ ! -e "$1.stop" ]; do
      /usr/bin/dd if="$2$((i % 4))" of=/mnt/f$((i % 61)) bs=64k conv=fsync 2>"$1.dd" || { echo "ERR $i" >>"$1.prog"; exit 1; }
      echo $i >>"$1.prog"; i=$((i + 1))
    done ) &
  WRITER=$!
}

# direct_writer PREFIX PATS DEV: puts 64 KiB block I % 127 of PATS(I % 4)
# (4 files of 127 blocks) at the same block of DEV (O_DIRECT) and reads it
# back at once (PREFIX.exp, PREFIX.got).
direct_writer() {
  rm -f "$1.stop"; : >"$1.prog"
  ( i=0
    while [ ! -e "$1.stop" ]; do
      b=$((i % 127)); v=$((i % 4))
      dd if="$2$v" of="$1.exp" bs=64k skip=$b count=1 2>/dev/null
      /usr/bin/dd if="$1.exp" of="$3" bs=64k seek=$b count=1 oflag=direct conv=notrunc 2>/dev/null || { echo "ERR write $i" >>"$1.prog"; exit 1; }
      /usr/bin/dd if="$3" of="$1.got" bs=64k skip=$b count=1 iflag=direct 2>/dev/null || { echo "ERR read $i" >>"$1.prog"; exit 1; }
      cmp -s "$1.exp" "$1.got" || { echo "ERR verify $i" >>"$1.prog"; exit 1; }
      echo $i >>"$1.prog"; i=$((i + 1))
    done ) &
  WRITER=$!
}

# stop_writer PREFIX: stop $WRITER (SIGKILL after 120 s); sets WRITER_RC.
stop_writer() {
  touch "$1.stop"
  wait_for 120 dead "$WRITER" || kill -KILL "$WRITER"
  wait "$WRITER"; WRITER_RC=$?
}

# files_wrong PREFIX PATS: after fsync_writer, how many of /mnt/f* differ
# from the pattern of their last acknowledged write (printed).
files_wrong() {
  _fw_bad=0
  for _fw_kv in $(awk '/^[0-9]/{p[$1 % 61] = $1 % 4} END {for (k in p) print k ":" p[k]}' "$1.prog"); do
    cmp -s /mnt/f${_fw_kv%:*} "$2${_fw_kv#*:}" || _fw_bad=$((_fw_bad + 1))
  done
  echo $_fw_bad
}

# blocks_wrong PREFIX PATS DEV: after direct_writer, every block written
# read back (O_DIRECT) against its last acknowledged write; sets
# BLOCKS_N (blocks checked) and BLOCKS_BAD (those that differ).
blocks_wrong() {
  BLOCKS_BAD=0 BLOCKS_N=0
  for _bw_kv in $(awk '/^[0-9]/{p[$1 % 127] = $1 % 4} END {for (k in p) print k ":" p[k]}' "$1.prog"); do
    _bw_b=${_bw_kv%:*}; BLOCKS_N=$((BLOCKS_N + 1))
    dd if="$2${_bw_kv#*:}" of="$1.exp" bs=64k skip=$_bw_b count=1 2>/dev/null
    /usr/bin/dd if="$3" of="$1.got" bs=64k skip=$_bw_b count=1 iflag=direct 2>/dev/null
    cmp -s "$1.exp" "$1.got" || BLOCKS_BAD=$((BLOCKS_BAD + 1))
  done
}
