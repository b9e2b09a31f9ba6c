#!/usr/bin/env bash
# run.sh - the guest-kernel harness: builds devio without sanitizers, packs
# it with busybox, e2fsprogs and the ublk/nbd/ext4 modules of Debian's 6.12
# kernel into an initramfs, boots that kernel under qemu TCG and runs a
# scenario script inside (default tests/vm/guest-tests.sh).  The guest
# prints "PASS name" / "FAIL name" on its serial console; this script
# repeats those lines on stdout (scripts/test.sh counts them) and reports
# "FAIL vm-boot" when the guest never finished.
#
#   tests/vm/run.sh [--script FILE] [--timeout SECONDS] [--keep]
#
# Env: VM_KERNEL (default newest /boot/vmlinuz-6.12.*-amd64; or a vmlinuz
# inside its modules folder, as scripts/guest-kernels.sh caches 7.x), VM_BUILD
# (default $DEVIO_BUILD, else build-vm), VM_BUILDTYPE (debugoptimized, for a new VM_BUILD),
# VM_MEM (1G), VM_SMP (2), VM_LOG (serial log path), VM_ENV (words
# exported in the guest, e.g. "BENCH_MB=64"), VM_EXTRA_BINS (more host
# programs for the guest's /usr/bin, e.g. "fio"), VM_CMDLINE (more kernel
# command line words, e.g. "trace_event=sched:sched_switch"), VM_ACCEL
# (qemu's accelerator and CPU, default "-accel tcg,thread=multi -cpu max";
# "-accel kvm -cpu host" where the host has working KVM: this build
# machine's /dev/kvm stops the guest's kernel decompressor with "KVM
# internal error ... emulation failure", and its CPU shows no vmx/svm).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SCRIPT=tests/vm/guest-tests.sh
TIMEOUT=540
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --script) SCRIPT=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: $0 [--script FILE] [--timeout SECONDS] [--keep]" >&2; exit 2 ;;
  esac
done

fail() { echo "FAIL vm-boot ($*)"; exit 1; }

KERNEL=${VM_KERNEL:-$(ls /boot/vmlinuz-6.12.*-amd64 2>/dev/null | sort -V | tail -n 1)}
[ -n "$KERNEL" ] && [ -r "$KERNEL" ] || fail "no kernel ${VM_KERNEL:-6.12 in /boot (scripts/deps.sh installs it)}"
# /boot/vmlinuz-VER with /lib/modules/VER (an installed kernel), or
# .../modules/VER/vmlinuz inside its modules (scripts/guest-kernels.sh's cache).
if [ -d "$(dirname "$KERNEL")/kernel" ]; then
  MODDIR=$(dirname "$KERNEL")
  KVER=$(basename "$MODDIR")
else
  KVER=${KERNEL#/boot/vmlinuz-}
  MODDIR=/lib/modules/$KVER
fi
[ -d "$MODDIR" ] || fail "no modules in $MODDIR"
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 missing"
BUSYBOX=$(command -v busybox) || fail "busybox missing"

# The build to test: VM_BUILD, else scripts/test.sh's sanitized DEVIO_BUILD
# (its libasan/libubsan go into the guest like any other library, so the
# ublk front end runs under ASan+UBSan there), else a plain build-vm.
BUILD=${VM_BUILD:-${DEVIO_BUILD:-$ROOT/build-vm}}
if [ ! -f "$BUILD/build.ninja" ]; then
  meson setup "$BUILD" --buildtype="${VM_BUILDTYPE:-debugoptimized}" -Db_lundef=false -Dtests=disabled >/dev/null ||
    fail "meson setup $BUILD"
fi
ninja -C "$BUILD" >/dev/null || fail "build in $BUILD failed"
SAN=
grep -q __asan_init "$BUILD/devio" && SAN=-fsanitize=address,undefined # VM_BUILD may be a sanitized build
cc -O2 -Wall $SAN -D_GNU_SOURCE -DDEVIO_VERSION='"vmtool"' -I include -I cli -o "$BUILD/vmtool" tests/vm/vmtool.c \
  cli/attach_nbd.c cli/usage.c "$BUILD/libdevio.a" -luring -lgnutls -lz -lpthread || fail "building tests/vm/vmtool.c"

WORK=$(mktemp -d /tmp/devio-vm.XXXXXX)
cleanup() { [ "$KEEP" = 1 ] && echo "kept $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT
R=$WORK/root
mkdir -p "$R"/{bin,sbin,lib,lib64,usr/lib,usr/bin,etc,proc,sys,dev,tmp,run,mnt,modules}

# Binaries and the shared libraries they need (as ldd resolves them).
copy_bin() { # copy_bin PATH [NAME]
  local src=$1 name=${2:-$(basename "$1")}
  cp -L "$src" "$R/usr/bin/$name" # /usr/bin: busybox --install fills /bin
  ldd "$src" 2>/dev/null | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    [ -e "$R$lib" ] || cp -L "$lib" "$R$lib"
  done
}
cp "$BUSYBOX" "$R/bin/busybox"
copy_bin "$BUILD/devio"
copy_bin "$BUILD/vmtool"
for b in mke2fs e2fsck blkdiscard losetup dd; do
  p=$(command -v $b) || fail "$b missing"
  copy_bin "$p"
done
ln -s mke2fs "$R/usr/bin/mkfs.ext4"
# VM_EXTRA_BINS: more host tools for a --script that wants them (the
# benchmarks' fio: large, so not in every guest)
for b in ${VM_EXTRA_BINS:-}; do
  p=$(command -v "$b") || fail "$b missing (VM_EXTRA_BINS)"
  copy_bin "$p"
done
ln -s ../bin/busybox "$R/sbin/init"
# ld.so also lives at /lib64 on x86-64
[ -e "$R/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"

# Modules in load order (dependencies first), decompressed for busybox insmod.
MODS="crc32c_generic crc16 mbcache jbd2 ext4 loop nbd ublk_drv fuse" # fuse: built in on both Debian kernels
for m in $MODS; do
  f=$(find "$MODDIR/kernel" -name "$m.ko*" | head -n 1)
  if [ -z "$f" ]; then # built in, in this kernel's configuration (7.x: crc32c_generic)
    echo "INFO module $m: not in $MODDIR, taken as built in" >&2
    continue
  fi
  case "$f" in
    *.xz) xz -dc "$f" >"$R/modules/$m.ko" ;;
    *.zst) zstd -dqc "$f" >"$R/modules/$m.ko" ;;
    *) cp "$f" "$R/modules/$m.ko" ;;
  esac
