//! The compression lab on the page: controls for every pruning and quantization option,
//! and the before/after panel (size, parameters, MACs, latency, agreement, top-5, and a
//! per-layer table with SQNR and weight histograms drawn over the quantization grid).

use compresslab_spec::recipe::{
    ActivationQuant, ChannelPruning, ChannelRanking, Granularity, MagnitudePruning, Observer,
    PruneScope, QuantScheme, Recipe,
};
use compresslab_spec::stats::{ChannelGrid, Histogram, LayerKind, LayerStats, ModelStats};
use leptos::ev;
use leptos::prelude::*;

use crate::app::{Item, ItemState, Status, cancel_long_job, send_lab};
use crate::fashion_panel::FashionReportView;
use compresslab_spec::messages::{CompressReport, FashionReport, ToWorker};

#[derive(Debug, Clone, PartialEq)]
pub enum LabState {
    Idle,
    Running { stage: String, fraction: f32 },
    Done(Box<CompressReport>),
    FashionDone(Box<FashionReport>),
    Failed(String),
}

/// Which model the page works on.
/// How the variant came to be, for its report's first line.
pub(crate) fn source_text(source: &str) -> String {
    match source {
        "recipe" => "Applied".into(),
        "distilled" => "Fine-tuned by distillation".into(),
        file => format!("Loaded {file}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChoice {
    /// EfficientNet-Lite0 on photos (agreement with the original).
    Photos,
    /// Our Fashion-MNIST network (exact accuracy on 10 000 labelled test images).
    Fashion,
    /// The visitor's own ONNX model (its own panel; the built-in lab is hidden).
    Yours,
}

/// Every control of the lab, as signals.
#[derive(Clone, Copy)]
struct Controls {
    channel_ratio: RwSignal<u32>,
    channel_ranking: RwSignal<String>,
    sparsity: RwSignal<u32>,
    prune_scope: RwSignal<String>,
    prune_exclude_ends: RwSignal<bool>,
    weight_bits: RwSignal<String>,
    granularity: RwSignal<String>,
    block_size: RwSignal<u32>,
    weight_symmetric: RwSignal<bool>,
    activations: RwSignal<bool>,
    observer: RwSignal<String>,
    act_symmetric: RwSignal<bool>,
    keep_fp32: RwSignal<Vec<String>>,
    runs: RwSignal<u32>,
}

impl Controls {
    fn new() -> Self {
        Self {
            channel_ratio: RwSignal::new(0),
            channel_ranking: RwSignal::new("l2".into()),
            sparsity: RwSignal::new(0),
            prune_scope: RwSignal::new("layer".into()),
            prune_exclude_ends: RwSignal::new(true),
            weight_bits: RwSignal::new("8".into()),
            granularity: RwSignal::new("channel".into()),
            block_size: RwSignal::new(32),
            weight_symmetric: RwSignal::new(true),
            activations: RwSignal::new(false),
            observer: RwSignal::new("p99.99".into()),
            act_symmetric: RwSignal::new(false),
            keep_fp32: RwSignal::new(Vec::new()),
            runs: RwSignal::new(5),
        }
    }

    fn recipe(&self) -> Recipe {
        let ratio = self.channel_ratio.get_untracked();
        let sparsity = self.sparsity.get_untracked();
        let bits: Option<u8> = self.weight_bits.get_untracked().parse().ok();
        Recipe {
            channel_pruning: (ratio > 0).then(|| ChannelPruning {
                ratio: ratio as f32 / 100.0,
                ranking: match self.channel_ranking.get_untracked().as_str() {
                    "l1" => ChannelRanking::L1,
                    "gamma" => ChannelRanking::BatchNormGamma,
                    _ => ChannelRanking::L2,
                },
            }),
            magnitude_pruning: (sparsity > 0).then(|| MagnitudePruning {
                sparsity: sparsity as f32 / 100.0,
                scope: match self.prune_scope.get_untracked().as_str() {
                    "global" => PruneScope::Global,
                    _ => PruneScope::PerLayer,
                },
                exclude: Vec::new(),
                exclude_ends: self.prune_exclude_ends.get_untracked(),
            }),
            weights: bits.map(|bits| QuantScheme {
                bits,
                symmetric: self.weight_symmetric.get_untracked(),
                granularity: match self.granularity.get_untracked().as_str() {
                    "tensor" => Granularity::PerTensor,
                    "block" => Granularity::PerBlock(self.block_size.get_untracked() as usize),
                    _ => Granularity::PerChannel,
                },
            }),
            activations: self.activations.get_untracked().then(|| ActivationQuant {
                bits: 8,
                symmetric: self.act_symmetric.get_untracked(),
                observer: match self.observer.get_untracked().as_str() {
                    "minmax" => Observer::MinMax,
                    "p99.9" => Observer::Percentile(99.9),
                    _ => Observer::Percentile(99.99),
                },
            }),
            keep_fp32: self.keep_fp32.get_untracked(),
        }
    }

    /// Shows a recipe (after loading an export) in the controls.
    fn show(&self, r: &Recipe) {
        self.channel_ratio.set(
            r.channel_pruning
                .map_or(0, |c| (c.ratio * 100.0).round() as u32),
        );
        if let Some(c) = r.channel_pruning {
            self.channel_ranking.set(
                match c.ranking {
                    ChannelRanking::L1 => "l1",
                    ChannelRanking::L2 => "l2",
                    ChannelRanking::BatchNormGamma => "gamma",
                }
                .into(),
            );
        }
        self.sparsity.set(
            r.magnitude_pruning
                .as_ref()
                .map_or(0, |m| (m.sparsity * 100.0).round() as u32),
        );
        if let Some(m) = &r.magnitude_pruning {
            self.prune_scope.set(
                match m.scope {
                    PruneScope::Global => "global",
                    PruneScope::PerLayer => "layer",
                }
                .into(),
            );
            // Exports made before `exclude_ends` named the two layers instead.
            self.prune_exclude_ends
                .set(m.exclude_ends || !m.exclude.is_empty());
        }
        self.weight_bits
            .set(r.weights.map_or("none".into(), |w| w.bits.to_string()));
        if let Some(w) = r.weights {
            self.weight_symmetric.set(w.symmetric);
            self.granularity.set(
                match w.granularity {
                    Granularity::PerTensor => "tensor",
                    Granularity::PerChannel => "channel",
                    Granularity::PerBlock(b) => {
                        self.block_size.set(b as u32);
                        "block"
                    }
                }
                .into(),
            );
        }
        self.activations.set(r.activations.is_some());
        self.keep_fp32.set(r.keep_fp32.clone());
    }

    fn preset(&self, name: &str) {
        let c = self;
        c.channel_ratio.set(0);
        c.sparsity.set(0);
        c.activations.set(false);
        c.weight_symmetric.set(true);
        c.keep_fp32.set(Vec::new());
        match name {
            "int8-channel" => {
                c.weight_bits.set("8".into());
                c.granularity.set("channel".into());
                c.activations.set(true);
            }
            "int8-tensor" => {
                c.weight_bits.set("8".into());
                c.granularity.set("tensor".into());
            }
            "int4-block" => {
                c.weight_bits.set("4".into());
                c.granularity.set("block".into());
                c.block_size.set(32);
            }
            _ => {
                c.weight_bits.set("none".into());
                c.channel_ratio.set(50);
            }
        }
    }
}

fn select_value(e: &ev::Event) -> String {
    event_target_value(e)
}

#[component]
pub fn LabPanel(
    status: RwSignal<Status>,
    lab: RwSignal<LabState>,
    items: RwSignal<Vec<Item>>,
    model: RwSignal<ModelChoice>,
) -> impl IntoView {
    let c = Controls::new();
    let fashion = move || model.get() == ModelChoice::Fashion;
    let busy = move || matches!(lab.get(), LabState::Running { .. });
    let ready = move || matches!(status.get(), Status::Ready(_));
    let queue_idle = move || {
        !items
            .get()
            .iter()
            .any(|i| matches!(i.state.get(), ItemState::Queued | ItemState::Running))
    };
    let can_apply = move || ready() && !busy() && queue_idle();
    // A loaded export's recipe is shown in the controls.
    Effect::new(move |_| match lab.get() {
        LabState::Done(r) if r.source != "recipe" => c.show(&r.recipe),
        LabState::FashionDone(r) if r.source != "recipe" => {
            model.set(ModelChoice::Fashion);
            c.show(&r.recipe);
        }
        _ => {}
    });
    let apply = move |_| {
        let choice = model.get_untracked();
        let recipe = c.recipe();
        let msg = match choice {
            ModelChoice::Photos | ModelChoice::Yours => ToWorker::Compress {
                recipe,
                runs: c.runs.get_untracked(),
            },
            ModelChoice::Fashion => ToWorker::FashionCompress { recipe },
        };
        send_lab(msg, None)
    };
    let on_load = move |e: ev::Event| {
        let input: web_sys::HtmlInputElement = event_target(&e);
        if let Some(file) = input.files().and_then(|f| f.get(0)) {
            send_lab(
                ToWorker::LoadCompressed {
                    name: file.name(),
                    runs: c.runs.get_untracked(),
                },
                Some(file.into()),
            );
        }
        input.set_value("");
    };
    let granularity_is_block = move || c.granularity.get() == "block";
    let quantizing = move || c.weight_bits.get() != "none";

    view! {
        <section class="lab" id="lab">
            <h2>"Compression lab"</h2>
            <p class="hint">
                {move || if fashion() {
                    "Prune and quantize the Fashion-MNIST network here, in your browser, then measure its accuracy on all 10 000 labelled test images next to the original's (CPU, int8 kernels where weights and inputs are int8). Activations are calibrated on 1 000 training images."
                } else {
                    "Prune and quantize this model here, in your browser, then compare it with the original: same photo, same backend. Agreement is measured on the sample photos and the photos you classified."
                }}
            </p>
            <div class="presets">
                "Presets: "
                <button class="preset" data-preset="int8-channel" on:click=move |_| c.preset("int8-channel")>"int8 per-channel (weights + activations)"</button>
                <button class="preset" data-preset="int8-tensor" on:click=move |_| c.preset("int8-tensor")>"int8 per-tensor (weights)"</button>
                <button class="preset" data-preset="int4-block" on:click=move |_| c.preset("int4-block")>"int4 per-block 32"</button>
                <button class="preset" data-preset="channels-50" on:click=move |_| c.preset("channels-50")>"50 % channels"</button>
            </div>
            <div class="controls">
                <fieldset>
                    <legend>"Channel pruning (structured)"</legend>
                    <label>"Remove "
                        <input id="channel-ratio" type="range" min="0" max="95" step="5"
                            prop:value=move || c.channel_ratio.get().to_string()
                            on:input=move |e| c.channel_ratio.set(event_target_value(&e).parse().unwrap_or(0))/>
                        <output>{move || format!("{} %", c.channel_ratio.get())}</output>
                        {move || if fashion() {
                            " of each convolution's channels and of fc1's units"
                        } else {
                            " of every group of coupled channels: each block's expanded channels, each residual stream, the stem's and the head's"
                        }}
                    </label>
                    <label>"ranked by "
                        <select id="channel-ranking" prop:value=move || c.channel_ranking.get()
                            on:change=move |e| c.channel_ranking.set(select_value(&e))>
                            <option value="l2">"L2 norm of the filter"</option>
                            <option value="l1">"L1 norm of the filter"</option>
                            <option value="gamma">"BatchNorm |γ|"</option>
                        </select>
                    </label>
                </fieldset>
                <fieldset>
                    <legend>"Magnitude pruning (unstructured)"</legend>
                    <label>"Zero "
                        <input id="sparsity" type="range" min="0" max="95" step="5"
                            prop:value=move || c.sparsity.get().to_string()
                            on:input=move |e| c.sparsity.set(event_target_value(&e).parse().unwrap_or(0))/>
                        <output>{move || format!("{} %", c.sparsity.get())}</output>
                        " of the weights"
                    </label>
                    <label>"threshold "
                        <select id="prune-scope" prop:value=move || c.prune_scope.get()
                            on:change=move |e| c.prune_scope.set(select_value(&e))>
                            <option value="layer">"per layer"</option>
                            <option value="global">"global"</option>
                        </select>
                    </label>
                    <label><input id="prune-exclude" type="checkbox" prop:checked=move || c.prune_exclude_ends.get()
                        on:change=move |e| c.prune_exclude_ends.set(event_target_checked(&e))/>
                        {move || if fashion() { " leave conv1 and the classifier alone" } else { " leave the stem and classifier alone" }}</label>
                </fieldset>
                <fieldset>
                    <legend>"Weight quantization"</legend>
                    <label>
                        <select id="weight-bits" prop:value=move || c.weight_bits.get()
                            on:change=move |e| c.weight_bits.set(select_value(&e))>
                            <option value="none">"fp32 (off)"</option>
                            <option value="8">"int8"</option>
                            <option value="4">"int4"</option>
                        </select>
                    </label>
                    <label>
                        <select id="weight-granularity" prop:value=move || c.granularity.get() disabled=move || !quantizing()
                            on:change=move |e| c.granularity.set(select_value(&e))>
                            <option value="tensor">"per tensor"</option>
                            <option value="channel">"per output channel"</option>
                            <option value="block">"per block"</option>
                        </select>
                    </label>
                    <label class:dim=move || !granularity_is_block()>"block "
                        <select id="block-size" prop:value=move || c.block_size.get().to_string() disabled=move || !granularity_is_block()
                            on:change=move |e| c.block_size.set(event_target_value(&e).parse().unwrap_or(32))>
                            <option value="32">"32"</option>
                            <option value="64">"64"</option>
                            <option value="128">"128"</option>
                        </select>
                    </label>
                    <label><input id="weight-symmetric" type="checkbox" prop:checked=move || c.weight_symmetric.get()
                        on:change=move |e| c.weight_symmetric.set(event_target_checked(&e))/>" symmetric"</label>
                </fieldset>
                <fieldset>
                    <legend>"Activation quantization (static int8)"</legend>
                    <label><input id="act-quant" type="checkbox" prop:checked=move || c.activations.get()
                        on:change=move |e| c.activations.set(event_target_checked(&e))/>
                        {move || if fashion() {
                            " quantize every layer's input, calibrated on 1 000 training images"
                        } else {
                            " quantize every layer's input, calibrated on the evaluation photos"
                        }}</label>
                    <label>"observer "
                        <select id="act-observer" prop:value=move || c.observer.get()
                            on:change=move |e| c.observer.set(select_value(&e))>
                            <option value="p99.99">"percentile 99.99"</option>
                            <option value="p99.9">"percentile 99.9"</option>
                            <option value="minmax">"min–max"</option>
                        </select>
                    </label>
                    <label><input id="act-symmetric" type="checkbox" prop:checked=move || c.act_symmetric.get()
                        on:change=move |e| c.act_symmetric.set(event_target_checked(&e))/>" symmetric"</label>
                </fieldset>
                <p class="hint">
                    {move || {
                        let n = c.keep_fp32.get().len();
                        if n == 0 {
                            "Mixed precision: tick “fp32” on any layer in the table below to leave it unquantized.".to_string()
                        } else {
                            format!("Mixed precision: {n} layer(s) kept in fp32.")
                        }
                    }}
                </p>
            </div>
            <div class="lab-actions">
                <button id="lab-apply" class="primary" disabled=move || !can_apply() on:click=apply>"Apply"</button>
                <label class:hidden=fashion>"timing runs "
                    <input id="lab-runs" type="number" min="1" max="200"
                        prop:value=move || c.runs.get().to_string()
                        on:change=move |e| {
                            if let Ok(n) = event_target_value(&e).parse::<u32>() {
                                c.runs.set(n.clamp(1, 200));
                            }
                        }/>
                </label>
                <button id="lab-export" disabled=move || !matches!(lab.get(), LabState::Done(_) | LabState::FashionDone(_))
                    on:click=move |_| send_lab(ToWorker::Export, None)>"Export (.safetensors + recipe.json)"</button>
                <button id="lab-export-onnx" disabled=move || !matches!(lab.get(), LabState::Done(_) | LabState::FashionDone(_))
                    title="QuantizeLinear/DequantizeLinear for int8, DequantizeLinear with block_size for int4 blocks, pruned channels removed: loads in ONNX Runtime and other runtimes"
                    on:click=move |_| send_lab(ToWorker::ExportOnnx, None)>"Export ONNX"</button>
                <label class="picker small">"Load a compressed model…"
                    <input id="lab-load" type="file" accept=".safetensors" on:change=on_load disabled=move || !can_apply()/>
                </label>
            </div>
            <div id="lab-state" data-state=move || match lab.get() {
                LabState::Idle => "idle",
                LabState::Running { .. } => "running",
                LabState::Done(_) | LabState::FashionDone(_) => "done",
                LabState::Failed(_) => "failed",
            }>
                {move || match lab.get() {
                    LabState::Idle => view! { <p class="hint">"Choose settings and press Apply."</p> }.into_any(),
                    LabState::Running { stage, fraction } => view! {
                        <div class="lab-progress"><div class="lab-progress-fill" style=format!("width:{:.0}%", fraction * 100.0)></div></div>
                        <p class="hint">{stage} " " <button id="lab-cancel" class="cancel small" on:click=move |_| cancel_long_job()>"Cancel"</button></p>
                    }.into_any(),
                    LabState::Failed(message) => view! { <p class="error" id="lab-error">{message}</p> }.into_any(),
                    LabState::Done(report) => view! { <Report report=*report keep_fp32=c.keep_fp32/> }.into_any(),
                    LabState::FashionDone(report) => view! { <FashionReportView report=*report keep_fp32=c.keep_fp32/> }.into_any(),
                }}
            </div>
        </section>
    }
}

pub(crate) fn mb(bytes: usize) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// "1.54× faster" or "1.77× slower": a slower variant never reads "0.56× faster".
pub(crate) fn speed_change(before_ms: f64, after_ms: f64) -> String {
    if before_ms > 0.0 && after_ms > before_ms {
        format!("{} slower", ratio(after_ms, before_ms))
    } else {
        format!("{} faster", ratio(before_ms, after_ms))
    }
}

pub(crate) fn ratio(before: f64, after: f64) -> String {
    if after > 0.0 {
        format!("{:.2}×", before / after)
    } else {
        "–".into()
    }
}

pub(crate) fn recipe_summary(r: &Recipe) -> String {
    let mut parts = Vec::new();
    if let Some(c) = r.channel_pruning {
        parts.push(format!(
            "{:.0} % channels removed ({:?})",
            c.ratio * 100.0,
            c.ranking
        ));
    }
    if let Some(m) = &r.magnitude_pruning {
        parts.push(format!(
            "{:.0} % weights zeroed ({:?})",
            m.sparsity * 100.0,
            m.scope
        ));
    }
    if let Some(w) = r.weights {
        parts.push(format!(
            "int{} {} {} weights",
            w.bits,
            if w.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            match w.granularity {
                Granularity::PerTensor => "per-tensor".to_string(),
                Granularity::PerChannel => "per-channel".to_string(),
                Granularity::PerBlock(b) => format!("per-block({b})"),
            }
        ));
    }
    if let Some(a) = r.activations {
        parts.push(format!("int{} activations ({:?})", a.bits, a.observer));
    }
    if !r.keep_fp32.is_empty() {
        parts.push(format!("{} layer(s) fp32", r.keep_fp32.len()));
    }
    if parts.is_empty() {
        "no compression".into()
    } else {
        parts.join(" · ")
    }
}

#[component]
fn Report(report: CompressReport, keep_fp32: RwSignal<Vec<String>>) -> impl IntoView {
    let r = report;
    let (b, a) = (&r.before, &r.after);
    let top = |p: &[compresslab_spec::report::Prediction]| {
        p.first()
            .map(|p| format!("{} ({:.1} %)", p.label, p.probability * 100.0))
            .unwrap_or_default()
    };
    let mut rows: Vec<CompareRow> = vec![
        (
            "top1",
            "Top-1 on this photo",
            top(&b.top5),
            top(&a.top5),
            String::new(),
        ),
        (
            "p50",
            "Warm latency p50",
            format!("{:.1} ms", b.latency.p50_ms),
            format!("{:.1} ms", a.latency.p50_ms),
            speed_change(b.latency.p50_ms, a.latency.p50_ms),
        ),
        (
            "p95",
            "Warm latency p95",
            format!("{:.1} ms", b.latency.p95_ms),
            format!("{:.1} ms", a.latency.p95_ms),
            speed_change(b.latency.p95_ms, a.latency.p95_ms),
        ),
        (
            "cold",
            "Cold (first) run",
            format!("{:.1} ms", b.latency.cold_ms),
            format!("{:.1} ms", a.latency.cold_ms),
            String::new(),
        ),
    ];
    rows.extend(size_rows(&b.stats, &a.stats));
    rows.extend([
        (
            "held",
            "Weights held while running",
            mb(b.held_bytes),
            mb(a.held_bytes),
            match a.held_bytes.cmp(&b.held_bytes) {
                std::cmp::Ordering::Greater => {
                    format!("{} larger", ratio(a.held_bytes as f64, b.held_bytes as f64))
                }
                std::cmp::Ordering::Equal => "same".into(),
                std::cmp::Ordering::Less => format!(
                    "{} smaller",
                    ratio(b.held_bytes as f64, a.held_bytes as f64)
                ),
            },
        ),
        (
            "macs",
            "MACs per image (dense / non-zero)",
            format!("{:.0} M", b.stats.macs as f64 / 1e6),
            format!(
                "{:.0} M / {:.0} M",
                a.stats.macs as f64 / 1e6,
                a.stats.nonzero_macs as f64 / 1e6
            ),
            ratio(b.stats.macs as f64, a.stats.macs as f64),
        ),
        (
            "agreement",
            "Top-1 agreement with the original",
            "—".into(),
            match (r.eval_images, r.excluded_images) {
                (0, _) => "too few photos to measure (classify photos it did not see)".into(),
                (n, 0) => format!("{}/{n} photos", r.top1_agreement),
                (n, c) => format!(
                    "{}/{n} held-out photos ({c} others {})",
                    r.top1_agreement,
                    match r.source.as_str() {
                        "distilled" => "trained on",
                        "recipe" => "calibrated",
                        // A loaded export: its file lists the photos it saw.
                        _ => "it was calibrated or trained on",
                    }
                ),
            },
            if r.eval_images == 0 {
                "—".into()
            } else {
                format!("mean KL {:.4}", r.mean_kl)
            },
        ),
    ]);
    let warning = r.cross_check.as_ref().and_then(|x| {
        (!x.top1_same || x.kl > 0.01).then(|| {
            format!(
                "Warning: on this photo the variant's WebGPU output disagrees with its CPU output (top-1 same: {}, max |logit| difference {:.3}, KL {:.4}).",
                x.top1_same, x.max_abs_diff, x.kl
            )
        })
    });
    let check = r.cross_check.as_ref().map(|x| {
        format!(
            "WebGPU vs CPU for this variant: top-1 same {}, max |logit| difference {:.2e}.",
            x.top1_same, x.max_abs_diff
        )
    });
    let layers = r.layers.clone();
    let selected = RwSignal::new(
        layers
            .iter()
            .position(|l| l.kind == LayerKind::Depthwise)
            .unwrap_or(0),
    );
    let layers_for_detail = layers.clone();
    view! {
        <div class="report" id="lab-report">
            <p class="recipe" id="lab-recipe">
                {format!("{} — {} — on {} — built in {:.0} ms", source_text(&r.source), recipe_summary(&r.recipe), r.executor, r.build_ms)}
                <br/><span class="kernels" id="lab-kernels">{format!("Ran: {}.", r.kernels)}</span>
            </p>
            {warning.map(|w| view! { <p class="warning" id="lab-warning">{w}</p> })}
            <CompareTable rows=rows/>
            <p class="hint">
                {format!(
                    "Latency on “{}”: {} warm {} of each, taken in turn; cold is each network's first run on this backend. ",
                    r.photo,
                    a.latency.runs,
                    if a.latency.runs == 1 { "run" } else { "runs" }
                )}
                {check}
            </p>
            <div class="top5-pair">
                <Top5 title="Original" preds=b.top5.clone()/>
                <Top5 title="Compressed" preds=a.top5.clone()/>
            </div>
            <h3>"Per layer"</h3>
            <SqnrChart layers=layers.clone() selected=selected/>
            <LayerDetail layers=layers_for_detail selected=selected/>
            <LayerTable layers=layers selected=selected keep_fp32=keep_fp32/>
        </div>
    }
}

/// One row of an original-vs-compressed table: key, label, before, after, change.
pub(crate) type CompareRow = (&'static str, &'static str, String, String, String);

/// Weight bytes and parameters, before and after.
pub(crate) fn size_rows(b: &ModelStats, a: &ModelStats) -> [CompareRow; 2] {
    [
        (
            "size",
            "Weight bytes",
            mb(b.weight_bytes),
            mb(a.weight_bytes),
            format!(
                "{} smaller",
                ratio(b.weight_bytes as f64, a.weight_bytes as f64)
            ),
        ),
        (
            "params",
            "Parameters (non-zero)",
            format!("{} ({})", b.parameters, b.nonzero_parameters),
            format!("{} ({})", a.parameters, a.nonzero_parameters),
            ratio(b.nonzero_parameters as f64, a.nonzero_parameters as f64),
        ),
    ]
}

#[component]
pub(crate) fn CompareTable(rows: Vec<CompareRow>) -> impl IntoView {
    view! {
        <table class="compare" id="lab-compare">
            <thead><tr><th></th><th>"Original"</th><th>"Compressed"</th><th>"Change"</th></tr></thead>
            <tbody>
                {rows.into_iter().map(|(key, label, before, after, change)| view! {
                    <tr data-metric=key><th>{label}</th><td class="before">{before}</td><td class="after">{after}</td><td>{change}</td></tr>
                }).collect_view()}
            </tbody>
        </table>
    }
}

#[component]
fn Top5(title: &'static str, preds: Vec<compresslab_spec::report::Prediction>) -> impl IntoView {
    view! {
        <div class="lab-top5">
            <h4>{title}</h4>
            <ol>
                {preds.into_iter().map(|p| view! {
                    <li>
                        <span class="label">{p.label.clone()}</span>
                        <span class="bar"><span class="fill" style=format!("width:{:.1}%", p.probability * 100.0)></span></span>
                        <span class="pct">{format!("{:.1} %", p.probability * 100.0)}</span>
                    </li>
                }).collect_view()}
            </ol>
        </div>
    }
}

fn short_name(name: &str) -> String {
    name.replace("_blocks.", "b")
        .replace("._", " ")
        .replace('_', "")
}

/// SQNR of every quantized layer as bars; depthwise layers in their own colour.
#[component]
pub(crate) fn SqnrChart(layers: Vec<LayerStats>, selected: RwSignal<usize>) -> impl IntoView {
    let (w, h) = (720.0, 160.0);
    let n = layers.len().max(1) as f64;
    let max_db = layers
        .iter()
        .filter_map(|l| l.sqnr_db.filter(|v| v.is_finite()))
        .fold(10.0f64, f64::max)
        .ceil();
    if layers.iter().all(|l| l.sqnr_db.is_none()) {
        let why = if layers.iter().all(|l| l.bits.is_none()) {
            "No layer is quantized: weight SQNR is not applicable."
        } else {
            // A loaded export holds only the integer weights.
            "Weight SQNR compares quantized weights with the floats they were quantized from, which an export does not hold: not shown."
        };
        return view! { <p class="hint">{why}</p> }.into_any();
    }
    let bars = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let v = l.sqnr_db.unwrap_or(0.0).clamp(0.0, max_db);
            let bh = v / max_db * (h - 20.0);
            let x = i as f64 * w / n;
            let class = match l.kind {
                LayerKind::Depthwise => "sqnr-bar depthwise",
                _ => "sqnr-bar",
            };
            let title = format!(
                "{}: {}",
                l.name,
                l.sqnr_db
                    .map_or("fp32".to_string(), |d| format!("{d:.1} dB"))
            );
            view! {
                <rect class=class x=format!("{x:.1}") y=format!("{:.1}", h - 10.0 - bh) width=format!("{:.1}", w / n - 1.0) height=format!("{bh:.1}")
                    class:selected=move || selected.get() == i
                    on:click=move |_| selected.set(i)>
                    <title>{title}</title>
                </rect>
            }
        })
        .collect_view();
    view! {
        <figure class="chart">
            <svg id="sqnr-chart" viewBox=format!("0 0 {w} {h}") preserveAspectRatio="none" role="img">
                {bars}
                <text x="4" y="12" class="axis">{format!("{max_db:.0} dB")}</text>
            </svg>
            <figcaption>"Weight SQNR per layer (higher is better; orange: depthwise). Click a bar for its histogram."</figcaption>
        </figure>
    }
    .into_any()
}

