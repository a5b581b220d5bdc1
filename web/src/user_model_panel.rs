//! "Your model", page side: drop or pick an `.onnx` file, see what it is, say how images
//! become its input, classify images, compress it with a recipe (agreement measured on
//! images that did not calibrate it), sweep every setting, and download the compressed ONNX.

use compresslab_spec::input::{InputSpec, Normalization, ResizeMode};
use compresslab_spec::labels::{class_for_folder, name_key, parse_class_names};
use compresslab_spec::recipe::{
    ChannelPruning, ChannelRanking, Granularity, MagnitudePruning, Observer, PruneScope,
    QuantScheme, Recipe,
};
use leptos::ev;
use leptos::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::Blob;

use crate::app::{cancel_long_job, draw_rgb, send_user_model, set_parsed};
use crate::distil_panel::{FeatureMatching, capped_note, files_of_input, is_image_name};
use crate::fashion_panel::{PruningChart, QuantChart};
use crate::lab_panel::{WeightHistograms, speed_change};
use compresslab_spec::messages::{
    FromWorker, NewHeadReport, ToWorker, UserClassification, UserCompressReport, UserModelInfo,
};
use compresslab_spec::report::{GraphSweepPoint, SweepPoint};

#[derive(Debug, Clone, PartialEq)]
pub struct UserImage {
    pub id: u32,
    pub name: String,
    /// The folder it came from (its label where the folder names a class).
    pub folder: Option<String>,
    pub result: Option<UserClassification>,
    pub error: Option<String>,
}

/// Where the class names come from when the model names its classes itself (those win over
/// a labels file, here and in the worker).
const FROM_METADATA: &str = "the model's metadata";
/// Where they come from after a new head learnt the folders' classes (also in the model's
/// metadata from then on).
const FROM_NEW_HEAD: &str = "your folders (the new head)";

#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserModelState {
    /// The file being imported.
    pub loading: Option<String>,
    pub info: Option<UserModelInfo>,
    pub labels: Vec<String>,
    pub labels_from: Option<String>,
    pub images: Vec<UserImage>,
    pub next_id: u32,
    /// A compression or export in progress.
    pub busy: Option<String>,
    pub report: Option<UserCompressReport>,
    /// The sweep's points measured so far (the last run's, until the model changes), and
    /// how many settings it has in all.
    pub sweep: Vec<GraphSweepPoint>,
    pub sweep_total: u32,
    /// The head last fitted on the folders' classes (until another model loads).
    pub new_head: Option<NewHeadReport>,
    /// Folder names (as labels match them) of the images the worker classified and keeps
    /// for this model, cleared cards included.
    pub folders: std::collections::BTreeSet<String>,
    pub error: Option<String>,
    /// What a drop or pick left out.
    pub notice: Option<String>,
    /// How the next images are prepared (the form's current settings).
    pub spec: InputSpec,
}

impl UserModelState {
    /// Whether the model itself names its classes (a labels file then does not apply).
    fn named_by_model(&self) -> bool {
        matches!(
            self.labels_from.as_deref(),
            Some(FROM_METADATA | FROM_NEW_HEAD)
        )
    }

    /// Distinct folder names of the images the model has classified (as labels match them).
    fn folder_classes(&self) -> usize {
        self.folders.len()
    }

    fn pending(&self) -> bool {
        self.images
            .iter()
            .any(|i| i.result.is_none() && i.error.is_none())
    }
}

