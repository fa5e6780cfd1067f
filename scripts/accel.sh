#!/usr/bin/env bash
# Prints the accelerator the end-to-end tests should use: "kvm" when /dev/kvm really runs a
# guest, else "tcg". Opening /dev/kvm is not enough: on some nested hosts it opens but guests
# hang or QEMU aborts, so this boots the test guest once under KVM (seconds at most) and
# watches for its ready line. The answer is cached in /run/guaca-hive/accel.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache=/run/guaca-hive/accel
if [ -s "$cache" ]; then cat "$cache"; exit 0; fi
mkdir -p /run/guaca-hive
answer=tcg
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    dir="$("$here/build-test-guest.sh")/tiny"
    if timeout 20 qemu-system-x86_64 -accel kvm -m 256 -kernel "$dir/kernel" -initrd "$dir/initrd" \
        -append "console=ttyS0 panic=-1" -display none -serial stdio -monitor none -no-reboot \
        -nodefaults 2>/dev/null | grep -q -m1 "test guest ready"; then
        answer=kvm
    fi
fi
echo "$answer" > "$cache"
echo "$answer"
