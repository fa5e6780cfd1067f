#!/usr/bin/env bash
# Builds the `tiny-net` test template; called by build-test-guest.sh, which has already
# extracted the kernel package:  build-test-guest-net.sh <extracted-kernel-pkg> <template-dir>
# The guest: the cloud kernel, virtio-net and its dependencies loaded from the package's own
# modules (the cloud kernel builds them as modules), eth0 configured by busybox udhcpc, and
# dropbear on port 22 accepting only the test key generated here (root, no passwords). The
# serial console prints the ready line only once dropbear listens, then keeps a shell.
# Files written: kernel initrd cmdline ready disk.qcow2 guest_ed25519 guest_ed25519.pub
# host_key_fingerprint. The private keys stay in the template dir (a cache, never the repo).
set -euo pipefail
kroot="$1"
dir="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir -p "$dir"
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc/dropbear,root/.ssh,run,var/run,var/log,lib/modules/hive}
cp "$(command -v busybox)" "$root/bin/busybox"

# virtio-net and what it needs, in load order (dependencies first), from the kernel package.
moddir="$(ls -d "$kroot"/lib/modules/*)"
order=()
add_module() {
    local name="$1" file deps dep
    for m in "${order[@]}"; do [ "$m" = "$name" ] && return 0; done
    file="$(find "$moddir" -name "$name.ko" -print -quit)"
    [ -n "$file" ] || { echo "build-test-guest-net: module $name not in $moddir" >&2; exit 1; }
    # The `depends=` field of the module's .modinfo section (modinfo needs kmod, not installed).
    deps="$(grep -a -o 'depends=[a-z0-9_,-]*' "$file" | head -n1 | cut -d= -f2)"
    for dep in ${deps//,/ }; do add_module "$dep"; done
    cp "$file" "$root/lib/modules/hive/$name.ko"
    order+=("$name")
}
if grep -q '^CONFIG_VIRTIO_NET=m' "$kroot"/boot/config-*; then
    add_module virtio_pci
    add_module virtio_net
fi
printf '%s\n' "${order[@]}" > "$root/lib/modules/hive/order"

# dropbear with the shared libraries ldd lists, the loader included, at the same paths.
cp /usr/sbin/dropbear "$root/bin/dropbear"
for lib in $(ldd /usr/sbin/dropbear | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

# Keys: the guest's host key (dropbear format) and the test client key pair (OpenSSH format).
rm -f "$dir/guest_ed25519" "$dir/guest_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -C guaca-hive-test -f "$dir/guest_ed25519"
chmod 600 "$dir/guest_ed25519"
cp "$dir/guest_ed25519.pub" "$root/root/.ssh/authorized_keys"
dropbearkey -t ed25519 -f "$root/etc/dropbear/dropbear_ed25519_host_key" >/dev/null 2>&1
dropbearkey -y -f "$root/etc/dropbear/dropbear_ed25519_host_key" | grep '^ssh-ed25519 ' > "$work/host.pub"
ssh-keygen -l -E sha256 -f "$work/host.pub" | awk '{print $2}' > "$dir/host_key_fingerprint.tmp"
grep -q '^SHA256:' "$dir/host_key_fingerprint.tmp" || { echo "build-test-guest-net: no host key fingerprint" >&2; exit 1; }
chmod 700 "$root/root" "$root/root/.ssh"
chmod 600 "$root/root/.ssh/authorized_keys" "$root/etc/dropbear/dropbear_ed25519_host_key"

# Users: root with a locked password ("*": no password login) and busybox's shell.
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:*:19000:0:99999:7:::' > "$root/etc/shadow"
echo 'root:x:0:' > "$root/etc/group"
echo '/bin/sh' > "$root/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\n' > "$root/etc/nsswitch.conf"
chmod 600 "$root/etc/shadow"

cat > "$root/etc/udhcpc.script" <<'DHCP'
#!/bin/sh
# busybox udhcpc calls this with deconfig, bound, renew, leasefail or nak.
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        echo "$ip" > /run/eth0.ip ;;
esac
exit 0
DHCP
chmod +x "$root/etc/udhcpc.script"

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname guaca-guest
clear > /dev/tty1 2>/dev/null
printf '\n\n   guaca-hive test guest (net)\n   =========================\n\n   kernel %s, busybox, dropbear\n\n' "$(uname -r)" > /dev/tty1
say() { echo "$*" > /dev/ttyS0; }
while read -r m; do
    [ -n "$m" ] && { insmod "/lib/modules/hive/$m.ko" || say "guaca-hive test guest: insmod $m failed"; }
done < /lib/modules/hive/order
ip link set lo up
# Up to 60 s for the first lease; udhcpc then stays in the background to renew it.
if udhcpc -i eth0 -s /etc/udhcpc.script -t 60 -T 1 -A 1 -b -S >/dev/null 2>&1 && [ -s /run/eth0.ip ]; then
    say "guaca-hive test guest: eth0 $(cat /run/eth0.ip)"
    dropbear -F -E -s -j -k -p 22 -r /etc/dropbear/dropbear_ed25519_host_key -P /run/dropbear.pid >/tmp/dropbear.log 2>&1 &
    # Ready means reachable: wait until dropbear listens on port 22.
    n=0
    while ! netstat -ltn 2>/dev/null | grep -q ':22 '; do
        n=$((n + 1)); [ $n -gt 300 ] && break
        usleep 100000
    done
    if netstat -ltn 2>/dev/null | grep -q ':22 '; then
        say "guaca-hive test guest ready"
    else
        say "guaca-hive test guest: dropbear does not listen: $(cat /tmp/dropbear.log)"
    fi
else
    say "guaca-hive test guest: no DHCP lease on eth0"
fi
while true; do
    setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1'
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$dir/initrd.tmp"

cp "$kroot"/boot/vmlinuz-* "$dir/kernel.tmp"
echo "console=tty1 console=ttyS0 panic=-1 loglevel=4" > "$dir/cmdline"
echo "guaca-hive test guest ready" > "$dir/ready"
qemu-img create -q -f qcow2 "$dir/disk.qcow2.tmp" 64M
mv "$dir/kernel.tmp" "$dir/kernel"
mv "$dir/initrd.tmp" "$dir/initrd"
mv "$dir/host_key_fingerprint.tmp" "$dir/host_key_fingerprint"
mv "$dir/disk.qcow2.tmp" "$dir/disk.qcow2"
