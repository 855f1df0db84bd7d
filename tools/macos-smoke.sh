#!/usr/bin/env bash
# The macOS backend end to end, on a Mac (docs/macos.md): builds and signs
# the VMM, then checks the host, a boot, exec, a share, the network, a
# fork and a snapshot, and prints a report to attach to an issue.
#
#   tools/macos-smoke.sh            # everything; the report lands in $REPORT
#   REPORT=/tmp/r.txt tools/macos-smoke.sh
#
# Needs: Apple silicon, macOS 15 or later, Xcode's command line tools,
# rustup, and the arm64 guest artifacts in ~/.cache/vmm (docs/macos.md,
# "Guest artifacts"). Each step prints PASS, FAIL or SKIP with its reason;
# the script exits 1 when a step failed. Plain bash 3.2 (macOS's own).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REPORT=${REPORT:-/tmp/vmm-macos-smoke-$(date +%Y%m%d-%H%M%S).txt}
TARGET=aarch64-apple-darwin
VMM=target/$TARGET/release/vmm
WORK=$(mktemp -d /tmp/vmm-smoke.XXXXXX)
failed=0
: >"$REPORT"

say() { echo "$*" | tee -a "$REPORT"; }

# step NAME COMMAND...: runs it with its output in the report (last 40
# lines), records PASS or FAIL and how long it took.
step() {
    local name=$1
    shift
    local start=$SECONDS out=$WORK/step.out
    if "$@" >"$out" 2>&1; then
        say "PASS  $name ($((SECONDS - start)) s)"
    else
        say "FAIL  $name ($((SECONDS - start)) s, exit $?)"
        failed=1
    fi
    tail -n 40 "$out" | sed 's/^/      /' | tee -a "$REPORT"
}

skip() { say "SKIP  $1: $2"; }

cleanup() {
    [ -x "$VMM" ] && for n in smoke smoke-1 smoke-2; do "$VMM" stop "$n" >/dev/null 2>&1; done
    [ -n "${http_pid:-}" ] && kill "$http_pid" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

say "vmm macOS smoke test, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "macOS:   $(sw_vers -productVersion 2>/dev/null) ($(sw_vers -buildVersion 2>/dev/null))"
say "chip:    $(sysctl -n machdep.cpu.brand_string 2>/dev/null)"
say "hv:      kern.hv_support=$(sysctl -n kern.hv_support 2>/dev/null) kern.hv_vmm_present=$(sysctl -n kern.hv_vmm_present 2>/dev/null)"
say "rustc:   $(rustc --version 2>/dev/null)"
say ""

if [ "$(uname -s)" != Darwin ] || [ "$(uname -m)" != arm64 ]; then
    say "FAIL  host: this script is for macOS on Apple silicon (this is $(uname -s) $(uname -m))"
    exit 1
fi

rustup target add "$TARGET" >/dev/null 2>&1
step "build (cargo build --release --target $TARGET -p vmm)" \
    cargo build --release --target "$TARGET" -p vmm
step "sign with the hypervisor entitlement" \
    codesign --sign - --force --entitlements tools/macos/vmm.entitlements "$VMM"
if [ ! -x "$VMM" ]; then
    say "no VMM binary: the remaining steps need it"
    exit 1
fi

step "vmm doctor" "$VMM" doctor

cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
if [ ! -e "$cache/kernel/arm64/Image" ] || [ ! -e "$cache/initramfs/current" ]; then
    skip "guest steps" "no arm64 kernel or initramfs in $cache (docs/macos.md, \"Guest artifacts\")"
    say ""
    say "report: $REPORT"
    exit $failed
fi
have_base=0
[ -e "$cache/base/current/base.ext4" ] && have_base=1

step "boot and run a command (vmm run --cold -- uname -a)" \
    "$VMM" run --cold -- uname -a
step "launch a VM in the background" "$VMM" launch --name smoke -d
step "exec with stdin" sh -c "echo from-stdin | '$VMM' exec smoke -i -- cat"
step "exec's exit status comes back (expects 7)" \
    sh -c "'$VMM' exec smoke -- sh -c 'exit 7'; [ \$? = 7 ]"

# A share: the guest writes a file the host then reads.
mkdir -p "$WORK/share"
echo "from the host" >"$WORK/share/in.txt"
cat >"$WORK/share.json" <<EOF
{ "shares": [ { "tag": "work", "host_path": "$WORK/share", "guest_path": "/mnt/work" } ] }
EOF
step "share: guest reads and writes a host folder" \
    sh -c "'$VMM' run --cold --config '$WORK/share.json' -- sh -c 'cat /mnt/work/in.txt && echo from-guest > /mnt/work/out.txt' && grep -q from-guest '$WORK/share/out.txt'"

# The network: the guest fetches from a server on this Mac's loopback.
if [ $have_base = 1 ] && command -v python3 >/dev/null; then
    echo "network ok" >"$WORK/hello.txt"
    (cd "$WORK" && exec python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1) &
    http_pid=$!
    cat >"$WORK/net.json" <<EOF
{ "memory_mib": 512, "rootfs": {}, "network": { "mode": "user" } }
EOF
    step "network: guest fetches from the host (10.0.2.2:8000)" \
        "$VMM" run --cold --config "$WORK/net.json" -- python3 -c \
        "import urllib.request as u; print(u.urlopen('http://10.0.2.2:8000/hello.txt', timeout=30).read().decode())"
else
    skip "network" "needs the Debian base image ($cache/base/current) and python3 on the Mac"
fi

step "fork the running VM into two" "$VMM" fork smoke --count 2
step "a fork child continues from the parent's state" \
    sh -c "'$VMM' exec smoke -- sh -c 'echo parent > /tmp/s' && '$VMM' fork smoke --count 1 >/dev/null && '$VMM' exec smoke-3 -- cat /tmp/s | grep -q parent"
step "snapshot" "$VMM" snapshot smoke --out "$WORK/snap"
"$VMM" restore --snapshot "$WORK/snap" --api-socket "$WORK/restored.sock" >"$WORK/restore.log" 2>&1 &
step "restore in a new process keeps the guest's state" \
    "$VMM" exec --api-socket "$WORK/restored.sock" -- cat /tmp/s
"$VMM" stop --api-socket "$WORK/restored.sock" >/dev/null 2>&1
step "vmm ps" "$VMM" ps
for n in smoke smoke-1 smoke-2 smoke-3; do "$VMM" stop "$n" >/dev/null 2>&1; done

say ""
say "report: $REPORT (attach it to an issue)"
exit $failed
