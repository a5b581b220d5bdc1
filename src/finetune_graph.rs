//! Fine-tuning any compressed graph against the graph it came from, on any burn autodiff
//! device: distillation (the original's softened outputs are the targets), plus
//! cross-entropy on the images that carry a label (folder names, in the model's classes),
//! quantization-aware (weights and activations are rounded to their grids in the forward
//! pass, gradients pass straight through), pruned weights kept at zero. At the end the
//! tuned weights are quantized again on the variant's own grids (scales fixed while training).

use std::collections::{BTreeMap, HashMap, HashSet};

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::compress::Progress;
use crate::distill::{argmax, cosine_lr, distillation_loss, label_tensors, loss_value, read_f32};
use crate::error::{EngineError, Result};
use crate::exec::{CpuExecutor, GraphModel, Tensor as HostTensor};
use crate::fashion::SplitMix;
use crate::graph::{ClassifierHead, CompressedGraph, Dim, Graph, Op, kept_channels, weight_nodes};

/// The settings of a fine-tuning run, bounded so a run stays short in a browser tab.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphFineTuneConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub temperature: f64,
    /// The cross-entropy's share of the loss on labelled images (the distillation keeps the
    /// rest); images without a label learn from the original alone.
    pub label_weight: f64,
    pub seed: u64,
}

impl Default for GraphFineTuneConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 8,
            learning_rate: 1e-4,
            temperature: 2.0,
            label_weight: 0.5,
            seed: 7,
        }
    }
}

pub const MAX_EPOCHS: usize = 50;
pub const MAX_BATCH: usize = 64;

impl GraphFineTuneConfig {
    pub fn validate(&self) -> Result<()> {
        let fine = (1..=MAX_EPOCHS).contains(&self.epochs)
            && (1..=MAX_BATCH).contains(&self.batch_size)
            && self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && self.learning_rate <= 0.1
            && self.temperature.is_finite()
            && (0.5..=20.0).contains(&self.temperature)
            && (0.0..=1.0).contains(&self.label_weight);
        if fine {
            Ok(())
        } else {
            Err(EngineError::Config(format!(
                "fine-tuning takes 1–{MAX_EPOCHS} epochs, batches of 1–{MAX_BATCH}, a learning rate in (0, 0.1], a temperature in [0.5, 20] and a label weight in [0, 1]; got {self:?}"
            )))
        }
    }
}

/// `graph` without the Softmax that computes its first output, if it ends in one: the
/// distillation compares logits (probabilities divided by a temperature are nearly flat,
/// which leaves almost nothing to learn from).
fn without_final_softmax(graph: &Graph) -> (Graph, bool) {
    let mut g = graph.clone();
    let Some(output) = g.outputs.first() else {
        return (g, false);
    };
    let producer = |value: &str| {
        g.nodes
            .iter()
            .find(|n| n.outputs.first().is_some_and(|o| o == value))
    };
    let mut node = producer(&output.name);
    // Exporters often end with an Identity after the Softmax.
    while let Some(n) = node.filter(|n| matches!(n.op, Op::Identity)) {
        node = producer(&n.inputs[0]);
    }
    let Some(logits) = node
        .filter(|n| matches!(n.op, Op::Softmax { .. }))
        .map(|n| n.inputs[0].clone())
    else {
        return (g, false);
    };
    g.outputs[0].name = logits;
    g.prune_unused();
    (g, true)
}

