//! The distillation panel (Fashion-MNIST tab): images in (folders, files, drops or the
//! site's training sample), settings, live progress with a loss curve, and the
//! before/after panel of the deployed networks.

use compresslab_spec::report::{CLASS_NAMES, TrainLayers};
use js_sys::{Array, Reflect};
use leptos::ev;
use leptos::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};

use crate::app::{send_distil, set_parsed};
use crate::fashion_panel::grey_bmp_url;
use crate::lab_panel::{LabState, mb, recipe_summary};
use compresslab_spec::messages::{
    DistilAction, DistilData, DistilEpoch, DistilReport, DistilSettings, DistilSide, DistilStep,
    DistilTarget, ToWorker,
};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct DistilState {
    /// (files decoded, files) while the worker reads dropped images.
    pub loading: Option<(u32, u32)>,
    pub data: Option<DistilData>,
    pub running: bool,
    pub paused: bool,
    pub backend: Option<String>,
    pub total_steps: u32,
    pub step: Option<DistilStep>,
    /// Work outside the training steps (fitting a head, measuring), while it runs.
    pub stage: Option<String>,
    /// (step, batch loss) for the curve.
    pub losses: Vec<(u32, f64)>,
    pub epochs: Vec<DistilEpoch>,
    pub report: Option<DistilReport>,
    /// Why the last run or load stopped (an error, or a cancel).
    pub message: Option<String>,
}

#[wasm_bindgen(inline_js = r#"
export function collectDropped(dataTransfer, maxImages) {
  // Entries must be taken while the drop event is live; the walk can be async.
  const entries = [...(dataTransfer.items || [])]
    .filter(i => i.kind === 'file')
    .map(i => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
  const loose = entries.every(e => !e) ? [...(dataTransfer.files || [])] : [];
  const isImage = name => /\.(png|jpe?g|webp|gif|bmp|avif)$/i.test(name);
  // The walk stops at the cap (and at as many other files again), so a huge folder is not
  // listed in full before anything happens.
  const out = [];
  let images = 0;
  let stopped = false;
  const full = () => images >= maxImages || out.length >= 2 * maxImages;
  async function walk(entry, prefix) {
    if (!entry || stopped) return;
    if (entry.isFile) {
      if (full()) { stopped = true; return; }
      const file = await new Promise((res, rej) => entry.file(res, rej));
      out.push([prefix + entry.name, file]);
      if (isImage(entry.name)) images += 1;
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length || stopped) break;
        for (const e of batch) await walk(e, prefix + entry.name + '/');
      }
    }
  }
  return (async () => {
    for (const e of entries) await walk(e, '');
    for (const f of loose) out.push([f.name, f]);
    return [out, stopped];
  })();
}
"#)]
extern "C" {
    /// `[[[path, File], …], stopped]` for what was dropped, folders walked recursively
    /// until `max_images` images (`stopped`: the walk ended there).
    #[wasm_bindgen(js_name = collectDropped)]
    fn collect_dropped(data_transfer: &web_sys::DataTransfer, max_images: u32) -> js_sys::Promise;
}

/// `(paths with their files, stopped)` for what was dropped: folders walked recursively
/// until `max_images` images (`stopped`: the walk ended there). Err: the browser could not
/// read the folder. Call it in the drop handler itself: the entries are taken then, while
/// the drop event is live.
pub(crate) fn dropped_files(
    data_transfer: &web_sys::DataTransfer,
    max_images: u32,
) -> impl std::future::Future<Output = Result<(Vec<(String, JsValue)>, bool), JsValue>> + use<> {
    let promise = collect_dropped(data_transfer, max_images);
    async move { listed(JsFuture::from(promise).await?) }
}