/// Applies a worker message about the user's model to the panel's state.
/// (The worker applies the same rule to the model's own class names when it loads one.)
pub fn on_message(state: RwSignal<UserModelState>, msg: FromWorker) {
    state.update(|s| match msg {
        FromWorker::UserModelLoaded(info) => {
            s.loading = None;
            s.error = None;
            s.report = None;
            s.new_head = None;
            s.folders.clear();
            s.sweep.clear();
            s.images.clear();
            if !info.labels.is_empty() {
                s.labels = info.labels.clone();
                s.labels_from = Some(FROM_METADATA.into());
            } else if s.named_by_model() {
                s.labels.clear();
                s.labels_from = None;
            }
            s.info = Some(*info);
        }
        FromWorker::UserModelClassified(result) => {
            if let Some(image) = s.images.iter_mut().find(|i| i.id == result.id) {
                let key = image.folder.as_deref().map(name_key);
                if let Some(key) = key.filter(|k| !k.is_empty()) {
                    s.folders.insert(key);
                }
                image.result = Some(result);
            }
        }
        FromWorker::UserModelCompressed(report) => {
            s.busy = None;
            s.error = None;
            s.report = Some(*report);
        }
        FromWorker::UserModelTuning { done, total, loss } => {
            s.busy = Some(format!(
                "Fine-tuning: step {done} of {total}, loss {loss:.4}"
            ));
        }
        FromWorker::UserSweepPoint { point, done, total } => {
            s.busy = Some(format!("Sweeping: {done} of {total} settings measured"));
            s.sweep_total = total;
            s.sweep.push(point);
        }
        FromWorker::UserSweepDone => s.busy = None,
        FromWorker::UserModelNewHead { info, report } => {
            s.busy = None;
            s.error = None;
            // The variant and the sweep were of the model with its old classes.
            s.report = None;
            s.sweep.clear();
            s.labels = report.classes.clone();
            s.labels_from = Some(FROM_NEW_HEAD.into());
            // Finished cards name the old classes; the images stay in the worker.
            let cleared = s.images.len();
            s.images.retain(|i| i.result.is_none() && i.error.is_none());
            let cleared = cleared - s.images.len();
            s.notice = (cleared > 0).then(|| format!(
                "The {cleared} earlier result cards were cleared (they named the old classes); the images stay with the model, to calibrate, fine-tune and measure it. Classify more to see the new classes."
            ));
            s.new_head = Some(report);
            s.info = Some(*info);
        }
        FromWorker::Exported { .. } => s.busy = None,
        FromWorker::UserModelFailed {
            id: Some(id),
            message,
        } => {
            if let Some(image) = s.images.iter_mut().find(|i| i.id == id) {
                image.error = Some(message);
            }
        }
        FromWorker::UserModelFailed { id: None, message } => {
            s.loading = None;
            // The worker drops the old variant before compressing a new one: after a failed
            // or cancelled compression there is none to show, export or fine-tune.
            if s.busy
                .as_deref()
                .is_some_and(|b| b.starts_with("Compressing"))
            {
                s.report = None;
            }
            s.busy = None;
            s.error = Some(message);
        }
        _ => {}
    });
}

/// The worker was replaced: whatever it held of the user's model is gone.
pub fn on_worker_lost(state: RwSignal<UserModelState>, message: &str) {
    state.update(|s| {
        if s.info.is_some() || s.loading.is_some() || s.busy.is_some() {
            s.error = Some(format!(
                "the model worker crashed ({message}); load your model again"
            ));
        }
        s.loading = None;
        s.busy = None;
        s.info = None;
        s.report = None;
        s.new_head = None;
        s.folders.clear();
        s.sweep.clear();
        for image in s.images.iter_mut().filter(|i| i.result.is_none()) {
            image.error = Some("the model worker crashed".into());
        }
    });
}

/// The most images one drop or pick classifies (a dropped folder's walk stops there).
pub const MAX_IMAGES_PER_DROP: u32 = 512;

/// Routes dropped or picked files (paths inside a dropped or picked folder, else names):
/// `.onnx` loads a model, `.txt` gives class names, images are classified, each with the
/// folder it came from (its label, where the folder names a class). `stopped`: a folder's
/// walk ended at [`MAX_IMAGES_PER_DROP`].
pub fn take_files(state: RwSignal<UserModelState>, files: Vec<(String, Blob)>, stopped: bool) {
    let spec = state.with_untracked(|s| s.spec);
    let mut images = 0;
    let mut skipped = 0;
    let mut past_cap = 0;
    let listed = files.len();
    for (path, blob) in files {
        let mut parts = path.rsplit('/');
        let name = parts.next().unwrap_or_default().to_string();
        let folder = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".onnx") {
            state.update(|s| {
                s.loading = Some(name.clone());
                s.error = None;
            });
            // A labels file the user gave goes with it (the model's own names win).
            let class_names = state.with_untracked(|s| {
                let from_file = s.labels_from.is_some() && !s.named_by_model();
                if from_file {
                    s.labels.clone()
                } else {
                    Vec::new()
                }
            });
            send_user_model(ToWorker::UserModelLoad { name, class_names }, Some(blob));
        } else if folder.is_none() && (lower.ends_with(".txt") || lower.ends_with(".json")) {
            // (A text file inside a dropped folder is not taken for class names.)
            wasm_bindgen_futures::spawn_local(async move {
                let text = JsFuture::from(blob.text())
                    .await
                    .ok()
                    .and_then(|t| t.as_string());
                let labels = parse_class_names(&text.unwrap_or_default());
                if labels.is_empty() {
                    state.update(|s| {
                        s.error = Some(format!("{name} holds no class names (one per line)"))
                    });
                } else if state.with_untracked(UserModelState::named_by_model) {
                    state.update(|s| {
                        s.notice = Some(format!(
                            "{name} is not used: the model names its classes itself"
                        ))
                    });
                } else {
                    state.update(|s| {
                        s.labels = labels.clone();
                        s.labels_from = Some(name.clone());
                    });
                    // The worker matches folder names against the names the page shows.
                    send_user_model(ToWorker::UserModelClassNames { names: labels }, None);
                }
            });
        } else if folder.is_some() && !is_image_name(&name) {
            // Whatever else a dropped folder holds.
            skipped += 1;
        } else {
            if state.with_untracked(|s| s.info.is_none()) {
                state.update(|s| s.error = Some("load an .onnx model first, then images".into()));
                return;
            }
            if images == MAX_IMAGES_PER_DROP {
                past_cap += 1;
                continue;
            }
            images += 1;
            let mut id = 0;
            state.update(|s| {
                s.next_id += 1;
                id = s.next_id;
                s.images.insert(
                    0,
                    UserImage {
                        id,
                        name: name.clone(),
                        folder: folder.clone(),
                        result: None,
                        error: None,
                    },
                );
            });
            send_user_model(
                ToWorker::UserModelClassify {
                    id,
                    name,
                    spec,
                    folder,
                },
                Some(blob),
            );
        }
    }
    let mut notes = Vec::new();
    if skipped > 0 {
        notes.push(format!(
            "{skipped} {} not an image by its name, left out.",
            if skipped == 1 { "file is" } else { "files are" }
        ));
    }
    let cap = MAX_IMAGES_PER_DROP as usize;
    if let Some(note) = capped_note(
        images as usize + past_cap,
        cap,
        "the most one drop classifies",
        listed,
        stopped,
    ) {
        notes.push(note);
    }
    state.update(|s| s.notice = (!notes.is_empty()).then(|| notes.join(" ")));
}

