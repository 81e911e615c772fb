#!/usr/bin/env bash
# The test command (README "Testing"): installs what the tests need on a
# fresh Debian machine, then runs every check CI enforces.
#
#   scripts/test.sh          everything
#   scripts/test.sh --quick  the test suite only (no fmt, clippy, docs)
set -euo pipefail
cd "$(dirname "$0")/.."

# --- set-up: the oracles the tests run -------------------------------------
need=()
# qemu-img, qemu-io: the interop tests' oracle.
command -v qemu-img >/dev/null 2>&1 && command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
# virt-xml-validate (and the xmllint it runs) check pool/volume XML against
# libvirt's schemas. Only the client tools: the daemon's recommends would
# replace qemu-utils with an older qemu.
command -v virt-xml-validate >/dev/null 2>&1 || need+=(libvirt-clients)
command -v xmllint >/dev/null 2>&1 || need+=(libxml2-utils)
# nbdinfo and nbdcopy (libnbd), nbdkit: clients and servers the NBD tests
# run against `vdisk serve` and vdisk's NBD client.
command -v nbdinfo >/dev/null 2>&1 && command -v nbdcopy >/dev/null 2>&1 || need+=(libnbd-bin python3-libnbd)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
# cryptsetup formats and dumps LUKS headers on plain files (the LUKS tests'
# second oracle; no device mapper needed).
command -v cryptsetup >/dev/null 2>&1 || [ -x /usr/sbin/cryptsetup ] || need+=(cryptsetup-bin)
# Python's cryptography (OpenSSL's AES): the LUKS2 tests' independent
# payload cipher.
python3 -c 'import cryptography' >/dev/null 2>&1 || need+=(python3-cryptography)
if [ ${#need[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing ${need[*]} and apt-get is not available: install them, then run this again" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# GlusterFS, a real shared filesystem (tests/shared_gluster.rs: two FUSE
# mounts as two hosts): best effort. Where it cannot be installed, or FUSE
# or the daemon cannot run, those tests say so and skip.
if ! command -v glusterd >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    gsudo=""
    [ "$(id -u)" -eq 0 ] || gsudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    { $gsudo apt-get update -qq && $gsudo apt-get install -y -qq --no-install-recommends glusterfs-server glusterfs-client; } \
        || echo "GlusterFS could not be installed: the GlusterFS tests will skip"
fi
# nfs-ganesha, a userspace NFS server (tests/shared_nfs.rs), and the NFS
# clients: best effort too; mounting also needs the kernel's NFS client.
if ! command -v ganesha.nfsd >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    nsudo=""
    [ "$(id -u)" -eq 0 ] || nsudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    { $nsudo apt-get update -qq && $nsudo apt-get install -y -qq --no-install-recommends nfs-ganesha nfs-ganesha-vfs nfs-common libnfs-utils; } \
        || echo "nfs-ganesha could not be installed: the NFS tests will skip"
fi
qemu-img --version | head -1
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true

# --- checks ----------------------------------------------------------------
if [ "${1:-}" != "--quick" ]; then
    echo "== cargo fmt --check"
    cargo fmt --all -- --check
    echo "== cargo clippy (all targets, all features, -D warnings)"
    cargo clippy --all-targets --all-features -- -D warnings
    echo "== cargo clippy (library alone, default features off)"
    cargo clippy --lib --no-default-features -- -D warnings
    echo "== cargo doc (-D warnings)"
    RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features
fi
# The whole suite, fuzz corpus replay included (tests/fuzz_replay.rs), in
# the `ci` profile: release speed with overflow checks on.
echo "== cargo test --profile ci"
cargo test --profile ci
