//! The graph engine on ONNX files: our test graphs (residual projection, DenseNet concat,
//! grouped conv + channel shuffle, MobileNetV3 pieces) and a real third-party CNN (the
//! text-direction classifier of rapidocr), each imported and run by the CPU interpreter and
//! compared with ONNX Runtime on the same inputs (files made by scripts/setup.sh --tests).

use std::path::PathBuf;

use burn::prelude::{Device, DeviceKind};
use compresslab::EngineError;
use compresslab::exec::{CpuExecutor, GraphModel, Tensor};
use compresslab::graph::{Op, fold_batch_norms, import_onnx};
use compresslab::npy::read_npy;

use super::fuzz::{Rng, damage_bytes, peak_bytes, scale};

pub fn models() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/onnx-models");
    assert!(
        dir.join("textdir.onnx").exists(),
        "ONNX test models missing: run scripts/setup.sh --tests first"
    );
    dir
}

pub fn npy(name: &str) -> Tensor {
    read_npy(&std::fs::read(models().join(name)).unwrap()).unwrap()
}

/// max |ours − reference| relative to the largest reference magnitude.
pub fn relative_difference(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims, reference.dims);
    let scale = reference
        .data
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-12);
    let diff = ours
        .data
        .iter()
        .zip(&reference.data)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Imports `cases` damaged copies of `bytes` (truncated, bit-flipped, extreme bytes, cut or
/// repeated chunks, a fifth each; fixed seed) and runs whatever imports on `input`: each step
/// must give a result or an error, never a panic, and hold at most
/// [`ONNX_CAP_FACTOR`] × the memory the undamaged file needs.
pub fn import_mutations(bytes: &[u8], input: &Tensor, cases: usize, seed: u64) {
    let import_and_run = |bytes: &[u8]| -> bool {
        let Ok(graph) = import_onnx(bytes) else {
            return false;
        };
        if let Ok(executor) = CpuExecutor::new(&graph) {
            let _ = executor.run(input);
        }
        true
    };
    let (clean, clean_peak) = peak_bytes(|| import_and_run(bytes));
    assert!(clean, "the undamaged model does not import");
    let cap = ONNX_CAP_FACTOR * clean_peak;
    let cases = cases * scale();
    let mut rng = Rng(seed);
    let (mut imported, mut peak) = (0, 0);
    for case in 0..cases {
        let damaged = damage_bytes(&mut rng, bytes, case);
        let (ok, held) = peak_bytes(|| import_and_run(&damaged));
        assert!(
            held <= cap,
            "case {case}: held {held} bytes, more than {ONNX_CAP_FACTOR} × the undamaged {clean_peak}"
        );
        imported += usize::from(ok);
        peak = peak.max(held);
    }
    println!(
        "{imported} of {cases} damaged copies imported; peak memory {:.2} MB (undamaged {:.2} MB, cap {:.2} MB)",
        peak as f64 / 1e6,
        clean_peak as f64 / 1e6,
        cap as f64 / 1e6
    );
}

/// A damaged ONNX file may hold this many times the undamaged file's memory: a flipped bit
/// in a declared shape may legitimately ask for a bigger activation, within limits.
const ONNX_CAP_FACTOR: usize = 4;

fn run(name: &str) -> (Tensor, Tensor) {
    let graph =
        import_onnx(&std::fs::read(models().join(format!("{name}.onnx"))).unwrap()).unwrap();
    let executor = CpuExecutor::new(&graph).unwrap();
    let outputs = executor.run(&npy(&format!("{name}.input.npy"))).unwrap();
    (
        outputs.into_iter().next().unwrap(),
        npy(&format!("{name}.output.npy")),
    )
}

#[test]
fn every_test_graph_matches_onnx_runtime() {
    for name in ["resnet", "densenet", "shufflenet", "mobilenet", "textdir"] {
        let (ours, reference) = run(name);
        let diff = relative_difference(&ours, &reference);
        println!(
            "{name}: output {:?}, max relative difference to ONNX Runtime {diff:.2e}",
            ours.dims
        );
        assert!(diff <= 1e-4, "{name}: {diff}");
    }
}

/// The burn interpreter on `device`, on every test graph, against ONNX Runtime's outputs.
fn burn_interpreter_matches_onnx_runtime(device: &Device, backend: &str) {
    for name in ["resnet", "densenet", "shufflenet", "mobilenet", "textdir"] {
        let graph =
            import_onnx(&std::fs::read(models().join(format!("{name}.onnx"))).unwrap()).unwrap();
        let model = GraphModel::new(&graph, device).unwrap();
        let input = npy(&format!("{name}.input.npy"));
        let outputs = futures_lite::future::block_on(model.run(&input, device)).unwrap();
        let reference = npy(&format!("{name}.output.npy"));
        let diff = relative_difference(&outputs[0], &reference);
        println!("{name} on burn {backend}: max relative difference to ONNX Runtime {diff:.2e}");
        assert!(diff <= 1e-4, "{name} on {backend}: {diff}");
    }
}

#[test]
fn the_burn_interpreter_on_flex_matches_onnx_runtime() {
    burn_interpreter_matches_onnx_runtime(&Device::flex(), "Flex");
}

// wgpu natively is lavapipe here (Vulkan on the CPU): WebGPU's shaders, without a browser.
#[test]
fn the_burn_interpreter_on_wgpu_matches_onnx_runtime() {
    burn_interpreter_matches_onnx_runtime(&Device::wgpu(DeviceKind::DefaultDevice), "wgpu");
}

// Gemm's C may hold its N values in any shape ([N, 1] here): both interpreters read it as a
// row, and the burn one does not panic on it.
#[test]
fn both_interpreters_take_a_gemm_bias_of_any_shape() {
    use compresslab::graph::{Constant, Dim, Graph, Node, ValueInfo};
    let mut graph = Graph {
        inputs: vec![ValueInfo {
            name: "x".into(),
            dims: [1, 4, 1, 1].map(Dim::Known).to_vec(),
        }],
        outputs: vec![ValueInfo {
            name: "y".into(),
            dims: vec![Dim::Known(1), Dim::Known(3)],
        }],
        ..Default::default()
    };
    graph.constants.insert(
        "b".into(),
        Constant {
            dims: vec![4, 3],
            data: (0..12).map(|i| i as f32 / 4.0 - 1.0).collect(),
        },
    );
    graph.constants.insert(
        "c".into(),
        Constant {
            dims: vec![3, 1],
            data: vec![0.5, -1.0, 2.0],
        },
    );
    graph.nodes = vec![
        Node {
            name: "flatten".into(),
            op: Op::Flatten { axis: 1 },
            inputs: vec!["x".into()],
            outputs: vec!["f".into()],
        },
        Node {
            name: "fc".into(),
            op: Op::Gemm {
                alpha: 1.0,
                beta: 2.0,
                trans_a: false,
                trans_b: false,
            },
            inputs: vec!["f".into(), "b".into(), "c".into()],
            outputs: vec!["y".into()],
        },
    ];
    let input = Tensor {
        dims: vec![1, 4, 1, 1],
        data: vec![1.0, 2.0, -1.0, 0.5],
    };
    let cpu = CpuExecutor::new(&graph)
        .unwrap()
        .run(&input)
        .unwrap()
        .remove(0);
    let device = Device::flex();
    let model = GraphModel::new(&graph, &device).unwrap();
    let ours = futures_lite::future::block_on(model.run(&input, &device))
        .unwrap()
        .remove(0);
    // x·B + 2·C by hand.
    let b = &graph.constants["b"].data;
    let want: Vec<f32> = (0..3)
        .map(|j| {
            (0..4).map(|i| input.data[i] * b[i * 3 + j]).sum::<f32>() + 2.0 * [0.5, -1.0, 2.0][j]
        })
        .collect();
    for got in [&cpu, &ours] {
        assert_eq!(got.dims, vec![1, 3]);
        for (g, w) in got.data.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{:?} vs {want:?}", got.data);
        }
    }
}

