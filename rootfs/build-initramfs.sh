#!/usr/bin/env bash
# Builds the default initramfs images, uncompressed newc cpio archives:
#   initramfs.cpio          /init (the guest agent, rootfs/agent, static musl
#                           binary), /bin/busybox (busybox-static) with /bin/sh
#                           linked to it, /dev /proc /sys /tmp: for VMs
#                           without a root disk (commands run from busybox);
#   initramfs-minimal.cpio  /init and the directories only: for VMs with a
#                           root disk, where the agent switches to the disk
#                           (busybox would cost 3 s of unpacking on PVM hosts).
# Uncompressed on purpose: a compressed initramfs is unpacked by emulated
# kernel code on PVM hosts, which costs seconds. For the same reason there is
# no link per busybox applet (400 links cost 10 s to unpack there): the init
# runs an unknown command as a busybox applet, and busybox's shell finds its
# applets by itself.
#
#   rootfs/build-initramfs.sh [--arch x86_64|arm64]   (default: this host's)
#
# Output: $CACHE/initramfs/<hash>/{initramfs,initramfs-minimal}.cpio (hash of
# the agent binary, busybox and this script) and the stable link
# $CACHE/initramfs/current; for another architecture than the host's (arm64
# on an x86_64 host: the agent cross-built, Debian's arm64 busybox-static
# from tools/arm64-packages.sh) the link is $CACHE/initramfs/arm64-current.
# $CACHE is $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else ~/.cache/vmm.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}"

die() { echo "initramfs: error: $*" >&2; exit 1; }

host_arch="$(uname -m | sed 's/aarch64/arm64/')"
arch="$host_arch"
case "${1:-}" in
    --arch) arch="${2:-}" ;;
    "") ;;
    *) die "usage: $0 [--arch x86_64|arm64]" ;;
esac
case "$arch" in
    x86_64) target=x86_64-unknown-linux-musl ;;
    arm64) target=aarch64-unknown-linux-musl ;;
    *) die "unknown architecture '$arch' (x86_64 or arm64)" ;;
esac
link=current
busybox=/bin/busybox
if [ "$arch" != "$host_arch" ]; then
    link="$arch-current"
    [ "$arch" = arm64 ] || die "only arm64 is cross-built"
    command -v aarch64-linux-gnu-gcc >/dev/null || die "the arm64 agent is cross-built: apt-get install gcc-aarch64-linux-gnu"
    rustup target add "$target" >/dev/null 2>&1 || rustup target add "$target"
    busybox="$("$repo/tools/arm64-packages.sh" busybox-static)/bin/busybox"
fi

[ -x "$busybox" ] || die "$busybox is missing: apt-get install busybox-static (tools/setup.sh does it)"
if readelf -l "$busybox" | grep -q INTERP; then die "$busybox is not static: apt-get install busybox-static"; fi
command -v cpio >/dev/null || die "cpio is missing: apt-get install cpio"

cargo build --quiet --release --manifest-path "$repo/Cargo.toml" --target "$target" -p vmm-agent
agent="${CARGO_TARGET_DIR:-$repo/target}/$target/release/vmm-agent"

key="$(cat "$agent" "$busybox" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
out="$cache/initramfs/$key"
if [ -f "$out/initramfs.cpio" ] && [ -f "$out/initramfs-minimal.cpio" ]; then
    ln -sfn "$key" "$cache/initramfs/$link"
    echo "initramfs: up to date: $out/initramfs.cpio" >&2
    exit 0
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
pack() { (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner 0:0 --quiet) > "$1"; }
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,root} "$out.tmp"
install -m 0755 "$agent" "$stage/init"
pack "$out.tmp/initramfs-minimal.cpio"
install -m 0755 "$busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
pack "$out.tmp/initramfs.cpio"
rm -rf "$out" && mv "$out.tmp" "$out"
ln -sfn "$key" "$cache/initramfs/$link"
echo "initramfs: built $out/initramfs.cpio ($(du -h "$out/initramfs.cpio" | cut -f1)) and initramfs-minimal.cpio ($(du -h "$out/initramfs-minimal.cpio" | cut -f1))" >&2
