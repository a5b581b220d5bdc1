//! Fine-tuning a compressed graph against its original (label-free distillation through the
//! quantization grids) on the burn interpreter: the variant must move toward the original on
//! text lines it did not train on.

use burn::prelude::Device;
use compresslab::compress::Recipe;
use compresslab::exec::{CpuExecutor, Tensor};
use compresslab::finetune_graph::{GraphFineTuneConfig, GraphFineTuner, flipped_copies};
use compresslab::graph::{compress_graph, import_onnx};
use compresslab::labels::softmax;
use compresslab::prune::{ChannelPruning, ChannelRanking};
use compresslab::quant::{Granularity, QuantScheme};
use futures_lite::future::block_on;

use super::graph::{models, npy};

/// The true direction (class) of each rendered test line, in `textdir.input.npy`'s order.
pub(crate) fn line_directions() -> Vec<usize> {
    npy("textdir.labels.npy")
        .data
        .iter()
        .map(|&v| v as usize)
        .collect()
}

/// The rows of an `[n, …]` batch as `[1, …]` tensors.
pub(crate) fn rows(batch: &Tensor) -> Vec<Tensor> {
    let n = batch.dims[0];
    let len = batch.data.len() / n;
    batch
        .data
        .chunks(len)
        .map(|d| Tensor {
            dims: [&[1], &batch.dims[1..]].concat(),
            data: d.to_vec(),
        })
        .collect()
}

/// Mean KL(original ‖ variant) of the softmax outputs, and top-1 agreements.
fn divergence(original: &CpuExecutor, variant: &CpuExecutor, inputs: &[Tensor]) -> (f64, usize) {
    let (mut kl, mut same) = (0.0, 0);
    for x in inputs {
        let p = softmax(&original.run(x).unwrap()[0].data);
        let q = softmax(&variant.run(x).unwrap()[0].data);
        kl += p
            .iter()
            .zip(&q)
            .map(|(a, b)| f64::from(*a) * (f64::from(a.max(1e-12)) / f64::from(b.max(1e-12))).ln())
            .sum::<f64>();
        let top = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j]));
        same += usize::from(top(&p) == top(&q));
    }
    (kl / inputs.len() as f64, same)
}

#[test]
fn fine_tuning_a_compressed_graph_brings_it_back_toward_the_original_on_held_out_lines() {
    let graph = import_onnx(&std::fs::read(models().join("textdir.onnx")).unwrap()).unwrap();
    let lines = rows(&npy("textdir.input.npy"));
    // Different texts in each half: the first trains, the second measures.
    let (train, held_out) = lines.split_at(lines.len() / 2);
    let recipe = Recipe {
        channel_pruning: Some(ChannelPruning {
            ratio: 0.3,
            ranking: ChannelRanking::L1,
        }),
        weights: Some(QuantScheme {
            bits: 4,
            symmetric: true,
            granularity: Granularity::PerChannel,
        }),
        ..Default::default()
    };
    let variant = compress_graph(&graph, &recipe, &[], &mut |_, _| Ok(())).unwrap();
    let original = CpuExecutor::new(&graph).unwrap();
    let train = flipped_copies(train);
    let targets: Vec<Vec<f32>> = train
        .iter()
        .map(|x| original.run(x).unwrap().remove(0).data)
        .collect();
    let cfg = GraphFineTuneConfig {
        epochs: 20,
        batch_size: 8,
        learning_rate: 1e-3,
        ..Default::default()
    };
    let device = Device::flex().autodiff();
    let mut tuner = GraphFineTuner::new(&variant, train, targets, cfg, &device).unwrap();
    let start = block_on(tuner.training_loss()).unwrap();
    let mut losses = Vec::new();
    while !tuner.is_done() {
        losses.push(block_on(tuner.step()).unwrap().loss);
    }
    let end = block_on(tuner.training_loss()).unwrap();
    let tuned = block_on(tuner.finish()).unwrap();
    let before = divergence(
        &original,
        &CpuExecutor::new(&variant.graph).unwrap(),
        held_out,
    );
    let after = divergence(
        &original,
        &CpuExecutor::new(&tuned.graph).unwrap(),
        held_out,
    );
    println!(
        "text direction, 30 % channels + int4 per channel, 6 lines × 4 flips: batch loss {:.4} → {:.4} over {} steps; on {} held-out lines KL {:.4} → {:.4}, top-1 agreement {} → {}",
        losses[0],
        losses[losses.len() - 1],
        losses.len(),
        held_out.len(),
        before.0,
        after.0,
        before.1,
        after.1
    );
    // Still quantized: every layer's weights re-quantized on the grid it trained on.
    assert_eq!(tuned.weights.len(), variant.weights.len());
    for (name, q) in &tuned.weights {
        assert_eq!(q.scheme.bits, 4);
        assert_eq!(q.scales, variant.weights[name].scales, "{name}");
    }
    assert_ne!(tuned.weights, variant.weights, "the weights moved");
    println!("loss on the training images {start:.3} → {end:.3}");
    // Measured (seed 7, lr 1e-3, grids fixed): training loss 2.57 → 1.45 (0.56×), held-out
    // KL 0.161 → 0.096 (0.60×), agreement 3 → 5 of 6.
    assert!(
        end < 0.7 * start,
        "training loss {start} → {end}: {losses:?}"
    );
    assert!(
        after.0 < 0.75 * before.0,
        "held-out KL {} → {}",
        before.0,
        after.0
    );
    assert!(after.1 > before.1, "agreement {} → {}", before.1, after.1);
}

