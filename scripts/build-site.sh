#!/usr/bin/env bash
# Release build of the site into dist/, and its wasm sizes. The page and the model worker are
# compiled to wasm32 in one cargo build (profile `site`), wasm-bindgen writes their JS glue
# (the page as an ES module, the worker as a classic script for `importScripts`), and every
# file name carries a hash of its content so a browser never mixes an old file with a new one.
# No bundler: this is all trunk did for us, and trunk took 7–18 minutes to install.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${COMPRESSLAB_CACHE:-$HOME/.cache/compresslab}/target}
cargo build --profile site --target wasm32-unknown-unknown -p compresslab-web -p compresslab-worker --bins
WASM=$CARGO_TARGET_DIR/wasm32-unknown-unknown/site
# A module linked as a "command" runs every static constructor (cubecl registers ~4 900) at
# the start of each export, so each call from JS into the worker cost 0.15–0.3 ms; main() runs
# them once instead (worker/src/main.rs) and the linker then wraps no export.
if ! grep -q -a "__wasm_call_ctors" "$WASM/worker.wasm"; then
  echo "worker.wasm has no name section: cannot check how it was linked" >&2
  exit 1
elif grep -q -a "command_export" "$WASM/worker.wasm"; then
  echo "worker.wasm was linked as a command (exports rerun the constructors): main must call __wasm_call_ctors" >&2
  exit 1
fi

STAGE=$(mktemp -d dist.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
hash_of() { sha256sum "$1" | cut -c1-16; }
# wasm-opt (Debian's binaryen) with the features rustc's wasm32 target emits, plus SIMD128
# (.cargo/config.toml). -Oz also drops the name section (names are for profilers only).
WASM_FEATURES=(--enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext
  --enable-mutable-globals --enable-reference-types --enable-multivalue --enable-simd)
# bindgen BIN TARGET: runs wasm-bindgen and wasm-opt, renames the pair to
# BIN-HASH{.js,_bg.wasm}, prints HASH.
bindgen() {
  wasm-bindgen --target "$2" --no-typescript --out-dir "$STAGE" --out-name "$1" "$WASM/$1.wasm"
  wasm-opt -Oz "${WASM_FEATURES[@]}" "$STAGE/${1}_bg.wasm" -o "$STAGE/${1}_bg.wasm"
  python3 scripts/fix_externref_export.py "$STAGE/${1}_bg.wasm"
  local h
  h=$(hash_of "$STAGE/${1}_bg.wasm")
  mv "$STAGE/${1}_bg.wasm" "$STAGE/$1-${h}_bg.wasm"
  mv "$STAGE/$1.js" "$STAGE/$1-$h.js"
  echo "$h"
}
# The two run at once (wasm-opt on the worker takes over a minute on one core).
bindgen compresslab-web web > "$STAGE/page.hash" &
worker=$(bindgen worker no-modules)
wait $!
page=$(cat "$STAGE/page.hash")
rm "$STAGE/page.hash"
# The page starts the worker as ./worker_loader.js (web/src/app.rs): a fixed name, so the
# page's wasm need not know the worker's hash.
printf 'importScripts("./worker-%s.js");wasm_bindgen("./worker-%s_bg.wasm");\n' "$worker" "$worker" \
  > "$STAGE/worker_loader.js"
style="style-$(hash_of web/style.css).css"
cp web/style.css "$STAGE/$style"
sed -e "s/{{STYLE}}/$style/g" -e "s/{{PAGE_JS}}/compresslab-web-$page.js/g" \
  -e "s/{{PAGE_WASM}}/compresslab-web-${page}_bg.wasm/g" web/index.html > "$STAGE/index.html"
cp -r assets "$STAGE/assets"

rm -rf dist
mv "$STAGE" dist
trap - EXIT
for f in dist/*.wasm; do
  printf '%s: %s bytes raw, %s bytes gzip -9\n' "$f" "$(stat -c %s "$f")" "$(gzip -9 -c "$f" | wc -c)"
done