done
ls "$R/modules" | grep '\.ko$' >/dev/null || fail "no modules packed from $MODDIR"
for m in $MODS; do [ -f "$R/modules/$m.ko" ] && echo "$m"; done >"$R/modules/order"
cp "$SCRIPT" "$R/scenario.sh"
for kv in ${VM_ENV:-}; do echo "export $kv"; done >"$R/env.sh"
cp tests/vm/guest-lib.sh "$R/guest-lib.sh"
mkdir -p "$R/scenarios" && cp tests/vm/scenarios/*.sh "$R/scenarios/" 2>/dev/null

cat >"$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=600m tmp /tmp
mount -t tmpfs run /run
ip link set lo up
ip addr add 127.0.0.1/8 dev lo 2>/dev/null
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
. /env.sh
echo "VM-START $(uname -r) $(nproc) cpus"
sh /scenario.sh
echo "VM-DONE"
sync
poweroff -f
INIT
chmod +x "$R/init" "$R/scenario.sh"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initrd.gz" || fail "packing the initramfs"

LOG=${VM_LOG:-$WORK/serial.log}
boot() {
  timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 ${VM_ACCEL:--accel tcg,thread=multi -cpu max} -m "${VM_MEM:-1G}" \
    -smp "${VM_SMP:-2}" -nographic -no-reboot -nic none \
    -kernel "$KERNEL" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 panic=-1 oops=panic loglevel=4 rdinit=/init ${VM_CMDLINE:-}" </dev/null >"$LOG" 2>&1
}
# A kernel that panics while it boots, before /init printed a line (seen
# once with 7.3.4 under multi-threaded TCG: an int3 oops while patching
# kernel text in sched_init_debug), is booted once more and said so; a
# panic after a scenario started is never retried.
for attempt in 1 2; do
  boot
  rc=$?
  if [ $attempt = 1 ] && tr -d '\r' <"$LOG" | grep -q 'Kernel panic' &&
     ! tr -d '\r' <"$LOG" | grep -qE '^(PASS|FAIL|INFO)[ -]'; then
    echo "INFO vm-boot: the kernel panicked while booting (before /init; qemu exit $rc): booting again"
    tr -d '\r' <"$LOG" | grep -m 3 -E 'Oops|RIP:|Kernel panic' | sed 's/^/INFO vm-boot: /'
    continue
  fi
  break
done
tr -d '\r' <"$LOG" | grep -E '^(PASS|FAIL|INFO|BENCH)[ -]' || true
if ! tr -d '\r' <"$LOG" | grep -q '^VM-DONE'; then
  echo "--- last lines of the serial console (qemu exit $rc):" >&2
  tr -d '\r' <"$LOG" | tail -n 40 >&2
  if tr -d '\r' <"$LOG" | grep -q 'Kernel panic'; then
    echo "FAIL vm-boot (the guest kernel panicked; qemu exit $rc)"
  else
    echo "FAIL vm-boot (guest did not finish within ${TIMEOUT}s; qemu exit $rc)"
  fi
  exit 1
fi
tr -d '\r' <"$LOG" | grep -q '^FAIL ' && exit 1
exit 0