fn histogram_svg(hist: &Histogram, levels: &[f32], w: f64, h: f64) -> impl IntoView + use<> {
    let peak = hist.counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let n = hist.counts.len().max(1) as f64;
    let span = (hist.max - hist.min).max(f32::MIN_POSITIVE) as f64;
    let bars = hist
        .counts
        .iter()
        .enumerate()
        .map(|(i, &count)| {
            let bh = count as f64 / peak * (h - 4.0);
            view! { <rect class="hist" x=format!("{:.2}", i as f64 * w / n) y=format!("{:.2}", h - bh) width=format!("{:.2}", w / n) height=format!("{bh:.2}")/> }
        })
        .collect_view();
    let grid = levels
        .iter()
        .map(|&l| {
            let x = (l - hist.min) as f64 / span * w;
            view! { <line class="grid" x1=format!("{x:.2}") x2=format!("{x:.2}") y1="0" y2=format!("{h}")/> }
        })
        .collect_view();
    view! {
        <svg viewBox=format!("0 0 {w} {h}") preserveAspectRatio="none" class="histogram">
            {bars}
            {grid}
        </svg>
    }
}

#[component]
pub(crate) fn LayerDetail(layers: Vec<LayerStats>, selected: RwSignal<usize>) -> impl IntoView {
    move || {
        layers.get(selected.get()).cloned().map(|l| {
            view! {
                <WeightHistograms
                    id_prefix=""
                    title=format!("{} ({:?}, shape {:?})", l.name, l.kind, l.shape)
                    weights=l.shape.iter().product()
                    histogram=l.histogram
                    channel=l.narrowest_channel
                    quantized=l.bits.is_some()/>
            }
        })
    }
}

