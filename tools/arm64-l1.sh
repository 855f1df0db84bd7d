#!/usr/bin/env bash
# Runs a job on an arm64 Linux host with KVM, made on this x86_64 machine:
# an "L1" arm64 Linux under qemu-system-aarch64 (TCG, EL2 emulated, so its
# kernel brings up KVM/arm64) whose initramfs holds our aarch64 `vmm` and
# what arm64 guests ("L2") of it need. ../shared/HOST-ARM64.md has the
# measurements behind the choices here.
#
#   tools/arm64-l1.sh prepare          builds what L1 holds (progress on stderr)
#   tools/arm64-l1.sh run JOB.sh       prepares, then boots L1, runs JOB.sh in
#                                      it, and prints L1's console; exits
#                                      with QEMU's status
#
# In L1, JOB.sh runs in /work as root with /proc, /sys, /dev, /tmp and /run
# mounted and loopback up, and finds in /work: `vmm` (aarch64, static),
# `Image` (our arm64 guest kernel), `initramfs.cpio` and
# `initramfs-minimal.cpio` (our agent for arm64), `disk.ext4` (a root disk:
# busybox), `debian-Image` (Debian's cloud kernel, also L1's own),
# `busybox-initramfs.cpio` (busybox as /init: prints `L2-MARKER` and powers
# off), and `vmm-minimal` (tools/minimal-vmm: the smallest VMM that boots
# them, the yardstick of the boot goal), plus the files $ARM64_L1_FILES
# names (space-separated paths; for example an arm64 base image). L1 powers
# off after the job.
#
# Inputs, each cached like the x86_64 ones: Debian's arm64 cloud kernel and
# busybox-static (tools/arm64-packages.sh), the arm64 kernel flavour
# (guest-kernel/build.sh arm64), the arm64 initramfs
# (rootfs/build-initramfs.sh --arch arm64), and `vmm` cross-built with
# `cargo build --target aarch64-unknown-linux-gnu` ($ARM64_L1_PROFILE: dev,
# the default, or release).
# Needs qemu-system-arm, gcc-aarch64-linux-gnu, cpio and e2fsprogs
# (tools/setup.sh installs them).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}"
target=aarch64-unknown-linux-gnu
# A development build by default: it compiles in a fraction of a release
# build's time and the tests' sections take about as long with it (the
# guests' own code dominates); ARM64_L1_PROFILE=release for measurements.
profile="${ARM64_L1_PROFILE:-dev}"
case "$profile" in
    dev) profile_args=(); vmm="${CARGO_TARGET_DIR:-$repo/target}/$target/debug/vmm" ;;
    release) profile_args=(--release); vmm="${CARGO_TARGET_DIR:-$repo/target}/$target/release/vmm" ;;
    *) echo "arm64-l1: error: ARM64_L1_PROFILE is dev or release" >&2; exit 1 ;;
esac
# QEMU's guest: 2 CPUs and 2 GiB; L1 waits at most this long for the job.
timeout_s="${ARM64_L1_TIMEOUT:-900}"

die() { echo "arm64-l1: error: $*" >&2; exit 1; }
say() { echo "arm64-l1: $*" >&2; }

prepare() {
    for tool in qemu-system-aarch64 aarch64-linux-gnu-gcc cpio mkfs.ext4; do
        command -v "$tool" >/dev/null || die "$tool is missing: run tools/setup.sh (it installs qemu-system-arm, gcc-aarch64-linux-gnu, cpio, e2fsprogs)"
    done
    rustup target add "$target" >/dev/null 2>&1 || rustup target add "$target"
    say "Debian arm64 packages"
    mapfile -t pkgs < <("$repo/tools/arm64-packages.sh" linux-image-cloud-arm64 busybox-static)
    debian_image="$(ls "${pkgs[0]}"/boot/vmlinuz-*)"
    busybox="${pkgs[1]}/bin/busybox"
    say "the arm64 guest kernel"
    "$repo/guest-kernel/build.sh" arm64
    say "the arm64 initramfs"
    "$repo/rootfs/build-initramfs.sh" --arch arm64
    say "vmm for $target"
    # Without debug info: it would make the binary 200 MB, which L1 copies.
    CARGO_PROFILE_DEV_DEBUG=false cargo build --quiet "${profile_args[@]}" \
        --manifest-path "$repo/Cargo.toml" --target "$target" -p vmm -p vmm-minimal-arm64 --bin vmm --bin vmm-minimal-arm64
}

