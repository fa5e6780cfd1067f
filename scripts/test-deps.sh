#!/usr/bin/env bash
# Installs and starts what the test suite needs beyond the Rust toolchain, idempotently:
#   - libvirt (daemon, QEMU driver, headers for the `virt` crate) and QEMU with qemu-img, all
#     from bookworm-backports so that qemu-system-x86 does not replace the newer qemu-img;
#   - dnsmasq and sshd (the tests start their own instances on loopback ports);
#   - redis-server (the coordinator tests start, stop and restart their own on free ports);
#   - Postgres (Debian's postgresql; postgres-up.sh starts the `main` cluster on 127.0.0.1:5432
#     with trust auth for user postgres; the store tests create their own databases in it);
#   - a private libvirtd (its own config and socket under /run/guaca-hive) plus virtlogd;
#   - Prometheus (`promtool` and the server the metrics test starts on a loopback port; the
#     system service stays stopped);
#   - Chromium and ChromeDriver (chromium-driver pulls chromium in) for the browser tests;
#   - the tiny test guests (a Debian kernel and a busybox initramfs; `tiny-net` adds DHCP and
#     dropbear, from dropbear-bin), see build-test-guest.sh, and a BIOS-bootable raw disk of the
#     tiny guest (syslinux, mtools, dosfstools, parted), see build-test-guest-disk.sh;
#   - the desktop driver's processes: Xvfb, x11vnc and Chromium (with one small font, for pages
#     with text; the tests read the screen over VNC, so no screenshot tool is needed).
# Needs root (it runs apt-get). Prints the libvirt URI the tests use.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export DEBIAN_FRONTEND=noninteractive

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v libvirtd >/dev/null || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
[ -x /usr/sbin/dropbear ] || need+=(dropbear-bin)
command -v cpio >/dev/null || need+=(cpio)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v ip >/dev/null || need+=(iproute2)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v syslinux >/dev/null || need+=(syslinux)
[ -s /usr/lib/syslinux/mbr/mbr.bin ] || need+=(syslinux-common)
command -v mcopy >/dev/null || need+=(mtools)
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
command -v parted >/dev/null || need+=(parted)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)
command -v pg_ctlcluster >/dev/null && command -v psql >/dev/null || need+=(postgresql)
command -v Xvfb >/dev/null || need+=(xvfb)
command -v x11vnc >/dev/null || need+=(x11vnc)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "test-deps: missing ${need[*]}; run this script as root" >&2
        exit 1
    fi
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat > /etc/apt/sources.list.d/guaca-hive-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    apt-get update -qq
    # Package scripts must not start system-wide daemons (sshd on :22, a default libvirtd):
    # the tests run their own instances.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get install -y -qq -o Dpkg::Use-Pty=0 -t bookworm-backports \
        qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu \
        libvirt-clients libvirt-dev >/dev/null
    apt-get install -y -qq -o Dpkg::Use-Pty=0 \
        dnsmasq-base openssh-server openssh-client iproute2 cpio pkg-config busybox-static \
        dropbear-bin redis-server syslinux syslinux-common mtools dosfstools parted >/dev/null
    # Without recommends: the node exporter and its service are not wanted here.
    apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends prometheus >/dev/null
    # Postgres for the store tests; started below by postgres-up.sh, not by the package.
    apt-get install -y -qq -o Dpkg::Use-Pty=0 postgresql postgresql-client >/dev/null
    # The desktop driver's; recommends (xauth, x11-utils) are not needed.
    apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends xvfb x11vnc chromium fonts-dejavu-core >/dev/null
    # The browser tests drive Debian's Chromium through its ChromeDriver.
    apt-get install -y -qq -o Dpkg::Use-Pty=0 chromium-driver >/dev/null
    if [ $made_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

"$here/postgres-up.sh" >/dev/null
"$here/libvirt-up.sh"
"$here/build-test-guest.sh" >/dev/null
"$here/build-test-guest-disk.sh" >/dev/null
"$here/accel.sh" >/dev/null
