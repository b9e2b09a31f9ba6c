#!/usr/bin/env bash
# guest-kernels.sh - fetch a current Debian kernel (Linux 7.x from
# trixie-backports) for the guest harness (tests/vm) into a cache, never into
# the system: a private apt source list and state folder, `apt-get download`
# of linux-binary-* and linux-modules-*, `dpkg-deb -x` into the cache.
# Prints the path of the vmlinuz on stdout (its modules are in the same
# folder, as the package lays them out).  Idempotent: a cached kernel is
# used as it is; DEVIO_KERNEL_REFRESH=1 looks for a newer one.
#
#   scripts/guest-kernels.sh            # the newest 7.x kernel, fetched once
# Env: DEVIO_KERNEL_CACHE (default /var/cache/devio/guest-kernels),
#      DEVIO_KERNEL_SUITE (trixie-backports), DEVIO_KERNEL_SERIES (7).
set -euo pipefail
CACHE=${DEVIO_KERNEL_CACHE:-/var/cache/devio/guest-kernels}
SUITE=${DEVIO_KERNEL_SUITE:-trixie-backports}
SERIES=${DEVIO_KERNEL_SERIES:-7}

cached() { ls -d "$CACHE"/root/usr/lib/modules/"$SERIES".*-amd64/vmlinuz 2>/dev/null | sort -V | tail -n 1; }

if [ "${DEVIO_KERNEL_REFRESH:-0}" != 1 ] && [ -n "$(cached)" ]; then
  cached
  exit 0
fi

APT=$CACHE/apt
mkdir -p "$APT"/{lists/partial,cache/archives/partial,etc} "$CACHE/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
  >"$APT/etc/sources.list"
: >"$APT/status"
opts=(-o Dir::Etc::sourcelist="$APT/etc/sources.list" -o Dir::Etc::sourceparts=/nonexistent
      -o Dir::State::Lists="$APT/lists" -o Dir::State::status="$APT/status"
      -o Dir::Cache="$APT/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q)
apt-get "${opts[@]}" update >&2
# The plain amd64 flavour (not cloud, not rt), newest version of the series.
ver=$(apt-cache "${opts[@]}" search --names-only "^linux-binary-$SERIES\\.[0-9.]+\\+deb[0-9]+-amd64\$" |
      awk '{print $1}' | sed 's/^linux-binary-//' | sort -V | tail -n 1)
if [ -z "$ver" ]; then
  echo "guest-kernels: no linux-binary-$SERIES.*-amd64 in $SUITE" >&2
  exit 1
fi
if [ -f "$CACHE/root/usr/lib/modules/$ver/vmlinuz" ]; then
  echo "$CACHE/root/usr/lib/modules/$ver/vmlinuz"
  exit 0
fi
echo "guest-kernels: fetching Linux $ver from $SUITE into $CACHE" >&2
(cd "$CACHE/debs" && apt-get "${opts[@]}" download "linux-binary-$ver" "linux-modules-$ver" >&2)
rm -rf "$CACHE/root.new"
mkdir -p "$CACHE/root.new"
for deb in "$CACHE/debs/linux-binary-${ver}_"*.deb "$CACHE/debs/linux-modules-${ver}_"*.deb; do
  dpkg-deb -x "$deb" "$CACHE/root.new"
done
[ -f "$CACHE/root.new/usr/lib/modules/$ver/vmlinuz" ] || { echo "guest-kernels: no vmlinuz in the packages of $ver" >&2; exit 1; }
# One kernel kept: the new one replaces what was there.
rm -rf "$CACHE/root" "$CACHE/debs"/*.deb
mv "$CACHE/root.new" "$CACHE/root"
echo "$CACHE/root/usr/lib/modules/$ver/vmlinuz"
