//! Compression on the graph, for every test model: channel groups found by walking the graph
//! (pruned = masked, 0 % = identical), the lab's recipe (W8A8 agreement on inputs that were
//! not used to calibrate), and the exported ONNX read back by our importer and by ONNX
//! Runtime with matching outputs.

use std::path::PathBuf;
use std::process::Command;

use compresslab::compress::{Observer, Recipe};
use compresslab::exec::{CpuExecutor, Tensor};
use compresslab::graph::{
    Graph, Op, channel_groups, compress_graph, export_onnx, import_onnx, mask_channels,
    prune_channels, weight_nodes,
};
use compresslab::npy::{read_npy, write_npy};
use compresslab::prune::{ChannelPruning, ChannelRanking, MagnitudePruning, PruneScope};
use compresslab::quant::{Granularity, QuantScheme};

use super::graph::{import_mutations, models, npy, relative_difference};

pub(crate) const MODELS: [&str; 5] = ["resnet", "densenet", "shufflenet", "mobilenet", "textdir"];

pub(crate) fn load(name: &str) -> Graph {
    import_onnx(&std::fs::read(models().join(format!("{name}.onnx"))).unwrap()).unwrap()
}

fn run(graph: &Graph, input: &Tensor) -> Tensor {
    CpuExecutor::new(graph)
        .unwrap()
        .run(input)
        .unwrap()
        .remove(0)
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Fraction of rows whose top-1 class is the same.
pub(crate) fn top1_agreement(a: &Tensor, b: &Tensor) -> f64 {
    let classes = a.dims[1];
    let same = a
        .data
        .chunks(classes)
        .zip(b.data.chunks(classes))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    same as f64 / (a.data.len() / classes) as f64
}

/// Standard-normal inputs of the model's input shape with a seed of their own: calibration
/// data the evaluated inputs are not part of.
fn random_like(t: &Tensor, mut seed: u64) -> Tensor {
    let mut uniform = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let data = (0..t.data.len())
        .map(|_| {
            let (u, v) = (uniform().max(1e-12), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    Tensor {
        dims: t.dims.clone(),
        data,
    }
}

/// `(calibration, evaluation)` for a model: the text-direction lines split in two halves
/// (different texts), the synthetic models' reference batch against a random batch.
pub(crate) fn calibration_and_evaluation(name: &str) -> (Tensor, Tensor) {
    let input = npy(&format!("{name}.input.npy"));
    if name != "textdir" {
        return (random_like(&input, 99), input);
    }
    let half = input.data.len() / 2;
    let mut dims = input.dims.clone();
    dims[0] /= 2;
    let part = |data: &[f32]| Tensor {
        dims: dims.clone(),
        data: data.to_vec(),
    };
    (part(&input.data[..half]), part(&input.data[half..]))
}

#[test]
fn channel_groups_follow_the_topology() {
    let summary = |name: &str| {
        let groups = channel_groups(&load(name)).unwrap();
        for g in &groups {
            println!(
                "{name}: {:?} {} channels{}",
                g.producers,
                g.channels,
                g.fixed
                    .as_ref()
                    .map_or(String::new(), |w| format!(", fixed: {w}"))
            );
        }
        groups
    };
    // ResNet: the stem and the first block's second conv are residual partners; the second
    // block's second conv and its projection shortcut are; the classifier's outputs are the
    // model's.
    let resnet = summary("resnet");
    let coupled: Vec<(usize, usize)> = resnet
        .iter()
        .filter(|g| g.fixed.is_none() && g.producers.len() > 1)
        .map(|g| (g.producers.len(), g.channels))
        .collect();
    assert_eq!(coupled, vec![(2, 16), (2, 32)]);
    assert!(
        resnet
            .iter()
            .any(|g| g.channels == 10 && g.fixed.as_deref() == Some("the model's output"))
    );
    // MobileNet: the stem, the squeeze-excite expansion (through the gate's Mul), the
    // depthwise branch (passes channels through) and the 1×1 branch all meet in one Sum.
    let mobilenet = summary("mobilenet");
    assert!(
        mobilenet
            .iter()
            .any(|g| g.fixed.is_none() && g.producers.len() == 3 && g.channels == 12)
    );
    // ShuffleNet: grouped convolutions and the channel shuffle fix their channels; the
    // dilated conv before the MatMul head stays prunable.
    let shufflenet = summary("shufflenet");
    assert!(
        shufflenet
            .iter()
            .any(|g| g.fixed.as_deref() == Some("grouped convolution"))
    );
    assert!(
        shufflenet
            .iter()
            .any(|g| g.fixed.is_none() && g.channels == 12)
    );
    // DenseNet: every conv's channels stay their own through the concatenations.
    let densenet = summary("densenet");
    assert_eq!(densenet.iter().filter(|g| g.fixed.is_none()).count(), 7);
    let textdir = summary("textdir");
    assert!(textdir.iter().filter(|g| g.fixed.is_none()).count() >= 10);
}

#[test]
fn pruned_channels_compute_what_masked_channels_compute() {
    for name in MODELS {
        let graph = load(name);
        let input = npy(&format!("{name}.input.npy"));
        let original = run(&graph, &input);
        let none = ChannelPruning {
            ratio: 0.0,
            ranking: ChannelRanking::L1,
        };
        let same = prune_channels(&graph, &none).unwrap();
        assert_eq!(
            same.constants, graph.constants,
            "{name}: 0 % changed weights"
        );
        assert_eq!(
            run(&same, &input).data,
            original.data,
            "{name}: 0 % changed outputs"
        );
        for ranking in [
            ChannelRanking::L1,
            ChannelRanking::L2,
            ChannelRanking::BatchNormGamma,
        ] {
            let cfg = ChannelPruning {
                ratio: 0.5,
                ranking,
            };
            let pruned = prune_channels(&graph, &cfg).unwrap();
            let masked = mask_channels(&graph, &cfg).unwrap();
            let (p, m) = (run(&pruned, &input), run(&masked, &input));
            let diff = relative_difference(&p, &m);
            let params = |g: &Graph| g.constants.values().map(|c| c.data.len()).sum::<usize>();
            println!(
                "{name} {ranking:?} 50 %: parameters {} → {}, pruned vs masked {diff:.2e}, changed vs original {:.2e}",
                params(&graph),
                params(&pruned),
                relative_difference(&p, &original)
            );
            assert!(diff <= 1e-5, "{name} {ranking:?}: {diff}");
            assert!(
                params(&pruned) < params(&graph) * 9 / 10,
                "{name}: little removed"
            );
        }
    }
}

#[test]
fn w8a8_on_the_graph_agrees_with_fp32_on_held_out_inputs() {
    let recipe = Recipe::w8a8(Granularity::PerChannel, Observer::MinMax);
    for name in MODELS {
        let graph = load(name);
        let (calibration, evaluation) = calibration_and_evaluation(name);
        let compressed =
            compress_graph(&graph, &recipe, &[calibration], &mut |_, _| Ok(())).unwrap();
        let quantizers = compressed
            .graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::QuantizeDequantize(_)))
            .count();
        let fp32 = run(&graph, &evaluation);
        let int8 = run(&compressed.graph, &evaluation);
        let agreement = top1_agreement(&fp32, &int8);
        let diff = relative_difference(&int8, &fp32);
        let quantized = compressed
            .layers
            .iter()
            .filter(|l| l.bits == Some(8))
            .count();
        println!(
            "{name}: {quantized}/{} layers int8, {quantizers} activation quantizers, top-1 agreement {:.0} % on {} held-out inputs, max relative output change {diff:.1e}",
            compressed.layers.len(),
            100.0 * agreement,
            evaluation.dims[0]
        );
        assert_eq!(quantized, compressed.layers.len());
        assert!(compressed.layers.iter().all(|l| l.activation.is_some()));
        assert!(agreement >= 0.99, "{name}: {agreement}");
        // The per-layer view: a histogram of every weight, and the narrowest channel with
        // the levels of its own 8-bit grid inside its range (per channel: at least 128 when
        // the channel's max|w| sets its scale, one side of zero at least).
        for l in &compressed.layers {
            let counted: u32 = l.histogram.counts.iter().sum();
            assert_eq!(counted as usize, l.parameters, "{name} {}", l.node);
            let channel = l.narrowest_channel.as_ref().expect("a non-zero channel");
            assert!(channel.channel < l.shape[0]);
            assert!(
                channel.levels.len() >= 128,
                "{name} {}: {} levels",
                l.node,
                channel.levels.len()
            );
        }
    }
}

/// Magnitude pruning with "leave the ends alone" keeps the first and last layers with weights
/// exactly as they were (found by position in the graph, not by name); the others reach the
/// requested sparsity.
#[test]
fn magnitude_pruning_leaves_a_graphs_ends_alone_when_asked() {
    for name in MODELS {
        let graph = load(name);
        let untouched = compress_graph(&graph, &Recipe::default(), &[], &mut |_, _| Ok(()))
            .unwrap()
            .layers;
        let recipe = Recipe {
            magnitude_pruning: Some(MagnitudePruning {
                sparsity: 0.5,
                scope: PruneScope::PerLayer,
                exclude: Vec::new(),
                exclude_ends: true,
            }),
            ..Recipe::default()
        };
        let pruned = compress_graph(&graph, &recipe, &[], &mut |_, _| Ok(()))
            .unwrap()
            .layers;
        let last = pruned.len() - 1;
        for (i, (a, b)) in pruned.iter().zip(&untouched).enumerate() {
            if i == 0 || i == last {
                assert_eq!(a.zeros, b.zeros, "{name}: {} was pruned", a.node);
            } else {
                // Exactly half of the weights (rounded), plus any zeros a bias has.
                let weights: usize = a.shape.iter().product();
                let half = (0.5 * weights as f64).round() as usize;
                assert!(
                    a.zeros >= half,
                    "{name}: {} has {} zeros of {weights}",
                    a.node,
                    a.zeros
                );
            }
        }
    }
}

/// int4 weight-only quantization in blocks of `block` input values.
pub(crate) fn int4_blocks(symmetric: bool, block: usize) -> Recipe {
    Recipe {
        weights: Some(QuantScheme {
            bits: 4,
            symmetric,
            granularity: Granularity::PerBlock(block),
        }),
        ..Recipe::default()
    }
}

/// The compressed graph on the CPU interpreter's integer kernels against the same graph in
/// float (dequantized weights, fake-quantized activations): what the export's QDQ model
/// computes. int8 sums of grid values are exact, so only float summation order differs.
#[test]
fn integer_kernels_on_the_graph_compute_what_its_float_form_computes() {
    let int4 = int4_blocks(true, 32);
    let recipes = [
        (
            "W8A8 per channel",
            Recipe::w8a8(Granularity::PerChannel, Observer::MinMax),
        ),
        (
            "W8A8 per tensor",
            Recipe::w8a8(Granularity::PerTensor, Observer::MinMax),
        ),
        ("int4 per block of 32", int4),
    ];
    for name in MODELS {
        let graph = load(name);
        let (calibration, evaluation) = calibration_and_evaluation(name);
        let float_bytes = CpuExecutor::new(&graph).unwrap().weight_bytes();
        for (label, recipe) in &recipes {
            let compressed = compress_graph(
                &graph,
                recipe,
                std::slice::from_ref(&calibration),
                &mut |_, _| Ok(()),
            )
            .unwrap();
            let integer = CpuExecutor::compressed(&compressed).unwrap();
            let used = integer.kernel_use();
            let reference = run(&compressed.graph, &evaluation);
            let ours = integer.run(&evaluation).unwrap().remove(0);
            let diff = relative_difference(&ours, &reference);
            let agreement = top1_agreement(&ours, &reference);
            println!(
                "{name}, {label}: {} int8 + {} int4 layers on integer kernels, {} as float; \
                 max relative difference to the float form {diff:.1e}, top-1 same on {:.0} % of {}; \
                 weights held {} → {} bytes",
                used.int8,
                used.int4,
                used.dequantized,
                100.0 * agreement,
                evaluation.dims[0],
                float_bytes,
                integer.weight_bytes()
            );
            let layers = compressed.layers.len();
            assert_eq!(
                used.int8 + used.int4 + used.dequantized,
                layers,
                "{name} {label}"
            );
            if recipe.activations.is_some() {
                // Every dense layer (1×1, k×k with one group, Gemm) and every depthwise
                // one on the int8 kernels; other grouped convolutions have none.
                let g = &compressed.graph;
                let depthwise = |node: &compresslab::graph::Node| {
                    let dims = node
                        .inputs
                        .get(1)
                        .and_then(|w| g.constants.get(w))
                        .map(|c| &c.dims);
                    matches!(&node.op, Op::Conv(c) if dims.is_some_and(|d| d[0] == c.group && d[1] == 1))
                };
                let integer = weight_nodes(g)
                    .into_iter()
                    .filter(|&i| {
                        let node = &g.nodes[i];
                        !matches!(&node.op, Op::Conv(c) if c.group > 1) || depthwise(node)
                    })
                    .count();
                assert_eq!(used.int8, integer, "{name} {label}: {used:?}");
                assert_eq!(used.int4, 0);
            } else {
                assert_eq!(used.int4, layers, "{name} {label}");
                // Packed nibbles and a scale per 32 (6.4× below f32); the float biases and
                // BatchNorms of these small models keep the whole at 4.0–6.0×.
                assert!(
                    integer.weight_bytes() * 7 <= float_bytes * 2,
                    "{name} {label}"
                );
            }
            // int8: exact integer sums, float rounding only. int4: the 1×1 and Gemm layers
            // round each pixel's inputs to 16 bits (measured at most 9.2e-5, textdir).
            let limit = if recipe.activations.is_some() {
                1e-5
            } else {
                3e-4
            };
            assert!(diff <= limit, "{name} {label}: {diff}");
            assert!(agreement >= 0.99, "{name} {label}: {agreement}");
        }
    }
}

fn python() -> Option<PathBuf> {
    let cache = std::env::var("COMPRESSLAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/compresslab")
        });
    let python = cache.join("venv/bin/python");
    python.exists().then_some(python)
}

