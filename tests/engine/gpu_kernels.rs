//! The WGSL integer kernels (kernels/) on native wgpu (lavapipe here: Vulkan on the CPU),
//! checked against the float fake-quant reference of the same compressed model.

use compresslab::classifier::{ImageClassifier, max_abs_diff};
use compresslab::compress::{ActivationQuant, Observer, Recipe, agreement, compress};
use compresslab::decode::decode_file;
use compresslab::gpu_int::GpuFeatures;
use compresslab::labels::Labels;
use compresslab::preprocess::imagenet_input;
use compresslab::quant::{Granularity, QuantScheme};
use futures_lite::future::block_on;

use crate::{PhotoNet, assets, store};

fn check(name: &str, recipe: Recipe, expect_int8: bool, expect_int4: bool) {
    check_on(name, recipe, GpuFeatures::NATIVE, expect_int8, expect_int4);
}

/// `features` as an adapter would report them.
fn check_on(
    name: &str,
    recipe: Recipe,
    features: GpuFeatures,
    expect_int8: bool,
    expect_int4: bool,
) {
    let store = store();
    let images: Vec<Vec<f32>> = ["coffee.png", "chelsea.png", "rocket.jpg"]
        .iter()
        .map(|n| imagenet_input(&decode_file(&assets().join("samples").join(n)).unwrap()))
        .collect();
    let model = compress(&store, &recipe, &images, &mut |_, _| Ok(())).unwrap();
    let device = burn::prelude::Device::wgpu(burn::prelude::DeviceKind::DefaultDevice);
    let gpu = ImageClassifier::new_compressed(&model, Labels::default(), &device, Some(features))
        .unwrap();
    let (int8, int4) = gpu.integer_layers();
    println!("{name}: {int8} int8 layers, {int4} int4 layers on integer kernels");
    assert_eq!(int8 > 0, expect_int8);
    assert_eq!(int4 > 0, expect_int4);
    // GPU memory for the weights: a layer on an integer kernel keeps no f32 copy.
    let float = ImageClassifier::new_compressed(&model, Labels::default(), &device, None)
        .unwrap()
        .held_weight_bytes();
    let held = gpu.held_weight_bytes();
    println!(
        "{name}: weights held on the GPU {:.2} MB, all-f32 form {:.2} MB ({:.2}×)",
        held as f64 / 1e6,
        float as f64 / 1e6,
        float as f64 / held as f64
    );
    if int8 + int4 > 0 {
        assert!(
            held * 3 < float,
            "{name}: {held} bytes held, {float} as f32"
        );
    } else {
        assert_eq!(held, float);
    }
    let reference = PhotoNet::compressed(&model, false).unwrap();
    for image in &images {
        let want = reference.forward(image).unwrap();
        let got = block_on(gpu.logits(image)).unwrap();
        let (same, kl) = agreement(&want, &got);
        let diff = max_abs_diff(&want, &got);
        // Through 50 layers a float rounding difference can move a value across a
        // quantization boundary: the logits then differ by up to ~0.1, and a photo whose two
        // best classes are closer than that may swap them.
        let mut sorted = want.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        println!(
            "{name}: kernels vs fake-quant reference: max |logit| {diff:.2e}, top-1 same {same} (margin {margin:.2e}), KL {kl:.2e}"
        );
        assert!(
            same || margin <= 2.0 * diff,
            "{name}: margin {margin}, diff {diff}"
        );
        assert!(kl < 1e-3, "{name}: KL {kl}");
    }
}

#[test]
fn int8_dot4_kernel_matches_the_reference() {
    check(
        "int8 W8A8 per-channel",
        Recipe::w8a8(Granularity::PerChannel, Observer::MinMax),
        true,
        false,
    );
    // Asymmetric per-tensor weights exercise the zero-point correction terms.
    check(
        "int8 W8A8 asymmetric per-tensor",
        Recipe {
            weights: Some(QuantScheme {
                bits: 8,
                symmetric: false,
                granularity: Granularity::PerTensor,
            }),
            activations: Some(ActivationQuant {
                bits: 8,
                symmetric: true,
                observer: Observer::Percentile(99.9),
            }),
            ..Recipe::default()
        },
        true,
        false,
    );
}

