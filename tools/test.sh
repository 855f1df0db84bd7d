#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: formatting, lints,
# unit tests and the integration tests that boot real guests. Each phase
# says how long it took: CI runs this on a clean clone with a budget of 45
# minutes on 2 cores, so a test file shares one booted guest between its
# tests and keeps each guest process count low (under PVM every process a
# guest starts costs about a second). tools/test-times.sh shows where a
# test file spends its time.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# This host's target (.cargo/config.toml names x86_64 for plain `cargo`).
export CARGO_BUILD_TARGET="${CARGO_BUILD_TARGET:-$(uname -m)-unknown-linux-gnu}"
cd "$repo"
# A clean clone gains nothing from incremental compilation, and its caches
# would double the target folder.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
start=$SECONDS
phase() {
    echo "test.sh: $1 took $((SECONDS - start)) s" >&2
    start=$SECONDS
}
# On x86_64 the arm64 tests run in an emulated arm64 host (tests/arm64.rs).
arm64=()
[ "$(uname -m)" != x86_64 ] || arm64=(--arm64)
tools/setup.sh --no-release --clients "${arm64[@]}"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The macOS target's standard library, for the macOS check below.
rustup target add aarch64-apple-darwin >/dev/null 2>&1 || rustup target add aarch64-apple-darwin
phase "setup"
cargo fmt --all -- --check
# The seccomp tests' hook (a thread makes a forbidden call on request) is
# built into test builds only.
features=vmm/seccomp-test-hooks
cargo clippy --workspace --all-targets --features "$features" --quiet -- -D warnings
# The whole workspace builds and is clean for arm64 too (tests/arm64.rs runs
# its VMM on KVM/arm64 in an emulated arm64 host).
cargo clippy --workspace --all-targets --target aarch64-unknown-linux-gnu --features "$features" --quiet -- -D warnings
# And for macOS (docs/macos.md): nothing is linked, so this runs here; the
# macOS code that is not a framework call is also built into the Linux
# tests below, where it runs.
cargo clippy --workspace --all-targets --target aarch64-apple-darwin --features "$features" --quiet -- -D warnings
phase "fmt and clippy"
cargo test --workspace --features "$features" --no-run --quiet
phase "the test build"
cargo test --workspace --features "$features"
phase "the tests"

# Every fuzz target for a short while (docs/fuzzing.md): a crash fails CI.
# A development build: it compiles in a fraction of an optimised one's
# time (which is for long runs), and 8 seconds find what they find.
FUZZ_BUILD=dev tools/fuzz.sh 8
phase "fuzzing"
