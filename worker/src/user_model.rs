//! "Your model", worker side: an imported ONNX graph on WebGPU (the burn interpreter) when
//! the page runs there, else on the CPU interpreter; its compressed variant; the inputs of
//! the images classified so far (the first half calibrates and fine-tunes, the rest measures
//! agreement); fine-tuning; and the ONNX export.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use burn::prelude::Device;
use compresslab::compress::Recipe;
use compresslab::exec::{CpuExecutor, GraphModel, Tensor};
use compresslab::finetune_graph::{GraphFineTuneConfig, GraphFineTuner, flipped_copies};
use compresslab::graph::{
    CompressedGraph, Dim, Graph, MAX_MODEL_BYTES, channel_groups, compress_graph, export_onnx,
    fold_batch_norms, import_onnx,
};
use compresslab::preprocess::{InputSpec, input_tensor};
use js_sys::Uint8Array;
use wasm_bindgen_futures::JsFuture;
use web_sys::Blob;

use crate::error::{WorkerError, WorkerResult};
use crate::lab::percentile;
use crate::worker::sleep_ms;
use crate::worker::{decode_blob, now, post, webgpu};
use compresslab_spec::messages::{
    FromWorker, UserClassification, UserCompressReport, UserLayer, UserModelInfo, UserSide,
};

/// After 3 timing pairs, no more are started once this much time has gone by.
const TIMING_BUDGET_MS: f64 = 5000.0;

/// Inputs kept for calibration and agreement (the oldest are dropped beyond this).
const MAX_KEPT_INPUTS: usize = 64;

/// One graph ready to run: on WebGPU when the page has it (the burn interpreter), else on
/// the CPU interpreter, never both (each holds the weights).
#[derive(Clone)]
enum Runner {
    Cpu(Rc<CpuExecutor>),
    Gpu {
        model: GraphModel,
        device: Device,
        /// Bytes of the f32 weights it uploaded.
        bytes: usize,
    },
}

impl Runner {
    fn new(graph: &Graph) -> WorkerResult<Self> {
        Self::build(graph, || CpuExecutor::new(graph))
    }

    /// A compressed graph: on the CPU its quantized layers run on the integer kernels where
    /// one exists for them.
    fn compressed(compressed: &CompressedGraph) -> WorkerResult<Self> {
        Self::build(&compressed.graph, || CpuExecutor::compressed(compressed))
    }

    fn build(
        graph: &Graph,
        cpu: impl FnOnce() -> compresslab::Result<CpuExecutor>,
    ) -> WorkerResult<Self> {
        Ok(match webgpu() {
            Some((device, _)) => {
                // BatchNorm folded into the convolutions: fewer dispatches, same outputs.
                let mut folded = graph.clone();
                fold_batch_norms(&mut folded);
                let bytes = folded.constants.values().map(|c| 4 * c.data.len()).sum();
                Runner::Gpu {
                    model: GraphModel::new(&folded, &device)?,
                    device,
                    bytes,
                }
            }
            None => Runner::Cpu(Rc::new(cpu()?)),
        })
    }

    /// The first output for one input.
    async fn run(&self, input: &Tensor) -> WorkerResult<Vec<f32>> {
        let outputs = match self {
            Runner::Gpu { model, device, .. } => model.run(input, device).await?,
            Runner::Cpu(cpu) => cpu.run(input)?,
        };
        let first = outputs
            .into_iter()
            .next()
            .ok_or_else(|| WorkerError::Message("the model has no output".into()))?;
        Ok(first.data)
    }

    /// Bytes of weights this runner keeps while the model is loaded.
    fn held_bytes(&self) -> usize {
        match self {
            Runner::Gpu { bytes, .. } => *bytes,
            Runner::Cpu(cpu) => cpu.weight_bytes(),
        }
    }