/// ONNX Runtime's first output for `model` on `input` (the venv from scripts/setup.sh --tests).
pub(crate) fn onnx_runtime(model: &[u8], input: &Tensor, tag: &str) -> Tensor {
    let python = python().expect("the ONNX Runtime venv is missing: run scripts/setup.sh --tests");
    let dir = std::env::temp_dir().join(format!("compresslab-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (m, i, o) = (
        dir.join(format!("{tag}.onnx")),
        dir.join(format!("{tag}.in.npy")),
        dir.join(format!("{tag}.out.npy")),
    );
    std::fs::write(&m, model).unwrap();
    std::fs::write(&i, write_npy(input)).unwrap();
    let status = Command::new(python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/models/run_ort.py"))
        .args([&m, &i, &o])
        .status()
        .unwrap();
    assert!(status.success(), "{tag}: ONNX Runtime failed on the export");
    read_npy(&std::fs::read(&o).unwrap()).unwrap()
}

#[test]
fn exported_onnx_runs_in_onnx_runtime_and_reimports() {
    let int4 = int4_blocks(false, 20);
    let pruned_int8 = Recipe {
        channel_pruning: Some(ChannelPruning {
            ratio: 0.3,
            ranking: ChannelRanking::L1,
        }),
        ..Recipe::w8a8(Granularity::PerChannel, Observer::Percentile(99.99))
    };
    let fp32 = Recipe::default();
    for name in MODELS {
        let graph = load(name);
        let (calibration, evaluation) = calibration_and_evaluation(name);
        for (tag, recipe) in [
            ("fp32", &fp32),
            ("int4-block20", &int4),
            ("pruned-w8a8", &pruned_int8),
        ] {
            let compressed = compress_graph(
                &graph,
                recipe,
                std::slice::from_ref(&calibration),
                &mut |_, _| Ok(()),
            )
            .unwrap();
            let ours = run(&compressed.graph, &evaluation);
            let bytes = export_onnx(&compressed.graph, &compressed.weights, &[]).unwrap();
            let reimported = run(&import_onnx(&bytes).unwrap(), &evaluation);
            let round_trip = relative_difference(&reimported, &ours);
            let ort = onnx_runtime(&bytes, &evaluation, &format!("{name}-{tag}"));
            let vs_ort = relative_difference(&ort, &ours);
            let agreement = top1_agreement(&ort, &ours);
            let stats = compressed.graph.stats(&compressed.weights).unwrap();
            println!(
                "{name} {tag}: {} bytes of ONNX, {} weight bytes; re-imported vs ours {round_trip:.1e}, ONNX Runtime vs ours {vs_ort:.1e}, top-1 same on {:.0} % of {}",
                bytes.len(),
                stats.weight_bytes,
                100.0 * agreement,
                evaluation.dims[0]
            );
            assert!(round_trip <= 1e-5, "{name} {tag}: {round_trip}");
            assert!(agreement >= 0.99, "{name} {tag}: {agreement}");
            // Float arithmetic on the same (dequantized) weights: 4e-7 at most measured; with
            // activation rounding, a value on a rounding edge can land one level apart
            // (2.5e-3 measured on the text-direction model).
            let limit = if tag == "pruned-w8a8" { 1e-2 } else { 1e-4 };
            assert!(vs_ort <= limit, "{name} {tag}: {vs_ort}");
        }
    }
}

/// The built-in lab's "Export ONNX": a compressed variant of either built-in network is an
/// ONNX file that our importer reads back to the same outputs and ONNX Runtime runs with the
/// same predictions, on inputs that did not calibrate it.
#[test]
fn built_in_variants_export_onnx_that_onnx_runtime_runs() {
    use compresslab::compress::{CompressedModel, compress};
    use compresslab::fashion::{PIXELS, SIDE, normalize};
    use compresslab::graph_builder::compressed_network_graph;
    use compresslab::sweep::calibration_batches;

    let w8a8 = Recipe::w8a8(Granularity::PerChannel, Observer::Percentile(99.99));
    let pruned_w8a8 = Recipe {
        channel_pruning: Some(ChannelPruning {
            ratio: 0.3,
            ranking: ChannelRanking::L2,
        }),
        ..w8a8.clone()
    };
    let int4 = int4_blocks(true, 32);
    let check = |tag: &str, model: &CompressedModel, inputs: &[Tensor]| {
        let bytes = model.to_onnx().unwrap();
        let (graph, weights) = compressed_network_graph(model).unwrap();
        let float = CpuExecutor::new(&graph).unwrap();
        let deployed = CpuExecutor::quantized(graph, &weights).unwrap();
        let reimported = CpuExecutor::new(&import_onnx(&bytes).unwrap()).unwrap();
        let batch = |run: &dyn Fn(&Tensor) -> Tensor| -> Tensor {
            let outs: Vec<Tensor> = inputs.iter().map(run).collect();
            Tensor {
                dims: vec![outs.iter().map(|t| t.dims[0]).sum(), outs[0].dims[1]],
                data: outs.into_iter().flat_map(|t| t.data).collect(),
            }
        };
        let ours = batch(&|x| float.run(x).unwrap().remove(0));
        let ints = batch(&|x| deployed.run(x).unwrap().remove(0));
        let back = batch(&|x| reimported.run(x).unwrap().remove(0));
        let ort = batch(&|x| onnx_runtime(&bytes, x, tag));
        let (round_trip, vs_ort) = (
            relative_difference(&back, &ours),
            relative_difference(&ort, &ours),
        );
        let (same, same_deployed) = (top1_agreement(&ort, &ours), top1_agreement(&ort, &ints));
        println!(
            "{tag}: {} bytes of ONNX; re-imported vs ours {round_trip:.1e}; ONNX Runtime vs ours {vs_ort:.1e}, top-1 same on {:.1} % of {} (vs our integer kernels {:.1} %)",
            bytes.len(),
            100.0 * same,
            ours.dims[0],
            100.0 * same_deployed
        );
        assert!(round_trip <= 1e-5, "{tag}: {round_trip}");
        // Weight-only: float arithmetic on the same weights (2.8e-7 measured). With activation
        // grids a value on a rounding edge lands one level apart and the layers after it
        // carry that on: 3.2e-3 measured on the Fashion CNN, 1.1e-2 through Lite0's 50 layers.
        let limit = if model.recipe.activations.is_some() {
            3e-2
        } else {
            1e-5
        };
        assert!(vs_ort <= limit, "{tag}: {vs_ort}");
        assert!(same >= 0.99, "{tag}: {same}");
        assert!(same_deployed >= 0.99, "{tag}: {same_deployed}");
    };

    // Fashion-MNIST: calibrated on the 1 000 training images, measured on 500 test images.
    let store = super::fashion::weights();
    let calibration = calibration_batches(&super::fashion::set("calibration.bin"));
    let test = super::fashion::set("test.bin");
    let images = Tensor {
        dims: vec![500, 1, SIDE, SIDE],
        data: normalize(&test.images[..500 * PIXELS]),
    };
    for (tag, recipe) in [
        ("fashion-pruned-w8a8", &pruned_w8a8),
        ("fashion-int4", &int4),
    ] {
        let model = compress(&store, recipe, &calibration, &mut |_, _| Ok(())).unwrap();
        check(tag, &model, std::slice::from_ref(&images));
    }

    // EfficientNet-Lite0: calibrated on 3 sample photos, measured on the other 4.
    let photos: Vec<Tensor> = sample_photos().into_iter().map(|(_, t)| t).collect();
    let calibration: Vec<Vec<f32>> = photos[..3].iter().map(|t| t.data.clone()).collect();
    let store = crate::store();
    for (tag, recipe) in [("efficientnet-w8a8", &w8a8), ("efficientnet-int4", &int4)] {
        let model = compress(&store, recipe, &calibration, &mut |_, _| Ok(())).unwrap();
        check(tag, &model, &photos[3..]);
    }
}

#[test]
fn mutated_compressed_exports_fail_cleanly() {
    // Truncated and bit-flipped copies of a QDQ + int4 export (integer initializers,
    // DequantizeLinear folding, QuantizeLinear pairs) import or fail with an error, and
    // whatever imports runs or fails with an error: never a panic.
    let graph = load("mobilenet");
    let (calibration, evaluation) = calibration_and_evaluation("mobilenet");
    let mut recipe = Recipe::w8a8(Granularity::PerBlock(8), Observer::MinMax);
    recipe.weights = Some(QuantScheme {
        bits: 4,
        symmetric: false,
        granularity: Granularity::PerBlock(8),
    });
    let compressed = compress_graph(&graph, &recipe, &[calibration], &mut |_, _| Ok(())).unwrap();
    let bytes = export_onnx(&compressed.graph, &compressed.weights, &[]).unwrap();
    import_mutations(&bytes, &evaluation, 1000, 0x9e37_79b9_7f4a_7c15);
}

/// The seven sample photos, preprocessed (sorted by name).
fn sample_photos() -> Vec<(String, Tensor)> {
    let dir = crate::assets().join("samples");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png") || n.ends_with(".jpg"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let image = compresslab::decode::decode_file(&dir.join(&n)).unwrap();
            let data = compresslab::preprocess::imagenet_input(&image);
            (
                n,
                Tensor {
                    dims: vec![1, 3, 224, 224],
                    data,
                },
            )
        })
        .collect()
}

