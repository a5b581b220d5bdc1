#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs every test: formatting, lints (native and
# wasm32), native unit + integration tests (CPU and wgpu on lavapipe), the site build, and
# the browser end-to-end tests (Playwright + Debian's chromium, WebGPU on SwiftShader).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${COMPRESSLAB_CACHE:-$HOME/.cache/compresslab}/target}
scripts/setup.sh --tests

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== clippy (native, then wasm32)"
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release -p compresslab-web --target wasm32-unknown-unknown -- -D warnings

echo "== native tests"
cargo test --release --workspace -- --nocapture 2>&1 | tee "${CARGO_TARGET_DIR}/native-tests.log"

echo "== site build"
scripts/build-site.sh

echo "== browser end-to-end tests"
node --test --test-concurrency=1 tests/e2e/