    /// What computes the layers, in words.
    fn kernels_text(&self) -> String {
        let levels = "activations rounded to their integer levels where the recipe quantizes them (what the exported QDQ model computes)";
        match self {
            Runner::Gpu { .. } => format!(
                "{} through the burn interpreter: float arithmetic on the dequantized weights (no integer kernel for imported models on WebGPU yet), {levels}",
                backend_name()
            ),
            Runner::Cpu(cpu) => {
                let used = cpu.kernel_use();
                let layers = |n: usize| format!("{n} layer{}", if n == 1 { "" } else { "s" });
                let mut parts = Vec::new();
                if used.int8 > 0 {
                    parts.push(format!(
                        "{} on the int8 kernel (int8 weights × int8 inputs, exact integer sums)",
                        layers(used.int8)
                    ));
                }
                if used.int4 > 0 {
                    parts.push(format!(
                        "{} from packed int4 weights, unpacked as they run",
                        layers(used.int4)
                    ));
                }
                if used.dequantized > 0 {
                    parts.push(format!(
                        "{} quantized but without an integer kernel (depthwise, grouped, or int8 weights without int8 inputs): float on the dequantized weights",
                        layers(used.dequantized)
                    ));
                }
                if parts.is_empty() {
                    "CPU interpreter: float (no quantized layers)".into()
                } else {
                    format!("CPU interpreter: {}; {levels}", parts.join("; "))
                }
            }
        }
    }
}

/// The compressed model, and how many of the oldest kept inputs it calibrated or trained on.
#[derive(Clone)]
struct Variant {
    compressed: CompressedGraph,
    runner: Runner,
    used: usize,
    fine_tuned: Option<String>,
}

struct UserModel {
    name: String,
    graph: Graph,
    original: Runner,
    inputs: RefCell<Vec<Tensor>>,
    variant: RefCell<Option<Variant>>,
    /// Whether WebGPU has run this model once (the first run compiles shaders).
    warm: Cell<bool>,
}

thread_local! {
    static USER: RefCell<Option<Rc<UserModel>>> = const { RefCell::new(None) };
    static STOP_TUNING: Cell<bool> = const { Cell::new(false) };
    /// The job queue's tickets: the next one handed out and the one being served.
    static NEXT_TICKET: Cell<u64> = const { Cell::new(0) };
    static SERVING: Cell<u64> = const { Cell::new(0) };
}

/// A place in the queue of this tab's jobs: they run one at a time in the order they came,
/// so a latency is one model's run, not several interleaved at their awaits.
struct Turn;

impl Turn {
    async fn wait() -> Turn {
        let ticket = NEXT_TICKET.with(|n| n.replace(n.get() + 1));
        while SERVING.get() != ticket {
            sleep_ms(1).await;
        }
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        SERVING.set(SERVING.get() + 1);
    }
}

fn current() -> WorkerResult<Rc<UserModel>> {
    USER.with(|u| u.borrow().clone())
        .ok_or_else(|| WorkerError::Message("load an .onnx model first".into()))
}

/// Where models run on this page, in words.
fn backend_name() -> String {
    match webgpu() {
        Some((_, adapter)) => format!("WebGPU ({adapter})"),
        None => "CPU interpreter".into(),
    }
}

fn dims_text(dims: &[Dim]) -> Vec<String> {
    dims.iter().map(ToString::to_string).collect()
}

async fn blob_bytes(blob: &Blob) -> WorkerResult<Vec<u8>> {
    let buffer = JsFuture::from(blob.array_buffer())
        .await
        .map_err(|e| WorkerError::js("read file", e))?;
    Ok(Uint8Array::new(&buffer).to_vec())
}

/// Imports the model file and reports what it is.
pub async fn load(name: String, blob: &Blob) -> WorkerResult<()> {
    let _turn = Turn::wait().await;
    if blob.size() > MAX_MODEL_BYTES as f64 {
        return Err(WorkerError::Message(format!(
            "{name} is {:.0} MB; models up to {} MB are read",
            blob.size() / 1_048_576.0,
            MAX_MODEL_BYTES >> 20
        )));
    }
    let bytes = blob_bytes(blob).await?;
    let graph = import_onnx(&bytes)?;
    let original = Runner::new(&graph)?;
    let declared = graph.input()?.dims.clone();
    let batch_one: Vec<Dim> = declared
        .iter()
        .enumerate()
        .map(|(i, d)| match (i, d) {
            (0, Dim::Sym(_)) => Dim::Known(1),
            _ => d.clone(),
        })
        .collect();
    let summary = graph.summary(&batch_one)?;
    let groups = channel_groups(&graph)?;
    let prunable = groups.iter().filter(|g| g.fixed.is_none()).count();
    let input_size = match (
        declared.get(2).and_then(Dim::known),
        declared.get(3).and_then(Dim::known),
    ) {
        (Some(h), Some(w)) => Some((h, w)),
        _ => None,
    };
    if declared.len() != 4 || declared.get(1).and_then(Dim::known) != Some(3) {
        return Err(WorkerError::Message(format!(
            "{name} takes an input of shape [{}]; the page feeds images as N×3×H×W",
            dims_text(&declared).join(", ")
        )));
    }
    let info = UserModelInfo {
        name: name.clone(),
        file_bytes: bytes.len(),
        producer: graph.producer.clone(),
        opset: graph.opset,
        input: dims_text(&declared),
        outputs: summary
            .outputs
            .iter()
            .map(|o| dims_text(&o.dims).join("×"))
            .collect(),
        nodes: summary.nodes,
        ops: summary.ops.clone(),
        parameters: summary.parameters,
        macs: summary.macs,
        input_size,
        labels: graph.class_names(),
        prunable_groups: prunable,
        fixed_groups: groups.len() - prunable,
    };
    USER.with(|u| {
        *u.borrow_mut() = Some(Rc::new(UserModel {
            name,
            graph,
            original,
            inputs: RefCell::new(Vec::new()),
            variant: RefCell::new(None),
            warm: Cell::new(false),
        }))
    });
    post(&FromWorker::UserModelLoaded(Box::new(info)));
    Ok(())
}

