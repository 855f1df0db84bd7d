#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: formatting, lints,
# unit tests and the integration tests that boot real guests.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
tools/setup.sh --no-release
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
# The seccomp tests' hook (a thread makes a forbidden call on request) is
# built into test builds only.
features=vmm/seccomp-test-hooks
cargo clippy --workspace --all-targets --features "$features" --quiet -- -D warnings
cargo test --workspace --features "$features" --lib --bins
cargo test --workspace --features "$features" --doc
cargo test --workspace --features "$features" --tests --no-run --quiet

# The integration tests (one binary per file in tests/) boot guests, and
# most of a test's time is a guest's: they run in two lanes at once, the
# longest files first (times measured on the 2-core development host), so
# the suite takes about the longer lane's time, not the sum.
lane_a=(template net jail image boot agent cli_run_exec seccomp names)
lane_b=(fs hostile e2b fork disk embed cli_errors pull)
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
run_lane() {
    local t
    for t in "$@"; do
        local start=$SECONDS
        if cargo test --quiet --features "$features" -p vmm --test "$t" >"$logs/$t.log" 2>&1; then
            echo "== $t: ok in $((SECONDS - start)) s"
        else
            echo "== $t: FAILED after $((SECONDS - start)) s"
            touch "$logs/$t.failed"
        fi
        cat "$logs/$t.log"
    done
}
run_lane "${lane_a[@]}" &
run_lane "${lane_b[@]}" &
wait
cargo test --features "$features" -p vmm-bench --tests --quiet
# Every integration test file must be in a lane.
for f in tests/*.rs; do
    t="$(basename "$f" .rs)"
    [ -e "$logs/$t.log" ] || { echo "tools/test.sh: tests/$t.rs is in no lane: add it" >&2; exit 1; }
done
failed=("$logs"/*.failed)
if [ -e "${failed[0]}" ]; then
    echo "failed: $(basename -s .failed "${failed[@]}" | tr '\n' ' ')" >&2
    exit 1
fi

# Every fuzz target for a short while (docs/fuzzing.md): a crash fails CI.
tools/fuzz.sh 15