#[test]
fn efficientnet_as_a_graph_matches_onnx_runtime_and_compresses() {
    // The model builder's graph of the built-in network, and the same graph through our ONNX
    // export and the importer, against ONNX Runtime running that export (on a batch: the
    // export declares a batch of any size).
    use compresslab::graph_builder::network_graph;
    let store = crate::store();
    let built_graph = network_graph(&store).unwrap();
    let built = CpuExecutor::new(&built_graph).unwrap();
    let bytes = export_onnx(
        &built_graph.clone().with_any_batch(),
        &std::collections::BTreeMap::new(),
        &[],
    )
    .unwrap();
    let graph = import_onnx(&bytes).unwrap();
    let executor = CpuExecutor::new(&graph).unwrap();
    let photos = sample_photos();
    assert_eq!(photos.len(), 7);
    let all = Tensor {
        dims: vec![photos.len(), 3, 224, 224],
        data: photos.iter().flat_map(|(_, x)| x.data.clone()).collect(),
    };
    let reference = onnx_runtime(&bytes, &all, "lite0-fp32");
    let classes = reference.dims[1];
    assert_eq!(reference.dims, vec![photos.len(), classes]);
    for (i, (name, input)) in photos.iter().enumerate() {
        let ours = executor.run(input).unwrap().remove(0);
        let direct = built.run(input).unwrap().remove(0);
        let ort = Tensor {
            dims: vec![1, classes],
            data: reference.data[i * classes..(i + 1) * classes].to_vec(),
        };
        let (diff, round_trip) = (
            relative_difference(&ours, &ort),
            relative_difference(&ours, &direct),
        );
        println!(
            "{name}: graph interpreter vs ONNX Runtime {diff:.1e}; ONNX round trip vs the builder's graph {round_trip:.1e}"
        );
        assert!(diff <= 1e-4, "{name}: {diff}");
        assert!(round_trip <= 1e-6, "{name}: {round_trip}");
    }

    // Dependency groups: each MBConv block's expanded channels (expand → depthwise → project)
    // and the residual streams the blocks of a stage share.
    let groups = channel_groups(&graph).unwrap();
    let prunable: Vec<&compresslab::graph::ChannelGroup> =
        groups.iter().filter(|g| g.fixed.is_none()).collect();
    for g in &groups {
        println!(
            "EfficientNet group: {} producers, {} channels{:?}",
            g.producers.len(),
            g.channels,
            g.fixed
        );
    }
    assert!(prunable.len() >= 20, "{} prunable groups", prunable.len());
    assert!(
        prunable.iter().any(|g| g.producers.len() >= 3),
        "a residual stream of 3+ blocks"
    );

    // W8A8: calibrated on 3 photos, agreement measured on the other 4.
    let recipe = Recipe::w8a8(Granularity::PerChannel, Observer::Percentile(99.99));
    let calibration: Vec<Tensor> = photos[..3].iter().map(|(_, t)| t.clone()).collect();
    let compressed = compress_graph(&graph, &recipe, &calibration, &mut |_, _| Ok(())).unwrap();
    let quantized = CpuExecutor::new(&compressed.graph).unwrap();
    let mut same = 0;
    for (_, input) in &photos[3..] {
        let a = executor.run(input).unwrap().remove(0);
        let b = quantized.run(input).unwrap().remove(0);
        same += usize::from(argmax(&a.data) == argmax(&b.data));
    }
    let stats = compressed.graph.stats(&compressed.weights).unwrap();
    let original = graph.stats(&Default::default()).unwrap();
    println!(
        "EfficientNet-Lite0 as a graph, W8A8 per channel: top-1 unchanged on {same}/4 held-out photos; weight bytes {} → {}",
        original.weight_bytes, stats.weight_bytes
    );
    assert!(same >= 3, "{same}/4");
    assert!(stats.weight_bytes * 3 < original.weight_bytes);
}