/// `(class, probability)` best first: a softmax of the outputs unless they already sum to
/// one (a model that ends in Softmax).
fn ranked(outputs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let sum: f32 = outputs.iter().sum();
    let probabilities = outputs.iter().all(|p| (0.0..=1.0).contains(p)) && (sum - 1.0).abs() < 1e-3;
    let p = if probabilities {
        outputs.to_vec()
    } else {
        compresslab::labels::softmax(outputs)
    };
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    order.into_iter().take(k).map(|i| (i, p[i])).collect()
}

/// Decodes, prepares and classifies one image with the model (and its variant).
pub async fn classify(id: u32, spec: InputSpec, blob: &Blob) -> WorkerResult<()> {
    let _turn = Turn::wait().await;
    let decoded = decode_blob(blob).await?;
    let data = input_tensor(&spec, &decoded.image)?;
    let input = Tensor {
        dims: vec![1, 3, spec.height, spec.width],
        data,
    };
    // What the model saw, back as 8-bit RGB for the card (min–max over the whole input).
    let (lo, hi) = input
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let plane = spec.height * spec.width;
    let seen: Vec<u8> = (0..plane)
        .flat_map(|i| {
            let channel = |c: usize| input.data[c * plane + i];
            [0, 1, 2].map(|c| (255.0 * (channel(c) - lo) / (hi - lo).max(1e-6)).round() as u8)
        })
        .collect();
    let m = current()?;
    let variant = m.variant.borrow().clone();
    let cold = matches!(m.original, Runner::Gpu { .. }) && !m.warm.replace(true);
    let start = now();
    let outputs = m.original.run(&input).await?;
    let ms = now() - start;
    let variant = match variant {
        Some(v) => {
            let start = now();
            let out = v.runner.run(&input).await?;
            Some((ranked(&out, 5), now() - start))
        }
        None => None,
    };
    {
        let mut inputs = m.inputs.borrow_mut();
        if inputs.len() == MAX_KEPT_INPUTS {
            inputs.remove(0);
            if let Some(v) = m.variant.borrow_mut().as_mut() {
                v.used = v.used.saturating_sub(1);
            }
        }
        inputs.push(input);
    }
    let result = UserClassification {
        id,
        top: ranked(&outputs, 5),
        ms,
        backend: backend_name(),
        cold,
        variant_top: variant.as_ref().map(|(t, _)| t.clone()),
        variant_ms: variant.map(|(_, ms)| ms),
        seen,
        seen_width: spec.width as u32,
        seen_height: spec.height as u32,
    };
    post(&FromWorker::UserModelClassified(result));
    Ok(())
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Applies `recipe`; the report measures agreement on the images that did not calibrate.
pub async fn compress(recipe: Recipe, runs: u32) -> WorkerResult<()> {
    let _turn = Turn::wait().await;
    let m = current()?;
    let start = now();
    // The old variant goes first (its memory is freed before the new one is built); the
    // page drops its report when this fails, so the two stay in line.
    m.variant.replace(None);
    let inputs = m.inputs.borrow().clone();
    let calibrating = recipe.activations.is_some();
    if calibrating && inputs.len() < 2 {
        return Err(WorkerError::Message(
            "activation quantization calibrates on the images you classified: classify at least 2 (half calibrate, half measure)".into(),
        ));
    }
    let used = if calibrating {
        inputs.len().div_ceil(2)
    } else {
        0
    };
    let compressed = compress_graph(&m.graph, &recipe, &inputs[..used], &mut |_, _| {
        crate::cancel::check()
    })?;
    let variant = Variant {
        runner: Runner::compressed(&compressed)?,
        compressed,
        used,
        fine_tuned: None,
    };
    let report = report(&m, &variant, runs, now() - start).await?;
    m.variant.replace(Some(variant));
    post(&FromWorker::UserModelCompressed(Box::new(report)));
    Ok(())
}

pub fn stop_tuning() {
    STOP_TUNING.set(true);
}

/// Fine-tunes the variant toward the original on the images it calibrated on (or the first
/// half of those classified), then reports it measured on the rest.
pub async fn fine_tune(epochs: u32, learning_rate: f64) -> WorkerResult<()> {
    let _turn = Turn::wait().await;
    let m = current()?;
    let start = now();
    let Some(variant) = m.variant.borrow().clone() else {
        return Err(WorkerError::Message(
            "compress the model first: fine-tuning trains the compressed variant".into(),
        ));
    };
    let inputs = m.inputs.borrow().clone();
    let used = if variant.used > 0 {
        variant.used
    } else {
        inputs.len().div_ceil(2)
    };
    if used == 0 || inputs.len() <= used {
        return Err(WorkerError::Message(format!(
            "fine-tuning needs images to train on and others to measure on: classify at least 2 (you have {})",
            inputs.len()
        )));
    }
    let train = flipped_copies(&inputs[..used]);
    let mut targets = Vec::with_capacity(train.len());
    for input in &train {
        targets.push(m.original.run(input).await?);
    }
    let cfg = GraphFineTuneConfig {
        epochs: (epochs as usize).clamp(1, compresslab::finetune_graph::MAX_EPOCHS),
        batch_size: 8,
        learning_rate,
        ..Default::default()
    };
    let device = match webgpu() {
        Some((device, _)) => device.autodiff(),
        None => Device::flex().autodiff(),
    };
    let epochs = cfg.epochs;
    let mut tuner = GraphFineTuner::new(&variant.compressed, train, targets, cfg, &device)?;
    STOP_TUNING.set(false);
    let before = tuner.training_loss().await?;
    while !tuner.is_done() {
        // Lets a stop message in between steps.
        sleep_ms(0).await;
        if STOP_TUNING.replace(false) {
            return Err(WorkerError::Message(format!(
                "fine-tuning stopped after {} of {} steps; the compressed variant is unchanged",
                tuner.steps_done(),
                tuner.total_steps()
            )));
        }
        let step = tuner.step().await?;
        post(&FromWorker::UserModelTuning {
            done: step.done,
            total: step.total,
            loss: step.loss,
        });
    }
    let after = tuner.training_loss().await?;
    if after >= before {
        return Err(WorkerError::Message(format!(
            "fine-tuning did not lower the distillation loss on the training images ({} → {}); the compressed variant is unchanged. A smaller learning rate may help.",
            loss_text(before),
            loss_text(after)
        )));
    }
    let steps = tuner.total_steps();
    let tuned = tuner.finish().await?;
    let seconds = (now() - start) / 1e3;
    let variant = Variant {
        runner: Runner::compressed(&tuned)?,
        compressed: tuned,
        used,
        fine_tuned: Some(format!(
            "fine-tuned for {} epochs ({steps} steps) on the {used} images that calibrated it and their flipped copies, toward the original's outputs (no labels), learning rate {learning_rate:e}, on {}: distillation loss on those images {} → {}, {seconds:.1} s in all",
            epochs,
            if webgpu().is_some() {
                "WebGPU"
            } else {
                "the CPU (burn Flex)"
            },
            loss_text(before),
            loss_text(after)
        )),
    };
    let report = report(&m, &variant, 5, now() - start).await?;
    m.variant.replace(Some(variant));
    post(&FromWorker::UserModelCompressed(Box::new(report)));
    Ok(())
}

/// A loss for people: 4 decimals, or 3 significant digits when smaller than that.
fn loss_text(loss: f64) -> String {
    if loss != 0.0 && loss.abs() < 1e-3 {
        format!("{loss:.2e}")
    } else {
        format!("{loss:.4}")
    }
}

/// Measures a variant against the original: agreement on the inputs it did not use,
/// interleaved p50 latency on the last input, size and compute, per-layer table.
async fn report(
    m: &UserModel,
    variant: &Variant,
    runs: u32,
    build_ms: f64,
) -> WorkerResult<UserCompressReport> {
    let inputs = m.inputs.borrow().clone();
    let used = variant.used.min(inputs.len());
    let held_out = &inputs[used..];
    let top1_same = if held_out.is_empty() {
        None
    } else {
        let mut same = 0;
        for input in held_out {
            crate::cancel::check()?;
            let a = m.original.run(input).await?;
            let b = variant.runner.run(input).await?;
            same += usize::from(argmax(&a) == argmax(&b));
        }
        Some(same)
    };
    // Up to `runs` interleaved pairs; on a slow device (an emulated GPU) the timing stops
    // after 3 pairs once it has taken 5 s, and the report says how many ran.
    let runs = runs.clamp(1, 100);
    let mut times = (Vec::new(), Vec::new());
    if let Some(input) = inputs.last() {
        let started = now();
        for done in 0..runs {
            if done >= 3 && now() - started > TIMING_BUDGET_MS {
                break;
            }
            crate::cancel::check()?;
            let t = now();
            m.original.run(input).await?;
            times.0.push(now() - t);
            let t = now();
            variant.runner.run(input).await?;
            times.1.push(now() - t);
        }
    }
    let runs = times.0.len() as u32;
    let p50 = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        if t.is_empty() {
            0.0
        } else {
            percentile(t, 50.0)
        }
    };
    // MACs for one image of the size the model is fed.
    let fed: Vec<Dim> = match inputs.last() {
        Some(t) => std::iter::once(Dim::Known(1))
            .chain(t.dims.iter().skip(1).map(|&d| Dim::Known(d)))
            .collect(),
        None => {
            let mut dims = m.graph.input()?.dims.clone();
            if let Some(batch) = dims.first_mut() {
                *batch = Dim::Known(1);
            }
            dims
        }
    };
    let compressed = &variant.compressed;
    let before = m.graph.stats_at(&fed, &Default::default())?;
    let after = compressed.graph.stats_at(&fed, &compressed.weights)?;
    let layers = compressed
        .layers
        .iter()
        .map(|l| UserLayer {
            node: l.node.clone(),
            op: l.op.to_string(),
            shape: l.shape.clone(),
            parameters: l.parameters,
            zeros: l.zeros,
            bits: l.bits,
            sqnr_db: l.sqnr_db.filter(|v| v.is_finite()),
            activation_bits: l.activation.map(|a| if a.qmax <= 7 { 4 } else { 8 }),
            histogram: l.histogram.clone(),
            narrowest_channel: l.narrowest_channel.clone(),
        })
        .collect();
    let executor = variant.runner.kernels_text();
    Ok(UserCompressReport {
        recipe: compressed.recipe.clone(),
        before: UserSide {
            parameters: before.parameters,
            weight_bytes: before.weight_bytes,
            macs: before.macs,
            held_bytes: m.original.held_bytes(),
            p50_ms: p50(&mut times.0),
        },
        after: UserSide {
            parameters: after.parameters,
            weight_bytes: after.weight_bytes,
            macs: after.macs,
            held_bytes: variant.runner.held_bytes(),
            p50_ms: p50(&mut times.1),
        },
        runs,
        calibration_images: used,
        held_out: held_out.len(),
        top1_same,
        layers,
        executor,
        build_ms,
        fine_tuned: variant.fine_tuned.clone(),
    })
}

/// The compressed variant (or the original, when nothing was compressed) as ONNX.
pub fn export() -> WorkerResult<()> {
    let m = current()?;
    let (bytes, recipe, name) = {
        let stem = m.name.trim_end_matches(".onnx").to_string();
        match m.variant.borrow().as_ref().map(|v| &v.compressed) {
            Some(c) => {
                let recipe = c.recipe.to_json();
                let bytes = export_onnx(
                    &c.graph,
                    &c.weights,
                    &[("compresslab.recipe".to_string(), recipe.clone())],
                )?;
                (bytes, recipe, format!("{stem}.compressed.onnx"))
            }
            None => (
                export_onnx(&m.graph, &Default::default(), &[])?,
                Recipe::default().to_json(),
                format!("{stem}.onnx"),
            ),
        }
    };
    post(&FromWorker::Exported {
        weights: bytes,
        recipe_json: recipe,
        file_name: name,
    });
    Ok(())
}