/// Each `[1, C, H, W]` image as it is, mirrored left–right, upside down, and turned 180°.
/// Label-free distillation takes the original's output on each copy as its target, so any
/// image is a valid training input: four times the data from the few images a user gives.
pub fn flipped_copies(images: &[HostTensor]) -> Vec<HostTensor> {
    let mut out = Vec::with_capacity(images.len() * 4);
    for image in images {
        let &[_, _, h, w] = image.dims.as_slice() else {
            out.push(image.clone());
            continue;
        };
        for (flip_rows, flip_cols) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut data = Vec::with_capacity(image.data.len());
            for plane in image.data.chunks(h * w) {
                for y in 0..h {
                    let row = if flip_rows { h - 1 - y } else { y };
                    let row = &plane[row * w..(row + 1) * w];
                    if flip_cols {
                        data.extend(row.iter().rev());
                    } else {
                        data.extend_from_slice(row);
                    }
                }
            }
            out.push(HostTensor {
                dims: image.dims.clone(),
                data,
            });
        }
    }
    out
}

/// Full-batch Adam steps [`fit_linear_classifier`] takes.
const HEAD_STEPS: usize = 300;
const HEAD_LEARNING_RATE: f64 = 5e-3;

/// Errors unless there are two or more classes and a class below `classes` for each of
/// `inputs` images.
pub fn check_head_labels(inputs: usize, labels: &[usize], classes: usize) -> Result<()> {
    if classes < 2 || inputs == 0 || inputs != labels.len() {
        return Err(EngineError::Config(format!(
            "a new head needs two or more classes and a label per image (got {classes} classes, {inputs} images, {} labels)",
            labels.len()
        )));
    }
    match labels.iter().find(|&&y| y >= classes) {
        Some(bad) => Err(EngineError::Config(format!(
            "label {bad} is not one of {classes} classes"
        ))),
        None => Ok(()),
    }
}

/// A linear classifier (softmax regression) for `classes` trained with cross-entropy on
/// `rows` feature vectors (row-major in `features`) and their labels, on `device`
/// (autodiff), from a fixed seed. Returns the weight `[classes, width]` row-major and the
/// bias `[classes]`.
pub async fn fit_linear_classifier(
    features: &[f32],
    rows: usize,
    labels: &[usize],
    classes: usize,
    device: &Device,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_head_labels(rows, labels, classes)?;
    if features.is_empty() || !features.len().is_multiple_of(rows) {
        return Err(EngineError::Config(format!(
            "{} feature values do not split into {rows} rows",
            features.len()
        )));
    }
    let width = features.len() / rows;
    device.seed(11);
    let x = Tensor::<2>::from_data(TensorData::new(features.to_vec(), [rows, width]), device);
    let ys: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(ys, [rows]), device);
    let mut head = LinearConfig::new(width, classes).init(device);
    let mut optim = AdamConfig::new().init();
    for step in 0..HEAD_STEPS {
        let log_p = log_softmax(head.forward(x.clone()), 1);
        let loss: Tensor<1> = log_p
            .gather(1, y.clone().unsqueeze_dim(1))
            .mean()
            .neg()
            .reshape([1]);
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        let lr = cosine_lr(HEAD_LEARNING_RATE, step, HEAD_STEPS);
        head = optim.step(lr, head, grads);
    }
    let head = head.valid();
    // burn's Linear holds `[width, classes]`.
    let weight = read_f32(head.weight.val().transpose()).await?;
    let bias = head
        .bias
        .as_ref()
        .ok_or_else(|| EngineError::Execution("the new head has no bias".into()))?
        .val();
    Ok((weight, read_f32(bias).await?))
}

/// A new head fitted on the user's own classes, and how well it does.
pub struct FittedHead {
    /// The model with its head replaced (class names in its metadata).
    pub graph: Graph,
    /// The node that was replaced.
    pub layer: String,
    /// Training images the new head gets right (of all of them).
    pub training_right: usize,
}

