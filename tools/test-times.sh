#!/usr/bin/env bash
# Where the suite's time goes: runs integration test files one test at a
# time and prints each test's seconds (the time since the previous test
# ended; the first includes the file's shared boot) and each file's total.
#
#   tools/test-times.sh [FILE...]     e.g. tools/test-times.sh fs net
#
# All files under tests/ by default. Run it on an otherwise idle machine:
# under PVM the guests' emulated kernels take every core they get.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
features=vmm/seccomp-test-hooks
files=("$@")
[ ${#files[@]} -gt 0 ] || mapfile -t files < <(basename -s .rs tests/*.rs)
cargo test --features "$features" --no-run --quiet $(printf -- '--test %s ' "${files[@]}")
for f in "${files[@]}"; do
    start=$SECONDS
    last=$SECONDS
    cargo test --quiet --features "$features" --test "$f" -- --test-threads=1 --format pretty 2>&1 |
        while IFS= read -r line; do
            case "$line" in
            "test "*" ... "*)
                echo "$f: $((SECONDS - last)) s  ${line#test }"
                last=$SECONDS
                ;;
            esac
        done
    echo "$f: total $((SECONDS - start)) s"
done
