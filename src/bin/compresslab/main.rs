//! Native command line: convert the pretrained checkpoint into the site's assets,
//! classify photos, and benchmark the engine on the CPU and wgpu backends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use burn::prelude::*;
use compresslab::classifier::{ImageClassifier, max_abs_diff};
use compresslab::compress::{CompressedModel, Observer, Recipe, agreement, compress};
use compresslab::cpu::CpuEfficientNet;
use compresslab::decode::decode_file;
use compresslab::exec::{self, CpuExecutor};
use compresslab::gpu_int::GpuFeatures;
use compresslab::graph::{compress_graph, import_onnx};
use compresslab::labels::Labels;
use compresslab::onnx;
use compresslab::preprocess::{imagenet_crop, imagenet_input};
use compresslab::prune::{ChannelPruning, ChannelRanking};
use compresslab::quant::{Granularity, QuantScheme};
use compresslab::torch_legacy::read_legacy_state_dict;
use compresslab::weights::TensorStore;
use compresslab::{EngineError, Result};

mod models;

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
      (mean squared error); prints held-out loss per epoch and the deployed networks'
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
        Some("convert") => convert(&args[1..]),
        Some("classify") => classify(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("export-onnx") => export_onnx(&args[1..]),
        Some("preprocess") => preprocess(&args[1..]),
        Some("compress") if args.get(1).is_some_and(|m| m.ends_with(".onnx")) => {
            models::compress(&args[1..])
        }
        Some("compress") => compress_cmd(&args[1..]),
        Some("bench-compress") => bench_compress(&args[1..]),
        Some("fashion-assets") => fashion_assets(&args[1..]),
        Some("train-fashion") => train_fashion(&args[1..]),
        Some("fashion-eval") => fashion_eval(&args[1..]),
        Some("sweep") => sweep_cmd(&args[1..]),
        Some("fashion-folder") => fashion_folder(&args[1..]),
        Some("distil") => distil_cmd(&args[1..]),
        Some("distil-photos") => distil_photos(&args[1..]),
        Some("bench-distil") => bench_distil(&args[1..]),
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
    // The graph engine's interpreter on the same network (issue 13: it must be as fast as
    // the dedicated path before the built-in networks move onto it), timed in turn with
    // the dedicated path so that both see the same machine.
    let reference = reference.unwrap_or_default();
    let store = load_store(Path::new(assets))?;
    let dedicated = load(Path::new(assets), "cpu")?;
    let interleaved = models::graph_interpreter_timing(&store, &input, runs, &reference, || {
        futures_lite::future::block_on(dedicated.logits(&input)).map(drop)
    })?;
    let [p50, dedicated_p50] =
        [&interleaved.interpreter, &interleaved.dedicated].map(|times| percentile(times, 50.0));
    println!(
        "| native graph interpreter (our ONNX export imported) | {:.1} | {p50:.1} | {:.1} | {runs} |",
        interleaved.cold,
        percentile(&interleaved.interpreter, 95.0)
    );
    println!(
        "max |logit difference| native cpu vs graph interpreter: {:.2e}",
        interleaved.max_diff
    );
    let ratio = p50 / dedicated_p50.max(1e-9);
    println!(
        "target graph interpreter ≤ 1.05× the dedicated CPU path (native, warm p50 of runs taken in turn: {p50:.1} vs {dedicated_p50:.1} ms): {ratio:.2}× (goal ≤ 1.05×) {}",
        if ratio <= 1.05 { "met" } else { "not met" }
    );
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

fn load_store(assets: &Path) -> Result<TensorStore> {
    TensorStore::from_safetensors(&read(&assets.join(WEIGHTS_FILE))?)
}

fn print_progress(stage: &str, fraction: f32) {
    eprintln!("  [{:>3.0}%] {stage}", fraction * 100.0);
}

fn compress_cmd(args: &[String]) -> Result<()> {
    let [assets, recipe, out, images @ ..] = args else {
        return Err(usage_error(
            "compress takes an assets dir, a recipe and an output file",
        ));
    };
    let store = load_store(Path::new(assets))?;
    let recipe_text = String::from_utf8_lossy(&read(Path::new(recipe))?).into_owned();
    let recipe = Recipe::from_json(&recipe_text)?;
    let calibration = images
        .iter()
        .map(|p| Ok(imagenet_input(&decode_file(Path::new(p))?)))
        .collect::<Result<Vec<_>>>()?;
    let model = compress(&store, &recipe, &calibration, &mut print_progress)?;
    let stats = model.stats()?;
    let original = CompressedModel::original(&store)?.stats()?;
    write(Path::new(out), &model.to_safetensors()?)?;
    println!(
        "parameters {} → {}, weight bytes {} → {} ({:.2}× smaller), MACs {:.0} M → {:.0} M",
        original.parameters,
        stats.parameters,
        original.weight_bytes,
        stats.weight_bytes,
        original.weight_bytes as f64 / stats.weight_bytes as f64,
        original.macs as f64 / 1e6,
        stats.macs as f64 / 1e6
    );
    Ok(())
}

/// The variants the targets are stated for.
fn bench_variants() -> Vec<(&'static str, Recipe)> {
    let int8 = Recipe::w8a8(Granularity::PerChannel, Observer::Percentile(99.99));
    let int4 = Recipe {
        weights: Some(QuantScheme {
            bits: 4,
            symmetric: true,
            granularity: Granularity::PerChannel,
        }),
        ..Recipe::default()
    };
    let pruned = Recipe {
        channel_pruning: Some(ChannelPruning {
            ratio: 0.5,
            ranking: ChannelRanking::L2,
        }),
        ..Recipe::default()
    };
    vec![
        ("fp32", Recipe::default()),
        ("int8 W8A8 per-channel", int8),
        ("int4 weight-only per-channel", int4),
        ("50 % channel-pruned", pruned),
    ]
}

/// Like [`time_runs`] for several functions, their warm runs taken in turn (one of each,
/// then again), so a machine's slow moments fall on all of them alike.
#[allow(clippy::type_complexity)]
fn time_in_turn(
    runs: usize,
    fs: &mut [&mut dyn FnMut() -> Result<Vec<f32>>],
) -> Result<Vec<(f64, f64, f64, Vec<f32>)>> {
    let mut firsts = Vec::with_capacity(fs.len());
    for f in fs.iter_mut() {
        let start = Instant::now();
        let logits = f()?;
        firsts.push((start.elapsed().as_secs_f64() * 1e3, logits));
    }
    let mut times = vec![Vec::with_capacity(runs); fs.len()];
    for _ in 0..runs {
        for (f, t) in fs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            f()?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(firsts
        .into_iter()
        .zip(times)
        .map(|((cold, logits), mut t)| {
            t.sort_by(f64::total_cmp);
            (cold, percentile(&t, 50.0), percentile(&t, 95.0), logits)
        })
        .collect())
}

fn time_runs(
    runs: usize,
    mut f: impl FnMut() -> Result<Vec<f32>>,
) -> Result<(f64, f64, f64, Vec<f32>)> {
    let start = Instant::now();
    let logits = f()?;
    let cold = start.elapsed().as_secs_f64() * 1e3;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((
        cold,
        percentile(&times, 50.0),
        percentile(&times, 95.0),
        logits,
    ))
}

fn bench_compress(args: &[String]) -> Result<()> {
    let (runs, rest) = match args {
        [flag, n, rest @ ..] if flag == "--runs" => (
            n.parse::<usize>()
                .map_err(|_| usage_error("--runs takes a number"))?,
            rest,
        ),
        rest => (20, rest),
    };
    let [assets, image] = rest else {
        return Err(usage_error(
            "bench-compress needs an assets dir and one image",
        ));
    };
    let assets = Path::new(assets);
    let store = load_store(assets)?;
    let input = imagenet_input(&decode_file(Path::new(image))?);
    // Calibrate on the sample photos next to the models (assets/samples).
    let samples_dir = assets.parent().unwrap_or(assets).join("samples");
    let mut calibration = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&samples_dir) {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        {
            calibration.push(imagenet_input(&decode_file(p)?));
        }
    }
    if calibration.is_empty() {
        calibration.push(input.clone());
    }
    println!(
        "{} calibration images; {runs} warm runs each",
        calibration.len()
    );
    println!(
        "| variant | executor | cold ms | warm p50 ms | warm p95 ms | speed-up vs fp32 (p50) | weight bytes | size ratio | MACs (M) | top-1 same | KL |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let original = CompressedModel::original(&store)?.stats()?;
    // The same network as a graph (our ONNX export imported), compressed by the graph
    // engine with the same recipes and run by the CPU interpreter: timed in turn with the
    // dedicated path, so both see the same machine.
    let graph = import_onnx(&compresslab::onnx::export_onnx(&store)?)?;
    let batches: Vec<exec::Tensor> = calibration
        .iter()
        .map(|data| exec::Tensor {
            dims: vec![1, 3, 224, 224],
            data: data.clone(),
        })
        .collect();
    let tensor = exec::Tensor {
        dims: vec![1, 3, 224, 224],
        data: input.clone(),
    };
    let mut fp32_p50: std::collections::HashMap<&str, f64> = Default::default();
    let mut reference: Option<Vec<f32>> = None;
    let mut interpreter_ratios = Vec::new();
    for (name, recipe) in bench_variants() {
        let model = compress(&store, &recipe, &calibration, &mut |_, _| {})?;
        let stats = model.stats()?;
        let cpu = CpuEfficientNet::from_compressed(&model, true)?;
        let compressed_graph = compress_graph(&graph, &recipe, &batches, &mut |_, _| {})?;
        let interpreter = CpuExecutor::compressed(&compressed_graph)?;
        let used = interpreter.kernel_use();
        let wgpu = ImageClassifier::new_compressed(
            &model,
            Labels::default(),
            &Device::wgpu(DeviceKind::DefaultDevice),
            Some(GpuFeatures::NATIVE),
        )?;
        let (int8, int4) = wgpu.integer_layers();
        eprintln!(
            "{name}: {int8} int8 and {int4} int4 layers on the WGSL integer kernels; graph interpreter: {} int8, {} int4, {} quantized as float",
            used.int8, used.int4, used.dequantized
        );
        let in_turn = time_in_turn(
            runs,
            &mut [&mut || cpu.forward(&input, 224, 224), &mut || {
                Ok(interpreter.run(&tensor)?.remove(0).data)
            }],
        )?;
        let wgpu_timing = time_runs(runs.min(5), || {
            futures_lite::future::block_on(wgpu.logits(&input))
        })?;
        interpreter_ratios.push((name, in_turn[1].1 / in_turn[0].1.max(1e-9)));
        let graph_stats = compressed_graph.graph.stats(&compressed_graph.weights)?;
        let (bytes, macs) = (stats.weight_bytes, stats.macs);
        let graph_size = (
            graph_stats.weight_bytes,
            graph_stats.macs.unwrap_or_default(),
        );
        let rows = [
            ("cpu", &in_turn[0], (bytes, macs)),
            ("graph interpreter", &in_turn[1], graph_size),
            ("wgpu", &wgpu_timing, (bytes, macs)),
        ];
        for (executor, (cold, p50, p95, logits), (bytes, macs)) in rows {
            let base = *fp32_p50.entry(executor).or_insert(*p50);
            let reference = reference.get_or_insert_with(|| logits.clone());
            let (same, kl) = agreement(reference, logits);
            println!(
                "| {name} | {executor} | {cold:.1} | {p50:.1} | {p95:.1} | {:.2}× | {} | {:.2}× | {:.0} | {same} | {kl:.4} |",
                base / p50,
                bytes,
                original.weight_bytes as f64 / bytes.max(1) as f64,
                macs as f64 / 1e6,
            );
        }
    }
    let worst = interpreter_ratios
        .iter()
        .map(|(_, r)| *r)
        .fold(0.0, f64::max);
    println!(
        "target graph interpreter ≤ 1.05× the dedicated CPU path for every variant (native, warm p50 of runs taken in turn): {} (goal ≤ 1.05×) {}",
        interpreter_ratios
            .iter()
            .map(|(name, r)| format!("{name} {r:.2}×"))
            .collect::<Vec<_>>()
            .join(", "),
        if worst <= 1.05 { "met" } else { "not met" }
    );
    Ok(())
}

fn read_idx_pair(dir: &Path, split: &str) -> Result<compresslab::fashion::FashionSet> {
    let read = |name: String| {
        let path = dir.join(&name);
        std::fs::read(&path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    compresslab::fashion::FashionSet::from_idx(
        &read(format!("{split}-images-idx3-ubyte"))?,
        &read(format!("{split}-labels-idx1-ubyte"))?,
    )
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn fashion_assets(args: &[String]) -> Result<()> {
    let [idx, out] = args else {
        return Err(usage_error("fashion-assets needs <idx-dir> <out-dir>"));
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|source| EngineError::Io {
        path: out.display().to_string(),
        source,
    })?;
    let test = read_idx_pair(Path::new(idx), "t10k")?;
    let calibration = read_idx_pair(Path::new(idx), "train")?.stratified(100);
    write_file(&out.join("test.bin"), &test.to_bytes())?;
    write_file(&out.join("calibration.bin"), &calibration.to_bytes())?;
    println!(
        "wrote {} test and {} calibration images to {}",
        test.len(),
        calibration.len(),
        out.display()
    );
    Ok(())
}

fn train_fashion(args: &[String]) -> Result<()> {
    use compresslab::fashion::{TrainConfig, train};
    let mut cfg = TrainConfig::default();
    let rest = match args {
        [flag, n, rest @ ..] if flag == "--epochs" => {
            cfg.epochs = n
                .parse()
                .map_err(|_| usage_error("--epochs needs a number"))?;
            rest
        }
        rest => rest,
    };
    let [idx, out] = rest else {
        return Err(usage_error(
            "train-fashion needs <idx-dir> <out.safetensors>",
        ));
    };
    let idx = Path::new(idx);
    let train_set = read_idx_pair(idx, "train")?;
    let test_set = read_idx_pair(idx, "t10k")?;
    println!("training on {} images: {cfg:?}", train_set.len());
    let device = Device::flex().autodiff();
    let started = Instant::now();
    let mut last_print = Instant::now();
    let store = futures_lite::future::block_on(train(&train_set, &cfg, &device, &mut |p| {
        if p.step + 1 == p.steps || last_print.elapsed().as_secs() >= 30 {
            last_print = Instant::now();
            println!(
                "epoch {} step {}/{} loss {:.4} ({:.0} s)",
                p.epoch + 1,
                p.step + 1,
                p.steps,
                p.loss,
                started.elapsed().as_secs_f64()
            );
        }
    }))?;
    let train_secs = started.elapsed().as_secs_f64();
    let net = compresslab::fashion_cpu::CpuFashionNet::from_store(&store)?;
    let eval = compresslab::fashion_cpu::evaluate(&net, &test_set)?;
    write_file(Path::new(out), &store.to_safetensors()?)?;
    println!(
        "trained in {train_secs:.0} s ({:.0} images/s); test accuracy {:.2} % ({}/{}); wrote {out}",
        (cfg.epochs * train_set.len()) as f64 / train_secs,
        100.0 * eval.accuracy(),
        eval.correct,
        eval.images
    );
    Ok(())
}

/// The Fashion-MNIST assets the site serves: trained weights, test set, calibration set.
struct FashionAssets {
    weights: TensorStore,
    test: compresslab::fashion::FashionSet,
    training_sample: compresslab::fashion::FashionSet,
    calibration: Vec<Vec<f32>>,
}

pub const FASHION_WEIGHTS_FILE: &str = "fashion-mnist-cnn.safetensors";

fn fashion_assets_from(dir: &str) -> Result<FashionAssets> {
    use compresslab::fashion::FashionSet;
    let read = |name: &str| {
        let path = Path::new(dir).join(name);
        std::fs::read(&path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    let training_sample = FashionSet::from_bytes(&read("calibration.bin")?)?;
    Ok(FashionAssets {
        weights: TensorStore::from_safetensors(&read(FASHION_WEIGHTS_FILE)?)?,
        test: FashionSet::from_bytes(&read("test.bin")?)?,
        calibration: compresslab::sweep::calibration_batches(&training_sample),
        training_sample,
    })
}

fn fashion_eval(args: &[String]) -> Result<()> {
    use compresslab::fashion::CLASS_NAMES;
    let (dir, recipe) = match args {
        [dir] => (dir, Recipe::default()),
        [dir, recipe] => {
            let text = std::fs::read_to_string(recipe).map_err(|source| EngineError::Io {
                path: recipe.clone(),
                source,
            })?;
            (dir, Recipe::from_json(&text)?)
        }
        _ => {
            return Err(usage_error(
                "fashion-eval needs <fashion-dir> [recipe.json]",
            ));
        }
    };
    let a = fashion_assets_from(dir)?;
    let started = Instant::now();
    let model = compress(&a.weights, &recipe, &a.calibration, &mut |_, _| {})?;
    let eval = compresslab::sweep::evaluate_model(&model, &a.test, a.test.len())?;
    let secs = started.elapsed().as_secs_f64();
    let stats = model.stats()?;
    println!(
        "accuracy {:.2} % ({}/{}), {} weight bytes, {} non-zero MACs; compress + evaluate {secs:.2} s",
        100.0 * eval.accuracy(),
        eval.correct,
        eval.images,
        stats.weight_bytes,
        stats.nonzero_macs
    );
    println!(
        "{:>12} {:>7}  confusion (rows: true class, columns: predicted)",
        "class", "acc %"
    );
    for (c, row) in eval.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>4}")).collect();
        println!(
            "{:>12} {:>7.2}  {}",
            CLASS_NAMES[c],
            100.0 * eval.class_accuracy()[c],
            cells.join(" ")
        );
    }
    Ok(())
}

fn sweep_cmd(args: &[String]) -> Result<()> {
    let (images, rest) = match args {
        [flag, n, rest @ ..] if flag == "--images" => (
            n.parse::<usize>()
                .map_err(|_| usage_error("--images needs a number"))?,
            rest,
        ),
        rest => (usize::MAX, rest),
    };
    let [dir] = rest else {
        return Err(usage_error("sweep needs <fashion-dir>"));
    };
    let a = fashion_assets_from(dir)?;
    let base = compresslab::sweep::run_case(
        &a.weights,
        &compresslab::sweep::SweepCase {
            axis: compresslab::sweep::SweepAxis::Quantization,
            label: "fp32".into(),
            x: 32.0,
            recipe: Recipe::default(),
        },
        &a.calibration,
        &a.test,
        images,
    )?;
    println!(
        "fp32: accuracy {:.2} % on {} test images, {} weight bytes",
        100.0 * base.accuracy,
        base.images,
        base.weight_bytes
    );
    println!(
        "{:<26} {:>10} {:>9} {:>12} {:>7}",
        "setting", "accuracy", "Δ pt", "weight bytes", "size ×"
    );
    for case in compresslab::sweep::sweep_cases() {
        let p = compresslab::sweep::run_case(&a.weights, &case, &a.calibration, &a.test, images)?;
        println!(
            "{:<26} {:>9.2}% {:>+9.2} {:>12} {:>7.2}",
            p.label,
            100.0 * p.accuracy,
            100.0 * (p.accuracy - base.accuracy),
            p.weight_bytes,
            base.weight_bytes as f64 / p.weight_bytes.max(1) as f64
        );
    }
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

fn fashion_folder(args: &[String]) -> Result<()> {
    use compresslab::fashion::{CLASS_NAMES, SIDE};
    let (per_class, rest) = leading_flag::<usize>(args, "--per-class")?;
    let per_class = per_class.unwrap_or(10);
    let [dir, out] = rest else {
        return Err(usage_error("fashion-folder needs <fashion-dir> <out-dir>"));
    };
    let a = fashion_assets_from(dir)?;
    let sample = a.training_sample.stratified(per_class);
    let mut written = 0;
    for i in 0..sample.len() {
        let class = CLASS_NAMES[usize::from(sample.labels[i])].replace('/', "_");
        let folder = Path::new(out).join(&class);
        std::fs::create_dir_all(&folder).map_err(|source| EngineError::Io {
            path: folder.display().to_string(),
            source,
        })?;
        let image = image::GrayImage::from_raw(SIDE as u32, SIDE as u32, sample.image(i).to_vec())
            .ok_or_else(|| EngineError::Dataset("image buffer size".into()))?;
        let path = folder.join(format!("{i:04}.png"));
        image
            .save(&path)
            .map_err(|e| EngineError::Decode(format!("{}: {e}", path.display())))?;
        written += 1;
    }
    println!(
        "wrote {written} PNGs in {} class folders under {out}",
        CLASS_NAMES.len()
    );
    Ok(())
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

fn read_image_folder(dir: &Path) -> Result<compresslab::fashion::FashionSet> {
    use compresslab::fashion::{
        FashionSet, UNLABELLED, class_for_name, fitted_size, pixels_from_fitted,
    };
    let files = files_under(dir)?;
    let mut set = FashionSet::default();
    for path in files {
        let Ok(img) = image::open(&path) else {
            eprintln!("skipped {} (not an image)", path.display());
            continue;
        };
        let rgba = img.to_rgba8();
        let (w, h) = fitted_size(rgba.width() as usize, rgba.height() as usize);
        let small = image::imageops::resize(
            &rgba,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        );
        let label = path
            .parent()
            .filter(|p| *p != dir)
            .and_then(|p| p.file_name())
            .and_then(|n| class_for_name(&n.to_string_lossy()))
            .unwrap_or(UNLABELLED);
        set.labels.push(label);
        set.images.extend(pixels_from_fitted(small.as_raw(), w, h)?);
    }
    Ok(set)
}

fn distil_cmd(args: &[String]) -> Result<()> {
    use compresslab::distill::{
        DistillConfig, Distiller, HELDOUT_FRACTION, SPLIT_SEED, requantize, student_for,
    };
    use compresslab::fashion::UNLABELLED;
    let (epochs, rest) = leading_flag::<usize>(args, "--epochs")?;
    let (images, rest) = leading_flag::<String>(rest, "--images")?;
    let [dir, recipe, out] = rest else {
        return Err(usage_error(
            "distil needs <fashion-dir> <recipe.json> <out.safetensors>",
        ));
    };
    let recipe = read_recipe(recipe)?;
    let a = fashion_assets_from(dir)?;
    let data = match &images {
        Some(folder) => read_image_folder(Path::new(folder))?,
        None => a.training_sample.clone(),
    };
    let (train_idx, heldout_idx) = data.stratified_split(HELDOUT_FRACTION, SPLIT_SEED);
    let (train, heldout) = (data.subset(&train_idx), data.subset(&heldout_idx));
    let (student, masks) = student_for(&a.weights, &recipe)?;
    let cfg = DistillConfig {
        epochs: epochs.unwrap_or(3),
        batch_size: 32,
        alpha: 0.7,
        weight_quant: recipe.weights,
        fp32_layers: recipe.keep_fp32.clone(),
        ..DistillConfig::default()
    };
    println!(
        "{} training and {} held-out images ({} unlabelled); {cfg:?}",
        train.len(),
        heldout.len(),
        data.labels.iter().filter(|&&l| l == UNLABELLED).count()
    );
    let mut run = Distiller::new(
        &a.weights,
        &student,
        masks,
        train.clone(),
        cfg,
        &Device::flex().autodiff(),
    )?;
    let before = futures_lite::future::block_on(run.evaluate(&heldout))?;
    let started = Instant::now();
    while !run.is_done() {
        let r = futures_lite::future::block_on(run.step())?;
        if r.epoch_done {
            let h = futures_lite::future::block_on(run.evaluate(&heldout))?;
            println!(
                "epoch {}: training loss {:.4}, held-out loss {:.4}, agreement {:.1} %",
                r.epoch + 1,
                r.epoch_loss,
                h.loss,
                100.0 * h.agreement
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let trained = futures_lite::future::block_on(run.student())?;
    let before_model = compress(&a.weights, &recipe, &a.calibration, &mut |_, _| {})?;
    let after_model = requantize(&trained, &recipe, &a.calibration)?;
    let labelled: Vec<usize> = (0..heldout.len())
        .filter(|&i| heldout.labels[i] != UNLABELLED)
        .collect();
    let labelled = heldout.subset(&labelled);
    for (name, model) in [("compressed", &before_model), ("fine-tuned", &after_model)] {
        let test = compresslab::sweep::evaluate_model(model, &a.test, a.test.len())?;
        let held = compresslab::sweep::evaluate_model(model, &labelled, labelled.len())?;
        println!(
            "{name:>10}: test accuracy {:.2} %, held-out accuracy {:.1} % ({} labelled), {} weight bytes",
            100.0 * test.accuracy(),
            100.0 * held.accuracy(),
            labelled.len(),
            model.stats()?.weight_bytes
        );
    }
    let trained_images = train.len() * run.total_steps() / run.steps_per_epoch().max(1);
    println!(
        "held-out loss {:.4} before training; {trained_images} training images in {secs:.1} s: {:.0} images/s (Flex CPU, batch 32, 28×28)",
        before.loss,
        trained_images as f64 / secs
    );
    write_file(Path::new(out), &after_model.to_safetensors()?)?;
    println!("wrote {out}");
    Ok(())
}

fn bench_distil(args: &[String]) -> Result<()> {
    use compresslab::distill::DistillConfig;
    use compresslab::distill_photo::{PhotoDistiller, augment_photo};
    use compresslab::efficientnet::{BatchNormMode, EfficientNetLite, fold_batch_norms};
    use compresslab::fashion::SplitMix;
    use compresslab::preprocess::CROP;
    let (batch, rest) = leading_flag::<usize>(args, "--batch")?;
    let (steps, rest) = leading_flag::<usize>(rest, "--steps")?;
    let (batch, steps) = (batch.unwrap_or(4).max(1), steps.unwrap_or(3).max(1));
    let [assets, image] = rest else {
        return Err(usage_error("bench-distil needs <assets-dir> <image>"));
    };
    let store = TensorStore::from_safetensors(&read(
        &Path::new(assets).join("models").join(WEIGHTS_FILE),
    )?)?;
    let folded = fold_batch_norms(&store)?;
    let photo = decode_file(Path::new(image))?;
    let mut rng = SplitMix::new(1);
    let mut inputs = || -> Vec<f32> {
        (0..batch)
            .flat_map(|_| augment_photo(&photo, &mut rng))
            .collect()
    };
    let read_back = |t: Tensor<2>| futures_lite::future::block_on(t.into_data_async());
    for (name, device) in [
        ("Flex CPU", Device::flex()),
        ("wgpu", Device::wgpu(DeviceKind::DefaultDevice)),
    ] {
        let net = EfficientNetLite::from_store(&folded, &device, BatchNormMode::Folded)?;
        let shape = [batch, 3, CROP, CROP];
        // Inference: one warm-up batch (shader compilation on wgpu), then `steps` batches.
        let _ =
            read_back(net.forward(Tensor::from_data(TensorData::new(inputs(), shape), &device)));
        let started = Instant::now();
        for _ in 0..steps {
            let _ = read_back(
                net.forward(Tensor::from_data(TensorData::new(inputs(), shape), &device)),
            );
        }
        let infer = (batch * steps) as f64 / started.elapsed().as_secs_f64();
        let cfg = DistillConfig {
            batch_size: batch,
            ..DistillConfig::default()
        };
        let mut run = PhotoDistiller::new(
            &store,
            &folded,
            Vec::new(),
            cfg,
            steps + 1,
            &device.clone().autodiff(),
        )?;
        let labels = vec![None; batch];
        futures_lite::future::block_on(run.step(inputs(), &labels))?;
        let started = Instant::now();
        let mut last = 0.0;
        for _ in 0..steps {
            last = futures_lite::future::block_on(run.step(inputs(), &labels))?;
        }
        let train = (batch * steps) as f64 / started.elapsed().as_secs_f64();
        println!(
            "{name:>8}: inference {infer:.2} images/s, distillation training {train:.2} images/s ({:.1}× the time per image; batch {batch}, {steps} timed steps, last loss {last:.4})",
            infer / train
        );
    }
    Ok(())
}

fn distil_photos(args: &[String]) -> Result<()> {
    use compresslab::distill::DistillConfig;
    use compresslab::finetune_photo::{PhotoFineTune, PhotoSet, folder_of, stored_photo};
    use std::sync::Arc;
    let (epochs, rest) = leading_flag::<usize>(args, "--epochs")?;
    let (batch, rest) = leading_flag::<usize>(rest, "--batch")?;
    let (features, rest) = leading_flag::<String>(rest, "--features")?;
    let feature_blocks = match features {
        Some(list) => list
            .split(',')
            .map(|b| b.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| usage_error("--features needs block numbers, e.g. 5,10,15"))?,
        None => Vec::new(),
    };
    let [assets, recipe, folder, out] = rest else {
        return Err(usage_error(
            "distil-photos needs <assets-dir> <recipe.json> <photo-folder> <out.safetensors>",
        ));
    };
    let recipe = read_recipe(recipe)?;
    let assets = Path::new(assets);
    let store = load_store(assets)?;
    let imagenet = Labels::from_json(&read(&assets.join(LABELS_FILE))?)?;
    let folder = Path::new(folder);
    // Paths as the page sees a chosen folder: "<folder>/<class>/<file>".
    let base = folder.parent().unwrap_or(folder);
    let (mut images, mut folders) = (Vec::new(), Vec::new());
    for path in files_under(folder)? {
        match decode_file(&path) {
            Ok(img) => {
                images.push(stored_photo(&img));
                let relative = path.strip_prefix(base).unwrap_or(&path);
                folders.push(folder_of(&relative.to_string_lossy().replace('\\', "/")));
            }
            Err(e) => eprintln!("skipped {}: {e}", path.display()),
        }
    }
    let set = Arc::new(PhotoSet::from_folders(images, &folders, &imagenet));
    println!("{} photos; labels: {}", set.len(), set.mode.describe());
    let cfg = DistillConfig {
        temperature: 2.0,
        alpha: 0.7,
        learning_rate: 2e-4,
        epochs: epochs.unwrap_or(3),
        batch_size: batch.unwrap_or(8),
        feature_blocks,
        weight_quant: recipe.weights,
        fp32_layers: recipe.keep_fp32.clone(),
        ..DistillConfig::default()
    };
    let device = Device::flex().autodiff();
    let mut run = futures_lite::future::block_on(PhotoFineTune::new(
        set.clone(),
        &store,
        &recipe,
        cfg,
        &device,
        &device,
        &mut |stage| println!("{stage}"),
    ))?;
    println!(
        "{} training and {} held-out photos, {} steps",
        run.train_images(),
        run.heldout_images(),
        run.total_steps()
    );
    let h = futures_lite::future::block_on(run.evaluate())?;
    println!(
        "before: held-out loss {:.4}, agreement {:.1} %",
        h.loss,
        100.0 * h.agreement
    );
    let started = Instant::now();
    let mut images = 0;
    while !run.is_done() {
        let r = futures_lite::future::block_on(run.step())?;
        images += r.images;
        if r.epoch_done {
            let h = futures_lite::future::block_on(run.evaluate())?;
            println!(
                "epoch {}: training loss {:.4}, held-out loss {:.4}, agreement {:.1} %{}",
                r.epoch + 1,
                r.epoch_loss,
                h.loss,
                100.0 * h.agreement,
                h.accuracy
                    .map(|a| format!(", accuracy {:.1} %", 100.0 * a))
                    .unwrap_or_default()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (before, after, _) = futures_lite::future::block_on(run.finish(&recipe))?;
    let labels = match set.own_classes() {
        Some(names) => Labels::from_names(names.to_vec())?,
        None => imagenet,
    };
    let teacher = ImageClassifier::new_cpu(run.teacher(), labels.clone())?;
    let teacher_preds = futures_lite::future::block_on(run.heldout_predictions(&teacher))?;
    if let (Some(accuracy), _) = run.scores(&teacher_preds, &teacher_preds) {
        println!(
            "   teacher: held-out accuracy {:.1} %, {} weight bytes",
            100.0 * accuracy,
            CompressedModel::original(run.teacher())?
                .stats()?
                .weight_bytes
        );
    }
    for (name, model) in [("compressed", &before), ("fine-tuned", &after)] {
        let net = ImageClassifier::new_compressed_cpu(model, labels.clone())?;
        let preds = futures_lite::future::block_on(run.heldout_predictions(&net))?;
        let (accuracy, agreement) = run.scores(&preds, &teacher_preds);
        println!(
            "{name:>10} (deployed, CPU): held-out agreement with the teacher {:.1} %{}, {} weight bytes",
            100.0 * agreement,
            accuracy
                .map(|a| format!(", accuracy {:.1} %", 100.0 * a))
                .unwrap_or_default(),
            model.stats()?.weight_bytes
        );
    }
    println!(
        "{images} training images in {secs:.1} s ({:.2} images/s)",
        images as f64 / secs.max(1e-9)
    );
    let bytes = after.to_safetensors()?;
    std::fs::write(out, bytes).map_err(|source| EngineError::Io {
        path: out.clone(),
        source,
    })?;
    println!("wrote {out}");
    Ok(())
}

fn read_recipe(path: &str) -> Result<Recipe> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_string(),
        source,
    })?;
    Ok(Recipe::from_json(&text)?)
}