/// Depthwise and 1×1 layers alternating (dw → 1×1 → dw → 1×1, as in MobileNet v1): each 1×1
/// layer ends one chain of int8 layers and is not taken as the next chain's expansion (its
/// float input never exists), and the result is what the float form computes.
#[test]
fn alternating_depthwise_and_pointwise_layers_chain_in_pairs() {
    use compresslab::graph::{Constant, Conv, Dim, Node, Padding, ValueInfo};
    let channels = 8;
    let mut graph = Graph {
        inputs: vec![ValueInfo {
            name: "x".into(),
            dims: [1, channels, 6, 6].map(Dim::Known).to_vec(),
        }],
        outputs: vec![ValueInfo {
            name: "y".into(),
            dims: [1, 4, 6, 6].map(Dim::Known).to_vec(),
        }],
        ..Default::default()
    };
    let conv = |kernel: usize, group: usize| {
        let pad = kernel / 2;
        Op::Conv(Conv {
            kernel: [kernel, kernel],
            strides: [1, 1],
            dilations: [1, 1],
            padding: Padding::Explicit([pad; 4]),
            group,
        })
    };
    let clip = Op::Clip { min: 0.0, max: 6.0 };
    // (input, op, weight dims, output)
    let layers = [
        ("x", conv(3, channels), [channels, 1, 3, 3], "d1"),
        ("r1", conv(1, 1), [channels, channels, 1, 1], "p1"),
        ("r2", conv(3, channels), [channels, 1, 3, 3], "d2"),
        ("r3", conv(1, 1), [4, channels, 1, 1], "y"),
    ];
    for (i, (input, op, dims, output)) in layers.into_iter().enumerate() {
        let n: usize = dims.iter().product();
        let (w, b) = (format!("w{i}"), format!("b{i}"));
        graph.constants.insert(
            w.clone(),
            Constant {
                dims: dims.to_vec(),
                data: (0..n)
                    .map(|k| ((k * 37 + i * 11) % 23) as f32 / 23.0 - 0.45)
                    .collect(),
            },
        );
        graph.constants.insert(
            b.clone(),
            Constant {
                dims: vec![dims[0]],
                data: (0..dims[0]).map(|k| k as f32 * 0.05 - 0.1).collect(),
            },
        );
        graph.nodes.push(Node {
            name: format!("conv{i}"),
            op,
            inputs: vec![input.into(), w, b],
            outputs: vec![output.into()],
        });
        if i < 3 {
            graph.nodes.push(Node {
                name: format!("clip{i}"),
                op: clip.clone(),
                inputs: vec![output.into()],
                outputs: vec![format!("r{}", i + 1)],
            });
        }
    }
    let image = |seed: usize| Tensor {
        dims: vec![1, channels, 6, 6],
        data: (0..channels * 36)
            .map(|k| ((k * 53 + seed * 17) % 97) as f32 / 24.0 - 1.0)
            .collect(),
    };
    let recipe = Recipe::w8a8(Granularity::PerChannel, Observer::MinMax);
    let calibration = [image(1), image(2)];
    let compressed = compress_graph(&graph, &recipe, &calibration, &mut |_, _| Ok(())).unwrap();
    let integer = CpuExecutor::compressed(&compressed).unwrap();
    let used = integer.kernel_use();
    assert_eq!((used.int8, used.chained), (4, 4), "{used:?}");
    let held_out = image(3);
    let ours = integer.run(&held_out).unwrap().remove(0);
    let reference = run(&compressed.graph, &held_out);
    let diff = relative_difference(&ours, &reference);
    println!(
        "dw → 1×1 → dw → 1×1 in two chains: max relative difference to the float form {diff:.1e}"
    );
    assert!(diff <= 1e-5, "{diff}");
}