fn files_of(input: &web_sys::HtmlInputElement) -> Vec<(String, Blob)> {
    files_of_input(input)
        .into_iter()
        .map(|(path, file)| (path, file.unchecked_into::<Blob>()))
        .collect()
}

fn recipe_for(preset: &str) -> Recipe {
    let w8a8 = Recipe::w8a8(Granularity::PerChannel, Observer::MinMax);
    let channels = Some(ChannelPruning {
        ratio: 0.3,
        ranking: ChannelRanking::L1,
    });
    match preset {
        "int4" => Recipe {
            weights: Some(QuantScheme {
                bits: 4,
                symmetric: false,
                granularity: Granularity::PerBlock(32),
            }),
            ..Recipe::default()
        },
        "channels30" => Recipe {
            channel_pruning: channels,
            ..Recipe::default()
        },
        "channels30-w8a8" => Recipe {
            channel_pruning: channels,
            ..w8a8
        },
        "sparse50" => Recipe {
            magnitude_pruning: Some(MagnitudePruning {
                sparsity: 0.5,
                scope: PruneScope::PerLayer,
                exclude: Vec::new(),
                exclude_ends: false,
            }),
            ..Recipe::default()
        },
        _ => w8a8,
    }
}

fn label_of(labels: &[String], class: usize) -> String {
    labels
        .get(class)
        .cloned()
        .unwrap_or_else(|| format!("class {class}"))
}

/// Below this many images a percentage moves in steps of 5 points or more: the page shows
/// counts instead.
const MIN_IMAGES_FOR_PERCENT: usize = 20;

fn megabytes(bytes: usize) -> String {
    format!("{:.2} MB", bytes as f64 / 1_048_576.0)
}

fn macs_text(m: Option<u64>) -> String {
    m.map_or("unknown".into(), |m| format!("{:.1} M", m as f64 / 1e6))
}

