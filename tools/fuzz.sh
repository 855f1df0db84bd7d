#!/usr/bin/env bash
# Fuzzes every parser that sees guest or outside bytes (docs/fuzzing.md).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (all of them by default) for SECONDS (default 60),
# FUZZ_JOBS targets at a time (default: the number of cores), starting from
# the committed seeds (fuzz/seeds/TARGET) and the corpus of earlier runs,
# kept outside the repository (~/.cache/vmm/fuzz/TARGET). Installs the
# nightly toolchain and cargo-fuzz when missing. Prints one line per
# target (runs, coverage, corpus); exits 1 if any target found a crash,
# naming the input that reproduces it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-60}"
# FUZZ_BUILD=dev: an unoptimised build, which compiles several times
# faster (CI's short runs); the default is optimised (long runs).
case "${FUZZ_BUILD:-release}" in
    release) mode=-O ;;
    dev) mode=--dev ;;
    *) echo "fuzz: FUZZ_BUILD is release or dev, not ${FUZZ_BUILD}" >&2; exit 2 ;;
esac
shift || true
cd "$repo/fuzz"

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
echo "fuzz: building ${#targets[@]} targets" >&2
cargo +nightly fuzz build "$mode" >&2

cache="${XDG_CACHE_HOME:-$HOME/.cache}/vmm/fuzz"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

run_one() {
    local t="$1" corpus="$cache/$1" log="$logs/$1.log"
    mkdir -p "$corpus"
    # -timeout: an input that takes this long is a hang, a finding.
    if cargo +nightly fuzz run "$mode" "$t" "$corpus" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        local runs cov
        runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
        cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo '?')
        echo "fuzz: $t: ${seconds}s, $runs runs, coverage $cov, corpus $(ls "$corpus" | wc -l) inputs, no crash"
    else
        echo "fuzz: $t: FOUND A CRASH; its log:" >&2
        grep -E 'ERROR|panicked|SUMMARY|Test unit written|artifact_prefix' "$log" >&2 || tail -30 "$log" >&2
        echo "fuzz: reproduce with: (cd fuzz && cargo +nightly fuzz run $mode $t <the file above>)" >&2
        return 1
    fi
}
export -f run_one
export seconds cache logs mode

printf '%s\n' "${targets[@]}" |
    xargs -P "${FUZZ_JOBS:-$(nproc)}" -I{} bash -c 'run_one {}'
