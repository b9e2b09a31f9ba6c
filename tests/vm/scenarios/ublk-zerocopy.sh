# ublk-zerocopy.sh - the ublk data path over a plain file (sourced by
# tests/vm/guest-tests.sh; helpers from /guest-lib.sh).  Where the driver
# offers it (7.x: auto-buf-reg) the file backend reads and writes the
# request's own pages through the queue's ring; where it does not (6.12)
# the server falls back to user copy.  Either way: data written with
# direct I/O reads back identical from the device and from the image, an
# ext4 round trip passes fsck, and `devio status` and the exit summary
# name the mode.

# zc_features LOG: the driver's feature bits the server logged.
zc_features() { sed -n 's/.*driver features \(0x[0-9a-f]*\).*/\1/p' "$1" | head -n 1; }

# zc_expect LOG: the mode the best choice must be on this kernel, from the
# features the server logged (UBLK_F_AUTO_BUF_REG bit 11, ZERO_COPY bit 0).
zc_expect() {
  _f=$(zc_features "$1")
  if [ $((${_f:-0} >> 11 & 1)) = 1 ]; then echo auto-buf-reg
  elif [ $((${_f:-0} & 1)) = 1 ]; then echo zero-copy
  else echo user-copy; fi
}

# zc_data DEV IMG: 8 MiB of random data in 1 MiB direct writes and 16
# scattered 4 KiB ones, read back through the device (direct) and from
# the image; 0 when all three agree.
zc_data() {
  dd if=/dev/urandom of=/tmp/zc.src bs=1M count=8 2>/dev/null
  /usr/bin/dd if=/tmp/zc.src of="$1" bs=1M oflag=direct conv=fsync 2>/dev/null || return 1
  for _i in $(seq 0 15); do
    /usr/bin/dd if=/tmp/zc.src of="$1" bs=4k count=1 skip=$((_i * 31)) seek=$((2048 + _i * 7)) \
      oflag=direct 2>/dev/null || return 1
    /usr/bin/dd if=/tmp/zc.src of=/tmp/zc.src bs=4k count=1 skip=$((_i * 31)) seek=$((2048 + _i * 7)) \
      conv=notrunc 2>/dev/null
  done
  _n=$(stat -c %s /tmp/zc.src)
  _src=$(sha256sum </tmp/zc.src | cut -d' ' -f1)
  echo 3 >/proc/sys/vm/drop_caches
  _dev=$(/usr/bin/dd if="$1" bs=4k count=$((_n / 4096)) iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  _img=$(head -c "$_n" "$2" | sha256sum | cut -d' ' -f1)
  [ "$_dev" = "$_src" ] && [ "$_img" = "$_src" ]
}

# zc_run NAME WANT-MODE FS SERVE-ARGS...: one device over /tmp/zc.img in
# WANT-MODE ("best": whatever zc_expect says this kernel gives); FS=fs
# adds the ext4 round trip.
# zc_total FIELD LINE: FIELD summed over every queue of an exit summary
# (the kernel may send every request to one queue).
zc_total() {
  echo "$2" | awk -v f="$1" '{ for (i = 1; i < NF; i++) if ($i == f) n += $(i + 1) } END { print n + 0 }'
}

zc_run() {
  _t=$1; _want=$2; _fs=$3; shift 3
  rm -f /tmp/zc.img; truncate -s 64M /tmp/zc.img
  if ! start_ublk /tmp/zc-$_t.log /tmp/zc.img --ublk --queues 2 "$@"; then
    show_log /tmp/zc-$_t.log; fail $_t "server did not start"; stop_server KILL; return
  fi
  [ "$_want" = best ] && _want=$(zc_expect /tmp/zc-$_t.log)
  _why=
  zc_data "$DEV" /tmp/zc.img || _why="data did not read back identical"
  [ -z "$_why" ] && [ "$_fs" = fs ] && { fs_roundtrip "$DEV" || _why="ext4 round trip failed"; }
  devio status >/tmp/zc-st.out 2>&1
  stop_server TERM
  grep 'data path' /tmp/zc-$_t.log | sed 's/^/INFO /'
  _sum=$(grep "queue 0 served" /tmp/zc-$_t.log | tail -n 1)
  info "$_t: $_sum"
  if [ -n "$_why" ]; then show_log /tmp/zc-$_t.log; fail $_t "$_why"
  elif [ "$SRV_RC" != 0 ]; then show_log /tmp/zc-$_t.log; fail $_t "server exited $SRV_RC"
  elif ! grep -q "ublk device $DEV .* mode $_want " /tmp/zc-st.out; then cat /tmp/zc-st.out; fail $_t "devio status does not say mode $_want"
  elif ! echo "$_sum" | grep -q " mode $_want\$"; then fail $_t "exit summary does not say mode $_want"
  elif [ "$_want" != user-copy ] && [ "$(zc_total zero_copy "$_sum")" = 0 ]; then fail $_t "no request went zero copy"
  elif [ "$_want" != user-copy ] && [ "$(zc_total copy_syscalls "$_sum")" != 0 ]; then fail $_t "copies made in $_want"
  else pass $_t; fi
}

KMAJ=$(uname -r | cut -d. -f1)
# the best mode: on 7.x it must be a zero-copy one, on 6.12 user copy
t=ublk-zerocopy-file
zc_run $t best fs
if [ "$KMAJ" -ge 7 ] && ! grep -q 'data path: zero copy' /tmp/zc-$t.log; then
  fail $t-mode "a 7.x kernel (features $(zc_features /tmp/zc-$t.log)) did not get zero copy"
elif [ "$KMAJ" -lt 7 ] && ! grep -q 'data path: user copy' /tmp/zc-$t.log; then
  fail $t-mode "6.12 did not fall back to user copy"
else
  pass $t-mode
fi

# the other modes by force, where the driver has them; refused where not
for m in register-buf:zero-copy user:user-copy; do
  t=ublk-zerocopy-force-${m%%:*}
  _f=$(zc_features /tmp/zc-ublk-zerocopy-file.log)
  if [ "${m%%:*}" = register-buf ] && [ $((${_f:-0} & 1)) = 0 ]; then
    devio serve /tmp/zc.img --ublk --ublk-copy register-buf >/tmp/zc-r.log 2>&1 &
    SRV=$!
    if wait_for 30 dead $SRV && grep -q 'has no zero copy' /tmp/zc-r.log; then pass $t
    else show_log /tmp/zc-r.log; stop_server KILL; fail $t "not refused on a driver without zero copy"; fi
    continue
  fi
  zc_run $t ${m#*:} nofs --ublk-copy ${m%%:*}
done

# zero copy over a backend that cannot take registered buffers: refused
# with the reason (RAM disk), whatever the kernel
t=ublk-zerocopy-ram-refused
devio serve ram:16M --ublk --ublk-copy zero >/tmp/zc-ram.log 2>&1 &
SRV=$!
if wait_for 30 dead $SRV && wait $SRV; then fail $t "zero copy over ram was accepted"
elif grep -q -e 'takes no registered buffers' -e 'has no zero copy' /tmp/zc-ram.log; then pass $t
else show_log /tmp/zc-ram.log; stop_server KILL; fail $t "no reason given"; fi
rm -f /tmp/zc.img /tmp/zc.src