/// `graph` with its classifier head ([`ClassifierHead`]) replaced by one fitted on the
/// features the original computes for `inputs` (each `[1, C, H, W]`, run on the CPU
/// interpreter) and their `labels` in `class_names` (transfer learning: everything before
/// the head stays as it was). `device` is an autodiff device for the fit. `progress` hears
/// before each image's features, and its error stops the work.
pub async fn fit_new_head(
    graph: &Graph,
    inputs: &[HostTensor],
    labels: &[usize],
    class_names: &[String],
    device: &Device,
    progress: Progress<'_>,
) -> Result<FittedHead> {
    check_head_labels(inputs.len(), labels, class_names.len())?;
    let input_dims = &inputs[0].dims;
    let head = ClassifierHead::find(graph, input_dims)?;
    let backbone = CpuExecutor::new(&head.feature_graph(graph))?;
    let mut features = Vec::with_capacity(inputs.len() * head.width);
    for (i, input) in inputs.iter().enumerate() {
        progress("computing features", i as f32 / inputs.len() as f32)?;
        let out = backbone
            .run(input)?
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Execution("no features".into()))?;
        if out.data.len() != head.width {
            return Err(EngineError::Execution(format!(
                "{} features for one image where the head reads {}",
                out.data.len(),
                head.width
            )));
        }
        features.extend(out.data);
    }
    let classes = class_names.len();
    let (weight, bias) =
        fit_linear_classifier(&features, inputs.len(), labels, classes, device).await?;
    let graph = head.replaced(graph, &weight, &bias, class_names, input_dims)?;
    let training_right = features
        .chunks(head.width)
        .zip(labels)
        .filter(|&(f, &y)| {
            let logits: Vec<f32> = (0..classes)
                .map(|k| {
                    bias[k]
                        + weight[k * head.width..(k + 1) * head.width]
                            .iter()
                            .zip(f)
                            .map(|(w, x)| w * x)
                            .sum::<f32>()
                })
                .collect();
            argmax(&logits) == y
        })
        .count();
    Ok(FittedHead {
        graph,
        layer: head.node,
        training_right,
    })
}

/// One step's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GraphStep {
    /// Steps done (from 1) of `total`.
    pub done: usize,
    pub total: usize,
    pub epoch: usize,
    pub loss: f64,
}

/// A fine-tuning run, one step at a time (the caller reports progress and can stop between
/// steps).
pub struct GraphFineTuner {
    cfg: GraphFineTuneConfig,
    device: Device,
    variant: CompressedGraph,
    student: Option<GraphModel>,
    masks: HashMap<String, Tensor<1>>,
    optim: ModuleOptimizer,
    inputs: Vec<HostTensor>,
    /// The original model's first output for each input, `[classes]`.
    targets: Vec<Vec<f32>>,
    /// Each input's class, where it has one.
    labels: Vec<Option<usize>>,
    features: Option<FeatureMatching>,
    order: Vec<usize>,
    rng: SplitMix,
    done: usize,
}

/// The most a feature-matching term may weigh against the distillation loss.
pub const MAX_FEATURE_WEIGHT: f64 = 100.0;

/// Feature matching: the original computes what some layers of the variant read, and the
/// variant learns to read the same (mean squared error).
struct FeatureMatching {
    /// The original, float, on the training device (it does not train).
    teacher: GraphModel,
    /// The values compared, in the original's graph and in the variant's, pairwise.
    teacher_values: Vec<String>,
    student_values: Vec<String>,
    /// Per pair, where channel pruning narrowed the value: the original's channels the
    /// variant kept (compared with the variant's, in order).
    kept: Vec<Option<Vec<usize>>>,
    weight: f64,
}

/// The value the layer with weights named `layer` reads (its first input) in `graph`, and its
/// dims for an input of dims `input`.
fn layer_input(
    graph: &Graph,
    input: &[Dim],
    layer: &str,
    side: &str,
) -> Result<(String, Vec<Dim>)> {
    let node = weight_nodes(graph)
        .into_iter()
        .map(|i| &graph.nodes[i])
        .find(|n| n.name == layer)
        .ok_or_else(|| {
            EngineError::Config(format!(
                "feature matching: the {side} has no layer with weights named `{layer}` (the names are those of the per-layer table)"
            ))
        })?;
    // Before the layer's activation quantizer, if it has one: the features its earlier
    // layers compute, without the rounding, which no training removes.
    let mut value = node.inputs[0].clone();
    if let Some(quantizer) = graph
        .nodes
        .iter()
        .find(|n| n.outputs.first() == Some(&value) && matches!(n.op, Op::QuantizeDequantize(_)))
    {
        value = quantizer.inputs[0].clone();
    }
    let dims = graph
        .shapes(input)?
        .get(&value)
        .cloned()
        .ok_or_else(|| EngineError::Execution(format!("`{value}` has no shape")))?;
    Ok((value, dims))
}

