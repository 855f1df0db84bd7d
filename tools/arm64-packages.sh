#!/usr/bin/env bash
# Downloads Debian 12 arm64 packages without installing them (this host may
# be x86_64), and unpacks each into the cache; prints each one's folder.
#
#   tools/arm64-packages.sh PACKAGE...
#
# Uses its own package lists (the host's apt configuration is not touched),
# refreshed when older than a day. A package is named as Debian names it;
# `linux-image-cloud-arm64` is resolved to the current versioned package.
# Output: $CACHE/arm64-packages/<package>_<version>/ (the unpacked .deb),
# reused while the version is current.
# $CACHE is $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else ~/.cache/vmm.
set -euo pipefail

cache="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}/arm64-packages"
die() { echo "arm64-packages: error: $*" >&2; exit 1; }
[ $# -gt 0 ] || die "usage: $0 PACKAGE..."

apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
touch "$apt_dir/status"
opts=(-o APT::Architecture=arm64 -o APT::Architectures=arm64
      -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache"
      -o Dir::State::Status="$apt_dir/status" -o Debug::NoLocking=1
      -o APT::Sandbox::User=root -q)
stamp="$apt_dir/updated"
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440)" ]; then
    echo "arm64-packages: refreshing the arm64 package lists" >&2
    apt-get "${opts[@]}" update >/dev/null || die "apt-get update (arm64 lists) failed"
    touch "$stamp"
fi

for pkg in "$@"; do
    if [ "$pkg" = linux-image-cloud-arm64 ]; then
        # The metapackage depends on the versioned image.
        pkg="$(apt-cache "${opts[@]}" depends "$pkg" | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)"
        [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-arm64"
    fi
    version="$(apt-cache "${opts[@]}" policy "$pkg" | sed -n 's/^ *Candidate: //p')"
    [ -n "$version" ] && [ "$version" != "(none)" ] || die "no arm64 package $pkg"
    out="$cache/${pkg}_${version//:/%}"
    if [ ! -d "$out" ]; then
        echo "arm64-packages: downloading $pkg $version" >&2
        work="$(mktemp -d)"
        (cd "$work" && apt-get "${opts[@]}" download "$pkg" >/dev/null) || die "cannot download $pkg"
        dpkg-deb -x "$work"/*.deb "$work/root"
        rm -rf "$out.tmp" && mv "$work/root" "$out.tmp" && mv "$out.tmp" "$out"
        rm -rf "$work"
    fi
    echo "$out"
done