fn listed(result: JsValue) -> Result<(Vec<(String, JsValue)>, bool), JsValue> {
    let result = Array::from(&result);
    let stopped = result.get(1).is_truthy();
    let files = Array::from(&result.get(0))
        .iter()
        .filter_map(|pair| {
            let pair: Array = pair.dyn_into().ok()?;
            Some((pair.get(0).as_string()?, pair.get(1)))
        })
        .collect();
    Ok((files, stopped))
}

pub(crate) fn is_image_name(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

/// Sends `(path, file)` pairs that look like images to the worker, at most as many as a
/// run keeps (`stopped`: a dropped folder's walk already ended at that cap).
fn send_files(
    files: Vec<(String, JsValue)>,
    stopped: bool,
    state: RwSignal<DistilState>,
    target: DistilTarget,
) {
    let total = files.len();
    let mut files: Vec<(String, JsValue)> = files
        .into_iter()
        .filter(|(path, _)| is_image_name(path))
        .collect();
    if files.is_empty() {
        state.update(|s| {
            s.message =
                Some("No image files (PNG, JPEG, WebP, GIF, BMP, AVIF) in that selection.".into())
        });
        return;
    }
    let skipped = total - files.len();
    let cap = target.max_images();
    let images = files.len();
    files.truncate(cap);
    let blobs = Array::new();
    let mut paths = Vec::with_capacity(files.len());
    for (path, file) in files {
        paths.push(path);
        blobs.push(&file);
    }
    let mut notes = Vec::new();
    if skipped > 0 {
        notes.push(format!(
            "{skipped} {} not an image by its name, left out.",
            if skipped == 1 { "file is" } else { "files are" }
        ));
    }
    if let Some(note) = capped_note(images, cap, "the most a run keeps", total, stopped) {
        notes.push(note);
    }
    state.update(|s| {
        s.loading = Some((0, paths.len() as u32));
        s.message = (!notes.is_empty()).then(|| notes.join(" "));
    });
    send_distil(ToWorker::DistilImages { paths, target }, Some(blobs));
}

/// What the page says when a selection was cut short: at `cap` images (`why`: what the cap
/// is, e.g. "the most a run keeps"), or, when a folder walk stopped among many other files
/// before reaching the cap, after `listed` files.
pub(crate) fn capped_note(
    images: usize,
    cap: usize,
    why: &str,
    listed: usize,
    stopped: bool,
) -> Option<String> {
    if images > cap || (stopped && images >= cap) {
        Some(format!(
            "Stopped reading at {cap} images, {why}; the rest of the selection is left out."
        ))
    } else if stopped {
        Some(format!(
            "Stopped reading the folder after {listed} files ({images} of them images): it holds mostly other files; the rest is left out."
        ))
    } else {
        None
    }
}

/// A file input's files, each with its path inside a picked folder (else its name).
pub(crate) fn files_of_input(input: &web_sys::HtmlInputElement) -> Vec<(String, JsValue)> {
    let Some(list) = input.files() else {
        return Vec::new();
    };
    (0..list.length())
        .filter_map(|i| list.get(i))
        .map(|f| {
            let relative = Reflect::get(&f, &"webkitRelativePath".into())
                .ok()
                .and_then(|v| v.as_string())
                .filter(|p| !p.is_empty());
            (relative.unwrap_or_else(|| f.name()), JsValue::from(f))
        })
        .collect()
}

fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

/// Images per second: whole numbers when fast, two decimals when slow (224² on a
/// software GPU runs well under one per second).
fn rate(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

fn pct(v: f64) -> String {
    format!("{:.1} %", 100.0 * v)
}

/// The layer choices of each network: (value, text).
fn layer_choices(target: DistilTarget) -> &'static [(&'static str, &'static str)] {
    match target {
        DistilTarget::Fashion => &[
            ("all", "all"),
            ("blocks:1", "last conv block and the classifier"),
            ("classifier", "classifier (fc1, fc2)"),
            ("last", "last layer (fc2)"),
        ],
        DistilTarget::Photos => &[
            ("all", "all"),
            ("blocks:8", "last 8 MBConv blocks and the head"),
            ("blocks:4", "last 4 MBConv blocks and the head"),
            ("blocks:2", "last 2 MBConv blocks and the head"),
            ("classifier", "head (last 1×1 conv + classifier)"),
            ("last", "classifier (fc) only"),
        ],
    }
}

/// Block numbers from "5, 10 15" (anything that is not a number separates them).
fn parse_blocks(text: &str) -> Vec<u8> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn parse_layers(value: &str) -> TrainLayers {
    match value {
        "classifier" => TrainLayers::Classifier,
        "last" => TrainLayers::LastLayer,
        v => match v.strip_prefix("blocks:").and_then(|n| n.parse().ok()) {
            Some(n) => TrainLayers::LastBlocks(n),
            None => TrainLayers::All,
        },
    }
}

#[component]
pub fn DistilPanel(
    distil: RwSignal<DistilState>,
    lab: RwSignal<LabState>,
    can_run: Signal<bool>,
    target: DistilTarget,
) -> impl IntoView {
    let photos = target == DistilTarget::Photos;
    let defaults = DistilSettings::for_target(target);
    let temperature = RwSignal::new(defaults.temperature);
    let alpha = RwSignal::new(defaults.alpha);
    let learning_rate = RwSignal::new(defaults.learning_rate);
    let epochs = RwSignal::new(defaults.epochs);
    let batch_size = RwSignal::new(defaults.batch_size);
    let layers = RwSignal::new("all".to_string());
    let qat = RwSignal::new(true);
    let feature_blocks = RwSignal::new(String::new());
    let feature_weight = RwSignal::new(defaults.feature_weight);
    let dragging = RwSignal::new(false);

    let recipe = move || match (lab.get(), target) {
        (LabState::FashionDone(r), DistilTarget::Fashion) => Some(r.recipe.clone()),
        (LabState::Done(r), DistilTarget::Photos) => Some(r.recipe.clone()),
        _ => None,
    };
    let running = move || distil.get().running;
    let can_start =
        move || can_run.get() && !running() && recipe().is_some() && distil.get().data.is_some();
    let start = move |_| {
        let Some(recipe) = recipe() else {
            return;
        };
        let settings = DistilSettings {
            temperature: temperature.get_untracked(),
            alpha: alpha.get_untracked(),
            learning_rate: learning_rate.get_untracked(),
            epochs: epochs.get_untracked().max(1),
            batch_size: batch_size.get_untracked().max(1),
            layers: parse_layers(&layers.get_untracked()),
            qat: qat.get_untracked(),
            feature_blocks: if photos {
                parse_blocks(&feature_blocks.get_untracked())
            } else {
                Vec::new()
            },
            feature_weight: feature_weight.get_untracked(),
        };
        distil.update(|s| {
            s.running = true;
            s.paused = false;
            s.message = None;
            s.report = None;
            s.losses.clear();
            s.epochs.clear();
            s.step = None;
            s.stage = None;
        });
        send_distil(
            ToWorker::Distil {
                recipe,
                settings,
                target,
            },
            None,
        );
    };
    let on_pick = move |e: ev::Event| {
        let input: web_sys::HtmlInputElement = event_target(&e);
        send_files(files_of_input(&input), false, distil, target);
        input.set_value("");
    };
    let on_drop = move |e: ev::DragEvent| {
        e.prevent_default();
        // The page's own drop handler classifies photos; this zone takes training images.
        e.stop_propagation();
        dragging.set(false);
        let Some(dt) = e.data_transfer() else {
            return;
        };
        let cap = u32::try_from(target.max_images()).unwrap_or(u32::MAX);
        let dropped = dropped_files(&dt, cap);
        spawn_local(async move {
            match dropped.await {
                Ok((files, stopped)) => send_files(files, stopped, distil, target),
                Err(_) => distil.update(|s| {
                    s.message = Some("The browser could not read the dropped folder.".into())
                }),
            }
        });
    };

    let intro = if photos {
        "The original EfficientNet-Lite0 is the teacher, the compressed one (the recipe applied above) the student. Folder names that are ImageNet classes "
    } else {
        "The original network is the teacher, the compressed one (the recipe applied above) the student. The student learns the teacher's "
    };
    let intro_rest = if photos {
        "(espresso, tabby, golden retriever…) train the 1000-way head; other folder names become your own classes: a new head is first fitted on the original's features, and the student, with its own copy, learns from that teacher. Without folders the teacher's outputs are the only target. The student keeps its compression (removed channels stay removed, pruned weights zero, quantized layers train with fake quantization), in the model worker, on WebGPU when the page uses it; your photos never leave the browser. 20 % of each class is held out to measure the result; training crops are random resized 224² crops and mirror images."
    } else {
        "softened outputs, and the labels when your folders name Fashion-MNIST classes, while keeping its compression: removed channels stay removed, pruned weights stay zero, quantized layers train with fake quantization. It runs in the model worker, on WebGPU when the page uses it; your images never leave the browser. 20 % of each class is held out to measure the result."
    };
    let builtin_text = if photos {
        "Use the site's sample photos (unlabelled)"
    } else {
        "Use 1 000 Fashion-MNIST training images"
    };
    let drop_text = if photos {
        "Drop photos or folders here (folder names = labels: ImageNet classes, or your own classes; at most 1 000 photos)"
    } else {
        "Drop images or folders here (folder names = labels: T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot)"
    };
    let title = if photos {
        "Fine-tune the compressed photo model by distillation"
    } else {
        "Fine-tune the compressed network by distillation"
    };
    let layer_options = layer_choices(target)
        .iter()
        .map(|(value, text)| view! { <option value=*value selected=*value == "all">{*text}</option> })
        .collect_view();

    view! {
        <section class="distil" id="distil" data-target=if photos { "photos" } else { "fashion" }>
            <h2>{title}</h2>
            <p class="hint">{intro}{intro_rest}</p>
            <div class="distil-inputs">
                <label class="picker">"Choose a folder…"
                    <input id="distil-folder" type="file" prop:webkitdirectory=true multiple on:change=on_pick/>
                </label>
                <label class="picker">"Choose images…"
                    <input id="distil-files" type="file" accept="image/*" multiple on:change=on_pick/>
                </label>
                <button id="distil-builtin" prop:disabled=move || !can_run.get() || running()
                    on:click=move |_| {
                        distil.update(|s| { s.loading = Some((0, 1)); s.message = None; });
                        send_distil(ToWorker::DistilBuiltin { target }, None);
                    }>{builtin_text}</button>
                <div id="distil-drop" class="dropzone" class:over=move || dragging.get()
                    on:dragover=move |e: ev::DragEvent| { e.prevent_default(); e.stop_propagation(); dragging.set(true); }
                    on:dragleave=move |_| dragging.set(false)
                    on:drop=on_drop>
                    {drop_text}
                </div>
            </div>
            {move || distil.get().loading.map(|(done, total)| view! {
                <p class="distil-loading">{format!("Reading images… {done}/{total}")}</p>
            })}
            {move || distil.get().data.map(|d| view! { <DataSummary data=d/> })}
            <fieldset class="distil-settings" id="distil-settings" prop:disabled=running>
                <label>"Temperature T " <input id="distil-t" type="number" min="0.5" max="20" step="0.5"
                    prop:value=move || temperature.get().to_string() on:change=set_parsed(temperature)/></label>
                <label>"α (teacher weight) " <input id="distil-alpha" type="number" min="0" max="1" step="0.1"
                    prop:value=move || alpha.get().to_string() on:change=set_parsed(alpha)/></label>
                <label>"Learning rate " <input id="distil-lr" type="number" min="0.00001" max="0.1" step="0.0005"
                    prop:value=move || learning_rate.get().to_string() on:change=set_parsed(learning_rate)/></label>
                <label>"Epochs " <input id="distil-epochs" type="number" min="1" max=DistilSettings::MAX_EPOCHS.to_string()
                    prop:value=move || epochs.get().to_string() on:change=set_parsed(epochs)/></label>
                <label>"Batch " <input id="distil-batch" type="number" min="1" max=target.max_batch().to_string()
                    prop:value=move || batch_size.get().to_string() on:change=set_parsed(batch_size)/></label>
                <label>"Layers that learn "
                    <select id="distil-layers" on:change=move |e| layers.set(event_target_value(&e))>
                        {layer_options}
                    </select>
                </label>
                {photos.then(|| view! {
                    <FeatureMatching id="distil-features" at=feature_blocks weight=feature_weight
                        label="Match features at blocks " placeholder="e.g. 5, 10, 15"
                        title="Mean squared error between the student's and the teacher's outputs of these MBConv blocks (0–15), added to the loss. With channel pruning, which narrows every block's output, the teacher's channels the student kept are compared"/>
                })}
                <label><input id="distil-qat" type="checkbox" prop:checked=move || qat.get()
                    prop:disabled=move || recipe().is_none_or(|r| r.weights.is_none())
                    on:change=move |e| qat.set(event_target_checked(&e))/>
                    " quantization-aware (fake-quantized weights, straight-through gradients; when the recipe quantizes weights)"</label>
            </fieldset>
            <div class="distil-actions">
                <button id="distil-start" class="primary" prop:disabled=move || !can_start() on:click=start>"Fine-tune"</button>
                <button id="distil-pause" prop:disabled=move || !running() || distil.get().step.is_none()
                    on:click=move |_| {
                        let action = if distil.get_untracked().paused { DistilAction::Resume } else { DistilAction::Pause };
                        send_distil(ToWorker::DistilControl { action }, None);
                    }>{move || if distil.get().paused { "Resume" } else { "Pause" }}</button>
                <button id="distil-cancel" prop:disabled=move || !running()
                    on:click=move |_| send_distil(ToWorker::DistilControl { action: DistilAction::Cancel }, None)>"Cancel"</button>
                <span class="hint">{move || match recipe() {
                    Some(r) => format!("Student: {}", recipe_summary(&r)),
                    None => "Apply a compression in the lab above first: that network is the student.".into(),
                }}</span>
            </div>
            {move || distil.get().message.map(|m| view! { <p class="notice" id="distil-message">{m}</p> })}
            <Progress distil=distil/>
            <Show when=move || !distil.get().losses.is_empty() || !distil.get().epochs.is_empty()>
                <LossChart distil=distil/>
            </Show>
            {move || distil.get().report.map(|r| view! { <DistilResult report=r/> })}
            {photos.then(|| view! {
                <p class="hint">"With ImageNet classes (or none) the fine-tuned network becomes the lab's variant above: its full report, per-layer effects and Export. With your own classes it is measured here; it answers in your classes, not ImageNet's."</p>
            })}
        </section>
    }
}

#[component]
fn DataSummary(data: DistilData) -> impl IntoView {
    // Photo data names its classes (none when label-free); Fashion-MNIST's are fixed.
    let photos = !data.label_mode.is_empty();
    let mut names: Vec<String> = if photos {
        data.class_names.clone()
    } else {
        CLASS_NAMES.iter().map(|s| s.to_string()).collect()
    };
    names.push("unlabelled".into());
    let rows = names
        .into_iter()
        .enumerate()
        .filter(|(i, _)| {
            data.train_counts.get(*i).copied().unwrap_or(0)
                + data.heldout_counts.get(*i).copied().unwrap_or(0)
                > 0
        })
        .map(|(i, name)| {
            view! {
                <tr><th>{name}</th><td class="train">{data.train_counts[i]}</td><td class="heldout">{data.heldout_counts[i]}</td></tr>
            }
        })
        .collect_view();
    let unmatched = (!data.unmatched.is_empty()).then(|| {
        view! {
            <p class="hint" id="distil-unmatched">{format!(
                "Folders that are not Fashion-MNIST classes (their images train label-free, on the teacher's outputs alone): {}",
                data.unmatched.join(", ")
            )}</p>
        }
    });
    let mode = (!data.label_mode.is_empty()).then(|| {
        view! { <p class="hint" id="distil-mode">{format!("Labels: {}.", data.label_mode)}</p> }
    });
    let heldout: u32 = data.heldout_counts.iter().sum();
    let small = (heldout < 20).then(|| {
        view! {
            <p class="hint" id="distil-small">{format!(
                "Only {heldout} held-out {}: the before/after numbers move in steps of {:.0} %, so read them as a rough check; more images per folder make them firm.",
                if heldout == 1 { "image" } else { "images" },
                100.0 / f64::from(heldout.max(1))
            )}</p>
        }
    });
    let rejected = (data.rejected_count > 0).then(|| {
        let files = if data.rejected_count == 1 { "file" } else { "files" };
        view! {
            <p class="notice" id="distil-rejected">{format!("{} {files} skipped: {}", data.rejected_count, data.rejected.join("; "))}</p>
        }
    });
    let preview = data
        .preview
        .iter()
        .map(|(label, pixels)| {
            let title = CLASS_NAMES
                .get(usize::from(*label))
                .copied()
                .unwrap_or("unlabelled");
            view! { <img class="thumb" src=grey_bmp_url(pixels) title=title alt=title/> }
        })
        .collect_view();
    let thumbs = data
        .thumbs
        .iter()
        .map(|(label, side, rgb)| {
            let src = rgb_bmp_url(rgb, *side as usize);
            view! { <img class="thumb photo" src=src title=label.clone() alt=label.clone()/> }
        })
        .collect_view();
    view! {
        <div class="distil-data" id="distil-data">
            <p><strong>{data.source.clone()}</strong>" · as the network sees them:"</p>
            <div class="distil-preview">{preview}{thumbs}</div>
            {mode}
            <table class="distil-counts" id="distil-counts">
                <thead><tr><th>"class"</th><th>"training"</th><th>"held out"</th></tr></thead>
                <tbody>{rows}</tbody>
            </table>
            {small}
            {unmatched}
            {rejected}
        </div>
    }
}

/// A `data:` URL of a square 24-bit BMP from `side`² RGB bytes.
fn rgb_bmp_url(rgb: &[u8], side: usize) -> String {
    let row = (side * 3).div_ceil(4) * 4;
    let offset = 14 + 40;
    let size = (offset + row * side) as u32;
    let mut b = Vec::with_capacity(size as usize);
    b.extend_from_slice(b"BM");
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&(side as u32).to_le_bytes());
    b.extend_from_slice(&(side as u32).to_le_bytes()); // positive height: rows bottom-up
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0; 24]);
    for line in rgb.chunks(side * 3).rev() {
        for px in line.chunks(3) {
            b.extend_from_slice(&[px[2], px[1], px[0]]); // BMP stores BGR
        }
        b.resize(b.len() + row - side * 3, 0);
    }
    crate::fashion_panel::bmp_data_url(&b)
}

