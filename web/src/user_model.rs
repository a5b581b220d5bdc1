//! "Your model", worker side: an imported ONNX graph on the CPU interpreter, its compressed
//! variant, the inputs of the images classified so far (the first half calibrates, the
//! second half measures agreement), and the ONNX export.

use std::cell::RefCell;

use compresslab::compress::Recipe;
use compresslab::exec::{CpuExecutor, Tensor};
use compresslab::graph::{
    CompressedGraph, Dim, Graph, MAX_MODEL_BYTES, channel_groups, compress_graph, export_onnx,
    import_onnx,
};
use compresslab::preprocess::InputSpec;
use js_sys::Uint8Array;
use wasm_bindgen_futures::JsFuture;
use web_sys::Blob;

use crate::error::{WebError, WebResult};
use crate::lab::percentile;
use crate::messages::{
    FromWorker, UserClassification, UserCompressReport, UserLayer, UserModelInfo, UserSide,
};
use crate::worker::{decode_blob, now, post};

/// Inputs kept for calibration and agreement (the oldest are dropped beyond this).
const MAX_KEPT_INPUTS: usize = 64;

struct UserModel {
    name: String,
    graph: Graph,
    executor: CpuExecutor,
    inputs: Vec<Tensor>,
    variant: Option<(CompressedGraph, CpuExecutor)>,
}

thread_local! {
    static USER: RefCell<Option<UserModel>> = const { RefCell::new(None) };
}

fn dims_text(dims: &[Dim]) -> Vec<String> {
    dims.iter().map(ToString::to_string).collect()
}

async fn blob_bytes(blob: &Blob) -> WebResult<Vec<u8>> {
    let buffer = JsFuture::from(blob.array_buffer())
        .await
        .map_err(|e| WebError::js("read file", e))?;
    Ok(Uint8Array::new(&buffer).to_vec())
}

/// Imports the model file and reports what it is.
pub async fn load(name: String, blob: &Blob) -> WebResult<()> {
    if blob.size() > MAX_MODEL_BYTES as f64 {
        return Err(WebError::Message(format!(
            "{name} is {:.0} MB; models up to {} MB are read",
            blob.size() / 1_048_576.0,
            MAX_MODEL_BYTES >> 20
        )));
    }
    let bytes = blob_bytes(blob).await?;
    let graph = import_onnx(&bytes)?;
    let executor = CpuExecutor::new(&graph)?;
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
        return Err(WebError::Message(format!(
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
        *u.borrow_mut() = Some(UserModel {
            name,
            graph,
            executor,
            inputs: Vec::new(),
            variant: None,
        })
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

fn first_output(executor: &CpuExecutor, input: &Tensor) -> WebResult<Vec<f32>> {
    let out = executor
        .run(input)?
        .into_iter()
        .next()
        .ok_or_else(|| WebError::Message("the model has no output".into()))?;
    Ok(out.data)
}

fn with_model<R>(f: impl FnOnce(&mut UserModel) -> WebResult<R>) -> WebResult<R> {
    USER.with(|u| match u.borrow_mut().as_mut() {
        Some(m) => f(m),
        None => Err(WebError::Message("load an .onnx model first".into())),
    })
}

/// Decodes, prepares and classifies one image with the model (and its variant).
pub async fn classify(id: u32, spec: InputSpec, blob: &Blob) -> WebResult<()> {
    let decoded = decode_blob(blob).await?;
    let data = spec.tensor(&decoded.image)?;
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
    let result = with_model(|m| {
        let start = now();
        let outputs = first_output(&m.executor, &input)?;
        let ms = now() - start;
        let variant = match &m.variant {
            Some((_, executor)) => {
                let start = now();
                let out = first_output(executor, &input)?;
                Some((ranked(&out, 5), now() - start))
            }
            None => None,
        };
        if m.inputs.len() == MAX_KEPT_INPUTS {
            m.inputs.remove(0);
        }
        m.inputs.push(input.clone());
        Ok(UserClassification {
            id,
            top: ranked(&outputs, 5),
            ms,
            variant_top: variant.as_ref().map(|(t, _)| t.clone()),
            variant_ms: variant.map(|(_, ms)| ms),
            seen,
            seen_width: spec.width as u32,
            seen_height: spec.height as u32,
        })
    })?;
    post(&FromWorker::UserModelClassified(result));
    Ok(())
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Applies `recipe`, measures agreement on the images that did not calibrate, and times both
/// models interleaved on the last image.
pub fn compress(recipe: Recipe, runs: u32) -> WebResult<()> {
    let report = with_model(|m| {
        let start = now();
        let n = m.inputs.len();
        let calibrating = recipe.activations.is_some();
        let split = if calibrating { n.div_ceil(2) } else { 0 };
        if calibrating && n < 2 {
            return Err(WebError::Message(
                "activation quantization calibrates on the images you classified: classify at least 2 (half calibrate, half measure)".into(),
            ));
        }
        let (calibration, held_out) = m.inputs.split_at(split);
        m.variant = None;
        let compressed = compress_graph(&m.graph, &recipe, calibration, &mut |_, _| {})?;
        let executor = CpuExecutor::new(&compressed.graph)?;
        let top1_same = if held_out.is_empty() {
            None
        } else {
            let mut same = 0;
            for input in held_out {
                let a = first_output(&m.executor, input)?;
                let b = first_output(&executor, input)?;
                same += usize::from(argmax(&a) == argmax(&b));
            }
            Some(same)
        };
        let build_ms = now() - start;
        let runs = runs.clamp(1, 100);
        let mut times = (Vec::new(), Vec::new());
        if let Some(input) = m.inputs.last() {
            for _ in 0..runs {
                let t = now();
                first_output(&m.executor, input)?;
                times.0.push(now() - t);
                let t = now();
                first_output(&executor, input)?;
                times.1.push(now() - t);
            }
        }
        let p50 = |t: &mut Vec<f64>| {
            t.sort_by(f64::total_cmp);
            if t.is_empty() {
                0.0
            } else {
                percentile(t, 50.0)
            }
        };
        // MACs for one image of the size the model is fed.
        let fed: Vec<Dim> = match m.inputs.last() {
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
            })
            .collect();
        let report = UserCompressReport {
            recipe: recipe.clone(),
            before: UserSide {
                parameters: before.parameters,
                weight_bytes: before.weight_bytes,
                macs: before.macs,
                p50_ms: p50(&mut times.0),
            },
            after: UserSide {
                parameters: after.parameters,
                weight_bytes: after.weight_bytes,
                macs: after.macs,
                p50_ms: p50(&mut times.1),
            },
            runs: if m.inputs.is_empty() { 0 } else { runs },
            calibration_images: calibration.len(),
            held_out: held_out.len(),
            top1_same,
            layers,
            executor: "CPU interpreter: float arithmetic on the dequantized weights, activations rounded to their integer levels (what the exported QDQ model computes); no integer kernel runs for imported models yet".into(),
            build_ms,
        };
        m.variant = Some((compressed, executor));
        Ok(report)
    })?;
    post(&FromWorker::UserModelCompressed(Box::new(report)));
    Ok(())
}

/// The compressed variant (or the original, when nothing was compressed) as ONNX.
pub fn export() -> WebResult<()> {
    let (bytes, recipe, name) = with_model(|m| {
        let stem = m.name.trim_end_matches(".onnx").to_string();
        Ok(match &m.variant {
            Some((c, _)) => {
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
        })
    })?;
    post(&FromWorker::Exported {
        weights: bytes,
        recipe_json: recipe,
        file_name: name,
    });
    Ok(())
}
