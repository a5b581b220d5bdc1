//! Benchmarks: the photo model on every executor, its compressed variants (the photo lab's
//! and the graph engine's compression, timed in turn on the CPU interpreter), and
//! distillation training speed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use compresslab::Result;
use compresslab::classifier::{ImageClassifier, max_abs_diff};
use compresslab::compress::{CompressedModel, Observer, Recipe, agreement, compress};
use compresslab::decode::decode_file;
use compresslab::exec::{self, CpuExecutor};
use compresslab::gpu_int::GpuFeatures;
use compresslab::graph::compress_graph;
use compresslab::labels::Labels;
use compresslab::preprocess::imagenet_input;
use compresslab::prune::{ChannelPruning, ChannelRanking};
use compresslab::quant::{Granularity, QuantScheme};
use compresslab::weights::TensorStore;

use super::{WEIGHTS_FILE, leading_flag, load, load_store, percentile, read, usage_error};

pub fn bench(args: &[String]) -> Result<()> {
    let (runs, rest) = leading_flag::<usize>(args, "--runs")?;
    let runs = runs.unwrap_or(20);
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

pub fn bench_compress(args: &[String]) -> Result<()> {
    let (runs, rest) = leading_flag::<usize>(args, "--runs")?;
    let runs = runs.unwrap_or(20);
    let [assets, image] = rest else {
        return Err(usage_error(
            "bench-compress needs an assets dir and one image",
        ));
    };
    let assets = Path::new(assets);
    let store = load_store(assets)?;
    let input = imagenet_input(&decode_file(Path::new(image))?);
    // Calibrate on the sample photos next to the models (assets/samples), except the one
    // the variants are compared on: its "top-1 same" and KL are then held-out figures.
    let samples_dir = assets.parent().unwrap_or(assets).join("samples");
    let benchmarked = std::fs::canonicalize(image).ok();
    let mut calibration = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&samples_dir) {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths.iter().filter(|p| {
            p.extension().is_some_and(|e| e == "png" || e == "jpg")
                && std::fs::canonicalize(p).ok() != benchmarked
        }) {
            calibration.push(imagenet_input(&decode_file(p)?));
        }
    }
    let held_out = !calibration.is_empty();
    if !held_out {
        calibration.push(input.clone());
    }
    println!(
        "{} calibration images ({}); {runs} warm runs each",
        calibration.len(),
        if held_out {
            "the compared photo is not among them: top-1 same and KL are held-out figures"
        } else {
            "no other photos: the compared photo calibrated too, so top-1 same and KL are not held-out figures"
        }
    );
    println!(
        "| variant | executor | cold ms | warm p50 ms | warm p95 ms | speed-up vs fp32 (p50) | weight bytes | size ratio | MACs (M) | top-1 same | KL |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let original = CompressedModel::original(&store)?.stats()?;
    // The photo lab's variants (`compress`) and the graph engine's (`compress_graph`, what
    // "Your model" runs) with the same recipes, both on the CPU interpreter, timed in turn so
    // both see the same machine.
    // With its BatchNorms as nodes, as an exported ONNX model has them: channel ranking sees
    // the filters as stored, as the lab's does.
    let graph = compresslab::graph_builder::unfolded_network_graph(&store)?;
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
    // Every variant is built first, then all CPU runs are timed in turn (fp32 and each
    // variant one after another, round after round), so the CPU ratios compare runs that
    // saw the same machine; wgpu (on lavapipe, seconds a run) is timed after, up to 5 runs
    // per variant.
    struct Built {
        name: &'static str,
        cpu: ImageClassifier,
        interpreter: CpuExecutor,
        wgpu: ImageClassifier,
        lab_size: (usize, u64),
        graph_size: (usize, u64),
    }
    let mut built = Vec::new();
    for (name, recipe) in bench_variants() {
        let model = compress(&store, &recipe, &calibration, &mut |_, _| Ok(()))?;
        let stats = model.stats()?;
        let compressed_graph = compress_graph(&graph, &recipe, &batches, &mut |_, _| Ok(()))?;
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
        let graph_stats = compressed_graph.graph.stats(&compressed_graph.weights)?;
        built.push(Built {
            name,
            cpu: ImageClassifier::new_compressed_cpu(&model, Labels::default())?,
            interpreter,
            wgpu,
            lab_size: (stats.weight_bytes, stats.macs),
            graph_size: (
                graph_stats.weight_bytes,
                graph_stats.macs.unwrap_or_default(),
            ),
        });
    }
    let mut cpu_runs: Vec<Box<dyn FnMut() -> Result<Vec<f32>> + '_>> = Vec::new();
    for b in &built {
        cpu_runs.push(Box::new(|| {
            futures_lite::future::block_on(b.cpu.logits(&input))
        }));
        cpu_runs.push(Box::new(|| Ok(b.interpreter.run(&tensor)?.remove(0).data)));
    }
    let mut cpu_refs: Vec<&mut dyn FnMut() -> Result<Vec<f32>>> =
        cpu_runs.iter_mut().map(|f| &mut **f as _).collect();
    let in_turn = time_in_turn(runs, &mut cpu_refs)?;
    let mut fp32_p50: std::collections::HashMap<&str, f64> = Default::default();
    let mut reference: Option<Vec<f32>> = None;
    // Each variant's speed-up on the graph engine's compression (the second CPU row).
    let graph_base = in_turn.get(1).map_or(f64::NAN, |t| t.1);
    let speed_ups: Vec<(&str, f64)> = built
        .iter()
        .zip(in_turn.chunks_exact(2))
        .map(|(b, t)| (b.name, graph_base / t[1].1))
        .collect();
    for (b, cpu_timings) in built.iter().zip(in_turn.chunks_exact(2)) {
        let wgpu_timing = time_runs(runs.min(5), || {
            futures_lite::future::block_on(b.wgpu.logits(&input))
        })?;
        let rows = [
            ("cpu, the lab's compression", &cpu_timings[0], b.lab_size),
            (
                "cpu, the graph engine's compression",
                &cpu_timings[1],
                b.graph_size,
            ),
            ("wgpu", &wgpu_timing, b.lab_size),
        ];
        for (executor, (cold, p50, p95, logits), (bytes, macs)) in rows {
            let base = *fp32_p50.entry(executor).or_insert(*p50);
            let reference = reference.get_or_insert_with(|| logits.clone());
            let (same, kl) = agreement(reference, logits);
            println!(
                "| {} | {executor} | {cold:.1} | {p50:.1} | {p95:.1} | {:.2}× | {} | {:.2}× | {:.0} | {same} | {kl:.4} |",
                b.name,
                base / p50,
                bytes,
                original.weight_bytes as f64 / bytes.max(1) as f64,
                macs as f64 / 1e6,
            );
        }
    }
    // The native goals (int8 ≥ 1.5×, int4 weight-only at least fp32's speed), on the
    // graph engine's compression run by the native interpreter (the rows "cpu, the graph
    // engine's compression"); single p50s of one run, so a ratio near its goal can flip
    // between runs.
    for (variant, goal) in [("int8", 1.5), ("int4", 1.0)] {
        if let Some((name, speed_up)) = speed_ups.iter().find(|(n, _)| n.starts_with(variant)) {
            println!(
                "target native {name} vs fp32 (cpu, the graph engine's compression): {speed_up:.2}× (goal ≥ {goal}×) {}",
                if *speed_up >= goal { "met" } else { "not met" }
            );
        }
    }
    Ok(())
}

pub fn bench_distil(args: &[String]) -> Result<()> {
    use compresslab::distill::{DistillConfig, NetworkDistiller};
    use compresslab::distill_photo::augment_photo;
    use compresslab::efficientnet::fold_batch_norms;
    use compresslab::exec::GraphModel;
    use compresslab::fashion::SplitMix;
    use compresslab::graph_builder::network_graph;
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
    let mut started = Instant::now();
    for (name, device) in [
        ("Flex CPU", Device::flex()),
        ("wgpu", Device::wgpu(DeviceKind::DefaultDevice)),
    ] {
        let net = GraphModel::new(&network_graph(&folded)?.with_any_batch(), &device)?;
        let shape = [batch, 3, CROP, CROP];
        // Inference: one warm-up batch (shader compilation on wgpu), then `steps` batches.
        for run in 0..=steps {
            if run == 1 {
                started = Instant::now();
            }
            let x = Tensor::from_data(TensorData::new(inputs(), shape), &device);
            let _ = read_back(net.logits(x)?);
        }
        let infer = (batch * steps) as f64 / started.elapsed().as_secs_f64();
        let cfg = DistillConfig {
            batch_size: batch,
            ..DistillConfig::default()
        };
        let mut run = NetworkDistiller::new(
            &store,
            &folded,
            Vec::new(),
            None,
            cfg,
            steps + 1,
            &device.clone().autodiff(),
        )?;
        let labels = vec![None; batch];
        futures_lite::future::block_on(run.step(inputs(), &labels))?;
        started = Instant::now();
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
