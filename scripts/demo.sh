#!/usr/bin/env bash
# demo.sh - the project's demo command (README): installs what it needs,
# builds devio, serves a disk image and a RAM disk, and shows real clients
# using them: devio's own client, ImDisk's wire protocol, qemu-img and
# libnbd over NBD, and the Linux kernel through FUSE + a loop device with a
# mounted ext4 file system.  Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/deps.sh
if [ ! -f build-release/build.ninja ]; then
  meson setup build-release --buildtype=release >/dev/null
fi
ninja -C build-release >/dev/null
DEVIO=$ROOT/build-release/devio

WORK=$(mktemp -d /tmp/devio-demo.XXXXXX)
PIDS=()
MNT=$WORK/mnt
cleanup() {
  set +e
  mountpoint -q "$MNT" && umount "$MNT"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_path() { for _ in $(seq 100); do [ -e "$1" ] && return 0; sleep 0.1; done; echo "timed out waiting for $1"; return 1; }

step "A 64 MiB disk image with a pattern in it"
truncate -s 64M "$WORK/disk.img"
head -c 1M /dev/urandom > "$WORK/pattern"
dd if="$WORK/pattern" of="$WORK/disk.img" bs=1M seek=3 conv=notrunc status=none
sha256sum "$WORK/pattern" | cut -c1-16

step "devio serve disk.img --devio unix:... --nbd unix:...   (one server, two protocols)"
"$DEVIO" serve "$WORK/disk.img" --devio "unix:$WORK/devio.sock" --nbd "unix:$WORK/nbd.sock" &
PIDS+=($!)
wait_path "$WORK/devio.sock"; wait_path "$WORK/nbd.sock"

step "devio info (ImDisk's devio protocol)"
"$DEVIO" info "devio+unix://$WORK/devio.sock"

step "read back the pattern over the devio protocol"
"$DEVIO" cat "devio+unix://$WORK/devio.sock" --offset 3M --length 1M | sha256sum | cut -c1-16

step "nbdinfo (libnbd) sees the same export over NBD"
nbdinfo "nbd+unix:///?socket=$WORK/nbd.sock" | sed -n '1,12p'

step "qemu-img compare: the NBD export equals the image"
qemu-img compare -f raw -F raw "$WORK/disk.img" "nbd+unix:///?socket=$WORK/nbd.sock"

step "a 1 TiB RAM disk starts instantly and costs memory only where written"
"$DEVIO" serve ram:1T --nbd "unix:$WORK/ram.sock" &
RAMPID=$!; PIDS+=($RAMPID)
wait_path "$WORK/ram.sock"
grep VmRSS /proc/$RAMPID/status
qemu-io -f raw -c 'write -P 0xab 0 256M' "nbd+unix:///?socket=$WORK/ram.sock" | tail -1
grep VmRSS /proc/$RAMPID/status
qemu-io -f raw -c 'discard 0 256M' "nbd+unix:///?socket=$WORK/ram.sock" | tail -1
echo "after TRIM:"; grep VmRSS /proc/$RAMPID/status

step "the kernel's view: FUSE file + loop device, ext4 on it"
truncate -s 128M "$WORK/fs.img"
mkdir -p "$WORK/fuse"
"$DEVIO" serve "$WORK/fs.img" --fuse "$WORK/fuse" --loop > "$WORK/loop.txt" &
PIDS+=($!)
for _ in $(seq 100); do grep -q /dev/loop "$WORK/loop.txt" 2>/dev/null && break; sleep 0.1; done
LOOP=$(grep -o '/dev/loop[0-9]*' "$WORK/loop.txt" | head -1)
echo "block device: $LOOP"
mkfs.ext4 -q "$LOOP"
mkdir -p "$MNT"; mount "$LOOP" "$MNT"
cp "$WORK/pattern" "$MNT/hello.bin"; sync
df -h "$MNT" | tail -1
sha256sum "$MNT/hello.bin" | cut -c1-16
umount "$MNT"
e2fsck -fn "$LOOP" | tail -1
"$DEVIO" status

step "done: every server stops and every device goes away on exit"
