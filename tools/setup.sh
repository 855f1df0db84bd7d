#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine to build and run the VMM:
#  - Debian packages: kernel source and build tools, busybox-static, cpio,
#    qemu-system-x86 (for boot-time comparisons), debootstrap, e2fsprogs
#    (mkfs.ext4 and debugfs write imported images), docker-registry and
#    skopeo (the image pull tests run a registry on 127.0.0.1 and push to it),
#    containerd and runc (tests/containerd.rs starts a containerd of its
#    own and compares our shim with runc, its default runtime);
#    python3-venv (the E2B and MCP tests install the official SDKs from PyPI;
#    the JavaScript E2B test needs Node.js 20.18+ and npm, which this machine
#    kind has: tools/client-env.sh checks);
#  - the Rust musl target (the guest agent is a static binary);
#  - the guest kernel for this host's flavour, the default initramfs and the
#    Debian base image, cached outside the repository (see
#    guest-kernel/build.sh and rootfs/), reused when their inputs did not
#    change;
#  - with `--clients`, the official clients the E2B and MCP tests drive
#    (tools/client-env.sh), made while the kernel compiles;
#  - with `--arm64`, what the arm64 tests run (tools/arm64-l1.sh prepare:
#    Debian's arm64 kernel and busybox, the arm64 guest kernel and
#    initramfs, the VMM cross-built for aarch64), also while the kernel
#    compiles; its packages (qemu-system-arm, gcc-aarch64-linux-gnu) are
#    installed on every x86_64 setup, so an arm64 build works anywhere;
#  - the VMM itself (release build; `--no-release` skips it: the test suite
#    builds its own debug binaries).
# Idempotent: run it again any time.
set -euo pipefail

release=1
clients=0
arm64=0
for arg in "$@"; do
    case $arg in
        --no-release) release=0 ;;
        --clients) clients=1 ;;
        --arm64) arm64=1 ;;
        *) echo "usage: $0 [--no-release] [--clients] [--arm64]" >&2; exit 2 ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# This host's target (.cargo/config.toml names x86_64 for plain `cargo`).
export CARGO_BUILD_TARGET="${CARGO_BUILD_TARGET:-$(uname -m)-unknown-linux-gnu}"
packages=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio
          busybox-static qemu-system-x86 debootstrap e2fsprogs binutils
          docker-registry skopeo python3 python3-venv containerd runc)
# arm64 cross-builds and the emulated arm64 host (an arm64 host's own gcc
# names itself aarch64-linux-gnu-gcc already), with the arm64 C library's
# headers (the cross gcc only recommends them; C code built by crates for
# aarch64 needs them).
[ "$(uname -m)" = aarch64 ] || packages+=(qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for t in x86_64-unknown-linux-musl aarch64-unknown-linux-gnu aarch64-unknown-linux-musl; do
    rustup target add "$t" >/dev/null 2>&1 || rustup target add "$t"
done

# The base image and the test clients (downloads and unpacking: mostly
# waiting on the network and the disk) are made while the kernel compiles.
pids=()
jobs_started=()
in_background() {
    "$@" >/dev/null &
    pids+=($!)
    jobs_started+=("$*")
}
in_background "$repo/rootfs/build-base-image.sh"
if [ "$clients" = 1 ]; then
    in_background "$repo/tools/client-env.sh" python
    in_background "$repo/tools/client-env.sh" node
fi
if [ "$arm64" = 1 ]; then
    in_background "$repo/tools/arm64-l1.sh" prepare
fi
"$repo/guest-kernel/build.sh" host
"$repo/rootfs/build-initramfs.sh"
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "setup: ${jobs_started[$i]} failed (its error is above)" >&2; exit 1; }
done
if [ "$release" = 1 ]; then
    cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p vmm -p vmm-bench
    echo "setup: done; the VMM is $repo/target/$CARGO_BUILD_TARGET/release/vmm" >&2
else
    echo "setup: done (no release build)" >&2
fi