/// Labels drive the loss: with the cross-entropy alone, a variant told that every training
/// line has the *other* direction learns to say so; told the true directions, it stays right
/// on the lines it did not train on.
#[test]
fn labelled_images_train_toward_their_labels() {
    let graph = import_onnx(&std::fs::read(models().join("textdir.onnx")).unwrap()).unwrap();
    let lines = rows(&npy("textdir.input.npy"));
    let truth = line_directions();
    let half = lines.len() / 2;
    let recipe = Recipe::w8a8(
        Granularity::PerChannel,
        compresslab::compress::Observer::MinMax,
    );
    let variant = compress_graph(&graph, &recipe, &lines[..half], &mut |_, _| Ok(())).unwrap();
    let original = CpuExecutor::new(&graph).unwrap();
    let targets: Vec<Vec<f32>> = lines[..half]
        .iter()
        .map(|x| original.run(x).unwrap().remove(0).data)
        .collect();
    let top = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    let right =
        |tuned: &compresslab::graph::CompressedGraph, range: std::ops::Range<usize>, flip: bool| {
            let cpu = CpuExecutor::new(&tuned.graph).unwrap();
            range
                .filter(|&i| {
                    top(&cpu.run(&lines[i]).unwrap()[0].data) == (truth[i] ^ usize::from(flip))
                })
                .count()
        };
    let tune = |labels: Vec<Option<usize>>, label_weight: f64, epochs: usize| {
        let cfg = GraphFineTuneConfig {
            epochs,
            batch_size: 6,
            learning_rate: 1e-3,
            label_weight,
            ..Default::default()
        };
        let device = Device::flex().autodiff();
        let mut tuner = GraphFineTuner::new(
            &variant,
            lines[..half].to_vec(),
            targets.clone(),
            cfg,
            &device,
        )
        .unwrap()
        .with_labels(labels)
        .unwrap();
        assert_eq!(tuner.labelled(), half);
        while !tuner.is_done() {
            block_on(tuner.step()).unwrap();
        }
        block_on(tuner.finish()).unwrap()
    };
    let before = (
        right(&variant, 0..half, false),
        right(&variant, half..lines.len(), false),
    );
    let wrong: Vec<Option<usize>> = truth[..half].iter().map(|&t| Some(t ^ 1)).collect();
    let misled = tune(wrong, 1.0, 20);
    let true_labels: Vec<Option<usize>> = truth[..half].iter().map(|&t| Some(t)).collect();
    let taught = tune(true_labels, 0.5, 5);
    let (misled_train, taught_held_out) = (
        right(&misled, 0..half, true),
        right(&taught, half..lines.len(), false),
    );
    println!(
        "text direction, int8 W8A8: right on the training lines {} of {half}, on the held-out lines {} of {half}; \
         after 20 epochs of cross-entropy toward the wrong directions, {misled_train} of {half} training lines follow them; \
         after 5 epochs toward the true ones (half distillation), held-out right {taught_held_out} of {half}",
        before.0, before.1
    );
    assert!(
        misled_train >= half - 1,
        "{misled_train} of {half} follow the wrong labels"
    );
    assert!(
        taught_held_out >= before.1,
        "held out {} → {taught_held_out}",
        before.1
    );
    assert!(
        GraphFineTuner::new(
            &variant,
            lines[..1].to_vec(),
            targets[..1].to_vec(),
            GraphFineTuneConfig::default(),
            &Device::flex().autodiff()
        )
        .unwrap()
        .with_labels(vec![Some(2)])
        .is_err(),
        "a class past the outputs is refused"
    );
}

