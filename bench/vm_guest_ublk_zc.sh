# vm_guest_ublk_zc.sh - runs inside the guest (bench/bench_ublk_zc.sh boots
# it): ublk zero copy against the loop device and against user copy on one
# tmpfs file, in interleaved rounds (every device once per round, so that
# host load shifts hit all of them alike), plus zero copy with 512 KiB
# requests and other builds' zero copy (packed as devio-NAME).  The
# first round also prints what explains a gap: each device's request size
# limit, whether loop uses direct I/O, how the file backend uses io_uring
# on tmpfs, io_uring worker threads and io_uring_enter calls per request,
# and context switches per MiB.  Prints "RUN ROUND DEVICE WORKLOAD MiB/s",
# "CTXT ROUND DEVICE WORKLOAD N" (the guest's context switches per MiB for
# the dd workloads, per 3 s run for fio's) and "DIAG ..." lines.
. /guest-lib.sh
DD=/usr/bin/dd
MB=${BENCH_MB:-64}
ROUNDS=${BENCH_REPS:-5}
IMG=/tmp/bench.img
cd /tmp

dd_rate() { # dd_rate ARGS...: MiB/s of one coreutils dd run
  "$DD" "$@" 2>&1 | awk -F', ' '/copied/ { split($(NF-1), t, " "); split($1, b, " ");
    if (t[1] > 0) printf "%.1f\n", b[1] / t[1] / 1048576; else print "0" }'
}
ctxt() { awk '/^ctxt/ { print $2 }' /proc/stat; }
fio_rate() { # fio_rate RW DEV: MiB/s of 3 s of 4 KiB at QD32 (io_uring, direct)
  fio --name=b --filename="$2" --rw="$1" --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 \
    --size=${MB}M --runtime=3 --time_based --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' 'NF > 50 { printf "%.1f\n", ($7 + $48) / 1024 }'
}

# measure ROUND NAME WORKLOAD MIB CMD...: one run, its MiB/s and the
# guest's context switches divided by MIB (1: per run)
measure() {
  _mr=$1 _md=$2 _mw=$3 _mm=$4; shift 4
  _mc0=$(ctxt); _mv=$("$@"); _mc1=$(ctxt)
  echo "RUN $_mr $_md $_mw ${_mv:-0}"
  echo "CTXT $_mr $_md $_mw $(( (_mc1 - _mc0) / _mm ))"
}

workloads() { # workloads ROUND NAME DEV
  measure "$1" "$2" seq-write-1M $MB dd_rate if=/dev/zero of="$3" bs=1M count=$MB oflag=direct
  measure "$1" "$2" seq-read-1M $MB dd_rate if="$3" of=/dev/null bs=1M count=$MB iflag=direct
  measure "$1" "$2" read-4k-qd1 8 dd_rate if="$3" of=/dev/null bs=4k count=2048 iflag=direct
  if command -v fio >/dev/null; then
    measure "$1" "$2" randread-4k-qd32 1 fio_rate randread "$3"
    measure "$1" "$2" randwrite-4k-qd32 1 fio_rate randwrite "$3"
  fi
}

diag_ublk() { # diag_ublk NAME: after the runs, before the server stops
  echo "DIAG $1 max_sectors_kb $(cat /sys/block/${DEV#/dev/}/queue/max_sectors_kb)"
  echo "DIAG $1 threads $(cat /proc/$SRV/task/*/comm | sort | uniq -c | awk '{ printf "%s%s x%s", s, $2, $1; s = ", " }')"
  echo "DIAG $1 $(devio status 2>/dev/null | grep -m 1 'file: ' | sed 's/^ *//')"
}

summary() { # summary NAME LOG: io_uring_enter per request from the exit summary
  awk -v name="$1" '/queue [0-9]+ served/ { for (i = 1; i <= NF; i++) {
      if ($i == "served") s += $(i + 1); if ($i == "io_uring_enter") e += $(i + 1) } }
    END { if (s) printf "DIAG %s requests %d io_uring_enter %.3f per request\n", name, s, e / s }' "$2"
}

# ublk_round ROUND NAME DEVIO-DIR SERVE-ARGS...: one round on a ublk
# device served by DEVIO-DIR/devio
ublk_round() {
  _ur=$1 _un=$2 _udir=$3; shift 3
  _upath=$PATH; PATH=$_udir:$PATH # (start_ublk and wait_for use _n and _log)
  start_ublk /tmp/$_un.log $IMG --ublk --queues 2 "$@"; _uok=$?
  PATH=$_upath
  if [ $_uok != 0 ]; then
    sed "s|^|DIAG $_un round $_ur failed to start: |" /tmp/$_un.log
    stop_server TERM; return
  fi
  workloads "$_ur" "$_un" "$DEV"
  [ "$_ur" = 1 ] && diag_ublk "$_un"
  stop_server TERM
  [ "$_ur" = 1 ] && summary "$_un" /tmp/$_un.log
}

# BENCH_FS=ext4: the file on ext4 (on a loop device over tmpfs) instead
# of tmpfs, whose page cache io_uring can read without a worker thread
if [ "${BENCH_FS:-tmpfs}" = ext4 ]; then
  dd if=/dev/zero of=/tmp/fs.img bs=1M count=$((MB + 64)) 2>/dev/null
  FSLOOP=$(/usr/bin/losetup -f --show /tmp/fs.img)
  mkfs.ext4 -q "$FSLOOP" && mkdir -p /mnt/b && mount "$FSLOOP" /mnt/b || exit 1
  IMG=/mnt/b/bench.img
  trap 'umount /mnt/b; /usr/bin/losetup -d "$FSLOOP"; rm -f /tmp/fs.img' EXIT
fi
echo "DIAG file on $(awk -v d="$(dirname $IMG)" '$2 == d { t = $3 } END { print t }' /proc/mounts)"
dd if=/dev/urandom of=$IMG bs=1M count=$MB 2>/dev/null
# other builds to compare, packed as /usr/bin/devio-NAME (BENCH_BUILDS)
OTHERS=$(ls /usr/bin/devio-* 2>/dev/null | sed 's|.*/devio-||')
mkdir -p /tmp/b-new && ln -sf /usr/bin/devio /tmp/b-new/devio
for b in $OTHERS; do mkdir -p /tmp/b-$b && ln -sf /usr/bin/devio-$b /tmp/b-$b/devio; done
for r in $(seq "$ROUNDS"); do
  LOOP=$(/usr/bin/losetup -f --show $IMG)
  workloads "$r" loop "$LOOP"
  if [ "$r" = 1 ]; then
    echo "DIAG loop max_sectors_kb $(cat /sys/block/${LOOP#/dev/}/queue/max_sectors_kb) dio $(cat /sys/block/${LOOP#/dev/}/loop/dio)"
  fi
  /usr/bin/losetup -d "$LOOP"
  ublk_round "$r" zero /tmp/b-new --ublk-copy zero
  ublk_round "$r" zero-512k /tmp/b-new --ublk-copy zero --max-io 524288
  for b in $OTHERS; do ublk_round "$r" zero-$b /tmp/b-$b --ublk-copy zero; done
  ublk_round "$r" user /tmp/b-new --ublk-copy user
done
rm -f $IMG