/// The "Your model" sweep on the text-direction model: every setting measured on the lines
/// that did not calibrate, against the original's top-1 and the lines' true directions.
/// Nothing removed changes nothing; int8 per channel keeps every line's answer; the weights
/// shrink along both pruning axes; and without calibration lines W8A8 is left out.
#[test]
fn a_sweep_measures_every_setting_on_held_out_lines() {
    use compresslab::sweep::{GraphSweep, SweepAxis, sweep_cases};
    let graph = load("textdir");
    let lines = super::graph_finetune::rows(&npy("textdir.input.npy"));
    let truth = super::graph_finetune::line_directions();
    let half = lines.len() / 2;
    let held_out: Vec<(Tensor, Option<usize>)> = lines[half..]
        .iter()
        .cloned()
        .zip(truth[half..].iter().map(|&t| Some(t)))
        .collect();
    let sweep = GraphSweep::new(&graph, lines[..half].to_vec(), held_out.clone()).unwrap();
    let cases = sweep.cases();
    assert_eq!(cases, sweep_cases());
    let points: Vec<_> = cases
        .iter()
        .map(|c| sweep.run(c, &mut |_, _| Ok(())).unwrap())
        .collect();
    for p in &points {
        println!(
            "{:>24}: top-1 same {}/{}, right {}/{} (original {}), {} weight bytes",
            p.label, p.same, p.images, p.right, p.labelled, p.original_right, p.weight_bytes
        );
    }
    // The float model as deployed (BatchNorm folded into the convolutions).
    let fp32 = compress_graph(&graph, &Recipe::default(), &[], &mut |_, _| Ok(()))
        .unwrap()
        .graph
        .stats_at(
            &[1, 3, 48, 192].map(compresslab::graph::Dim::Known),
            &Default::default(),
        )
        .unwrap()
        .weight_bytes;
    let at = |label: &str| points.iter().find(|p| p.label == label).unwrap();
    for p in &points {
        assert_eq!(
            (p.images, p.labelled),
            (lines.len() - half, lines.len() - half)
        );
        assert_eq!(
            p.original_right, p.labelled,
            "ONNX Runtime reads every line right too"
        );
    }
    for label in ["0 % zero weights", "0 % channels removed"] {
        assert_eq!(at(label).same, at(label).images, "{label}");
    }
    assert_eq!(at("0 % channels removed").weight_bytes, fp32);
    // Zeroed weights are still stored (dense): sparsity alone saves no bytes.
    assert!(
        points
            .iter()
            .filter(|p| p.axis == SweepAxis::Sparsity)
            .all(|p| p.weight_bytes == fp32)
    );
    assert_eq!(at("int8 per-channel").same, at("int8 per-channel").images);
    assert!(at("int8 per-channel").weight_bytes * 3 < fp32);
    let channels: Vec<usize> = points
        .iter()
        .filter(|p| p.axis == SweepAxis::Channels)
        .map(|p| p.weight_bytes)
        .collect();
    assert!(channels.windows(2).all(|w| w[1] <= w[0]), "{channels:?}");
    assert!(channels[channels.len() - 1] * 10 < fp32, "{channels:?}");
    // Without calibration lines, the cases that quantize activations are left out.
    let uncalibrated = GraphSweep::new(&graph, Vec::new(), held_out).unwrap();
    assert!(
        uncalibrated
            .cases()
            .iter()
            .all(|c| c.recipe.activations.is_none())
    );
    assert_eq!(uncalibrated.cases().len(), sweep_cases().len() - 1);
}
