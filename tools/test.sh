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
cargo test --workspace --features "$features"

# Every fuzz target for a short while (docs/fuzzing.md): a crash fails CI.
tools/fuzz.sh 15