#[test]
fn the_text_direction_model_reads_rendered_lines() {
    let (ours, _) = run("textdir");
    let labels = npy("textdir.labels.npy");
    let classes = ours.dims[1];
    let right = ours
        .data
        .chunks(classes)
        .zip(&labels.data)
        .filter(|(p, label)| {
            let best = if p[1] > p[0] { 1.0 } else { 0.0 };
            best == **label
        })
        .count();
    println!(
        "text direction: {right}/{} rendered lines right (upright and rotated 180°)",
        labels.data.len()
    );
    // ONNX Runtime gets all 12 right on these lines (tests/models/make_models.py prints it).
    assert_eq!(right, labels.data.len());
}

#[test]
fn import_folds_shape_arithmetic_and_fuses_hard_swish() {
    let bytes = std::fs::read(models().join("textdir.onnx")).unwrap();
    let graph = import_onnx(&bytes).unwrap();
    let count = |f: &dyn Fn(&Op) -> bool| graph.nodes.iter().filter(|n| f(&n.op)).count();
    // 18 Add→Clip→Mul→Div hard-swishes in the file; Div appears nowhere else.
    assert_eq!(count(&|op| *op == Op::HardSwish), 18);
    assert_eq!(count(&|op| *op == Op::Div), 0);
    assert_eq!(count(&|op| matches!(op, Op::Conv(_))), 53);
    assert_eq!(count(&|op| matches!(op, Op::BatchNorm { .. })), 35);
    // The flatten idiom became one Reshape that copies the batch dim.
    assert!(graph.nodes.iter().any(|n| n.op
        == Op::Reshape {
            shape: vec![0, 200]
        }));
    assert_eq!(graph.opset, 11);
    assert_eq!(graph.input().unwrap().dims.len(), 4);
    let summary = graph
        .summary(&compresslab::graph::known_dims(&[1, 3, 48, 192]))
        .unwrap();
    println!("textdir: {summary:?}");
    assert_eq!(summary.parameters, 133_628);
    assert!(summary.macs.unwrap() > 1_000_000);
}

