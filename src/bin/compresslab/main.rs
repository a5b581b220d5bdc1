//! Native command line: convert the pretrained checkpoint into the site's assets,
//! classify photos, and benchmark the engine on the CPU and wgpu backends. This file holds
//! the usage, the dispatch and the helpers every family of subcommands shares; each family
//! has its own module.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::prelude::*;
use compresslab::classifier::ImageClassifier;
use compresslab::compress::Recipe;
use compresslab::labels::Labels;
use compresslab::weights::TensorStore;
use compresslab::{EngineError, Result};

mod bench;
mod fashion;
mod models;
mod photo;

const USAGE: &str = "usage:
  compresslab inspect <model.onnx> [--shape NxCxHxW]
      any ONNX CNN: operators, parameters, MACs, input/output shapes, or why it does not import
  compresslab run <model.onnx> <in.npy> <out.npy> [--device cpu|flex|wgpu]
      runs any imported ONNX model on an NCHW float32 batch and writes its first output
  compresslab compress <model.onnx> <recipe.json> <out.onnx> [--calibration <in.npy>]
      the lab's recipe (same JSON, missing fields default) on any imported model: channel
      pruning by dependency groups, BatchNorm folding, magnitude pruning, int8/int4 weights,
      calibrated activations; writes ONNX (QDQ, int4 blocks via DequantizeLinear block_size)
  compresslab convert <checkpoint.pth> <imagenet1k_label_to_names.json> <out-dir>
  compresslab classify [--device cpu|flex|wgpu] <assets-dir> <image>...
  compresslab bench [--runs N] <assets-dir> <image>
  compresslab compress <assets-dir> <recipe.json> <out.safetensors> [calibration images...]
      applies a recipe (see README) and writes the compressed model with its recipe
  compresslab bench-compress [--runs N] <assets-dir> <image>
      fp32 vs int8 (weights + activations) vs int4 weight-only vs 50 % channel-pruned:
      latency p50/p95 and ratios on the CPU path and wgpu, size and agreement
  compresslab fashion-assets <idx-dir> <out-dir>
      writes the site's Fashion-MNIST assets from the dataset's (gunzipped) IDX files:
      test.bin (all 10 000 test images) and calibration.bin (100 training images per class)
  compresslab train-fashion [--epochs N] <idx-dir> <out.safetensors>
      trains the Fashion-MNIST CNN from scratch (burn, Flex CPU backend, fixed seed) and
      prints its test accuracy
  compresslab fashion-eval <fashion-dir> [recipe.json]
      accuracy, per-class accuracy and confusion matrix on the 10 000 test images (of the
      trained network, or of it compressed by the recipe); <fashion-dir> is assets/fashion
  compresslab sweep [--images N] <fashion-dir>
      accuracy vs sparsity, channel ratio and weight bits × granularity (default: all
      10 000 test images)
  compresslab fashion-folder [--per-class N] <fashion-dir> <out-dir>
      writes N (default 10) training images per class as PNGs in one folder per class
      (the folder names are the labels), to try the page's distillation with
  compresslab distil [--epochs N] [--images <folder>] <fashion-dir> <recipe.json> <out.safetensors>
      the page's fine-tune: compresses with the recipe, distils the student from the
      original (folder names = labels; default images: the 1 000-image training sample),
      re-quantizes, prints held-out and test accuracy before/after and training images/s,
      and writes the fine-tuned compressed model
  compresslab distil-photos [--epochs N] [--batch B] [--features 5,10,15] <assets-dir> <recipe.json> <photo-folder> <out.safetensors>
      the page's photo fine-tune: folder names that are ImageNet classes train the
      1000-way head, other folder names become your own classes (a head is fitted on the
      original first), no folders train label-free; 20 % held out; quantization-aware when
      the recipe quantizes weights; --features also matches those MBConv blocks' outputs
      (mean squared error; with channel pruning, on the channels it kept); prints held-out loss per epoch and the deployed networks'
      accuracy / agreement before and after, and writes the fine-tuned compressed model
  compresslab bench-distil [--batch B] [--steps N] <assets-dir> <image>
      EfficientNet-Lite0 at 224²: distillation training images/s (teacher forward +
      student forward/backward + Adam) next to inference images/s, on burn's Flex CPU
      backend and on wgpu
  compresslab preprocess <image> <out.rgb>
      writes the 224×224 8-bit RGB crop the model sees (raw bytes, row-major)
  compresslab export-onnx <assets-dir> <image> <out-dir>
      writes model.onnx (BatchNorm folded), input.bin (the image preprocessed, f32 LE NCHW)
      and logits.json (our CPU logits for it), for cross-runtime checks and benchmarks";

