#!/usr/bin/env bash
# Installs the official clients that tests and benches drive vmm's servers
# with, unchanged and at pinned versions, and prints the folder they are in:
#   tools/client-env.sh python   a virtual environment made from
#                                tests/python/requirements.txt
#                                (the E2B and MCP Python SDKs)
#   tools/client-env.sh node     node_modules from tests/node/package.json
#                                and its lock (the E2B JavaScript SDK)
# Each is made once, under <cache>/python/<hash> or <cache>/node/<hash>
# (the cache is $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else
# ~/.cache/vmm; the hash is of the pin files), and reused while the pins
# are unchanged. Callers that run at once take turns (a lock file).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}"

case "${1:-}" in
    python) pins=("$repo/tests/python/requirements.txt") ;;
    node) pins=("$repo/tests/node/package.json" "$repo/tests/node/package-lock.json") ;;
    *) echo "usage: $0 python|node" >&2; exit 2 ;;
esac
kind=$1
hash=$(cat "${pins[@]}" | sha256sum | cut -c1-16)
root="$cache/$kind"
dir="$root/$hash"
mkdir -p "$root"
exec 9>"$root/$hash.lock"
flock 9
if [ ! -e "$dir/ready" ]; then
    # Made in place; a partial one from an interrupted run has no `ready`.
    rm -rf "$dir"
    case $kind in
        python)
            command -v python3 >/dev/null || { echo "client-env: python3 is missing: run tools/setup.sh" >&2; exit 1; }
            python3 -m venv "$dir" >&2
            "$dir/bin/pip" install --quiet --disable-pip-version-check -r "${pins[0]}" >&2
            ;;
        node)
            # The E2B SDK's engines field: 20.18.1 or later.
            if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 18) ? 0 : 1)' 2>/dev/null \
                || ! command -v npm >/dev/null; then
                echo "client-env: Node.js 20.18 or later and npm are needed (node: $(node --version 2>/dev/null || echo missing)); install them from nodejs.org or NodeSource" >&2
                exit 1
            fi
            mkdir -p "$dir"
            cp "${pins[@]}" "$dir/"
            npm ci --prefix "$dir" --ignore-scripts --no-audit --no-fund --loglevel=error >&2
            ;;
    esac
    touch "$dir/ready"
fi
echo "$dir"
