#!/usr/bin/env bash
# deps.sh - install the Debian 12 packages devio needs to build, test, demo
# and benchmark.  Idempotent; needs root.  Skips apt when all are present.
set -euo pipefail
PKGS=(
  # build
  build-essential meson ninja-build pkg-config liburing-dev libcmocka-dev zlib1g-dev clang libclang-rt-14-dev
  libjansson-dev libgnutls28-dev
  # a static link against libdevio.a (pkg-config --static devio: gnutls.pc's
  # Libs.private name -lunistring, which libgnutls28-dev does not pull in)
  libunistring-dev
  # man pages (scdoc sources in docs/man), rendered in tests/integration/test_docs.py
  scdoc man-db
  # the Debian package (debian/, tests/integration/test_package.py) and bash completion
  debhelper dpkg-dev lintian bash-completion
  # test peers and tools
  python3 python3-pytest qemu-utils libnbd-bin python3-libnbd nbdkit nbd-server fio fuse3
  e2fsprogs xfsprogs fdisk util-linux kmod procps psmisc iproute2
  # service tests: systemd-socket-activate and systemd-analyze (tests/integration/test_daemon.py)
  systemd
  # NBD over TLS tests: certtool, psktool (tests/integration/test_tls.py)
  gnutls-bin
  # Ceph RBD: the library to build against, and a one-node cluster for the tests
  librbd-dev ceph-mon ceph-osd ceph-common qemu-block-extra
  # guest-kernel harness (ublk, kernel nbd)
  qemu-system-x86 busybox-static cpio xz-utils 'linux-image-6.12.*-amd64-unsigned'
  # benchmarks and profiling
  hyperfine linux-perf valgrind bc
)
missing=()
for p in "${PKGS[@]}"; do
  case "$p" in
    *'*'*) ls /boot/vmlinuz-6.12.*-amd64 >/dev/null 2>&1 || missing+=("$p") ;;
    *) dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p") ;;
  esac
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# A pattern can match several kernel builds: take the plain amd64 one.
resolved=()
for p in "${missing[@]}"; do
  if [[ "$p" == *'*'* ]]; then
    k=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9.+a-z]*-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -n 1)
    [ -n "$k" ] && resolved+=("$k") || echo "deps: no Debian 6.12 kernel package found; guest tests will be skipped" >&2
  else
    resolved+=("$p")
  fi
done
apt-get install -y -q --no-install-recommends "${resolved[@]}" >/dev/null