/// What the layer named `layer` reads in `graph`, for each input, on the burn interpreter;
/// with `kept`, only those channels (axis 1) of it.
fn layer_inputs_of(
    graph: &compresslab::graph::Graph,
    layer: &str,
    inputs: &[Tensor],
    kept: Option<&[usize]>,
) -> Vec<f32> {
    use burn::prelude::{Tensor as BurnTensor, TensorData};
    let node = graph.nodes.iter().find(|n| n.name == layer).unwrap();
    let value = [node.inputs[0].clone()];
    let device = Device::flex();
    let model = compresslab::exec::GraphModel::new(graph, &device).unwrap();
    let mut out = Vec::new();
    for x in inputs {
        let dims: [usize; 4] = x.dims.clone().try_into().unwrap();
        let t = BurnTensor::<4>::from_data(TensorData::new(x.data.clone(), dims), &device);
        let (_, tapped) = model.forward_tapped(t, &value).unwrap();
        let tapped = tapped.into_iter().next().unwrap();
        let per_channel: usize = tapped.dims[2..].iter().product();
        let data = tapped
            .flat()
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        match kept {
            Some(channels) => {
                for &c in channels {
                    out.extend_from_slice(&data[c * per_channel..(c + 1) * per_channel]);
                }
            }
            None => out.extend(data),
        }
    }
    out
}

