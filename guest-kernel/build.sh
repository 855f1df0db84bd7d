#!/usr/bin/env bash
# Builds the guest kernel of one or more flavours.
#
#   guest-kernel/build.sh [standard|pvm|arm64|host|all]...   (default: host)
#
# Flavours: `standard` and `pvm` are x86_64 (an ELF vmlinux); `arm64` is an
# arm64 `Image`, cross-built with gcc-aarch64-linux-gnu on an x86_64 host.
# "host" is the flavour this machine needs: arm64 on an arm64 host, else pvm
# when the kvm_pvm module is loaded, standard otherwise; "all" is every
# flavour. Source: Debian's linux-source-6.1 package. Output:
# $CACHE/kernel/<flavour>-<hash>/<vmlinux or Image>, where the hash covers
# the source package version, the config fragments, the patches and this
# script, plus the stable link $CACHE/kernel/<flavour> -> <flavour>-<hash>,
# which the VMM reads. An existing build with the same hash is reused.
# $CACHE is $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else ~/.cache/vmm.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}"
tarball=/usr/src/linux-source-6.1.tar.xz
jobs="$(nproc)"

die() { echo "guest-kernel: error: $*" >&2; exit 1; }

host_flavour() {
    if [ "$(uname -m)" = aarch64 ]; then echo arm64
    elif [ -d /sys/module/kvm_pvm ]; then echo pvm
    else echo standard; fi
}

build_flavour() {
    local flavour="$1"
    # The architecture's make variables, its fragment, the make target and
    # the file it leaves.
    local make_args=() platform target file
    case "$flavour" in
        standard|pvm) platform=x86_64; target=vmlinux; file=vmlinux ;;
        arm64)
            platform=arm64; target=Image; file=arch/arm64/boot/Image
            make_args=(ARCH=arm64)
            if [ "$(uname -m)" != aarch64 ]; then
                command -v aarch64-linux-gnu-gcc >/dev/null \
                    || die "the arm64 flavour is cross-built: apt-get install gcc-aarch64-linux-gnu"
                make_args+=(CROSS_COMPILE=aarch64-linux-gnu-)
            fi ;;
        *) die "unknown flavour '$flavour' (standard, pvm or arm64)" ;;
    esac
    local fragments=("$here/config/common.config" "$here/config/$platform.config")
    [ "$platform" = "$flavour" ] || fragments+=("$here/config/$flavour.config")
    [ -f "$tarball" ] || die "$tarball is missing: apt-get install linux-source-6.1 (tools/setup.sh does it)"
    local pkgver key out src name
    name="$(basename "$file")"
    pkgver="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
    key="$({
        echo "linux-source-6.1 $pkgver"
        cat "${fragments[@]}"
        if [ -d "$here/patches/$flavour" ]; then cat "$here/patches/$flavour"/*.patch; fi
        cat "${BASH_SOURCE[0]}"
    } | sha256sum | cut -c1-16)"
    out="$cache/kernel/$flavour-$key"
    if [ -f "$out/$name" ]; then
        ln -sfn "$flavour-$key" "$cache/kernel/$flavour"
        echo "guest-kernel: $flavour is up to date: $out/$name" >&2
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
    cat "${fragments[@]}" > "$src/vmm.config"
    make -C "$src" -s "${make_args[@]}" KCONFIG_ALLCONFIG=vmm.config allnoconfig
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
    make -C "$src" -s -j"$jobs" "${make_args[@]}" "$target"
    mkdir -p "$out.tmp"
    cp "$src/$file" "$src/.config" "$out.tmp/"
    rm -rf "$out" && mv "$out.tmp" "$out"
    ln -sfn "$flavour-$key" "$cache/kernel/$flavour"
    rm -rf "$src"
    echo "guest-kernel: built $out/$name ($(du -h "$out/$name" | cut -f1))" >&2
}

[ $# -gt 0 ] || set -- host
mkdir -p "$cache/kernel"
for arg in "$@"; do
    case "$arg" in
        host) build_flavour "$(host_flavour)" ;;
        all) build_flavour standard; build_flavour pvm; build_flavour arm64 ;;
        *) build_flavour "$arg" ;;
    esac
done