pub const WEIGHTS_FILE: &str = "efficientnet-lite0.safetensors";

pub const LABELS_FILE: &str = "imagenet-labels.json";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("inspect") => models::inspect(&args[1..]),
        Some("run") => models::run(&args[1..]),
        Some("convert") => photo::convert(&args[1..]),
        Some("classify") => photo::classify(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("export-onnx") => photo::export_onnx(&args[1..]),
        Some("preprocess") => photo::preprocess(&args[1..]),
        Some("compress") if args.get(1).is_some_and(|m| m.ends_with(".onnx")) => {
            models::compress(&args[1..])
        }
        Some("compress") => photo::compress_cmd(&args[1..]),
        Some("bench-compress") => bench::bench_compress(&args[1..]),
        Some("fashion-assets") => fashion::fashion_assets(&args[1..]),
        Some("train-fashion") => fashion::train_fashion(&args[1..]),
        Some("fashion-eval") => fashion::fashion_eval(&args[1..]),
        Some("sweep") => fashion::sweep_cmd(&args[1..]),
        Some("fashion-folder") => fashion::fashion_folder(&args[1..]),
        Some("distil") => fashion::distil_cmd(&args[1..]),
        Some("distil-photos") => photo::distil_photos(&args[1..]),
        Some("bench-distil") => bench::bench_distil(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn usage_error(msg: &str) -> EngineError {
    EngineError::Decode(format!("{msg}\n{USAGE}"))
}

/// p-th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn load_store(assets: &Path) -> Result<TensorStore> {
    TensorStore::from_safetensors(&read(&assets.join(WEIGHTS_FILE))?)
}

fn print_progress(stage: &str, fraction: f32) -> compresslab::Result<()> {
    eprintln!("  [{:>3.0}%] {stage}", fraction * 100.0);
    Ok(())
}

/// `--flag value` at the front of `args`, parsed.
fn leading_flag<'a, T: std::str::FromStr>(
    args: &'a [String],
    flag: &str,
) -> Result<(Option<T>, &'a [String])> {
    match args {
        [f, v, rest @ ..] if f == flag => Ok((
            Some(
                v.parse()
                    .map_err(|_| usage_error(&format!("{flag} needs a value")))?,
            ),
            rest,
        )),
        rest => Ok((None, rest)),
    }
}

fn read_recipe(path: &str) -> Result<Recipe> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_string(),
        source,
    })?;
    Ok(Recipe::from_json(&text)?)
}

/// `cpu`: our channels-last CPU path; `flex`: burn's CPU backend; `wgpu`: burn on wgpu.
fn load(assets: &Path, backend: &str) -> Result<ImageClassifier> {
    let store = TensorStore::from_safetensors(&read(&assets.join(WEIGHTS_FILE))?)?;
    let labels = Labels::from_json(&read(&assets.join(LABELS_FILE))?)?;
    match backend {
        "cpu" => ImageClassifier::new_cpu(&store, labels),
        "flex" => ImageClassifier::new(&store, labels, &Device::flex()),
        "wgpu" => ImageClassifier::new(&store, labels, &Device::wgpu(DeviceKind::DefaultDevice)),
        other => Err(usage_error(&format!("unknown backend {other}"))),
    }
}

/// Every image under `dir` (recursively) as Fashion-MNIST pixels, labelled by its parent
/// folder's name when that is a class.
/// Every file under `dir` (recursively), sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|source| EngineError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    Ok(files)
}
