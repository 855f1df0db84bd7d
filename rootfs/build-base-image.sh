#!/usr/bin/env bash
# Builds the shared read-only base image: Debian bookworm (minbase + python3)
# as an ext4 file made with `mkfs.ext4 -d` (no loop mounts, no root-only
# mount tricks). Every VM that boots it shares this one file; each VM writes
# to its own layer (see docs/disk.md).
#
#   rootfs/build-base-image.sh [--arch x86_64|arm64]   (default: this host's)
#
# Output: $CACHE/base/<hash>/base.ext4 (hash of this script, the mirror and
# the architecture) and the stable link $CACHE/base/current, or
# $CACHE/base/arm64-current for an arm64 image built on an x86_64 host.
# Reused when up to date.
# $CACHE is $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else ~/.cache/vmm.
# $VMM_DEBIAN_MIRROR overrides the mirror (default: deb.debian.org).
#
# Another architecture's image: debootstrap's second stage runs the image's
# own programs (package scripts, `useradd`), which this host runs through
# qemu-user-static registered with binfmt_misc (Debian's qemu-user-static
# and binfmt-support packages do it, with the F flag that lets a chroot use
# the interpreter). mmdebstrap would need the same emulation for the same
# scripts; debootstrap is what the native build already uses.
set -euo pipefail

cache="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}"
mirror="${VMM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
packages=python3

die() { echo "base-image: error: $*" >&2; exit 1; }

host_arch="$(dpkg --print-architecture)"
arch="$host_arch"
case "${1:-}" in
    --arch) arch="$(echo "${2:-}" | sed 's/^x86_64$/amd64/')" ;;
    "") ;;
    *) die "usage: $0 [--arch x86_64|arm64]" ;;
esac
link=current
if [ "$arch" != "$host_arch" ]; then
    link="$arch-current"
    [ "$arch" = arm64 ] || die "only arm64 is built for another architecture"
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "running arm64 programs needs qemu-user-static: apt-get install qemu-user-static binfmt-support (and, where binfmt_misc is not mounted, mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64)"
fi
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap (tools/setup.sh does it)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is missing: apt-get install e2fsprogs"
[ "$(id -u)" = 0 ] || die "debootstrap needs root (run tools/setup.sh as root)"

key="$({ cat "${BASH_SOURCE[0]}"; echo "$mirror $suite $packages"; [ "$arch" = amd64 ] || echo "$arch"; } | sha256sum | cut -c1-16)"
out="$cache/base/$key"
if [ -f "$out/base.ext4" ]; then
    ln -sfn "$key" "$cache/base/$link"
    echo "base-image: up to date: $out/base.ext4 ($(du -h --apparent-size "$out/base.ext4" | cut -f1))" >&2
    exit 0
fi

tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
echo "base-image: debootstrap $suite $arch (minbase + $packages) from $mirror" >&2
debootstrap --arch="$arch" --variant=minbase --include="$packages" "$suite" "$tree" "$mirror" >/dev/null

# Trim what a sandbox never reads: package caches and lists, docs, man
# pages, locales other than C, Python bytecode caches (rebuilt on demand).
rm -rf "$tree"/var/cache/apt/* "$tree"/var/lib/apt/lists/* "$tree"/var/log/* \
       "$tree"/usr/share/doc/* "$tree"/usr/share/man/* "$tree"/usr/share/info/* \
       "$tree"/usr/share/locale/* "$tree"/tmp/*
find "$tree" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "sandbox" > "$tree/etc/hostname"
# An unprivileged user, `user` (uid 1000, home /home/user), as E2B's
# sandboxes have: commands run as root unless a request names it
# (docs/agents.md).
chroot "$tree" useradd --create-home --uid 1000 --shell /bin/bash user
# Login shells (the E2B SDKs run every command as `bash -l -c`) start a
# process for `id -u` in /etc/profile and for `mesg n` in root's
# .profile: about a second each on a PVM host. Bash knows its uid, and a
# sandbox has no terminal to protect.
sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/' "$tree/etc/profile"
sed -i '/^mesg n/d' "$tree/root/.profile"
grep -q 'EUID:-' "$tree/etc/profile" || die "/etc/profile changed upstream: update the id -u edit"
# The VMM's guest agent mounts these itself.
mkdir -p "$tree"/proc "$tree"/sys "$tree"/dev "$tree"/tmp "$tree"/run

used_kib="$(du -sk "$tree" | cut -f1)"
# Room for ext4 metadata plus 25% free space for small writes; the guest's
# writes go to its own layer anyway.
size_mib=$(( (used_kib * 5 / 4) / 1024 + 32 ))
mkdir -p "$out.tmp"
# 4 KiB blocks: below 512 MiB mkfs would pick 1 KiB blocks, which made
# `vmm run --cold -- true` 30% slower on a PVM host (29.6 s against 22.8 s
# for the same files in an imported image with 4 KiB blocks; vmm bench image).
mkfs.ext4 -q -F -b 4096 -L sandbox-root -d "$tree" -E root_owner=0:0 "$out.tmp/base.ext4" "${size_mib}M"
rm -rf "$out" && mv "$out.tmp" "$out"
ln -sfn "$key" "$cache/base/$link"
echo "base-image: built $out/base.ext4: ${size_mib} MiB apparent, $(du -h "$out/base.ext4" | cut -f1) on disk" >&2
