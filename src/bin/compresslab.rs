//! Native command line: convert the pretrained checkpoint into the site's assets,
//! classify photos, and benchmark the engine on the CPU and wgpu backends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use burn::prelude::*;
use compresslab::classifier::{ImageClassifier, max_abs_diff};
use compresslab::decode::decode_file;
use compresslab::labels::Labels;
use compresslab::onnx;
use compresslab::preprocess::{imagenet_crop, imagenet_input};
use compresslab::torch_legacy::read_legacy_state_dict;
use compresslab::weights::TensorStore;
use compresslab::{EngineError, Result};

const USAGE: &str = "usage:
  compresslab convert <checkpoint.pth> <imagenet1k_label_to_names.json> <out-dir>
  compresslab classify [--device cpu|flex|wgpu] <assets-dir> <image>...
  compresslab bench [--runs N] <assets-dir> <image>
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
        Some("convert") => convert(&args[1..]),
        Some("classify") => classify(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("export-onnx") => export_onnx(&args[1..]),
        Some("preprocess") => preprocess(&args[1..]),
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

fn convert(args: &[String]) -> Result<()> {
    let [pth, labels, out] = args else {
        return Err(usage_error("convert takes three arguments"));
    };
    let store = read_legacy_state_dict(&read(Path::new(pth))?)?;
    let labels = Labels::from_label_to_names_json(&read(Path::new(labels))?)?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|source| EngineError::Io {
        path: out.display().to_string(),
        source,
    })?;
    write(&out.join(WEIGHTS_FILE), &store.to_safetensors()?)?;
    write(&out.join(LABELS_FILE), labels.to_json().as_bytes())?;
    println!(
        "converted {} tensors, {} parameters, {} classes into {}",
        store.len(),
        store.parameter_count(),
        labels.len(),
        out.display()
    );
    Ok(())
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

fn classify(args: &[String]) -> Result<()> {
    let (backend, rest) = match args {
        [flag, name, rest @ ..] if flag == "--device" => (name.as_str(), rest),
        rest => ("cpu", rest),
    };
    let [assets, images @ ..] = rest else {
        return Err(usage_error("classify needs an assets dir and images"));
    };
    let classifier = load(Path::new(assets), backend)?;
    for image in images {
        let input = imagenet_input(&decode_file(Path::new(image))?);
        let start = Instant::now();
        let top = futures_lite::future::block_on(classifier.classify(&input, 5))?;
        println!("{image} ({:.1} ms)", start.elapsed().as_secs_f64() * 1e3);
        for p in top {
            println!(
                "  {:>5.1}%  {} ({})",
                p.probability * 100.0,
                p.label,
                p.class
            );
        }
    }
    Ok(())
}

/// p-th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn bench(args: &[String]) -> Result<()> {
    let (runs, rest) = match args {
        [flag, n, rest @ ..] if flag == "--runs" => (
            n.parse::<usize>()
                .map_err(|_| usage_error("--runs takes a number"))?,
            rest,
        ),
        rest => (20, rest),
    };
    let [assets, image] = rest else {
        return Err(usage_error("bench needs an assets dir and one image"));
    };
    let input = imagenet_input(&decode_file(Path::new(image))?);
    println!("| backend | cold ms | warm p50 ms | warm p95 ms | runs |");
    println!("|---|---|---|---|---|");
    let mut reference: Option<Vec<f32>> = None;
    for name in ["cpu", "flex", "wgpu"] {
        let classifier = load(Path::new(assets), name)?;
        let start = Instant::now();
        let logits = futures_lite::future::block_on(classifier.logits(&input))?;
        let cold = start.elapsed().as_secs_f64() * 1e3;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            futures_lite::future::block_on(classifier.logits(&input))?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| native {name} | {cold:.1} | {:.1} | {:.1} | {runs} |",
            percentile(&times, 50.0),
            percentile(&times, 95.0)
        );
        match &reference {
            None => reference = Some(logits),
            Some(r) => println!(
                "max |logit difference| native cpu vs {name}: {:.2e}",
                max_abs_diff(r, &logits)
            ),
        }
    }
    Ok(())
}

fn export_onnx(args: &[String]) -> Result<()> {
    let [assets, image, out] = args else {
        return Err(usage_error("export-onnx takes three arguments"));
    };
    let assets = Path::new(assets);
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|source| EngineError::Io {
        path: out.display().to_string(),
        source,
    })?;
    let store = TensorStore::from_safetensors(&read(&assets.join(WEIGHTS_FILE))?)?;
    write(&out.join("model.onnx"), &onnx::export_onnx(&store)?)?;
    let input = imagenet_input(&decode_file(Path::new(image))?);
    let raw: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(&out.join("input.bin"), &raw)?;
    let classifier = load(assets, "cpu")?;
    let logits = futures_lite::future::block_on(classifier.logits(&input))?;
    let json = serde_json::to_string(&logits).map_err(|e| EngineError::Weights(e.to_string()))?;
    write(&out.join("logits.json"), json.as_bytes())?;
    println!(
        "wrote model.onnx, input.bin and logits.json to {}",
        out.display()
    );
    Ok(())
}

fn preprocess(args: &[String]) -> Result<()> {
    let [image, out] = args else {
        return Err(usage_error("preprocess takes two arguments"));
    };
    let crop = imagenet_crop(&decode_file(Path::new(image))?);
    write(Path::new(out), &crop.pixels)
}
