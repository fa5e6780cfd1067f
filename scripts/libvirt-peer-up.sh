#!/usr/bin/env bash
# Starts the test suite's second private libvirtd, the migration "peer", unless it already
# answers. Idempotent. Prints its URI:
#   qemu:///system?socket=/run/guaca-hive/libvirt-peer/libvirt-sock
# For libvirt's migration it is another host: it runs in its own mount + UTS namespace
# (hostname hive-peer) with private /run/libvirt (tmpfs) and its own /etc/libvirt,
# /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt (bind mounts of directories under
# $state), its own host_uuid (scripts/libvirt/libvirtd-peer.conf), its own virtlogd, and
# migration ports (also used for the NBD server of storage copy) 49300-49399, apart from the
# main daemon's default 49152-49215. Its socket and pid file are under /run/guaca-hive/libvirt-peer,
# which is not privately mounted, so clients (and the main daemon, for peer-to-peer
# migration) reach it from outside. Files, serial sockets and disks outside the private
# directories are shared with the host, as on a node with shared storage.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state=/var/lib/guaca-hive/libvirt-peer
rundir=/run/guaca-hive/libvirt-peer
sock="$rundir/libvirt-sock"
uri="qemu:///system?socket=$sock"
log=/var/log/guaca-hive/libvirtd-peer.log
# Distinct from scripts/libvirt-up.sh's patterns (which match scripts/libvirt/libvirtd.conf).
pattern="libvirtd.*libvirt-peer"
logd_pattern="virtlogd.*libvirt-peer"

answers() { timeout 10 virsh -c "$uri" version >/dev/null 2>&1; }

if answers && pgrep -f "$logd_pattern" >/dev/null; then
    echo "$uri"
    exit 0
fi

mkdir -p "$rundir" /var/log/guaca-hive "$state"/{lib,cache,log} \
    /run/libvirt /var/lib/libvirt /etc/libvirt /var/cache/libvirt /var/log/libvirt
chmod 0755 "$state/lib" "$state/log"
chmod 0711 "$state/cache"

# A stale peer (stopped answering, or lost its virtlogd): make sure it has exited, or its
# namespace's leftovers confuse the new one.
for p in "$pattern" "$logd_pattern"; do
    if pkill -f "$p" 2>/dev/null; then
        for _ in $(seq 1 300); do
            pgrep -f "$p" >/dev/null || break
            sleep 0.1
        done
        pkill -9 -f "$p" 2>/dev/null || true
    fi
done
rm -f "$sock" "$rundir"/libvirt-sock-ro "$rundir"/libvirt-admin-sock "$rundir"/*.pid

# The peer's /etc/libvirt: a copy of the host's, once, without the host's domains, networks,
# storage pools and secrets (it must not start the host's networks a second time).
if [ ! -d "$state/etc" ]; then
    rm -rf "$state/etc.tmp"
    cp -a /etc/libvirt "$state/etc.tmp"
    rm -rf "$state/etc.tmp/qemu" "$state/etc.tmp/storage" "$state/etc.tmp/secrets"
    mkdir -p "$state/etc.tmp/qemu/networks/autostart" "$state/etc.tmp/secrets"
    chmod 0700 "$state/etc.tmp/secrets"
    mv "$state/etc.tmp" "$state/etc"
fi
# Its own configs, rewritten on every start.
install -m 0644 "$here/libvirt/libvirtd-peer.conf" "$state/etc/libvirtd.conf"
install -m 0644 "$here/libvirt/virtlogd-peer.conf" "$state/etc/virtlogd.conf"
{
    grep -Ev '^[[:space:]]*migration_port_(min|max)[[:space:]]*=' /etc/libvirt/qemu.conf || true
    echo "# scripts/libvirt-peer-up.sh: apart from the main daemon's default 49152-49215."
    echo "# Also the range libvirt takes the NBD server's port from for storage copy."
    echo "migration_port_min = 49300"
    echo "migration_port_max = 49399"
} > "$state/etc/qemu.conf.tmp"
chmod 0600 "$state/etc/qemu.conf.tmp"
mv "$state/etc/qemu.conf.tmp" "$state/etc/qemu.conf"

# The daemons keep the namespace alive once the shell that made it has exited.
unshare --mount --uts --propagation private -- env STATE="$state" RUNDIR="$rundir" bash -euc '
    mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
    mount --bind "$STATE/lib" /var/lib/libvirt
    mount --bind "$STATE/etc" /etc/libvirt
    mount --bind "$STATE/cache" /var/cache/libvirt
    mount --bind "$STATE/log" /var/log/libvirt
    hostname hive-peer
    virtlogd -d -f "$STATE/etc/virtlogd.conf" -p "$RUNDIR/virtlogd.pid"
    libvirtd -d -f "$STATE/etc/libvirtd.conf" -p "$RUNDIR/libvirtd.pid"
' >>"$log" 2>&1 || {
    echo "libvirt-peer-up: starting the peer libvirtd failed; see $log" >&2
    exit 1
}

# The first start probes QEMU's capabilities (its cache is the peer's own): allow for it.
deadline=$((SECONDS + 60))
until answers; do
    if [ "$SECONDS" -ge "$deadline" ] || ! pgrep -f "$pattern" >/dev/null; then
        echo "libvirt-peer-up: the peer libvirtd did not answer on $sock; see $log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "$uri"