/// An adapter without WGSL's `packed_4x8_integer_dot_product` cannot run the int8 kernel:
/// W8A8 then runs as float on the dequantized weights (same numbers), int4 stays on its kernel.
#[test]
fn without_packed_dot4_int8_runs_as_float_and_int4_keeps_its_kernel() {
    let without = GpuFeatures { packed_dot4: false };
    check_on(
        "int8 W8A8 per-channel, no dot4I8Packed",
        Recipe::w8a8(Granularity::PerChannel, Observer::MinMax),
        without,
        false,
        false,
    );
    check_on(
        "int4 per-channel weight-only, no dot4I8Packed",
        Recipe {
            weights: Some(QuantScheme {
                bits: 4,
                symmetric: true,
                granularity: Granularity::PerChannel,
            }),
            ..Recipe::default()
        },
        without,
        false,
        true,
    );
}

#[test]
fn int4_weight_only_kernel_matches_the_reference() {
    check(
        "int4 per-block(32) asymmetric",
        Recipe {
            weights: Some(QuantScheme {
                bits: 4,
                symmetric: false,
                granularity: Granularity::PerBlock(32),
            }),
            ..Recipe::default()
        },
        false,
        true,
    );
}

/// Any imported graph, compressed, on the burn interpreter with its quantized 1×1
/// convolutions and Gemms on the WGSL integer kernels (what "Your model" runs on WebGPU),
/// against the same graph's float form on the CPU interpreter (dequantized weights,
/// fake-quantized activations: what the exported QDQ model computes).
#[test]
fn graph_layers_on_wgsl_integer_kernels_compute_what_the_float_form_computes() {
    use compresslab::exec::{CpuExecutor, GraphModel};
    use compresslab::gpu_int::graph_on_integer_kernels;
    use compresslab::graph::{Op, compress_graph, weight_nodes};

    use crate::graph::relative_difference;
    use crate::graph_compress::{
        MODELS, calibration_and_evaluation, int4_blocks, load, top1_agreement,
    };

    let device = burn::prelude::Device::wgpu(burn::prelude::DeviceKind::DefaultDevice);
    let recipes = [
        (
            "W8A8 per channel",
            Recipe::w8a8(Granularity::PerChannel, Observer::MinMax),
        ),
        ("int4 per block of 32", int4_blocks(true, 32)),
    ];
    for name in MODELS {
        let graph = load(name);
        let (calibration, evaluation) = calibration_and_evaluation(name);
        for (label, recipe) in &recipes {
            let compressed = compress_graph(
                &graph,
                recipe,
                std::slice::from_ref(&calibration),
                &mut |_, _| Ok(()),
            )
            .unwrap();
            let g = &compressed.graph;
            // What the kernels fit: dense 1×1 convolutions without stride or padding, and
            // Gemms that store B as [N, K].
            let fitting = weight_nodes(g)
                .into_iter()
                .filter(|&i| match &g.nodes[i].op {
                    Op::Conv(c) => {
                        c.kernel == [1, 1]
                            && c.strides == [1, 1]
                            && c.group == 1
                            && c.padding.resolve(0, 7, 1, 1, 1) == (0, 0)
                            && c.padding.resolve(1, 7, 1, 1, 1) == (0, 0)
                    }
                    Op::Gemm { trans_b, .. } => *trans_b,
                    _ => false,
                })
                .count();
            let gpu = graph_on_integer_kernels(&compressed, &device, GpuFeatures::NATIVE).unwrap();
            let float = GraphModel::new(g, &device).unwrap();
            let (int8, int4) = gpu.kernel_layers();
            let reference = CpuExecutor::new(g)
                .unwrap()
                .run(&evaluation)
                .unwrap()
                .remove(0);
            let ours = block_on(gpu.run(&evaluation, &device)).unwrap().remove(0);
            let diff = relative_difference(&ours, &reference);
            let agreement = top1_agreement(&ours, &reference);
            println!(
                "{name}, {label}: {int8} int8 + {int4} int4 of {} weight layers on WGSL kernels \
                 ({fitting} fit them); max relative difference to the float form {diff:.1e}, \
                 top-1 same on {:.0} % of {}; weights held {} → {} bytes",
                compressed.layers.len(),
                100.0 * agreement,
                evaluation.dims[0],
                float.held_bytes(),
                gpu.held_bytes(),
            );
            if recipe.activations.is_some() {
                assert_eq!((int8, int4), (fitting, 0), "{name} {label}");
            } else {
                assert_eq!((int8, int4), (0, fitting), "{name} {label}");
            }
            assert!(fitting > 0, "{name}");
            assert!(gpu.held_bytes() < float.held_bytes(), "{name} {label}");
            // Measured at most 5.6e-6 (textdir): float sums in another order.
            assert!(diff <= 5e-5, "{name} {label}: {diff}");
            assert!(agreement >= 0.99, "{name} {label}: {agreement}");
        }
    }
}