#[component]
pub fn UserModelPanel(state: RwSignal<UserModelState>) -> impl IntoView {
    let height = RwSignal::new(224usize);
    let width = RwSignal::new(224usize);
    let resize = RwSignal::new("crop".to_string());
    let normalization = RwSignal::new("imagenet".to_string());
    let bgr = RwSignal::new(false);
    let preset = RwSignal::new("w8a8".to_string());
    // A model with a fixed input size sets the size fields.
    Effect::new(move |_| {
        if let Some((h, w)) = state.with(|s| s.info.as_ref().and_then(|i| i.input_size)) {
            height.set(h);
            width.set(w);
        }
    });
    // The form's settings apply to the images added next (from the picker or a drop).
    Effect::new(move |_| {
        let spec = InputSpec {
            height: height.get(),
            width: width.get(),
            resize: match resize.get().as_str() {
                "pad" => ResizeMode::HeightAndPadRight,
                "stretch" => ResizeMode::Stretch,
                _ => ResizeMode::ShorterSideCentreCrop,
            },
            normalization: match normalization.get().as_str() {
                "unit" => Normalization::MinusOneToOne,
                "zero-one" => Normalization::ZeroToOne,
                "raw" => Normalization::Raw,
                _ => Normalization::ImageNet,
            },
            bgr: bgr.get(),
        };
        state.update_untracked(|s| s.spec = spec);
    });
    let on_model = move |e: ev::Event| {
        let input: web_sys::HtmlInputElement = event_target(&e);
        take_files(state, files_of(&input), false);
        input.set_value("");
    };
    let on_images = on_model;
    let on_labels = on_model;
    let compress = move |_| {
        state.update(|s| {
            s.busy = Some("Compressing".into());
            s.error = None;
        });
        send_user_model(
            ToWorker::UserModelCompress {
                recipe: recipe_for(&preset.get_untracked()),
                runs: 5,
            },
            None,
        );
    };
    let epochs = RwSignal::new(5usize);
    let learning_rate = RwSignal::new("1e-4".to_string());
    let feature_layers = RwSignal::new(String::new());
    let feature_weight = RwSignal::new(1.0f64);
    let fine_tune = move |_| {
        state.update(|s| {
            s.busy = Some("Fine-tuning: preparing".into());
            s.error = None;
        });
        send_user_model(
            ToWorker::UserModelFineTune {
                epochs: epochs.get_untracked() as u32,
                learning_rate: learning_rate.get_untracked().parse().unwrap_or(1e-4),
                feature_layers: feature_layers
                    .get_untracked()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                feature_weight: feature_weight.get_untracked(),
            },
            None,
        );
    };
    let stop = move |_| send_user_model(ToWorker::UserModelStopTuning, None);
    let tuning = move || {
        state.with(|s| {
            s.busy
                .as_deref()
                .is_some_and(|b| b.starts_with("Fine-tuning"))
        })
    };
    let has_variant = move || state.with(|s| s.report.is_some());
    let export = move |_| {
        state.update(|s| s.busy = Some("Exporting".into()));
        send_user_model(ToWorker::UserModelExport, None);
    };
    let sweep = move |_| {
        state.update(|s| {
            s.busy = Some("Sweeping".into());
            s.error = None;
            s.sweep.clear();
        });
        send_user_model(ToWorker::UserModelSweep, None);
    };
    let new_head = move |_| {
        state.update(|s| {
            s.busy = Some("Teaching your classes".into());
            s.error = None;
        });
        send_user_model(ToWorker::UserModelNewHead, None);
    };
    let folders = move || state.with(UserModelState::folder_classes);
    let loaded = move || state.with(|s| s.info.is_some());
    let idle = move || state.with(|s| s.busy.is_none() && s.loading.is_none() && !s.pending());

    view! {
        <section class="user-model" id="user-model">
            <p class="intro">
                "Bring your own CNN as an .onnx file (drop it anywhere on this tab or pick it). It is imported in your browser, "
                "run on WebGPU (or our CPU interpreter), compressed with the lab's recipes, fine-tuned, and exported as ONNX (QDQ int8, int4 blocks) that ONNX Runtime and other runtimes load. "
                "Nothing leaves your machine."
            </p>
            <div class="user-inputs">
                <label class="picker">"Choose a model (.onnx)…"
                    <input id="user-model-input" type="file" accept=".onnx" on:change=on_model/>
                </label>
                <label class="picker">"Class names (.txt)…"
                    <input id="user-labels-input" type="file" accept=".txt,.json" on:change=on_labels/>
                </label>
            </div>
            {move || state.with(|s| s.loading.clone()).map(|name| view! { <p class="status loading" id="user-loading">"Importing " {name} "…"</p> })}
            {move || state.with(|s| s.error.clone()).map(|e| view! { <p class="notice error" id="user-error">{e}</p> })}
            {move || state.with(|s| s.info.clone()).map(|info| view! { <ModelSummary info=info/> })}
            {move || state.with(|s| s.labels_from.clone().map(|from| (from, s.labels.len()))).map(|(from, n)| view! {
                <p class="labels-source" id="user-labels">{format!("{n} class names from {from}")}</p>
            })}
            <Show when=loaded>
                <fieldset class="preprocessing" id="user-preprocessing">
                    <legend>"How images become the model's input"</legend>
                    <label>"Height " <input id="user-height" type="number" min="1" max="4096" prop:value=move || height.get().to_string() on:change=set_parsed(height)/></label>
                    <label>"Width " <input id="user-width" type="number" min="1" max="4096" prop:value=move || width.get().to_string() on:change=set_parsed(width)/></label>
                    <label>"Resize "
                        <select id="user-resize" on:change=move |e| resize.set(event_target_value(&e)) prop:value=move || resize.get()>
                            <option value="crop">"shorter side, centre crop (ImageNet style)"</option>
                            <option value="pad">"to the height, pad right (text lines)"</option>
                            <option value="stretch">"stretch to the size"</option>
                        </select>
                    </label>
                    <label>"Normalise "
                        <select id="user-normalization" on:change=move |e| normalization.set(event_target_value(&e)) prop:value=move || normalization.get()>
                            <option value="imagenet">"ImageNet mean/std on [0, 1]"</option>
                            <option value="unit">"(x − 127.5) / 127.5"</option>
                            <option value="zero-one">"[0, 1]"</option>
                            <option value="raw">"[0, 255]"</option>
                        </select>
                    </label>
                    <label><input id="user-bgr" type="checkbox" prop:checked=move || bgr.get() on:change=move |e| bgr.set(event_target_checked(&e))/>" BGR channel order"</label>
                </fieldset>
                <div class="user-inputs">
                    <label class="picker">"Classify images…"
                        <input id="user-images-input" type="file" accept="image/*" multiple on:change=on_images/>
                    </label>
                    <label class="picker">"Classify a folder…"
                        <input id="user-folder-input" type="file" prop:webkitdirectory=true multiple on:change=on_images/>
                    </label>
                    <span class="hint">{format!(
                        "or drop images or folders on this tab (up to {MAX_IMAGES_PER_DROP} images at a time); the settings above apply to the images you add next. A folder named after one of the model's classes (or its number, \u{201c}3\u{201d} or \u{201c}class 3\u{201d}, when the model has no names) labels its images: accuracy is then measured, and fine-tuning learns those classes."
                    )}</span>
                </div>
                {move || state.with(|s| s.notice.clone()).map(|n| view! { <p class="notice" id="user-notice">{n}</p> })}
                <fieldset class="user-new-head">
                    <legend>"Your own classes"</legend>
                    <button id="user-new-head" on:click=new_head disabled=move || !idle() || folders() < 2>"Learn my folders' classes"</button>
                    <span class="hint">{move || match folders() {
                        0 => "Classify a folder that holds one folder per class (two or more classes).".to_string(),
                        1 => "Your images come from one folder: a head needs two classes or more.".to_string(),
                        n => format!("Your images come from {n} folders: each becomes a class."),
                    }}</span>
                    <p class="hint">"Replaces the model's last layer (transfer learning): a new one is fitted on what the model computes before it, for the first half of each folder's images; the other half measure it. Everything before that layer stays as it was. The model then has your classes: compress, fine-tune (with your folders as labels), sweep and export it as usual; the export names the classes in its metadata."</p>
                    {move || state.with(|s| s.new_head.clone()).map(|r| view! { <NewHead report=r/> })}
                </fieldset>
                <fieldset class="user-compress">
                    <legend>"Compress"</legend>
                    <select id="user-recipe" on:change=move |e| preset.set(event_target_value(&e)) prop:value=move || preset.get()>
                        <option value="w8a8">"int8 weights (per channel) + int8 activations (calibrated)"</option>
                        <option value="int4">"int4 weights, blocks of 32 (weight-only)"</option>
                        <option value="channels30">"30 % of channels removed (dependency groups, L1)"</option>
                        <option value="channels30-w8a8">"30 % channels removed + int8 W8A8"</option>
                        <option value="sparse50">"50 % of weights zeroed (magnitude, per layer)"</option>
                    </select>
                    <button id="user-compress" on:click=compress disabled=move || !idle()>"Compress"</button>
                    <button id="user-export" on:click=export disabled=move || !idle()>"Export ONNX"</button>
                    {move || state.with(|s| s.busy.clone()).map(|b| {
                        // Compression, sweeps and a new head read the page's cancel counter
                        // between layers and images; fine-tuning has its own Stop.
                        let cancellable = ["Compressing", "Sweeping", "Teaching"]
                            .iter()
                            .any(|job| b.starts_with(job));
                        view! {
                            <span class="busy" id="user-busy">{b} "…"</span>
                            {cancellable.then(|| view! {
                                <button id="user-cancel" class="cancel small" on:click=move |_| cancel_long_job()>"Cancel"</button>
                            })}
                        }
                    })}
                    <p class="hint">"Activation calibration uses the first half of the images you classified (and of each class a folder names); agreement and accuracy are measured on the other half."</p>
                </fieldset>
                <fieldset class="user-finetune">
                    <legend>"Fine-tune the compressed model"</legend>
                    <label>"Epochs " <input id="user-epochs" type="number" min="1" max="50" prop:value=move || epochs.get().to_string() on:change=set_parsed(epochs)/></label>
                    <label>"Learning rate "
                        <select id="user-lr" on:change=move |e| learning_rate.set(event_target_value(&e)) prop:value=move || learning_rate.get()>
                            <option value="1e-5">"1e-5 (a light touch)"</option>
                            <option value="1e-4">"1e-4"</option>
                            <option value="1e-3">"1e-3 (for heavy compression)"</option>
                        </select>
                    </label>
                    <FeatureMatching id="user-features" at=feature_layers weight=feature_weight
                        label="Match features at the inputs of " placeholder="layer names from the table"
                        title="Names from the per-layer table, separated by commas: the compressed model also learns to read, at each of these layers, what the original reads there (mean squared error). Where channel pruning narrowed a layer's input, the channels it kept are compared."/>
                    <button id="user-finetune" on:click=fine_tune disabled=move || !idle() || !has_variant()>"Fine-tune"</button>
                    <Show when=tuning>
                        <button id="user-tune-stop" on:click=stop>"Stop"</button>
                    </Show>
                    <p class="hint">"Trains the compressed variant toward the original's outputs through its quantization, and toward their class for images whose folder names one, on the images that calibrated it (or the first half) and their flipped copies (which learn from the original alone); agreement and accuracy are then measured on the rest. Runs on WebGPU when the page does."</p>
                </fieldset>
                <fieldset class="user-sweep">
                    <legend>"Sweep"</legend>
                    <button id="user-sweep" on:click=sweep disabled=move || !idle()>"Sweep every setting"</button>
                    <p class="hint">"Compresses the model with each setting in turn — 0–95 % of weights zeroed (per layer), 0–95 % of channels removed (dependency groups, L2 ranking, where the preset above ranks by L1), int8 / int4 weights per tensor, per channel and per block of 32, and int8 weights + activations — and measures every setting on the same images: those you classified that do not calibrate (the other half calibrates the activations), on the CPU interpreter with its integer kernels. No fine-tuning: what compression alone costs. The variant above stays as it is."</p>
                </fieldset>
                {move || {
                    let (points, total) = state.with(|s| (s.sweep.clone(), s.sweep_total));
                    (!points.is_empty()).then(|| view! { <UserSweep points=points total=total/> })
                }}
                {move || state.with(|s| s.report.clone()).map(|r| view! { <UserReport report=r/> })}
                <Show when=move || state.with(|s| s.images.iter().any(|i| i.result.is_some() || i.error.is_some()))>
                    <button id="user-clear" class="clear" on:click=move |_| state.update(|s| {
                        s.images.retain(|i| i.result.is_none() && i.error.is_none())
                    })>"Clear finished results"</button>
                </Show>
                <section class="results" id="user-results">
                    <For each=move || state.get().images key=|i| (i.id, i.result.is_some(), i.error.is_some()) let:image>
                        <UserCard image=image labels=Signal::derive(move || state.with(|s| s.labels.clone()))/>
                    </For>
                </section>
            </Show>
        </section>
    }
}

