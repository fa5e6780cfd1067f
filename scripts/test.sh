#!/usr/bin/env bash
# The test command (README: "Test it"). Installs and starts what the tests need beyond the Rust
# toolchain (scripts/test-deps.sh: libvirt, QEMU, dnsmasq, sshd, the test guest; needs root
# for apt-get the first time), checks that the default build needs no libvirt, then runs every
# test, the libvirt driver and the real-QEMU end-to-end tests included.
# Extra arguments go to `cargo test` (e.g. a test-name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
# noVNC for the session page, from npm (web/package-lock.json).
scripts/build-web.sh
cargo build --bins
cargo test --all-targets --features libvirt "$@"