#[component]
fn Progress(distil: RwSignal<DistilState>) -> impl IntoView {
    view! {
        {move || {
            let s = distil.get();
            if !s.running {
                return None;
            }
            let text = match (&s.stage, &s.step) {
                (Some(stage), _) => format!("{stage}…"),
                (None, Some(p)) => format!(
                    "Epoch {}/{} · step {}/{} · loss {:.3} · {} images/s · ETA {}{}",
                    p.epoch, p.epochs, p.step, p.total, p.loss, rate(p.images_per_s), clock(p.eta_s),
                    if s.paused { " · paused" } else { "" }
                ),
                (None, None) => "Preparing the student and measuring it on the held-out images (the first step compiles the training shaders)…".into(),
            };
            let fraction = s.step.as_ref().map_or(0.0, |p| f64::from(p.step) / f64::from(p.total.max(1)));
            Some(view! {
                <div class="distil-progress">
                    <progress id="distil-progress" max="1" value=fraction.to_string()></progress>
                    <span id="distil-status">{text}</span>
                    {s.backend.map(|b| view! { <span class="hint">{format!(" on {b}")}</span> })}
                </div>
            })
        }}
    }
}

const W: f64 = 520.0;
const H: f64 = 220.0;
const PAD: f64 = 40.0;

#[component]
fn LossChart(distil: RwSignal<DistilState>) -> impl IntoView {
    view! {
        {move || {
            let s = distil.get();
            let total = s.total_steps.max(1) as f64;
            let top = s
                .losses
                .iter()
                .map(|l| l.1)
                .chain(s.epochs.iter().map(|e| e.heldout.loss))
                .fold(0.0f64, f64::max)
                .max(1e-3)
                * 1.05;
            let x = move |step: f64| PAD + step / total * (W - PAD - 10.0);
            let y = move |loss: f64| H - PAD - (loss / top).clamp(0.0, 1.0) * (H - PAD - 10.0);
            let train: String = s
                .losses
                .iter()
                .map(|&(step, loss)| format!("{:.1},{:.1}", x(f64::from(step)), y(loss)))
                .collect::<Vec<_>>()
                .join(" ");
            let heldout: Vec<(f64, f64)> = s
                .epochs
                .iter()
                .map(|e| (x(f64::from(e.step)), y(e.heldout.loss)))
                .collect();
            let heldout_path = heldout
                .iter()
                .map(|(a, b)| format!("{a:.1},{b:.1}"))
                .collect::<Vec<_>>()
                .join(" ");
            let ticks = (0..=4)
                .map(|i| {
                    let v = top * f64::from(i) / 4.0;
                    view! {
                        <line class="tick" x1=PAD.to_string() x2=(W - 10.0).to_string() y1=format!("{:.1}", y(v)) y2=format!("{:.1}", y(v))/>
                        <text class="axis" x="2" y=format!("{:.1}", y(v) + 4.0)>{format!("{v:.2}")}</text>
                    }
                })
                .collect_view();
            let accuracy = s.epochs.last().and_then(|e| {
                e.heldout.accuracy.map(|a| format!("held-out accuracy {} (teacher {})", pct(a), e.heldout.teacher_accuracy.map(pct).unwrap_or_default()))
            });
            let train_values = s.losses.iter().map(|l| format!("{:.4}", l.1)).collect::<Vec<_>>().join(",");
            let heldout_values = s.epochs.iter().map(|e| format!("{:.4}", e.heldout.loss)).collect::<Vec<_>>().join(",");
            let agreement = s.epochs.last().map(|e| format!("agreement with the teacher {}", pct(e.heldout.agreement)));
            view! {
                <figure class="chart distil-chart">
                    <svg id="distil-loss" viewBox=format!("0 0 {W} {H}") role="img"
                        data-train=train_values data-heldout=heldout_values>
                        {ticks}
                        <text class="axis" x=(W / 2.0 - 20.0).to_string() y=(H - 8.0).to_string()>"training step"</text>
                        <polyline class="series train" points=train/>
                        <polyline class="series heldout" points=heldout_path/>
                        {heldout.into_iter().map(|(a, b)| view! { <circle class="dot heldout" cx=format!("{a:.1}") cy=format!("{b:.1}") r="3.5"/> }).collect_view()}
                    </svg>
                    <figcaption>
                        <span class="key train">"■ training loss (per batch, augmented)"</span>" "
                        <span class="key heldout">"● held-out loss (per epoch)"</span>
                        <br/>
                        {[accuracy, agreement].into_iter().flatten().collect::<Vec<_>>().join(" · ")}
                    </figcaption>
                </figure>
            }
        }}
    }
}

