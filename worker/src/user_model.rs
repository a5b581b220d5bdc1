//! "Your model", worker side: an imported ONNX graph on WebGPU (the burn interpreter) when
//! the page runs there, else on the CPU interpreter; its compressed variant; the inputs of
//! the images classified so far (the first half calibrates and fine-tunes, the rest measures
//! agreement); fine-tuning; and the ONNX export.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use burn::prelude::Device;
use compresslab::compress::Recipe;
use compresslab::distill::argmax;
use compresslab::exec::{CpuExecutor, GraphModel, Tensor};
use compresslab::finetune_graph::{
    GraphFineTuneConfig, GraphFineTuner, fit_new_head, flipped_copies,
};
use compresslab::gpu_int::graph_on_integer_kernels;
use compresslab::graph::{
    CompressedGraph, Dim, Graph, MAX_MODEL_BYTES, channel_groups, compress_graph, export_onnx,
    fold_batch_norms, import_onnx,
};
use compresslab::labels::class_for_folder;
use compresslab::preprocess::{InputSpec, input_tensor};
use compresslab::sweep::GraphSweep;
use compresslab_spec::labels::{class_for_name, folder_classes};
use js_sys::Uint8Array;
use wasm_bindgen_futures::JsFuture;
use web_sys::Blob;

use crate::error::{WorkerError, WorkerResult};
use crate::lab::percentile;
use crate::worker::{decode_blob, now, post, webgpu, webgpu_features};
use crate::worker::{sleep_ms, yield_now};
use compresslab_spec::messages::{
    FromWorker, LabelledAccuracy, NewHeadReport, UserClassification, UserCompressReport, UserLayer,
    UserModelInfo, UserSide,
};

/// After 3 timing pairs, no more are started once this much time has gone by.
const TIMING_BUDGET_MS: f64 = 5000.0;

/// Inputs kept for calibration, fine-tuning and agreement: the oldest are dropped beyond
/// this many, or beyond this many bytes (about 50 ImageNet-size inputs, 280 text lines;
/// a fine-tune holds four flipped copies of half of them besides).
const MAX_KEPT_INPUTS: usize = 512;
const MAX_KEPT_BYTES: usize = 32 << 20;

/// One graph ready to run: on WebGPU when the page has it (the burn interpreter), else on
/// the CPU interpreter, never both (each holds the weights).
#[derive(Clone)]
enum Runner {
    Cpu(Rc<CpuExecutor>),
    Gpu {
        model: GraphModel,
        device: Device,
        /// Quantized layers the integer kernels do not fit (computed in float).
        float_quantized: usize,
    },
}

impl Runner {
    fn new(graph: &Graph) -> WorkerResult<Self> {
        Ok(match webgpu() {
            Some((device, _)) => {
                // BatchNorm folded into the convolutions: fewer dispatches, same outputs.
                let mut folded = graph.clone();
                fold_batch_norms(&mut folded);
                Runner::Gpu {
                    model: GraphModel::new(&folded, &device)?,
                    device,
                    float_quantized: 0,
                }
            }
            None => Runner::Cpu(Rc::new(CpuExecutor::new(graph)?)),
        })
    }

