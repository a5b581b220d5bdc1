#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs every test: formatting, lints (native and
# wasm32), native unit + integration tests (CPU and wgpu on lavapipe), the site build, and
# the browser end-to-end tests (Playwright + Debian's chromium, WebGPU on SwiftShader).
# Ends with one timing line per phase, so whatever slows CI shows up.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${COMPRESSLAB_CACHE:-$HOME/.cache/compresslab}/target}

TIMINGS=()
CURRENT=""
START=$SECONDS
phase() { # phase NAME COMMAND...: runs COMMAND and records how long it took
  local start=$SECONDS
  CURRENT=$1
  printf '\n==== phase: %s\n' "$1"
  shift
  "$@"
  TIMINGS+=("$(printf '%-14s %5d s' "$CURRENT" $((SECONDS - start)))")
  CURRENT=""
}
report() {
  local status=$?
  printf '\n==== timing\n'
  for t in "${TIMINGS[@]}"; do echo "phase $t"; done
  [[ -n $CURRENT ]] && echo "phase $CURRENT failed"
  printf 'total %5d s\n' $((SECONDS - START))
  exit "$status"
}
trap report EXIT

lint() {
  cargo fmt --all --check
  # The engine (with its tests) natively; the site for wasm32, which lints the engine's wasm
  # build too. The site crate is never built natively, so nothing here compiles leptos twice.
  cargo clippy --release --all-targets -- -D warnings
  cargo clippy --release -p compresslab-web -p compresslab-worker -p compresslab-spec --target wasm32-unknown-unknown -- -D warnings
}
native_tests() {
  # The same profile and package set as the set-up's `cargo run --release`: nothing builds twice.
  cargo test --release -- --nocapture 2>&1 | tee "$CARGO_TARGET_DIR/native-tests.log"
}

phase setup scripts/setup.sh --tests
phase lint lint
phase native-build cargo test --release --no-run
phase native-tests native_tests
phase site-build scripts/build-site.sh
phase browser-tests node --test --test-concurrency=1 tests/e2e/
