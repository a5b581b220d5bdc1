//! Fashion-MNIST on the page: the before/after accuracy report (per class, confusion
//! matrix, per layer) and the accuracy sweeps with their charts.

use compresslab_spec::report::{CLASS_NAMES, Evaluation, SweepAxis, SweepPoint};
use compresslab_spec::stats::{LayerKind, LayerStats};
use leptos::prelude::*;

use crate::app::{cancel_long_job, send_sweep};
use crate::lab_panel::{
    CompareRow, CompareTable, LayerDetail, LayerTable, SqnrChart, mb, ratio, recipe_summary,
    size_rows, speed_change,
};
use compresslab_spec::messages::{ChangedPrediction, FashionReport};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SweepState {
    /// (current case, done, total) while running.
    pub running: Option<(String, u32, u32)>,
    pub points: Vec<SweepPoint>,
    pub error: Option<String>,
}

fn pct(v: f64) -> String {
    format!("{:.2} %", 100.0 * v)
}

#[component]
pub fn FashionReportView(report: FashionReport, keep_fp32: RwSignal<Vec<String>>) -> impl IntoView {
    let r = report;
    let (b, a) = (&r.before, &r.after);
    let delta = 100.0 * (a.eval.accuracy() - b.eval.accuracy());
    let mut rows: Vec<CompareRow> = vec![
        (
            "accuracy",
            "Test accuracy (10 000 images)",
            pct(b.eval.accuracy()),
            pct(a.eval.accuracy()),
            format!("{delta:+.2} pt"),
        ),
        (
            "agreement",
            "Same prediction as the original",
            "—".into(),
            format!("{} / {}", r.same_prediction, a.eval.images),
            pct(r.same_prediction as f64 / a.eval.images.max(1) as f64),
        ),
        (
            "macs",
            "MACs per image (non-zero)",
            format!("{:.2} M", b.stats.nonzero_macs as f64 / 1e6),
            format!("{:.2} M", a.stats.nonzero_macs as f64 / 1e6),
            ratio(b.stats.nonzero_macs as f64, a.stats.nonzero_macs as f64),
        ),
        (
            "latency",
            "Evaluation time per image (batches of 100)",
            format!("{:.3} ms · {}", b.ms_per_image, workers_text(b.workers)),
            format!("{:.3} ms · {}", a.ms_per_image, workers_text(a.workers)),
            speed_change(b.ms_per_image, a.ms_per_image),
        ),
    ];
    rows.splice(2..2, size_rows(&b.stats, &a.stats));
    let layers: Vec<LayerStats> = r.layers.clone();
    let selected = RwSignal::new(
        layers
            .iter()
            .position(|l| l.kind == LayerKind::Dense)
            .unwrap_or(0),
    );
    let show_after = RwSignal::new(true);
    let (eval_before, eval_after) = (b.eval.clone(), a.eval.clone());
    view! {
        <div class="report" id="fashion-report">
            <p class="recipe" id="lab-recipe">
                {format!("{} — {} — CPU, {} of 5 layers on the int8 kernel — built in {:.0} ms",
                    crate::lab_panel::source_text(&r.source),
                    recipe_summary(&r.recipe), r.integer_layers, r.build_ms)}
            </p>
            <CompareTable rows=rows/>
            <h3>"Per class"</h3>
            <table class="layers" id="class-accuracy">
                <thead><tr><th>"Class"</th><th>"Original"</th><th>"Compressed"</th><th>"Change"</th></tr></thead>
                <tbody>
                    {b.eval.class_accuracy().into_iter().zip(a.eval.class_accuracy()).enumerate().map(|(c, (x, y))| view! {
                        <tr data-class=c.to_string()>
                            <td>{CLASS_NAMES[c]}</td><td>{pct(x)}</td><td>{pct(y)}</td>
                            <td class:worse={y < x}>{format!("{:+.1} pt", 100.0 * (y - x))}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
            <h3>"Predictions that changed"</h3>
            <ChangedGallery changed=r.changed.clone() total=a.eval.images - r.same_prediction/>
            <h3>"Confusion matrix"</h3>
            <div class="matrix-toggle">
                <label><input type="radio" name="confusion-side" prop:checked=move || !show_after.get() on:change=move |_| show_after.set(false)/>" original"</label>
                <label><input type="radio" name="confusion-side" id="confusion-after" prop:checked=move || show_after.get() on:change=move |_| show_after.set(true)/>" compressed"</label>
            </div>
            {move || {
                let e = if show_after.get() { eval_after.clone() } else { eval_before.clone() };
                view! { <ConfusionMatrix eval=e/> }
            }}
            <h3>"Per layer"</h3>
            <SqnrChart layers=layers.clone() selected=selected/>
            <LayerDetail layers=layers.clone() selected=selected/>
            <LayerTable layers=layers selected=selected keep_fp32=keep_fp32/>
        </div>
    }
}

/// Test images whose prediction compression changed, with the true label and both
/// predictions.
#[component]
fn ChangedGallery(changed: Vec<ChangedPrediction>, total: usize) -> impl IntoView {
    if changed.is_empty() {
        return view! { <p class="hint" id="changed">"Compression changed no prediction on the test set."</p> }.into_any();
    }
    let shown = changed.len();
    view! {
        <div class="changed" id="changed">
            {changed.into_iter().map(|c| {
                let name = |k: u8| CLASS_NAMES[k as usize % CLASS_NAMES.len()];
                let verdict = match (c.before == c.label, c.after == c.label) {
                    (true, false) => "broken",
                    (false, true) => "fixed",
                    _ => "other",
                };
                view! {
                    <figure class=format!("changed-item {verdict}") data-index=c.index.to_string()>
                        <img src=grey_bmp_url(&c.pixels) width="56" height="56" alt=name(c.label)/>
                        <figcaption>
                            <span class="truth">{name(c.label)}</span>
                            <span>{format!("{} → {}", name(c.before), name(c.after))}</span>
                        </figcaption>
                    </figure>
                }
            }).collect_view()}
            <p class="hint">{format!("{shown} of the {total} test images whose prediction changed (red: was right, now wrong; green: was wrong, now right).")}</p>
        </div>
    }
    .into_any()
}

/// A 28×28 8-bit grey image as a BMP data URL (no canvas needed).
pub(crate) fn grey_bmp_url(pixels: &[u8]) -> String {
    let side = 28u32;
    let palette = 256 * 4;
    let offset = 14 + 40 + palette;
    let size = offset + pixels.len() as u32;
    let mut b = Vec::with_capacity(size as usize);
    b.extend_from_slice(b"BM");
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&side.to_le_bytes());
    b.extend_from_slice(&side.to_le_bytes()); // positive height: rows bottom-up
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&8u16.to_le_bytes());
    b.extend_from_slice(&[0; 24]); // no compression, default sizes and palette counts
    for v in 0..=255u8 {
        // Fashion-MNIST is white-on-black; show it dark-on-light like a catalogue photo.
        let g = 255 - v;
        b.extend_from_slice(&[g, g, g, 0]);
    }
    for row in pixels.chunks(side as usize).rev() {
        b.extend_from_slice(row); // 28 bytes: already a multiple of 4
    }
    bmp_data_url(&b)
}

/// A `data:` URL of a BMP file, base64-encoded by the browser's own `btoa`.
pub(crate) fn bmp_data_url(bmp: &[u8]) -> String {
    // `btoa` takes a "binary string": one UTF-16 code unit per byte, which U+0000–U+00FF are.
    let binary: String = bmp.iter().map(|&b| char::from(b)).collect();
    let encoded = web_sys::window()
        .and_then(|w| w.btoa(&binary).ok())
        .unwrap_or_default();
    format!("data:image/bmp;base64,{encoded}")
}

/// Rows: true class; columns: predicted class; shade by the share of the row.
#[component]
fn ConfusionMatrix(eval: Evaluation) -> impl IntoView {
    view! {
        <table class="confusion" id="confusion">
            <thead><tr><th>"true ↓ / predicted →"</th>
                {CLASS_NAMES.iter().map(|n| view! { <th class="rot" title=*n>{n.split('/').next().unwrap_or(n).to_string()}</th> }).collect_view()}
            </tr></thead>
            <tbody>
                {eval.confusion.iter().enumerate().map(|(t, row)| {
                    let total = row.iter().sum::<u32>().max(1) as f64;
                    view! {
                        <tr>
                            <th>{CLASS_NAMES[t]}</th>
                            {row.iter().enumerate().map(|(p, &n)| {
                                let share = n as f64 / total;
                                let colour = if p == t { "34, 139, 84" } else { "200, 50, 50" };
                                let alpha = if n == 0 { 0.0 } else { 0.08 + 0.92 * share.sqrt() };
                                view! {
                                    <td class:diag={p == t} style=format!("background: rgba({colour}, {alpha:.2})")
                                        title=format!("{} predicted as {}: {n}", CLASS_NAMES[t], CLASS_NAMES[p])>{n}</td>
                                }
                            }).collect_view()}
                        </tr>
                    }
                }).collect_view()}
            </tbody>
        </table>
    }
}

/// Accuracy vs sparsity / channel ratio (lines) and vs quantization (bars).
#[component]
pub fn SweepPanel(sweep: RwSignal<SweepState>, can_run: Signal<bool>) -> impl IntoView {
    let images = RwSignal::new(2000u32);
    let running = move || sweep.get().running.is_some();
    view! {
        <section class="lab" id="sweeps">
            <h2>"Accuracy sweeps"</h2>
            <p class="hint">
                "One setting at a time, each point measured on labelled test images: unstructured sparsity (per-layer magnitude), "
                "structured channel pruning (L2), and weight quantization (int8 / int4 × per-tensor / per-channel / per-block 32, symmetric; "
                "and int8 weights + activations). No fine-tuning: this is what compression alone costs."
            </p>
            <div class="lab-actions">
                <label>"on the first "
                    <select id="sweep-images" prop:value=move || images.get().to_string()
                        on:change=move |e| images.set(event_target_value(&e).parse().unwrap_or(2000))>
                        <option value="500">"500"</option>
                        <option value="2000">"2 000"</option>
                        <option value="10000">"10 000"</option>
                    </select>
                    " test images"
                </label>
                <button id="sweep-run" class="primary" disabled=move || running() || !can_run.get()
                    on:click=move |_| send_sweep(images.get_untracked())>"Run sweeps"</button>
            </div>
            <div id="sweep-state" data-state=move || {
                let s = sweep.get();
                if s.running.is_some() { "running" } else if s.error.is_some() { "failed" } else if s.points.is_empty() { "idle" } else { "done" }
            }>
                {move || sweep.get().running.map(|(stage, done, total)| view! {
                    <div class="lab-progress"><div class="lab-progress-fill" style=format!("width:{:.0}%", 100.0 * done as f64 / total.max(1) as f64)></div></div>
                    <p class="hint">{format!("{done}/{total}: {stage}")} " "
                        <button id="sweep-cancel" class="cancel small" on:click=move |_| cancel_long_job()>"Cancel"</button></p>
                })}
                {move || sweep.get().error.map(|e| view! { <p class="error">{e}</p> })}
            </div>
            {move || {
                let points = sweep.get().points;
                (!points.is_empty()).then(|| view! {
                    <div class="sweep-charts">
                        <PruningChart points=points.clone() metric="Accuracy" id="sweep-pruning"/>
                        <QuantChart points=points.clone() metric="Accuracy" id="sweep-quant"/>
                    </div>
                    <SweepTable points=points/>
                })
            }}
        </section>
    }
}

const CHART_W: f64 = 420.0;
const CHART_H: f64 = 240.0;
const PAD: f64 = 36.0;

/// The accuracy axis spans from the lowest point (at most 10 % = chance) to 100 %.
fn y_range(points: &[SweepPoint]) -> (f64, f64) {
    let lo = points
        .iter()
        .map(|p| p.accuracy)
        .fold(1.0f64, f64::min)
        .min(0.8);
    ((lo * 10.0).floor() / 10.0, 1.0)
}

/// Horizontal grid lines and labels at five accuracies from `y0` to `y1`.
fn accuracy_ticks(y0: f64, y1: f64, y: impl Fn(f64) -> f64) -> impl IntoView {
    (0..=4)
        .map(|i| {
            let a = y0 + (y1 - y0) * i as f64 / 4.0;
            view! {
                <line class="tick" x1=PAD.to_string() x2=(CHART_W - 8.0).to_string() y1=format!("{:.1}", y(a)) y2=format!("{:.1}", y(a))/>
                <text class="axis" x="2" y=format!("{:.1}", y(a) + 4.0)>{format!("{:.0}%", 100.0 * a)}</text>
            }
        })
        .collect_view()
}

/// Sweep points of both pruning axes as lines; `metric` names what `accuracy` holds.
#[component]
pub fn PruningChart(
    points: Vec<SweepPoint>,
    metric: &'static str,
    id: &'static str,
) -> impl IntoView {
    let (y0, y1) = y_range(&points);
    let x = |v: f64| PAD + v / 100.0 * (CHART_W - PAD - 8.0);
    let y = move |a: f64| CHART_H - PAD - (a - y0) / (y1 - y0) * (CHART_H - PAD - 8.0);
    let series = [
        (
            SweepAxis::Sparsity,
            "sparsity",
            "unstructured (zero weights)",
        ),
        (SweepAxis::Channels, "channels", "channels removed"),
    ];
    let lines = series
        .iter()
        .map(|&(axis, class, _)| {
            let pts: Vec<(f64, f64, String)> = points
                .iter()
                .filter(|p| p.axis == axis)
                .map(|p| {
                    let title = format!("{}: {:.2} %", p.label, 100.0 * p.accuracy);
                    (x(p.x as f64), y(p.accuracy), title)
                })
                .collect();
            let path = pts
                .iter()
                .map(|(a, b, _)| format!("{a:.1},{b:.1}"))
                .collect::<Vec<_>>()
                .join(" ");
            view! {
                <polyline class=format!("series {class}") points=path/>
                {pts.into_iter().map(|(a, b, title)| view! {
                    <circle class=format!("dot {class}") cx=format!("{a:.1}") cy=format!("{b:.1}") r="3"><title>{title}</title></circle>
                }).collect_view()}
            }
        })
        .collect_view();
    let ticks = accuracy_ticks(y0, y1, y);
    let xticks = [0, 25, 50, 75, 95]
        .into_iter()
        .map(|v| view! { <text class="axis" x=format!("{:.1}", x(v as f64) - 8.0) y=(CHART_H - PAD + 16.0).to_string()>{format!("{v}%")}</text> })
        .collect_view();
    view! {
        <figure class="chart sweep">
            <svg id=id viewBox=format!("0 0 {CHART_W} {CHART_H}") role="img">
                {ticks}{xticks}{lines}
            </svg>
            <figcaption>
                {metric} " vs pruning: "
                <span class="key sparsity">"■ unstructured (zero weights)"</span>" "
                <span class="key channels">"■ channels removed"</span>
            </figcaption>
        </figure>
    }
}

/// The quantization points as bars; `metric` names what `accuracy` holds.
#[component]
pub fn QuantChart(
    points: Vec<SweepPoint>,
    metric: &'static str,
    id: &'static str,
) -> impl IntoView {
    let quant: Vec<SweepPoint> = points
        .into_iter()
        .filter(|p| p.axis == SweepAxis::Quantization)
        .collect();
    let (y0, y1) = y_range(&quant);
    let n = quant.len().max(1) as f64;
    let slot = (CHART_W - PAD - 8.0) / n;
    let y = move |a: f64| CHART_H - PAD - (a - y0) / (y1 - y0) * (CHART_H - PAD - 8.0);
    let bars = quant
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let x0 = PAD + i as f64 * slot + 2.0;
            let top = y(p.accuracy);
            let class = if p.label.starts_with("int4") { "qbar int4" } else { "qbar int8" };
            view! {
                <rect class=class x=format!("{x0:.1}") y=format!("{top:.1}") width=format!("{:.1}", slot - 4.0) height=format!("{:.1}", (CHART_H - PAD - top).max(0.0))>
                    <title>{format!("{}: {:.2} %", p.label, 100.0 * p.accuracy)}</title>
                </rect>
                <text class="axis small" x=format!("{:.1}", x0) y=(CHART_H - PAD + 12.0).to_string()>{p.label.replace("per-", "").replace("int", "i")}</text>
            }
        })
        .collect_view();
    let ticks = accuracy_ticks(y0, y1, y);
    view! {
        <figure class="chart sweep">
            <svg id=id viewBox=format!("0 0 {CHART_W} {CHART_H}") role="img">
                {ticks}{bars}
            </svg>
            <figcaption>{metric} " vs weight bits × granularity (blue: int8, orange: int4)"</figcaption>
        </figure>
    }
}

#[component]
fn SweepTable(points: Vec<SweepPoint>) -> impl IntoView {
    view! {
        <table class="layers" id="sweep-table">
            <thead><tr><th>"Setting"</th><th>"Accuracy"</th><th>"Images"</th><th>"Weights"</th><th>"Non-zero MACs"</th></tr></thead>
            <tbody>
                {points.into_iter().map(|p| view! {
                    <tr data-axis=format!("{:?}", p.axis)>
                        <td>{p.label.clone()}</td><td>{pct(p.accuracy)}</td><td>{p.images}</td>
                        <td>{mb(p.weight_bytes)}</td><td>{format!("{:.2} M", p.macs as f64 / 1e6)}</td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
    }
}

/// "1 worker" / "2 workers": how many shared an evaluation.
fn workers_text(workers: u32) -> String {
    match workers {
        1 => "1 worker".into(),
        n => format!("{n} workers"),
    }
}