# Assembles L1's initramfs in $1 with job $2.
assemble() {
    local stage="$1" job="$2" kernel initramfs
    kernel="$cache/kernel/arm64/Image"
    initramfs="$cache/initramfs/arm64-current"
    mkdir -p "$stage"/{bin,dev,proc,sys,tmp,run,work}
    install -m 0755 "$busybox" "$stage/bin/busybox"
    # The initramfs is copied to a tmpfs that becomes the root: a root on
    # the initramfs itself cannot be pivoted away from, which the jail of
    # `vmm run` does (as on any real host, whose root is a disk).
    cat > "$stage/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /newroot
/bin/busybox mount -t tmpfs -o size=80% root /newroot
/bin/busybox cp -a /bin /work /stage2 /newroot/
/bin/busybox mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp /newroot/run
exec /bin/busybox switch_root /newroot /stage2
EOF
    cat > "$stage/stage2" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up
echo "L1-UP kernel=$(uname -r) kvm=$(ls /dev/kvm 2>&1)"
cd /work && sh /work/job.sh
echo "L1-DONE status=$?"
poweroff -f
EOF
    chmod 0755 "$stage/init" "$stage/stage2"
    install -m 0755 "$vmm" "$stage/work/vmm"
    install -m 0755 "$(dirname "$vmm")/vmm-minimal-arm64" "$stage/work/vmm-minimal"
    install -m 0644 "$job" "$stage/work/job.sh"
    # Files a job asks for (ARM64_L1_FILES, space-separated paths).
    for f in ${ARM64_L1_FILES:-}; do cp "$f" "$stage/work/"; done
    cp "$kernel" "$stage/work/Image"
    cp "$initramfs/initramfs.cpio" "$initramfs/initramfs-minimal.cpio" "$stage/work/"
    cp "$debian_image" "$stage/work/debian-Image"
    # A root disk for L2: busybox, its shell, and the mount points.
    local disk="$stage/disk"
    mkdir -p "$disk"/{bin,dev,proc,sys,tmp,run,root,etc}
    install -m 0755 "$busybox" "$disk/bin/busybox"
    ln -s busybox "$disk/bin/sh"
    mkfs.ext4 -q -d "$disk" "$stage/work/disk.ext4" 32M
    rm -rf "$disk"
    # busybox as /init, for the boot of Debian's kernel.
    local bb="$stage/bb"
    mkdir -p "$bb"/{bin,proc}
    install -m 0755 "$busybox" "$bb/bin/busybox"
    cat > "$bb/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "L2-MARKER arch=$(/bin/busybox uname -m) cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
# stty sets the console with TCSADRAIN, which returns once the UART has
# sent the line: a power-off right away would cut it short.
/bin/busybox stty -F /dev/console sane
/bin/busybox poweroff -f
EOF
    chmod 0755 "$bb/init"
    (cd "$bb" && find . | cpio -o -H newc --quiet) > "$stage/work/busybox-initramfs.cpio"
    rm -rf "$bb"
    # Uncompressed: TCG would spend seconds inflating it.
    (cd "$stage" && find . -mindepth 1 | cpio -o -H newc --owner 0:0 --quiet) > "$stage.cpio"
}

case "${1:-}" in
    prepare) prepare ;;
    run)
        [ -f "${2:-}" ] || die "usage: $0 run JOB.sh"
        prepare
        stage="$(mktemp -d)"
        trap 'rm -rf "$stage" "$stage.cpio"' EXIT
        assemble "$stage" "$2"
        say "booting L1 (qemu-system-aarch64, TCG)"
        # -cpu max with pauth-impdef: without it L1 runs 3-4x slower.
        timeout "$timeout_s" qemu-system-aarch64 \
            -M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on \
            -smp 2 -m 2048 -accel tcg,thread=multi -nographic -no-reboot \
            -kernel "$debian_image" -initrd "$stage.cpio" \
            -append "console=ttyAMA0 rdinit=/init quiet" </dev/null
        ;;
    *) die "usage: $0 prepare | run JOB.sh" ;;
esac