/// One layer's weights: the histogram of all of them, and its narrowest output channel with
/// the quantization levels inside its range (why per-tensor scales starve small channels).
/// `id_prefix` keeps the element ids of two tabs apart.
#[component]
pub(crate) fn WeightHistograms(
    id_prefix: &'static str,
    title: String,
    weights: usize,
    histogram: Histogram,
    channel: Option<ChannelGrid>,
    quantized: bool,
) -> impl IntoView {
    view! {
        <div class="layer-detail" id=format!("{id_prefix}layer-detail")>
            <h4>{title}</h4>
            <div class="hist-pair">
                <figure>
                    {histogram_svg(&histogram, &[], 340.0, 100.0)}
                    <figcaption>{format!("All {weights} weights, {:.3} … {:.3}", histogram.min, histogram.max)}</figcaption>
                </figure>
                {channel.map(|ch| {
                    let levels = ch.levels.len();
                    // More than 32 lines merge into a wash: draw every k-th level.
                    let every = levels.div_ceil(32).max(1);
                    let drawn: Vec<f32> = ch.levels.iter().copied().step_by(every).collect();
                    let caption = match (quantized, every) {
                        (false, _) => format!("Narrowest channel (#{}), not quantized.", ch.channel),
                        (true, 1) => format!("Narrowest channel (#{}): {} quantization levels fall inside its range (red lines).", ch.channel, levels),
                        (true, k) => format!("Narrowest channel (#{}): {} quantization levels fall inside its range (red lines: every {k}th).", ch.channel, levels),
                    };
                    view! {
                        <figure>
                            {histogram_svg(&ch.histogram, &drawn, 340.0, 100.0)}
                            <figcaption id=format!("{id_prefix}narrowest-caption")>{caption}</figcaption>
                        </figure>
                    }
                })}
            </div>
        </div>
    }
}

