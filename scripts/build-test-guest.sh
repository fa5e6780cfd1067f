#!/usr/bin/env bash
# Builds the tiny bootable test guest from Debian packages, once, into a cache directory:
#   <out>/tiny/kernel    the kernel of Debian's linux-image-*-cloud-amd64 (downloaded, not installed)
#   <out>/tiny/initrd    a busybox initramfs (busybox-static): a banner on the screen, a shell on
#                        the serial console (ttyS0)
#   <out>/tiny/cmdline   the kernel command line
#   <out>/tiny/ready     the line the guest prints on its serial console once it is up
#   <out>/tiny/disk.qcow2  a small empty disk, the template's base image
# A second template, <out>/tiny-net, has the same layout and the same kernel, and an initramfs
# that also loads virtio-net, takes an address on eth0 by DHCP (busybox udhcpc) and runs
# dropbear (Debian's dropbear-bin, with its shared libraries) on port 22. Its serial console
# prints the ready line only once dropbear listens. Beside it, made at build time and never in
# the repository:
#   <out>/tiny-net/guest_ed25519(.pub)     the test key pair; the public key is root's only
#                                          authorized key in the guest
#   <out>/tiny-net/host_key_fingerprint    SHA256:… of the guest's host key, for pinning
# This is the template layout of the libvirt driver (src/drivers/libvirt). Prints <out>.
# Default <out>: /var/cache/guaca-hive/templates (override with GUEST_DIR).
set -euo pipefail
out="${GUEST_DIR:-/var/cache/guaca-hive/templates}"
dir="$out/tiny"
net="$out/tiny-net"
built() {
    local d="$1"; shift
    for f in kernel initrd disk.qcow2 ready "$@"; do [ -s "$d/$f" ] || return 1; done
}
if built "$dir" && built "$net" guest_ed25519 guest_ed25519.pub host_key_fingerprint; then
    echo "$out"
    exit 0
fi
for tool in busybox cpio qemu-img apt-get dpkg-deb ssh-keygen ldd; do
    command -v "$tool" >/dev/null || { echo "build-test-guest: $tool missing; run scripts/test-deps.sh" >&2; exit 1; }
done
for tool in /usr/sbin/dropbear /usr/bin/dropbearkey; do
    [ -x "$tool" ] || { echo "build-test-guest: $tool missing (dropbear-bin); run scripts/test-deps.sh" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
chown _apt "$work" 2>/dev/null || true

# The kernel: the package linux-image-cloud-amd64 depends on, extracted without installing.
kpkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"
[ -n "$kpkg" ] || { apt-get update -qq; kpkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"; }
(cd "$work" && apt-get download -qq "$kpkg" >/dev/null)
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/k"

if ! built "$dir"; then
mkdir -p "$dir"
cp "$work"/k/boot/vmlinuz-* "$dir/kernel.tmp"

# The initramfs: static busybox and an init that paints a banner on the VGA console and keeps
# a shell on the serial console.
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc}
cp "$(command -v busybox)" "$root/bin/busybox"
file "$root/bin/busybox" 2>/dev/null | grep -q static || ldd "$root/bin/busybox" 2>&1 | grep -q "not a dynamic" || {
    echo "build-test-guest: busybox is not static; install busybox-static" >&2; exit 1; }
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
hostname guaca-guest
clear > /dev/tty1 2>/dev/null
printf '\n\n   guaca-hive test guest\n   ===================\n\n   kernel %s, busybox\n\n' "$(uname -r)" > /dev/tty1
echo "guaca-hive test guest ready" > /dev/ttyS0
while true; do
    setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1'
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$dir/initrd.tmp"

echo "console=tty1 console=ttyS0 panic=-1 loglevel=4" > "$dir/cmdline"
echo "guaca-hive test guest ready" > "$dir/ready"
qemu-img create -q -f qcow2 "$dir/disk.qcow2.tmp" 64M
mv "$dir/kernel.tmp" "$dir/kernel"
mv "$dir/initrd.tmp" "$dir/initrd"
mv "$dir/disk.qcow2.tmp" "$dir/disk.qcow2"
fi

built "$net" guest_ed25519 guest_ed25519.pub host_key_fingerprint || "$(dirname "$0")/build-test-guest-net.sh" "$work/k" "$net"
echo "$out"