#[component]
fn DistilResult(report: DistilReport) -> impl IntoView {
    let r = report;
    type Row = (&'static str, &'static str, fn(&DistilSide) -> String);
    let rows: [Row; 6] = [
        ("heldout-accuracy", "Held-out accuracy", |s| {
            s.heldout_accuracy
                .map(pct)
                .unwrap_or_else(|| "– (no labels)".into())
        }),
        (
            "heldout-agreement",
            "Held-out agreement with the teacher",
            |s| pct(s.heldout_agreement),
        ),
        ("test-accuracy", "Test accuracy (10 000 images)", |s| {
            s.test_accuracy
                .map(|v| format!("{:.2} %", 100.0 * v))
                .unwrap_or_default()
        }),
        ("test-agreement", "Test agreement with the teacher", |s| {
            s.test_agreement
                .map(|v| format!("{:.2} %", 100.0 * v))
                .unwrap_or_default()
        }),
        ("latency", "CPU time per image", |s| {
            format!("{:.3} ms", s.ms_per_image)
        }),
        ("size", "Weight bytes", |s| mb(s.stats.weight_bytes)),
    ];
    let photos = r.target == DistilTarget::Photos;
    let body = rows
        .iter()
        .filter(|(key, _, _)| !(photos && key.starts_with("test-")))
        .map(|(key, label, f)| {
            view! {
                <tr data-metric=*key><th>{*label}</th>
                    <td class="teacher">{f(&r.teacher)}</td>
                    <td class="before">{f(&r.before)}</td>
                    <td class="after">{f(&r.after)}</td></tr>
            }
        })
        .collect_view();
    let features = if r.settings.feature_blocks.is_empty() {
        String::new()
    } else {
        format!(
            " · features matched at blocks {} (weight {})",
            r.settings
                .feature_blocks
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            r.settings.feature_weight
        )
    };
    let teacher_title = if r.label_mode.starts_with("your own") {
        "Teacher (original + fitted head)"
    } else {
        "Teacher (original)"
    };
    view! {
        <div class="distil-result" id="distil-result">
            <h3>"Before and after fine-tuning (as deployed: re-quantized, CPU executor)"</h3>
            <table class="compare">
                <thead><tr><th></th><th>{teacher_title}</th><th>"Compressed"</th><th>"Fine-tuned"</th></tr></thead>
                <tbody>{body}</tbody>
            </table>
            <p class="hint" id="distil-label-mode">{format!("Labels: {}.", r.label_mode)}</p>
            <p class="hint">{format!(
                "{} training and {} held-out images · {:.1} s on {} · {} training images/s{}{} · T {} · α {} · lr {} · batch {}",
                r.train_images, r.heldout_images, r.seconds, r.backend, rate(r.images_per_s),
                if r.qat { " · quantization-aware" } else { "" },
                features,
                r.settings.temperature, r.settings.alpha, r.settings.learning_rate, r.settings.batch_size
            )}</p>
        </div>
    }
}

/// Where feature matching applies (a comma-separated list the worker checks) and its weight
/// in the loss. `id` names the list's field (`…-features`); the weight's is `…-feature-weight`.
#[component]
pub(crate) fn FeatureMatching(
    id: &'static str,
    at: RwSignal<String>,
    weight: RwSignal<f64>,
    label: &'static str,
    placeholder: &'static str,
    title: &'static str,
) -> impl IntoView {
    let weight_id = format!("{}-feature-weight", id.trim_end_matches("-features"));
    view! {
        <label title=title>
            {label}
            <input id=id type="text" placeholder=placeholder size="16"
                prop:value=move || at.get() on:change=move |e| at.set(event_target_value(&e))/>
        </label>
        <label>"weight " <input id=weight_id type="number" min="0" max="100" step="0.1"
            prop:value=move || weight.get().to_string() on:change=set_parsed(weight)/></label>
    }
}