#[component]
pub(crate) fn LayerTable(
    layers: Vec<LayerStats>,
    selected: RwSignal<usize>,
    keep_fp32: RwSignal<Vec<String>>,
) -> impl IntoView {
    view! {
        <table class="layers" id="lab-layers">
            <thead><tr>
                <th>"Layer"</th><th>"Kind"</th><th>"Shape"</th><th>"Params"</th><th>"Sparsity"</th>
                <th>"Bits"</th><th>"SQNR"</th><th>"MACs"</th><th>"Input scale"</th><th>"fp32"</th>
            </tr></thead>
            <tbody>
                {layers.into_iter().enumerate().map(|(i, l)| {
                    let name = l.name.clone();
                    let name_for_toggle = name.clone();
                    let total: usize = l.shape.iter().product();
                    view! {
                        <tr class:selected=move || selected.get() == i on:click=move |_| selected.set(i) data-layer=name.clone()>
                            <td>{short_name(&name)}</td>
                            <td>{format!("{:?}", l.kind)}</td>
                            <td>{format!("{:?}", l.shape)}</td>
                            <td>{l.parameters}</td>
                            <td>{format!("{:.1} %", 100.0 * l.zeros as f64 / total.max(1) as f64)}</td>
                            <td>{l.bits.map_or("32".to_string(), |b| b.to_string())}</td>
                            <td class="sqnr">{l.sqnr_db.map_or("—".to_string(), |d| if d.is_finite() { format!("{d:.1} dB") } else { "exact".into() })}</td>
                            <td>{format!("{:.1} M", l.macs as f64 / 1e6)}</td>
                            <td>{l.activation.map_or("—".to_string(), |a| format!("{:.4} (zp {})", a.scale, a.zero_point))}</td>
                            <td><input type="checkbox" class="keep-fp32"
                                prop:checked={let n = name_for_toggle.clone(); move || keep_fp32.get().contains(&n)}
                                on:click=|e| e.stop_propagation()
                                on:change=move |e| {
                                    let on = event_target_checked(&e);
                                    keep_fp32.update(|k| {
                                        k.retain(|x| x != &name_for_toggle);
                                        if on { k.push(name_for_toggle.clone()); }
                                    });
                                }/></td>
                        </tr>
                    }
                }).collect_view()}
            </tbody>
        </table>
    }
}
