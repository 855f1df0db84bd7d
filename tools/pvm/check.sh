#!/usr/bin/env bash
# Reproduces, in a guest of this VMM, the user-space faults docs/host-kvm.md
# describes for PVM hosts: three processes at once (1 vCPU) holding AVX
# registers, filling fresh memory with stores and with glibc's memcpy, and
# starting python. On a host with hardware virtualization every count of
# wrong rounds and failed starts is 0. Needs gcc (static glibc) on the host.
# Usage: tools/pvm/check.sh [SECONDS per test, default 30]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
vmm="${VMM_BIN:-$repo/target/x86_64-unknown-linux-gnu/release/vmm}"
secs="${1:-30}"
[ -x "$vmm" ] || { echo "check: no vmm at $vmm; run tools/setup.sh (or set VMM_BIN)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/share"
gcc -O2 -static -o "$work/share/ymm" "$here/ymm.c"
gcc -O2 -static -o "$work/share/mem" "$here/mem.c"
cat > "$work/vm.json" <<JSON
{"vcpus": 1, "memory_mib": 512,
 "shares": [{"tag": "pvm", "host_path": "$work/share", "guest_path": "/mnt/pvm", "read_only": true}]}
JSON
"$vmm" run --config "$work/vm.json" --timeout 1800 -- sh -c "
  cd /mnt/pvm
  for t in 1 2 3; do ./ymm \$t $secs & done; wait
  for mode in stores memcpy; do for t in 1 2 3; do ./mem \$t $secs \$mode & done; wait; done
  failed=0
  for round in 1 2 3 4; do
    for t in 1 2 3; do (timeout 300 python3 -c 'import json, subprocess, locale' >/dev/null 2>&1 || echo x >> /tmp/failed) & done
    wait
  done
  echo \"python: \$(cat /tmp/failed 2>/dev/null | wc -l) of 12 starts (3 at once) failed\"
" || true
