#!/usr/bin/env bash
# The main job: set everything up, check the host, and boot a demo VM that
# runs a command and powers off.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/tools/setup.sh"
vmm="$repo/target/release/vmm"
"$vmm" doctor
echo "demo: booting examples/demo.json" >&2
"$vmm" launch --config "$repo/examples/demo.json"