fn mean_squared_difference(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

/// Feature matching on any graph: with what two layers read added to the loss, a variant
/// moves those values toward the original's on held-out lines, more than distillation on
/// the outputs alone does (same seed, same steps): with 60 % of its weights zeroed, and with
/// 30 % of its channels removed (compared on the channels it kept). A name that is not a
/// layer is refused.
#[test]
fn feature_matching_pulls_a_graphs_layer_inputs_toward_the_original() {
    use compresslab::graph::{CompressedGraph, kept_channels};
    let graph = import_onnx(&std::fs::read(models().join("textdir.onnx")).unwrap()).unwrap();
    let lines = rows(&npy("textdir.input.npy"));
    let (train, held_out) = lines.split_at(lines.len() / 2);
    let original = CpuExecutor::new(&graph).unwrap();
    let targets: Vec<Vec<f32>> = train
        .iter()
        .map(|x| original.run(x).unwrap().remove(0).data)
        .collect();
    let cfg = GraphFineTuneConfig {
        epochs: 10,
        batch_size: 6,
        learning_rate: 1e-3,
        ..Default::default()
    };
    let device = Device::flex().autodiff();
    let tuner = |variant: &CompressedGraph| {
        GraphFineTuner::new(
            variant,
            train.to_vec(),
            targets.clone(),
            cfg.clone(),
            &device,
        )
        .unwrap()
    };
    let check = |tag: &str, recipe: Recipe| {
        let variant = compress_graph(&graph, &recipe, &[], &mut |_, _| Ok(())).unwrap();
        let names: Vec<String> = variant.layers.iter().map(|l| l.node.clone()).collect();
        let layers = [
            names[names.len() / 3].clone(),
            names[2 * names.len() / 3].clone(),
        ];
        let kept = match &recipe.channel_pruning {
            Some(cfg) => kept_channels(&graph, cfg).unwrap(),
            None => Default::default(),
        };
        let tune = |features: &[String]| {
            let mut run = tuner(&variant)
                .with_feature_matching(&graph, features, 1.0)
                .unwrap();
            while !run.is_done() {
                block_on(run.step()).unwrap();
            }
            block_on(run.finish()).unwrap()
        };
        let distance = |tuned: &CompressedGraph| -> Vec<f64> {
            layers
                .iter()
                .map(|layer| {
                    let node = graph.nodes.iter().find(|n| &n.name == layer).unwrap();
                    let channels = kept.get(&node.inputs[0]).map(Vec::as_slice);
                    mean_squared_difference(
                        &layer_inputs_of(&tuned.graph, layer, held_out, None),
                        &layer_inputs_of(&graph, layer, held_out, channels),
                    )
                })
                .collect()
        };
        let narrowed = layers
            .iter()
            .filter(|l| {
                let node = graph.nodes.iter().find(|n| &n.name == *l).unwrap();
                kept.contains_key(&node.inputs[0])
            })
            .count();
        let before = distance(&variant);
        let outputs_only = distance(&tune(&[]));
        let matched = distance(&tune(&layers));
        println!(
            "text direction, {tag}: mean squared difference to the original at the inputs of {layers:?} ({narrowed} narrowed) on {} held-out lines: compressed {before:.4?}, distilled on the outputs {outputs_only:.4?}, with feature matching {matched:.4?}",
            held_out.len()
        );
        crate::assert_feature_matching_helps(tag, &layers, &before, &outputs_only, &matched);
        (variant, narrowed)
    };
    let (sparse, _) = check("60 % zero weights", crate::zeroed_per_layer(0.6));
    let (_, narrowed) = check(
        "30 % channels removed",
        crate::channels_removed(0.3, ChannelRanking::L1),
    );
    assert_eq!(narrowed, 2, "both layers read pruned values");
    let unknown = tuner(&sparse).with_feature_matching(&graph, &["no such layer".into()], 1.0);
    assert!(
        matches!(&unknown, Err(e) if e.to_string().contains("no layer with weights named `no such layer`")),
        "{:?}",
        unknown.err()
    );
}

/// Models are often exported with a fixed batch of one. Where nothing in the shapes depends
/// on it, fine-tuning still runs batches; where something does (a Reshape to a batch of one),
/// it trains one image per step instead of failing.
#[test]
fn a_model_exported_for_a_batch_of_one_still_fine_tunes() {
    use compresslab::graph::{Dim, Op};
    let fixed = |name: &str| {
        let mut graph =
            import_onnx(&std::fs::read(models().join(format!("{name}.onnx"))).unwrap()).unwrap();
        for value in graph.inputs.iter_mut().chain(graph.outputs.iter_mut()) {
            value.dims[0] = Dim::Known(1);
        }
        graph
    };
    let resnet = fixed("resnet");
    let mut shufflenet = fixed("shufflenet");
    // The channel shuffle's Reshape back to [-1, 16, 20, 20], as an exporter writes it for a
    // batch of one.
    let mut baked = 0;
    for node in &mut shufflenet.nodes {
        if let Op::Reshape { shape } = &mut node.op
            && shape.first() == Some(&-1)
        {
            shape[0] = 1;
            baked += 1;
        }
    }
    assert!(baked > 0, "no Reshape to a batch of -1");
    for (name, graph, batches) in [("resnet", resnet, true), ("shufflenet", shufflenet, false)] {
        let inputs: Vec<Tensor> = rows(&npy(&format!("{name}.input.npy")))
            .into_iter()
            .take(6)
            .collect();
        let recipe = Recipe {
            weights: Some(QuantScheme {
                bits: 8,
                symmetric: true,
                granularity: Granularity::PerChannel,
            }),
            ..Default::default()
        };
        let variant = compress_graph(&graph, &recipe, &[], &mut |_, _| Ok(())).unwrap();
        let original = CpuExecutor::new(&graph).unwrap();
        let targets: Vec<Vec<f32>> = inputs
            .iter()
            .map(|x| original.run(x).unwrap().remove(0).data)
            .collect();
        let cfg = GraphFineTuneConfig {
            epochs: 1,
            batch_size: 4,
            ..Default::default()
        };
        let mut tuner =
            GraphFineTuner::new(&variant, inputs, targets, cfg, &Device::flex().autodiff())
                .unwrap();
        let n = tuner.total_steps().max(1);
        let images = rows(&npy(&format!("{name}.input.npy"))).len().min(6);
        assert!(images >= 2);
        let expected = if batches { images.div_ceil(4) } else { images };
        assert_eq!(
            tuner.steps_per_epoch(),
            expected,
            "{name}: {images} images, {n} steps"
        );
        while !tuner.is_done() {
            block_on(tuner.step()).unwrap();
        }
        block_on(tuner.finish()).unwrap();
    }
}

/// The user's own classes on the text-direction model: a new head fitted on the original's
/// features for the first half of the lines, in classes of the user's own names and order
/// ("upright" second, where the model has 0° first), reads every held-out line right.
#[test]
fn a_new_head_learns_the_users_own_classes() {
    use compresslab::finetune_graph::fit_new_head;
    let graph = import_onnx(&std::fs::read(models().join("textdir.onnx")).unwrap()).unwrap();
    let lines = rows(&npy("textdir.input.npy"));
    let ours: Vec<usize> = line_directions().iter().map(|&d| 1 - d).collect();
    let names = vec!["turned over".to_string(), "upright".to_string()];
    let half = lines.len() / 2;
    let device = Device::flex().autodiff();
    let fitted = block_on(fit_new_head(
        &graph,
        &lines[..half],
        &ours[..half],
        &names,
        &device,
        &mut |_, _| Ok(()),
    ))
    .unwrap();
    assert_eq!(fitted.training_right, half);
    assert_eq!(fitted.graph.class_names(), names);
    let net = CpuExecutor::new(&fitted.graph).unwrap();
    for (x, &truth) in lines[half..].iter().zip(&ours[half..]) {
        let out = net.run(x).unwrap().remove(0);
        assert_eq!(out.dims, [1, 2]);
        // The model's Softmax stays at the end.
        assert!((out.data.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(compresslab::distill::argmax(&out.data), truth);
    }
    // A head for fewer than two classes is refused with a reason.
    let one = block_on(fit_new_head(
        &graph,
        &lines[..2],
        &[0, 0],
        &names[..1],
        &device,
        &mut |_, _| Ok(()),
    ));
    assert!(one.is_err());
}

/// A test graph with a head of another form: the synthetic models as they are, or rewritten
/// to a MatMul without a bias, a 1×1 Conv head (GlobalAveragePool → Conv → Flatten), or a
/// Gemm without `transB` whose weight a second output reads too. Returns it and the model
/// whose inputs it takes.
fn head_variant(name: &str) -> (compresslab::graph::Graph, &'static str) {
    use compresslab::graph::{Conv, Dim, Node, Op, Padding, ValueInfo};
    let file = match name {
        "matmul-no-bias" => "shufflenet",
        "conv-head" => "resnet",
        "gemm-shared" => "mobilenet",
        "resnet" => "resnet",
        "shufflenet" => "shufflenet",
        "mobilenet" => "mobilenet",
        _ => "densenet",
    };
    let mut graph =
        import_onnx(&std::fs::read(models().join(format!("{file}.onnx"))).unwrap()).unwrap();
    let gemm = |g: &compresslab::graph::Graph| {
        g.nodes
            .iter()
            .position(|n| matches!(n.op, Op::Gemm { .. }))
            .unwrap()
    };
    match name {
        "matmul-no-bias" => {
            // The shuffle net's MatMul with its bias Add taken out: the new head adds one.
            let product = |n: &Node| {
                graph
                    .nodes
                    .iter()
                    .any(|m| matches!(m.op, Op::MatMul) && m.outputs[0] == n.inputs[0])
            };
            let add = graph
                .nodes
                .iter()
                .position(|n| matches!(n.op, Op::Add) && product(n))
                .unwrap();
            let removed = graph.nodes.remove(add);
            for node in &mut graph.nodes {
                for input in &mut node.inputs {
                    if *input == removed.outputs[0] {
                        *input = removed.inputs[0].clone();
                    }
                }
            }
            graph.prune_unused();
        }
        "conv-head" => {
            // Flatten → Gemm(transB) becomes a 1×1 Conv on the pooled map, then Flatten.
            let at = gemm(&graph);
            let head = graph.nodes.remove(at);
            let flatten = graph.nodes.remove(at - 1);
            assert!(matches!(flatten.op, Op::Flatten { .. }));
            let w = graph.constants.get_mut(&head.inputs[1]).unwrap();
            w.dims.extend([1, 1]);
            let conv = Node {
                name: "head_conv".into(),
                op: Op::Conv(Conv {
                    kernel: [1, 1],
                    strides: [1, 1],
                    dilations: [1, 1],
                    padding: Padding::Explicit([0; 4]),
                    group: 1,
                }),
                inputs: vec![
                    flatten.inputs[0].clone(),
                    head.inputs[1].clone(),
                    head.inputs[2].clone(),
                ],
                outputs: vec!["head_conv.out".into()],
            };
            let flat = Node {
                name: "head_flatten".into(),
                op: Op::Flatten { axis: 1 },
                inputs: vec!["head_conv.out".into()],
                outputs: head.outputs.clone(),
            };
            graph.nodes.extend([conv, flat]);
        }
        "gemm-shared" => {
            // The Gemm's weight stored [features, classes] (no transB), and read by a second
            // Gemm that computes a second output.
            let at = gemm(&graph);
            let w = graph
                .constants
                .get_mut(&graph.nodes[at].inputs[1].clone())
                .unwrap();
            let (k, f) = (w.dims[0], w.dims[1]);
            let (dims, data) = compresslab::graph::transpose(&w.dims, &w.data, &[1, 0]);
            (w.dims, w.data) = (dims, data);
            if let Op::Gemm { trans_b, .. } = &mut graph.nodes[at].op {
                *trans_b = false;
            }
            let mut second = graph.nodes[at].clone();
            second.name = "second_reader".into();
            second.outputs = vec!["second_output".into()];
            graph.nodes.push(second);
            graph.outputs.push(ValueInfo {
                name: "second_output".into(),
                dims: vec![Dim::Known(1), Dim::Known(k)],
            });
            assert!(f > k);
        }
        _ => {}
    }
    (graph, file)
}

/// A head replaced on each synthetic topology (Gemm after Flatten, MatMul + Add + Softmax) and
/// on rewritten ones ([`head_variant`]: a MatMul without a bias, a 1×1 Conv, a Gemm without
/// `transB` sharing its weight with a second output):
/// the new graph computes the features times the new weights plus the new bias, declares
/// the new class count, keeps the class names through an ONNX export, and ONNX Runtime
/// computes the same outputs from that export.
#[test]
fn a_replaced_head_computes_its_weights_on_the_original_features() {
    use compresslab::graph::{ClassifierHead, Op, export_onnx};
    for name in [
        "resnet",
        "shufflenet",
        "mobilenet",
        "densenet",
        "matmul-no-bias",
        "conv-head",
        "gemm-shared",
    ] {
        let (graph, file) = head_variant(name);
        let x = rows(&npy(&format!("{file}.input.npy"))).remove(0);
        let head = ClassifierHead::find(&graph, &x.dims).unwrap();
        let classes = 3;
        let weight: Vec<f32> = (0..classes * head.width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 200.0)
            .collect();
        let bias = vec![0.5, -0.25, 0.125];
        let names: Vec<String> = ["cat", "dog, small", "bird"].map(String::from).to_vec();
        let replaced = head
            .replaced(&graph, &weight, &bias, &names, &x.dims)
            .unwrap();
        assert_eq!(replaced.class_names(), names, "{name}");
        let features = CpuExecutor::new(&head.feature_graph(&graph))
            .unwrap()
            .run(&x)
            .unwrap()
            .remove(0)
            .data;
        let mut expected: Vec<f32> = (0..classes)
            .map(|k| {
                bias[k]
                    + weight[k * head.width..(k + 1) * head.width]
                        .iter()
                        .zip(&features)
                        .map(|(w, f)| w * f)
                        .sum::<f32>()
            })
            .collect();
        let ends_in_softmax = graph
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::Softmax { .. }));
        if ends_in_softmax {
            expected = softmax(&expected);
        }
        let ours = CpuExecutor::new(&replaced)
            .unwrap()
            .run(&x)
            .unwrap()
            .remove(0);
        assert_eq!(ours.dims, [1, classes], "{name}");
        for (a, b) in ours.data.iter().zip(&expected) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{name}: {ours:?} vs {expected:?}"
            );
        }
        if name == "gemm-shared" {
            // The other reader of the shared weight still computes what it did.
            let before = CpuExecutor::new(&graph).unwrap().run(&x).unwrap().remove(1);
            let after = CpuExecutor::new(&replaced)
                .unwrap()
                .run(&x)
                .unwrap()
                .remove(1);
            assert_eq!(before, after);
            assert_eq!(
                replaced.outputs[1].dims.last(),
                graph.outputs[1].dims.last()
            );
        }
        let export = export_onnx(&replaced, &Default::default(), &[]).unwrap();
        assert_eq!(import_onnx(&export).unwrap().class_names(), names, "{name}");
        let ort = super::graph_compress::onnx_runtime(&export, &x, &format!("{name}-new-head"));
        assert_eq!(ort.dims, [1, classes], "{name}");
        for (a, b) in ort.data.iter().zip(&ours.data) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{name}: ORT {ort:?} vs ours {ours:?}"
            );
        }
    }
    // A constant added after the Softmax is no bias of the layer: refused with the reason.
    let (mut graph, file) = head_variant("matmul-no-bias");
    let probabilities = graph.outputs[0].name.clone();
    graph.constants.insert(
        "late".into(),
        compresslab::graph::Constant {
            dims: vec![1],
            data: vec![0.5],
        },
    );
    graph.nodes.push(compresslab::graph::Node {
        name: "late_add".into(),
        op: Op::Add,
        inputs: vec![probabilities, "late".into()],
        outputs: vec!["late_out".into()],
    });
    graph.outputs[0].name = "late_out".into();
    let x = rows(&npy(&format!("{file}.input.npy"))).remove(0);
    let refused = ClassifierHead::find(&graph, &x.dims)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("added after"), "{refused}");
}