    /// A compressed graph (BatchNorm already folded): its quantized layers run on the
    /// integer kernels where one fits them, on WebGPU as on the CPU.
    fn compressed(compressed: &CompressedGraph) -> WorkerResult<Self> {
        Ok(match webgpu() {
            Some((device, _)) => {
                let model = graph_on_integer_kernels(compressed, &device, webgpu_features())?;
                let (int8, int4) = model.kernel_layers();
                Runner::Gpu {
                    float_quantized: compressed.weights.len().saturating_sub(int8 + int4),
                    model,
                    device,
                }
            }
            None => Runner::Cpu(Rc::new(CpuExecutor::compressed(compressed)?)),
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
            Runner::Gpu { model, .. } => model.held_bytes(),
            Runner::Cpu(cpu) => cpu.weight_bytes(),
        }
    }

    /// What computes the layers, in words.
    fn kernels_text(&self) -> String {
        let levels = "activations rounded to their integer levels where the recipe quantizes them (what the exported QDQ model computes)";
        let layers = |n: usize| format!("{n} layer{}", if n == 1 { "" } else { "s" });
        let (int8, int4, float, place, float_why, int4_how) = match self {
            Runner::Gpu {
                model,
                float_quantized,
                ..
            } => {
                let (int8, int4) = model.kernel_layers();
                let why = if webgpu_features().packed_dot4 {
                    "not a plain 1×1 (stem, depthwise, grouped, strided), or int8 weights without int8 inputs"
                } else {
                    "not a plain 1×1, or int8 on an adapter without dot4I8Packed"
                };
                (
                    int8,
                    int4,
                    *float_quantized,
                    format!("{} through the burn interpreter", backend_name()),
                    why,
                    "unpacked as they run",
                )
            }
            Runner::Cpu(cpu) => {
                let used = cpu.kernel_use();
                (
                    used.int8,
                    used.int4,
                    used.dequantized,
                    "CPU interpreter".to_string(),
                    "grouped, a depthwise block smaller than a channel, or int8 weights without int8 inputs",
                    "1×1 and Gemm as integer products with each pixel's inputs rounded to 16 bits, the others unpacked to float as they run",
                )
            }
        };
        let mut parts = Vec::new();
        if int8 > 0 {
            parts.push(format!(
                "{} on the int8 kernel (int8 weights × int8 inputs, exact integer sums)",
                layers(int8)
            ));
        }
        if int4 > 0 {
            parts.push(format!(
                "{} from packed int4 weights ({int4_how})",
                layers(int4)
            ));
        }
        if float > 0 {
            parts.push(format!(
                "{} quantized but without an integer kernel ({float_why}): float on the dequantized weights",
                layers(float)
            ));
        }
        if parts.is_empty() {
            format!("{place}: float (no quantized layers)")
        } else {
            format!("{place}: {}; {levels}", parts.join("; "))
        }
    }
}

/// The compressed model, and which kept inputs (by serial) it calibrated or trained on.
#[derive(Clone)]
struct Variant {
    compressed: CompressedGraph,
    runner: Runner,
    used: BTreeSet<u64>,
    fine_tuned: Option<String>,
}

/// An image as the model's input, and the folder it came from.
#[derive(Clone)]
struct KeptInput {
    /// Its place in the order images came (never reused).
    serial: u64,
    input: Tensor,
    folder: Option<String>,
}

struct UserModel {
    name: String,
    /// Size of the file it came from.
    file_bytes: usize,
    graph: Graph,
    original: Runner,
    /// The model's outputs per image (what a class number must stay below; known once it
    /// has run when the model leaves a size open).
    classes: Cell<usize>,
    inputs: RefCell<Vec<KeptInput>>,
    next_serial: Cell<u64>,
    variant: RefCell<Option<Variant>>,
    /// Whether WebGPU has run this model once (the first run compiles shaders).
    warm: Cell<bool>,
}

thread_local! {
    static USER: RefCell<Option<Rc<UserModel>>> = const { RefCell::new(None) };
    /// The class names the page shows (folder names are matched against them).
    static CLASS_NAMES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
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

/// The class names of a labels file the user gave, in turn after the jobs sent before it (a
/// model dropped with its labels file loads first). As on the page, the model's own names
/// (in its metadata) win.
pub async fn set_class_names(names: Vec<String>) {
    let _turn = Turn::wait().await;
    if current().is_ok_and(|m| !m.graph.class_names().is_empty()) {
        return;
    }
    CLASS_NAMES.set(names);
}

impl UserModel {
    /// The class `folder` names, with the class names as they stand now.
    fn truth(&self, folder: Option<&str>) -> Option<usize> {
        let folder = folder?;
        CLASS_NAMES.with_borrow(|names| class_for_folder(names, self.classes.get(), folder))
    }

    /// Which kept inputs calibrate and train: the first half of those without a label and
    /// the first half of each class's (in the order they came), so that every class the
    /// folders name (with two images or more) is on both sides of the split.
    fn training_serials(&self, inputs: &[KeptInput]) -> BTreeSet<u64> {
        let keys: Vec<Option<usize>> = inputs
            .iter()
            .map(|k| self.truth(k.folder.as_deref()))
            .collect();
        first_halves(inputs, &keys)
    }
}

/// The first half of the inputs of each key (their class, or `None`), in the order they came.
fn first_halves(inputs: &[KeptInput], keys: &[Option<usize>]) -> BTreeSet<u64> {
    let mut totals: BTreeMap<Option<usize>, usize> = BTreeMap::new();
    for key in keys {
        *totals.entry(*key).or_default() += 1;
    }
    let mut seen: BTreeMap<Option<usize>, usize> = BTreeMap::new();
    inputs
        .iter()
        .zip(keys)
        .filter(|(_, key)| {
            let n = seen.entry(**key).or_default();
            *n += 1;
            *n <= totals[*key].div_ceil(2)
        })
        .map(|(k, _)| k.serial)
        .collect()
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

/// What the page shows about `graph` (from a file of `file_bytes`), and its outputs per image
/// (`usize::MAX` while a size is open).
fn describe(name: &str, file_bytes: usize, graph: &Graph) -> WorkerResult<(UserModelInfo, usize)> {
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
    let groups = channel_groups(graph)?;
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
    // Every value per image of the first output (a [1, 1000, 1, 1] output has 1 000).
    let classes = summary
        .outputs
        .first()
        .and_then(|o| {
            o.dims
                .iter()
                .skip(1)
                .try_fold(1usize, |n, d| n.checked_mul(d.known()?))
        })
        .unwrap_or(usize::MAX);
    let info = UserModelInfo {
        name: name.to_string(),
        file_bytes,
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
    Ok((info, classes))
}

/// Imports the model file and reports what it is.
pub async fn load(name: String, class_names: Vec<String>, blob: &Blob) -> WorkerResult<()> {
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
    let (info, classes) = describe(&name, bytes.len(), &graph)?;
    let original = Runner::new(&graph)?;
    // As the page does: the model's own class names when it has them, else the user's.
    let names = graph.class_names();
    CLASS_NAMES.set(if names.is_empty() { class_names } else { names });
    USER.with(|u| {
        *u.borrow_mut() = Some(Rc::new(UserModel {
            name,
            file_bytes: bytes.len(),
            graph,
            original,
            classes: Cell::new(classes),
            inputs: RefCell::new(Vec::new()),
            next_serial: Cell::new(0),
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
pub async fn classify(
    id: u32,
    spec: InputSpec,
    folder: Option<String>,
    blob: &Blob,
) -> WorkerResult<()> {
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
    m.classes.set(outputs.len());
    {
        let mut inputs = m.inputs.borrow_mut();
        let bytes =
            |inputs: &[KeptInput]| -> usize { inputs.iter().map(|k| 4 * k.input.data.len()).sum() };
        while !inputs.is_empty()
            && (inputs.len() >= MAX_KEPT_INPUTS
                || bytes(&inputs) + 4 * input.data.len() > MAX_KEPT_BYTES)
        {
            inputs.remove(0);
        }
        let serial = m.next_serial.replace(m.next_serial.get() + 1);
        inputs.push(KeptInput {
            serial,
            input,
            folder,
        });
    }
    let result = UserClassification {
        id,
        top: ranked(&outputs, 5),
        ms,
        backend: backend_name(),
        cold,
        variant_top: variant.as_ref().map(|(t, _)| t.clone()),
        variant_ms: variant.map(|(_, ms)| ms),
        classes: outputs.len(),
        seen,
        seen_width: spec.width as u32,
        seen_height: spec.height as u32,
    };
    post(&FromWorker::UserModelClassified(result));
    Ok(())
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
        m.training_serials(&inputs)
    } else {
        BTreeSet::new()
    };
    let calibration: Vec<Tensor> = inputs
        .iter()
        .filter(|k| used.contains(&k.serial))
        .map(|k| k.input.clone())
        .collect();
    let compressed = compress_graph(&m.graph, &recipe, &calibration, &mut |_, _| {
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

/// Runs every sweep case on the model, measured on the images classified so far that do not
/// calibrate (the others calibrate W8A8), and posts each point as it is measured. The current
/// variant stays as it is.
pub async fn sweep() -> WorkerResult<()> {
    let _turn = Turn::wait().await;
    let m = current()?;
    let inputs = m.inputs.borrow().clone();
    let used = m.training_serials(&inputs);
    let (calibration, held_out): (Vec<KeptInput>, Vec<KeptInput>) =
        inputs.into_iter().partition(|k| used.contains(&k.serial));
    if held_out.is_empty() {
        return Err(WorkerError::Message(
            "the sweep measures on images that do not calibrate, and the first half of each class a folder names (of the others, without a folder) calibrates: classify at least 2 images, 2 or more of each labelled class".into(),
        ));
    }
    let held_out = held_out
        .into_iter()
        .map(|k| {
            let truth = m.truth(k.folder.as_deref());
            (k.input, truth)
        })
        .collect();
    let sweep = GraphSweep::new(
        &m.graph,
        calibration.into_iter().map(|k| k.input).collect(),
        held_out,
    )?;
    let cases = sweep.cases();
    let total = cases.len() as u32;
    for (done, case) in (1..).zip(&cases) {
        // Yields, so the page's cancel lands between cases even without a shared counter.
        crate::cancel::checkpoint().await?;
        let point = sweep.run(case, &mut |_, _| crate::cancel::check())?;
        post(&FromWorker::UserSweepPoint { point, done, total });
    }
    post(&FromWorker::UserSweepDone);
    Ok(())
}

/// Teaches the model the classes its images' folders name: a new head fitted on the
/// features the model computes for the first half of each folder's images (the rest
/// measure it). The model is replaced by the one with the new head; any variant is dropped.
pub async fn new_head() -> WorkerResult<()> {
    let _turn = Turn::wait().await;
    let m = current()?;
    let start = now();
    let inputs = m.inputs.borrow().clone();
    let names = folder_classes(inputs.iter().filter_map(|k| k.folder.as_deref()));
    let keys: Vec<Option<usize>> = inputs
        .iter()
        .map(|k| class_for_name(&names, k.folder.as_deref()?))
        .collect();
    let counts: Vec<usize> = (0..names.len())
        .map(|c| keys.iter().filter(|k| **k == Some(c)).count())
        .collect();
    if names.len() < 2 || counts.iter().any(|&n| n < 2) {
        return Err(WorkerError::Message(format!(
            "a new head learns the classes your folders name: drop a folder holding one folder per class, two classes or more, two images or more in each (half train the head, half measure it); the images classified so far come from {} folder{}{}",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            if names.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    names
                        .iter()
                        .zip(&counts)
                        .map(|(n, c)| format!("{n}: {c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )));
    }
    let training = first_halves(&inputs, &keys);
    let (mut train, mut labels, mut held_out) = (Vec::new(), Vec::new(), Vec::new());
    for (kept, key) in inputs.iter().zip(&keys) {
        let Some(class) = *key else { continue };
        if training.contains(&kept.serial) {
            train.push(kept.input.clone());
            labels.push(class);
        } else {
            held_out.push((&kept.input, class));
        }
    }
    crate::cancel::checkpoint().await?;
    // On the CPU even when the page runs on WebGPU: the features come from the CPU
    // interpreter, and 300 small full-batch steps cost more in GPU dispatches than in
    // arithmetic (67.7 s for 4 text lines on SwiftShader).
    let device = Device::flex().autodiff();
    let fitted = fit_new_head(&m.graph, &train, &labels, &names, &device, &mut |_, _| {
        crate::cancel::check()
    })
    .await?;
    let original = Runner::new(&fitted.graph)?;
    let mut held_out_right = 0;
    for (input, class) in &held_out {
        crate::cancel::checkpoint().await?;
        held_out_right += usize::from(argmax(&original.run(input).await?) == *class);
    }
    let (info, _) = describe(&m.name, m.file_bytes, &fitted.graph)?;
    let report = NewHeadReport {
        layer: fitted.layer.clone(),
        classes: names.clone(),
        training: train.len(),
        training_right: fitted.training_right,
        held_out: held_out.len(),
        held_out_right,
        unlabelled: keys.iter().filter(|k| k.is_none()).count(),
        ms: now() - start,
    };
    drop(train);
    CLASS_NAMES.set(names.clone());
    USER.with(|u| {
        *u.borrow_mut() = Some(Rc::new(UserModel {
            name: m.name.clone(),
            file_bytes: m.file_bytes,
            graph: fitted.graph,
            original,
            classes: Cell::new(names.len()),
            inputs: RefCell::new(inputs),
            next_serial: Cell::new(m.next_serial.get()),
            variant: RefCell::new(None),
            warm: Cell::new(false),
        }))
    });
    post(&FromWorker::UserModelNewHead {
        info: Box::new(info),
        report,
    });
    Ok(())
}

pub fn stop_tuning() {
    STOP_TUNING.set(true);
}

/// Fine-tunes the variant toward the original on the images it calibrated on (or the first
/// half of those classified), then reports it measured on the rest.
pub async fn fine_tune(
    epochs: u32,
    learning_rate: f64,
    feature_layers: &[String],
    feature_weight: f64,
) -> WorkerResult<()> {
    let _turn = Turn::wait().await;
    let m = current()?;
    let start = now();
    let Some(variant) = m.variant.borrow().clone() else {
        return Err(WorkerError::Message(
            "compress the model first: fine-tuning trains the compressed variant".into(),
        ));
    };
    // Only the training images are copied (the kept inputs may be tens of MB).
    let (training, kept, which) = {
        let inputs = m.inputs.borrow();
        let pick = |serials: &BTreeSet<u64>| -> Vec<KeptInput> {
            inputs
                .iter()
                .filter(|k| serials.contains(&k.serial))
                .cloned()
                .collect()
        };
        let earlier = pick(&variant.used);
        let (training, which) = if !earlier.is_empty() {
            let which = if variant.fine_tuned.is_some() {
                "those it was trained on before"
            } else {
                "those that calibrated it"
            };
            (earlier, which)
        } else {
            (
                pick(&m.training_serials(&inputs)),
                "the first half of them, and of each class",
            )
        };
        (training, inputs.len(), which)
    };
    if training.is_empty() || kept <= training.len() {
        return Err(WorkerError::Message(format!(
            "fine-tuning needs images to train on and others to measure on: classify at least 2 (you have {kept})"
        )));
    }
    let used: BTreeSet<u64> = training.iter().map(|k| k.serial).collect();
    // A label holds for the image as it is, not for its flipped copies (turning a text line
    // over changes its direction): those learn from the original alone.
    let labels: Vec<Option<usize>> = training
        .iter()
        .flat_map(|k| [m.truth(k.folder.as_deref()), None, None, None])
        .collect();
    let labelled = labels.iter().flatten().count();
    let images: Vec<Tensor> = training.into_iter().map(|k| k.input).collect();
    let train = flipped_copies(&images);
    drop(images);
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
    let mut tuner = GraphFineTuner::new(&variant.compressed, train, targets, cfg, &device)?
        .with_labels(labels)?
        .with_feature_matching(&m.graph, feature_layers, feature_weight)?;
    STOP_TUNING.set(false);
    let before = tuner.training_loss().await?;
    while !tuner.is_done() {
        // Lets a stop message in between steps.
        yield_now().await;
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
    let loss_name = match (labelled, feature_layers.is_empty()) {
        (0, true) => "distillation loss",
        (_, true) => "loss (distillation + cross-entropy)",
        (0, false) => "loss (distillation + feature matching)",
        (_, false) => "loss (distillation + cross-entropy + feature matching)",
    };
    let features = if feature_layers.is_empty() {
        String::new()
    } else {
        format!(
            ", and to read what the original reads at {} (weight {feature_weight})",
            feature_layers.join(", ")
        )
    };
    if after >= before {
        return Err(WorkerError::Message(format!(
            "fine-tuning did not lower the {loss_name} on the training images ({} → {}); the compressed variant is unchanged. A smaller learning rate may help.",
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
        fine_tuned: Some(format!(
            "fine-tuned for {} epochs ({steps} steps) on {} images ({which}) and their flipped copies, toward the original's outputs{}{features}, learning rate {learning_rate:e}, on {}: {loss_name} on those images {} → {}, {seconds:.1} s in all",
            epochs,
            used.len(),
            if labelled == 0 {
                " (no labels)".to_string()
            } else {
                format!(
                    " and, for the {labelled} whose folder names a class, that class (half the loss)"
                )
            },
            if webgpu().is_some() {
                "WebGPU"
            } else {
                "the CPU (burn Flex)"
            },
            loss_text(before),
            loss_text(after)
        )),
        used,
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
    let held_out: Vec<&KeptInput> = inputs
        .iter()
        .filter(|k| !variant.used.contains(&k.serial))
        .collect();
    let used = inputs.len() - held_out.len();
    let (mut same, mut labelled) = (
        0,
        LabelledAccuracy {
            images: 0,
            original: 0,
            variant: 0,
        },
    );
    for kept in &held_out {
        crate::cancel::checkpoint().await?;
        let a = argmax(&m.original.run(&kept.input).await?);
        let b = argmax(&variant.runner.run(&kept.input).await?);
        same += usize::from(a == b);
        if let Some(truth) = m.truth(kept.folder.as_deref()) {
            labelled.images += 1;
            labelled.original += usize::from(a == truth);
            labelled.variant += usize::from(b == truth);
        }
    }
    let top1_same = (!held_out.is_empty()).then_some(same);
    let labelled = (labelled.images > 0).then_some(labelled);
    // Up to `runs` interleaved pairs; on a slow device (an emulated GPU) the timing stops
    // after 3 pairs once it has taken 5 s, and the report says how many ran.
    let runs = runs.clamp(1, 100);
    let mut times = (Vec::new(), Vec::new());
    if let Some(input) = inputs.last().map(|k| &k.input) {
        let started = now();
        for done in 0..runs {
            if done >= 3 && now() - started > TIMING_BUDGET_MS {
                break;
            }
            crate::cancel::checkpoint().await?;
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
    let fed: Vec<Dim> = match inputs.last().map(|k| &k.input) {
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
            activation_bits: l
                .activation
                .map(|a| if a.qmax - a.qmin <= 15 { 4 } else { 8 }),
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
        labelled,
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
