#!/usr/bin/env bash
# Benchmark: warm latency p50/p95 (≥ 20 runs) natively (Flex CPU, wgpu on lavapipe) and in
# headless Chromium (our WebGPU path on SwiftShader, our CPU fallback), with ONNX Runtime Web
# on the same weights and input as the reference; then the compressed variants against fp32.
# Prints tables and ratios.
#   scripts/bench.sh [RUNS]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${COMPRESSLAB_CACHE:-$HOME/.cache/compresslab}/target}
RUNS=${1:-20}
scripts/setup.sh --tests
cargo build --release --quiet --bin compresslab
CLI=$CARGO_TARGET_DIR/release/compresslab
echo "== native"
"$CLI" bench --runs "$RUNS" assets/models assets/samples/coffee.png
echo "== native, compressed variants (fp32 / int8 W8A8 / int4 weight-only / 50 % channels)"
"$CLI" bench-compress --runs "$RUNS" assets/models assets/samples/coffee.png
DATA=$CARGO_TARGET_DIR/bench-data
"$CLI" export-onnx assets/models assets/samples/coffee.png "$DATA"
[[ -f dist/index.html ]] || scripts/build-site.sh
echo "== browser"
node tests/bench/browser-bench.mjs "$DATA" "$RUNS"
echo "== site size (gzip -9 of what the browser downloads)"
gzip_mb() { awk -v b="$(gzip -9 -c "$1" | wc -c)" 'BEGIN { printf "%.3f", b / 1e6 }'; }
size_target() { # NAME FILE GOAL_MB
  local mb
  mb=$(gzip_mb "$2")
  awk -v n="$1" -v m="$mb" -v g="$3" \
    'BEGIN { printf "target %s: %s MB gzip (goal ≤ %s MB) %s\n", n, m, g, (m <= g ? "met" : "not met") }'
}
size_target "worker wasm size" "$(ls dist/worker-*_bg.wasm)" 3.5
size_target "page wasm size" "$(ls dist/compresslab-web-*_bg.wasm)" 0.6