/// What the new head learnt, and how well it reads the images that did not train it.
#[component]
fn NewHead(report: NewHeadReport) -> impl IntoView {
    let measured = if report.held_out == 0 {
        "No image was left to measure it on: give each class two images or more.".to_string()
    } else {
        format!(
            "On the {} images that did not train it: {} right{}.",
            report.held_out,
            report.held_out_right,
            if report.held_out >= MIN_IMAGES_FOR_PERCENT {
                format!(
                    " ({:.1} %)",
                    100.0 * report.held_out_right as f64 / report.held_out as f64
                )
            } else {
                String::new()
            }
        )
    };
    let unlabelled = (report.unlabelled > 0).then(|| {
        format!(
            " {} images without a class folder were not used.",
            report.unlabelled
        )
    });
    view! {
        <p class="new-head" id="user-new-head-report">
            {format!(
                "New head in place of `{}`: {} classes ({}), fitted on {} images ({} right) in {:.1} s. ",
                report.layer,
                report.classes.len(),
                report.classes.join(", "),
                report.training,
                report.training_right,
                report.ms / 1e3
            )}
            <strong id="user-new-head-held-out">{measured}</strong>
            {unlabelled}
        </p>
    }
}

/// The sweep's points: agreement with the original on the held-out images as charts (the
/// Fashion-MNIST sweep's, with agreement for accuracy), and a table with their counts and,
/// where folders label images, accuracy.
#[component]
fn UserSweep(points: Vec<GraphSweepPoint>, total: u32) -> impl IntoView {
    let charted: Vec<SweepPoint> = points
        .iter()
        .map(|p| SweepPoint {
            axis: p.axis,
            label: p.label.clone(),
            x: p.x,
            accuracy: p.same as f64 / p.images.max(1) as f64,
            images: p.images,
            weight_bytes: p.weight_bytes,
            macs: p.macs.unwrap_or(0),
        })
        .collect();
    let labelled = points.first().map_or(0, |p| p.labelled);
    let images = points.first().map_or(0, |p| p.images);
    let labels = if labelled > 0 {
        format!(
            "{labelled} labelled by their folders, of which the original gets {} right",
            points.first().map_or(0, |p| p.original_right)
        )
    } else {
        "no folder labels them, so there is no accuracy".into()
    };
    let caption = format!(
        "{} of {total} settings measured on {images} held-out images ({labels}), against the original's top-1.{}",
        points.len(),
        if images < MIN_IMAGES_FOR_PERCENT {
            format!(
                " Too few for charts in percent (each image is {:.0} points): the counts are in the table; with {MIN_IMAGES_FOR_PERCENT} or more images that do not calibrate, the charts appear.",
                100.0 / images.max(1) as f64
            )
        } else {
            String::new()
        }
    );
    view! {
        <section class="user-sweep-result" id="user-sweep-result">
            <p class="hint" id="user-sweep-caption">{caption}</p>
            {(images >= MIN_IMAGES_FOR_PERCENT).then(|| view! {
                <div class="sweep-charts">
                    <PruningChart points=charted.clone() metric="Top-1 same as the original" id="user-sweep-pruning"/>
                    <QuantChart points=charted metric="Top-1 same as the original" id="user-sweep-quant"/>
                </div>
            })}
            <table class="layers" id="user-sweep-table">
                <thead><tr>
                    <th>"Setting"</th><th>"Top-1 same as the original"</th>
                    {(labelled > 0).then(|| view! { <th>"Right (labelled)"</th> })}
                    <th>"Weights"</th><th>"MACs per image (zeros included)"</th>
                </tr></thead>
                <tbody>
                    {points.into_iter().map(|p| view! {
                        <tr data-axis=format!("{:?}", p.axis) data-same=p.same.to_string() data-images=p.images.to_string()>
                            <td>{p.label.clone()}</td>
                            <td>{format!("{}/{}", p.same, p.images)}</td>
                            {(labelled > 0).then(|| view! { <td>{format!("{}/{}", p.right, p.labelled)}</td> })}
                            <td>{megabytes(p.weight_bytes)}</td>
                            <td>{macs_text(p.macs)}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
        </section>
    }
}

#[component]
fn ModelSummary(info: UserModelInfo) -> impl IntoView {
    let ops = info
        .ops
        .iter()
        .map(|(op, n)| format!("{op} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    view! {
        <div class="model-summary" id="user-summary">
            <h3>{info.name.clone()}</h3>
            <p>{format!(
                "{} · producer {} · opset {} · {} nodes · {} parameters · {} · input [{}] → output {}",
                megabytes(info.file_bytes),
                if info.producer.is_empty() { "unknown" } else { &info.producer },
                info.opset,
                info.nodes,
                info.parameters,
                match info.macs {
                    Some(m) => format!("{} MACs per image", macs_text(Some(m))),
                    None => "MACs depend on the image size you choose (the model leaves it open)".into(),
                },
                info.input.join(", "),
                info.outputs.join(", ")
            )}</p>
            <p class="ops" id="user-ops">{ops}</p>
            <p class="groups">{format!(
                "Channel dependency groups: {} prunable, {} fixed (model input/output, grouped convolutions, channel shuffles)",
                info.prunable_groups, info.fixed_groups
            )}</p>
        </div>
    }
}

#[component]
fn UserCard(image: UserImage, labels: Signal<Vec<String>>) -> impl IntoView {
    let canvas = NodeRef::<leptos::html::Canvas>::new();
    let result = image.result.clone();
    let seen = result
        .as_ref()
        .map(|r| (r.seen.clone(), r.seen_width, r.seen_height));
    let (w, h) = seen.as_ref().map_or((1, 1), |s| (s.1, s.2));
    Effect::new(move |_| {
        if let (Some(c), Some((pixels, w, h))) = (canvas.get(), &seen) {
            draw_rgb(&c, pixels, *w, *h);
        }
    });
    let body = match (&result, &image.error) {
        (_, Some(e)) => view! { <p class="error">{e.clone()}</p> }.into_any(),
        (None, None) => view! { <p class="pending">"Classifying…"</p> }.into_any(),
        (Some(r), None) => {
            let r = r.clone();
            view! {
                <ol class="top5">
                    {r.top.iter().map(|&(class, p)| view! {
                        <li class="prediction" data-class=class>
                            <span class="label">{move || label_of(&labels.get(), class)}</span>
                            <span class="bar"><span class="fill" style=format!("width: {:.1}%", p * 100.0)></span></span>
                            <span class="prob">{format!("{:.1}%", p * 100.0)}</span>
                        </li>
                    }).collect_view()}
                </ol>
                <p class="timing">{format!(
                    "{:.1} ms on {}{}",
                    r.ms,
                    r.backend,
                    if r.cold { " (cold: first run, includes shader compilation)" } else { "" }
                )}</p>
                {image.folder.clone().map(|folder| {
                    let top = r.top.first().map(|&(c, _)| c);
                    let classes = r.classes;
                    // With the class names as they stand (a labels file may come later).
                    let folder_class = {
                        let folder = folder.clone();
                        move || class_for_folder(&labels.get(), classes, &folder)
                    };
                    let right = {
                        let folder_class = folder_class.clone();
                        move || folder_class().map(|t| (top == Some(t)).to_string()).unwrap_or_default()
                    };
                    let text = move || match folder_class() {
                        Some(t) => format!(
                            "Folder \u{201c}{folder}\u{201d}: {} {}",
                            label_of(&labels.get(), t),
                            if top == Some(t) { "\u{2713} right" } else { "\u{2717} wrong" }
                        ),
                        None => format!("Folder \u{201c}{folder}\u{201d} names no class of this model: not counted"),
                    };
                    view! {
                        <p class="truth" data-right=right>{text}</p>
                    }
                })}
                {r.variant_top.clone().map(|top| {
                    let (class, p) = top.first().copied().unwrap_or((0, 0.0));
                    view! {
                        <p class="variant" data-class=class>{move || format!(
                            "Compressed: {} ({:.1} %) in {:.1} ms",
                            label_of(&labels.get(), class),
                            p * 100.0,
                            r.variant_ms.unwrap_or(0.0)
                        )}</p>
                    }
                })}
            }
            .into_any()
        }
    };
    view! {
        <article class="card user-card" data-name=image.name.clone()>
            <h4>{image.name.clone()}</h4>
            <canvas node_ref=canvas width=w.to_string() height=h.to_string() class="model-input-canvas"></canvas>
            {body}
        </article>
    }
}

#[component]
fn UserReport(report: UserCompressReport) -> impl IntoView {
    let (b, a) = (&report.before, &report.after);
    // The first quantized layer is shown first: its grid is what the histograms explain.
    let layers = report.layers.clone();
    let selected = RwSignal::new(layers.iter().position(|l| l.bits.is_some()).unwrap_or(0));
    let agreement = match report.top1_same {
        Some(same) => format!(
            "Top-1 unchanged on {same} of {} held-out images ({} calibrated or trained it and are not counted).",
            report.held_out, report.calibration_images
        ),
        None => "Too few images to measure agreement: classify images first (with activation quantization or fine-tuning, at least 2: half calibrate or train, half measure).".into(),
    };
    view! {
        <div class="user-report" id="user-report">
            <table class="before-after">
                <thead><tr><th></th><th>"Original"</th><th>"Compressed"</th></tr></thead>
                <tbody>
                    <tr><th>"Parameters"</th><td>{b.parameters}</td><td id="user-params-after">{a.parameters}</td></tr>
                    <tr><th>"Weight storage"</th><td>{megabytes(b.weight_bytes)}</td><td id="user-bytes-after">{megabytes(a.weight_bytes)}</td></tr>
                    <tr><th>"Weights held while running"</th><td>{megabytes(b.held_bytes)}</td><td id="user-held-after">{megabytes(a.held_bytes)}</td></tr>
                    <tr><th>"MACs per image"</th><td>{macs_text(b.macs)}</td><td>{macs_text(a.macs)}</td></tr>
                    {if report.runs == 0 {
                        view! { <tr><th>"Latency p50"</th><td colspan="2">"classify an image to time both"</td></tr> }.into_any()
                    } else {
                        view! {
                            <tr><th>{format!("Latency p50 ({} interleaved runs)", report.runs)}</th>
                                <td>{format!("{:.1} ms", b.p50_ms)}</td>
                                <td>{format!("{:.1} ms ({})", a.p50_ms, speed_change(b.p50_ms, a.p50_ms))}</td></tr>
                        }.into_any()
                    }}
                </tbody>
            </table>
            <p class="agreement" id="user-agreement" data-same=report.top1_same.map(|s| s.to_string()).unwrap_or_default()
                data-held-out=report.held_out.to_string()>{agreement}</p>
            {report.labelled.map(|l| {
                let share = |right: usize| {
                    if l.images >= MIN_IMAGES_FOR_PERCENT {
                        format!(" ({:.1} %)", 100.0 * right as f64 / l.images as f64)
                    } else {
                        String::new()
                    }
                };
                view! {
                    <p class="accuracy" id="user-accuracy" data-images=l.images.to_string()
                        data-original=l.original.to_string() data-variant=l.variant.to_string()>{format!(
                        "On the {} held-out images whose folder names their class: original right on {}{}, compressed on {}{}.{}",
                        l.images,
                        l.original,
                        share(l.original),
                        l.variant,
                        share(l.variant),
                        if l.images < MIN_IMAGES_FOR_PERCENT { " Too few images for a percentage: add more per class to make it firm." } else { "" }
                    )}</p>
                }
            })}
            {report.fine_tuned.clone().map(|t| view! { <p class="fine-tuned" id="user-fine-tuned">{"This variant was "}{t}"."</p> })}
            <p class="executor">{"What ran: "}{report.executor.clone()}{format!(" · built in {:.0} ms", report.build_ms)}</p>
            <table class="layers" id="user-layers">
                <thead><tr><th>"Node"</th><th>"Op"</th><th>"Shape"</th><th>"Params"</th><th>"Zeros"</th><th>"Weights"</th><th>"SQNR"</th><th>"Input"</th></tr></thead>
                <tbody>
                    {report.layers.iter().enumerate().map(|(i, l)| view! {
                        <tr class:selected=move || selected.get() == i on:click=move |_| selected.set(i) data-layer=l.node.clone()>
                            <td>{l.node.clone()}</td>
                            <td>{l.op.clone()}</td>
                            <td>{format!("{:?}", l.shape)}</td>
                            <td>{l.parameters}</td>
                            <td>{format!("{:.0} %", 100.0 * l.zeros as f64 / l.parameters.max(1) as f64)}</td>
                            <td>{l.bits.map_or("fp32".into(), |b| format!("int{b}"))}</td>
                            <td>{l.sqnr_db.map_or("–".into(), |d| format!("{d:.1} dB"))}</td>
                            <td>{l.activation_bits.map_or("fp32".into(), |b| format!("int{b}"))}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
            <p class="hint">"Click a layer for its weight histograms."</p>
            {move || layers.get(selected.get()).cloned().map(|l| view! {
                <WeightHistograms
                    id_prefix="user-"
                    title=format!("{} ({}, shape {:?})", l.node, l.op, l.shape)
                    weights=l.shape.iter().product()
                    histogram=l.histogram
                    channel=l.narrowest_channel
                    quantized=l.bits.is_some()/>
            })}
        </div>
    }
}