#[test]
fn unsupported_and_malformed_files_are_errors_that_say_why() {
    let bytes = std::fs::read(models().join("unsupported.onnx")).unwrap();
    match import_onnx(&bytes) {
        Err(EngineError::UnsupportedOp {
            op, node, opset, ..
        }) => {
            assert_eq!(
                (op.as_str(), node.as_str(), opset),
                ("ConvTranspose", "upsample", 13)
            );
        }
        other => panic!("expected an unsupported-op error, got {other:?}"),
    }
    assert!(import_onnx(b"").is_err());
    assert!(import_onnx(b"GIF89a not a model").is_err());

    // Every truncation of a real model, and bit flips anywhere in it, give an error or a
    // graph, never a panic; whatever imports also runs or fails cleanly.
    let bytes = std::fs::read(models().join("shufflenet.onnx")).unwrap();
    let input = npy("shufflenet.input.npy");
    import_mutations(&bytes, &input, 1500, 0x2545_f491_4f6c_dd1d);
}

#[test]
fn folding_batch_norms_keeps_the_outputs() {
    for (name, expected) in [("resnet", 6), ("mobilenet", 1), ("textdir", 35)] {
        let mut graph =
            import_onnx(&std::fs::read(models().join(format!("{name}.onnx"))).unwrap()).unwrap();
        let input = npy(&format!("{name}.input.npy"));
        let before = CpuExecutor::new(&graph)
            .unwrap()
            .run(&input)
            .unwrap()
            .remove(0);
        let nodes = graph.nodes.len();
        let folded = fold_batch_norms(&mut graph);
        let after = CpuExecutor::new(&graph)
            .unwrap()
            .run(&input)
            .unwrap()
            .remove(0);
        let diff = relative_difference(&after, &before);
        println!(
            "{name}: {folded} BatchNorms folded, {nodes} → {} nodes, max relative change {diff:.2e}",
            graph.nodes.len()
        );
        assert_eq!(folded, expected);
        assert_eq!(graph.nodes.len(), nodes - folded);
        assert!(
            !graph
                .nodes
                .iter()
                .any(|n| matches!(n.op, Op::BatchNorm { .. }))
        );
        assert!(diff <= 1e-5, "{name}: {diff}");
    }
}
