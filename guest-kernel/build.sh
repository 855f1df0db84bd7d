#!/usr/bin/env bash
# Builds the guest kernel (an ELF vmlinux) of one or more flavours.
#
#   guest-kernel/build.sh [standard|pvm|host|all]...   (default: host)
#
# "host" is the flavour this machine needs: pvm when the kvm_pvm module is
# loaded, standard otherwise. Source: Debian's linux-source-6.1 package.
# Output: $CACHE/kernel/<flavour>-<hash>/vmlinux, where the hash covers the
# source package version, the config fragments, the patches and this script,
# plus the stable link $CACHE/kernel/<flavour> -> <flavour>-<hash>, which the
# VMM reads. An existing build with the same hash is reused.
# $CACHE is $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else ~/.cache/vmm.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}"
tarball=/usr/src/linux-source-6.1.tar.xz
jobs="$(nproc)"

die() { echo "guest-kernel: error: $*" >&2; exit 1; }

host_flavour() {
    if [ -d /sys/module/kvm_pvm ]; then echo pvm; else echo standard; fi
}

build_flavour() {
    local flavour="$1"
    [ -f "$here/config/$flavour.config" ] || die "unknown flavour '$flavour' (standard or pvm)"
    [ -f "$tarball" ] || die "$tarball is missing: apt-get install linux-source-6.1 (tools/setup.sh does it)"
    local pkgver key out src
    pkgver="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
    key="$({
        echo "linux-source-6.1 $pkgver"
        cat "$here/config/common.config" "$here/config/$flavour.config"
        if [ -d "$here/patches/$flavour" ]; then cat "$here/patches/$flavour"/*.patch; fi
        cat "${BASH_SOURCE[0]}"
    } | sha256sum | cut -c1-16)"
    out="$cache/kernel/$flavour-$key"
    if [ -f "$out/vmlinux" ]; then
        ln -sfn "$flavour-$key" "$cache/kernel/$flavour"
        echo "guest-kernel: $flavour is up to date: $out/vmlinux" >&2
        return
    fi
    src="$cache/kernel/build-$flavour"
    echo "guest-kernel: building $flavour ($pkgver, key $key) in $src" >&2
    rm -rf "$src" && mkdir -p "$src"
    tar -xf "$tarball" -C "$src" --strip-components=1
    if [ -d "$here/patches/$flavour" ]; then
        for p in "$here/patches/$flavour"/*.patch; do
            patch -d "$src" -p1 --forward --quiet < "$p" || die "patch $(basename "$p") does not apply to $pkgver"
        done
    fi
    cat "$here/config/common.config" "$here/config/$flavour.config" > "$src/vmm.config"
    make -C "$src" -s KCONFIG_ALLCONFIG=vmm.config allnoconfig
    # Every option the fragments ask for must have taken effect.
    local bad=0 line sym
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$src/.config" || { echo "guest-kernel: not applied: $line" >&2; bad=1; } ;;
            "# CONFIG_"*" is not set")
                sym="${line#\# }"; sym="${sym%% *}"
                if grep -q "^$sym=" "$src/.config"; then echo "guest-kernel: still set: $sym" >&2; bad=1; fi ;;
        esac
    done < "$src/vmm.config"
    [ "$bad" = 0 ] || die "the config fragments did not apply cleanly (see above)"
    make -C "$src" -s -j"$jobs" vmlinux
    mkdir -p "$out.tmp"
    cp "$src/vmlinux" "$src/.config" "$out.tmp/"
    rm -rf "$out" && mv "$out.tmp" "$out"
    ln -sfn "$flavour-$key" "$cache/kernel/$flavour"
    rm -rf "$src"
    echo "guest-kernel: built $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))" >&2
}

[ $# -gt 0 ] || set -- host
mkdir -p "$cache/kernel"
for arg in "$@"; do
    case "$arg" in
        host) build_flavour "$(host_flavour)" ;;
        all) build_flavour standard; build_flavour pvm ;;
        *) build_flavour "$arg" ;;
    esac
done
