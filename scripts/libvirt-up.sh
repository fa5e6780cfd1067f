#!/usr/bin/env bash
# Starts the test suite's private libvirtd (config scripts/libvirt/libvirtd.conf, socket under
# /run/guaca-hive/libvirt) and virtlogd, unless they already answer. Idempotent. Prints the URI:
#   qemu:///system?socket=/run/guaca-hive/libvirt/libvirt-sock
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sock=/run/guaca-hive/libvirt/libvirt-sock
uri="qemu:///system?socket=$sock"
mkdir -p /run/guaca-hive/libvirt /var/log/guaca-hive

# Only a virtlogd in this mount namespace counts: the migration peer's (libvirt-peer-up.sh)
# runs in its own, on its own /run/libvirt.
own_virtlogd() {
    local p
    for p in $(pgrep -x virtlogd); do
        [ "$(readlink "/proc/$p/ns/mnt" 2>/dev/null)" = "$(readlink /proc/self/ns/mnt)" ] && return 0
    done
    return 1
}
if ! own_virtlogd; then
    virtlogd -d -f "$here/libvirt/virtlogd.conf"
fi
if ! virsh -c "$uri" version >/dev/null 2>&1; then
    # A previous private libvirtd that stopped answering (its socket removed) still holds
    # libvirt's driver pid files until it has exited: make sure it has, or the new one fails.
    if pkill -f "libvirtd.*scripts/libvirt/libvirtd\.conf" 2>/dev/null; then
        for _ in $(seq 1 300); do
            pgrep -f "libvirtd.*scripts/libvirt/libvirtd\.conf" >/dev/null || break
            sleep 0.1
        done
        pkill -9 -f "libvirtd.*scripts/libvirt/libvirtd\.conf" 2>/dev/null || true
        sleep 0.5
    fi
    libvirtd -d -f "$here/libvirt/libvirtd.conf" -p /run/guaca-hive/libvirtd.pid
    for _ in $(seq 1 100); do
        virsh -c "$uri" version >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
if ! virsh -c "$uri" version >/dev/null 2>&1; then
    echo "libvirt-up: libvirtd did not answer on $sock; see /var/log/guaca-hive/libvirtd.log" >&2
    exit 1
fi
echo "$uri"
