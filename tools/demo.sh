#!/usr/bin/env bash
# The main job: set everything up, check the host, and boot a demo VM that
# runs a command and powers off.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/tools/setup.sh"
vmm="$repo/target/${CARGO_BUILD_TARGET:-$(uname -m)-unknown-linux-gnu}/release/vmm"
"$vmm" doctor
echo "demo: booting examples/demo.json (initramfs only, a command from the kernel command line)" >&2
"$vmm" launch --config "$repo/examples/demo.json"
echo "demo: vmm run -- python3 -c 'print(6*7)' (Debian root disk, agent over vsock; the first run of a configuration builds its template, docs/templates.md)" >&2
"$vmm" run -- python3 -c 'import platform; print(6*7, platform.platform())'
echo "demo: vmm run -- sh -c 'exit 3' starts from that template and exits with the command's status" >&2
status=0; "$vmm" run -- sh -c 'exit 3' || status=$?
echo "demo: exit status $status" >&2
"$vmm" template ls
