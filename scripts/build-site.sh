#!/usr/bin/env bash
# Release build of the site into dist/ (trunk, offline), and its wasm sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${COMPRESSLAB_CACHE:-$HOME/.cache/compresslab}/target}
trunk build --release
for f in dist/*.wasm; do
  printf '%s: %s bytes raw, %s bytes gzip -9\n' "$f" "$(stat -c %s "$f")" "$(gzip -9 -c "$f" | wc -c)"
done