fn dims_text(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims.iter().map(ToString::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// `graph` taking batches of any size where its shapes allow (models are often exported
/// with a fixed batch of one that nothing in them depends on), and whether batches of more
/// than one image fit.
fn batched(graph: &Graph) -> (Graph, bool) {
    let any = graph.clone().with_any_batch();
    let fits = any.input().is_ok_and(|input| {
        let mut dims = input.dims.clone();
        if let Some(batch) = dims.first_mut() {
            *batch = Dim::Known(2);
        }
        any.shapes(&dims).is_ok()
    });
    if fits {
        (any, true)
    } else {
        (graph.clone(), false)
    }
}

impl GraphFineTuner {
    /// `inputs` (each `[1, C, H, W]`, one size) train the `variant` toward `targets`, the
    /// original's outputs on them (for a model that ends in Softmax, its probabilities).
    /// `device` must be an autodiff device.
    pub fn new(
        variant: &CompressedGraph,
        inputs: Vec<HostTensor>,
        targets: Vec<Vec<f32>>,
        cfg: GraphFineTuneConfig,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let Some(first) = inputs.first() else {
            return Err(EngineError::Config("fine-tuning needs images".into()));
        };
        let same_size = inputs.iter().all(|t| t.dims == first.dims);
        if first.dims.len() != 4 || first.dims[0] != 1 || !same_size {
            return Err(EngineError::Config(
                "fine-tuning takes single images of one size (classify them with one input size)"
                    .into(),
            ));
        }
        let classes = targets.first().map_or(0, Vec::len);
        if targets.len() != inputs.len()
            || classes == 0
            || targets.iter().any(|t| t.len() != classes)
        {
            return Err(EngineError::Config(
                "one target of the same length per image".into(),
            ));
        }
        device.seed(cfg.seed);
        let (graph, softmax_removed) = without_final_softmax(&variant.graph);
        let (graph, batches) = batched(&graph);
        let mut cfg = cfg;
        if !batches {
            // A model whose shapes fix a batch of one trains one image per step.
            cfg.batch_size = 1;
        }
        // The original's probabilities as logits: softmax(ln p) = p.
        let targets = if softmax_removed {
            targets
                .into_iter()
                .map(|t| t.into_iter().map(|p| p.max(1e-30).ln()).collect())
                .collect()
        } else {
            targets
        };
        let student = GraphModel::new(&graph, device)?.with_weight_quantization(&variant.weights);
        // Magnitude pruning's zeros stay zeros; channel pruning already removed its channels.
        let masks = match &variant.recipe.magnitude_pruning {
            Some(_) => {
                let names: Vec<String> = variant.layers.iter().map(|l| l.weight.clone()).collect();
                GraphModel::zero_masks(&graph, &names, device)
            }
            None => HashMap::new(),
        };
        let mut rng = SplitMix::new(cfg.seed);
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        rng.shuffle(&mut order);
        Ok(Self {
            device: device.clone(),
            variant: variant.clone(),
            student: Some(student),
            masks,
            optim: AdamConfig::new().init(),
            labels: vec![None; inputs.len()],
            features: None,
            inputs,
            targets,
            order,
            rng,
            done: 0,
            cfg,
        })
    }

    /// Each input's class (`None`: learns from the original alone), in the order of the
    /// inputs: those with a class also learn it by cross-entropy.
    pub fn with_labels(mut self, labels: Vec<Option<usize>>) -> Result<Self> {
        let classes = self.targets[0].len();
        if labels.len() != self.inputs.len() || labels.iter().flatten().any(|&c| c >= classes) {
            return Err(EngineError::Config(format!(
                "one label per image, each below the model's {classes} outputs"
            )));
        }
        self.labels = labels;
        Ok(self)
    }

    /// Also trains what the layers named `layers` read toward what the same layers read in
    /// `original` (mean squared error, averaged over the layers, added to the loss with
    /// `weight`). `original` is the graph the variant was compressed from: where its channel
    /// pruning narrowed a layer's input, the channels it kept are compared.
    pub fn with_feature_matching(
        mut self,
        original: &Graph,
        layers: &[String],
        weight: f64,
    ) -> Result<Self> {
        if layers.is_empty() {
            self.features = None;
            return Ok(self);
        }
        if !(weight.is_finite() && (0.0..=MAX_FEATURE_WEIGHT).contains(&weight)) {
            return Err(EngineError::Config(format!(
                "the feature-matching weight must be in 0–{MAX_FEATURE_WEIGHT}, got {weight}"
            )));
        }
        let student_graph = self.model()?.graph().clone();
        let (teacher_graph, _) = batched(original);
        // The same selection compress_graph made: which of the original's channels stayed.
        let pruned = match &self.variant.recipe.channel_pruning {
            Some(cfg) if cfg.ratio > 0.0 => kept_channels(original, cfg)?,
            _ => HashMap::new(),
        };
        let (mut teacher_values, mut student_values, mut kept) =
            (Vec::new(), Vec::new(), Vec::new());
        // Compared at the size of the training images (the model may leave it open).
        let input: Vec<Dim> = self.inputs[0].dims.iter().map(|&d| Dim::Known(d)).collect();
        for layer in layers {
            let (theirs, their_dims) = layer_input(&teacher_graph, &input, layer, "original")?;
            let (ours, our_dims) = layer_input(&student_graph, &input, layer, "compressed model")?;
            let channels = pruned.get(&theirs);
            let mut expected = their_dims.clone();
            if let (Some(channels), Some(axis)) = (channels, expected.get_mut(1)) {
                *axis = Dim::Known(channels.len());
            }
            if expected != our_dims {
                return Err(EngineError::Config(format!(
                    "feature matching at `{layer}`: its input is {} in the compressed model and {} in the original, which channel pruning does not explain: was the variant compressed from this model?",
                    dims_text(&our_dims),
                    dims_text(&their_dims)
                )));
            }
            kept.push(channels.cloned());
            teacher_values.push(theirs);
            student_values.push(ours);
        }
        let teacher = GraphModel::new(&teacher_graph, &self.device)?.freeze_except(&HashSet::new());
        self.features = Some(FeatureMatching {
            teacher,
            teacher_values,
            student_values,
            kept,
            weight,
        });
        Ok(self)
    }

    fn model(&self) -> Result<&GraphModel> {
        self.student
            .as_ref()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))
    }

    /// How many inputs carry a label.
    pub fn labelled(&self) -> usize {
        self.labels.iter().flatten().count()
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.inputs.len().div_ceil(self.cfg.batch_size)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.cfg.epochs
    }

    pub fn steps_done(&self) -> usize {
        self.done
    }

    pub fn is_done(&self) -> bool {
        self.done >= self.total_steps()
    }

    /// The loss of `model` on the inputs at `batch`: distillation, and cross-entropy on the
    /// labelled ones.
    fn batch_loss(&self, model: &GraphModel, batch: &[usize]) -> Result<Tensor<1>> {
        let dims = &self.inputs[0].dims;
        let (c, h, w) = (dims[1], dims[2], dims[3]);
        let classes = self.targets[0].len();
        let n = batch.len();
        let mut pixels = Vec::with_capacity(n * c * h * w);
        let mut targets = Vec::with_capacity(n * classes);
        for &i in batch {
            pixels.extend_from_slice(&self.inputs[i].data);
            targets.extend_from_slice(&self.targets[i]);
        }
        let x = Tensor::<4>::from_data(TensorData::new(pixels, [n, c, h, w]), &self.device);
        let teacher = Tensor::<2>::from_data(TensorData::new(targets, [n, classes]), &self.device);
        let student_values = self
            .features
            .as_ref()
            .map_or(&[][..], |f| f.student_values.as_slice());
        let (logits, student_features) = model.logits_tapped(x.clone(), student_values)?;
        if logits.dims() != [n, classes] {
            return Err(EngineError::Execution(format!(
                "the variant's output {:?} is not the original's [{n}, {classes}]",
                logits.dims()
            )));
        }
        let labels: Vec<Option<usize>> = batch.iter().map(|&i| self.labels[i]).collect();
        // A batch without labels is distillation alone, at full weight (as without labels).
        let distillation_weight = if labels.iter().any(Option::is_some) {
            1.0 - self.cfg.label_weight
        } else {
            1.0
        };
        let mut loss = distillation_loss(
            logits,
            teacher,
            Some(label_tensors(&labels, &self.device)),
            self.cfg.temperature,
            distillation_weight,
        );
        if let Some(f) = &self.features {
            let (_, teacher_features) = f.teacher.forward_tapped(x, &f.teacher_values)?;
            let weight = f.weight / f.teacher_values.len() as f64;
            for ((s, t), kept) in student_features
                .into_iter()
                .zip(teacher_features)
                .zip(&f.kept)
            {
                let t = match kept {
                    Some(channels) => t.select_channels(channels)?,
                    None => t,
                };
                let mse: Tensor<1> = (s.flat()? - t.flat()?.detach())
                    .powf_scalar(2.0)
                    .mean()
                    .reshape([1]);
                loss = loss + mse.mul_scalar(weight);
            }
        }
        Ok(loss)
    }

    /// The student's mean distillation loss over every training input, as it stands (what
    /// the run is judged by: a batch's loss is noisy).
    pub async fn training_loss(&self) -> Result<f64> {
        let model = self
            .student
            .as_ref()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?;
        let all: Vec<usize> = (0..self.inputs.len()).collect();
        let mut sum = 0.0;
        for batch in all.chunks(self.cfg.batch_size) {
            let loss = self.batch_loss(model, batch)?.detach();
            sum += loss_value(loss, || "evaluation".into()).await? * batch.len() as f64;
        }
        Ok(sum / self.inputs.len() as f64)
    }

    /// One Adam step on the next batch.
    pub async fn step(&mut self) -> Result<GraphStep> {
        if self.is_done() {
            return Err(EngineError::Config("fine-tuning already finished".into()));
        }
        let per_epoch = self.steps_per_epoch();
        let (epoch, step) = (self.done / per_epoch, self.done % per_epoch);
        let bs = self.cfg.batch_size;
        let batch: Vec<usize> =
            self.order[step * bs..((step + 1) * bs).min(self.order.len())].to_vec();
        let model = self
            .student
            .take()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?;
        let loss = self.batch_loss(&model, &batch)?;
        let value = loss_value(loss.clone(), || format!("step {}", self.done + 1)).await?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = cosine_lr(self.cfg.learning_rate, self.done, self.total_steps());
        self.student = Some(self.optim.step(lr, model, grads).mask_zeros(&self.masks));
        self.done += 1;
        if self.done.is_multiple_of(per_epoch) {
            self.rng.shuffle(&mut self.order);
        }
        Ok(GraphStep {
            done: self.done,
            total: self.total_steps(),
            epoch,
            loss: value,
        })
    }

    /// The tuned variant: its float weights quantized again on their grids.
    pub async fn finish(self) -> Result<CompressedGraph> {
        let student = self
            .student
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?;
        let tuned: BTreeMap<_, _> = student.constants().await?;
        self.variant.with_tuned_weights(&tuned)
    }
}
