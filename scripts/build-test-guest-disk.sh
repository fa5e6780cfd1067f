#!/usr/bin/env bash
# Builds, once, a BIOS-bootable raw disk of the tiny test guest, for tests that need a guest
# which boots from its disk alone (as an imported VMware disk does), not by direct kernel boot:
#   <out>/bootable.raw  64 MiB: an MBR (syslinux's mbr.bin) with one active FAT partition at
#                       1 MiB holding syslinux, the tiny guest's kernel and initramfs, and a
#                       syslinux.cfg that boots them with console=ttyS0
#   <out>/ready         the line the guest prints on its serial console once it is up (the tiny
#                       guest's, as the kernel and initramfs are the same)
# Built without loop devices or mounts (parted, mkfs.vfat --offset, mtools, syslinux --offset
# all work on the image file), so it runs in containers too. The tiny guest comes from
# build-test-guest.sh. Prints <out>. Default <out>: /var/cache/guaca-hive/guests/bootdisk.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-/var/cache/guaca-hive/guests/bootdisk}"
disk="$out/bootable.raw"
if [ -s "$disk" ] && [ -s "$out/ready" ]; then
    echo "$out"
    exit 0
fi
for tool in parted mkfs.vfat mcopy syslinux; do
    command -v "$tool" >/dev/null || { echo "build-test-guest-disk: $tool missing; run scripts/test-deps.sh" >&2; exit 1; }
done
mbr=/usr/lib/syslinux/mbr/mbr.bin
[ -s "$mbr" ] || { echo "build-test-guest-disk: $mbr missing (syslinux-common); run scripts/test-deps.sh" >&2; exit 1; }
tiny="$("$here/build-test-guest.sh")/tiny"
for f in kernel initrd cmdline ready; do
    [ -s "$tiny/$f" ] || { echo "build-test-guest-disk: $tiny/$f missing" >&2; exit 1; }
done

mkdir -p "$out"
work="$(mktemp -d)"
# Built beside its final name, so the last mv is a rename: no half-written disk counts as built.
img="$disk.tmp"
trap 'rm -rf "$work" "$img"' EXIT
# 512-byte sectors: the partition spans sector 2048 (1 MiB) to the end of the 64 MiB disk.
size_mib=64
start=2048
sectors=$((size_mib * 2048))
offset=$((start * 512))
rm -f "$img"
truncate -s "${size_mib}M" "$img"
parted -s "$img" mklabel msdos mkpart primary fat16 "${start}s" "$((sectors - 1))s" set 1 boot on
# The block count is in KiB; mkfs.vfat's --offset is in sectors, mtools' @@ and syslinux's in bytes.
mkfs.vfat -F 16 -n GUACABOOT --offset "$start" "$img" $(((sectors - start) / 2)) >/dev/null

cmdline="$(cat "$tiny/cmdline")"
case " $cmdline " in *" console=ttyS0"*) ;; *) cmdline="$cmdline console=ttyS0" ;; esac
cat > "$work/syslinux.cfg" <<CFG
SERIAL 0 115200
DEFAULT tiny
PROMPT 0
TIMEOUT 0
LABEL tiny
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $cmdline
CFG
export MTOOLS_SKIP_CHECK=1
mcopy -i "$img@@$offset" "$tiny/kernel" ::vmlinuz
mcopy -i "$img@@$offset" "$tiny/initrd" ::initrd.img
mcopy -i "$img@@$offset" "$work/syslinux.cfg" ::syslinux.cfg
syslinux --install --offset "$offset" "$img"
# The boot code only (440 bytes): the partition table after it stays.
dd if="$mbr" of="$img" bs=440 count=1 conv=notrunc status=none

cp "$tiny/ready" "$out/ready.tmp"
mv "$img" "$disk"
mv "$out/ready.tmp" "$out/ready"
echo "$out"
