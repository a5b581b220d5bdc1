//! Crafted files against the loaders the worker runs on what a user drops: the lab's own
//! exports (safetensors with the recipe and layer table as JSON metadata) and ONNX models.
//! Thousands of mutated copies of real files (fixed seeds, so a failure replays): byte-level
//! damage (truncation, bit flips, extreme bytes, cut or repeated chunks) and, for exports,
//! structured damage to the JSON header (shapes, dtypes, offsets, quantization schemes,
//! activation parameters, the recipe). Each copy must load and run, or fail with an error:
//! never a panic, never a hang, and never more memory held than a stated multiple of what
//! the undamaged file needs (measured by this test binary's allocator, per thread).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

use compresslab::compress::{CompressedModel, Observer, Recipe, compress};
use compresslab::fashion::{FashionSet, PIXELS, normalize};
use compresslab::fashion_cpu::CpuFashionNet;
use compresslab::prune::{ChannelPruning, ChannelRanking};
use compresslab::quant::{Granularity, QuantScheme};
use compresslab::sweep::calibration_batches;
use compresslab::weights::TensorStore;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Memory: the bytes each thread holds, and the most it held during a closure.

/// The system allocator, counting per thread the bytes allocated and not yet freed there.
pub struct TrackingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: allocations during a thread's teardown are not counted.
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call goes to `System` with the caller's arguments; the counting only reads
// the sizes and never touches the memory.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes this thread held meanwhile above
/// what it held before.
pub fn peak_bytes<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, peak.saturating_sub(base).max(0) as usize)
}

// ---------------------------------------------------------------------------------------
// Mutations.

/// xorshift64: small, seedable, the same on every machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte-level damage of one of five kinds, chosen by `case` (so each kind gets a fifth).
pub fn damage_bytes(rng: &mut Rng, bytes: &[u8], case: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let len = out.len().max(1);
    match case % 5 {
        0 => out.truncate(rng.below(len)),
        1 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(len);
                if let Some(b) = out.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        2 => {
            const EXTREMES: [u8; 5] = [0x00, 0xff, 0x7f, 0x80, 0x01];
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(len);
                if let Some(b) = out.get_mut(at) {
                    *b = EXTREMES[rng.below(EXTREMES.len())];
                }
            }
        }
        3 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(64)).min(out.len());
            out.drain(at.min(end)..end);
        }
        _ => {
            let at = rng.below(len).min(out.len());
            let end = (at + 1 + rng.below(64)).min(out.len());
            let chunk = out[at..end].to_vec();
            out.splice(at..at, chunk);
        }
    }
    out
}

/// Numbers a parser or an allocator finds hard.
const EXTREME_NUMBERS: [f64; 12] = [
    0.0,
    -1.0,
    1.0,
    2.0,
    3.0,
    255.0,
    65_536.0,
    2_147_483_648.0,
    4_294_967_297.0,
    1e15,
    1.8e19,
    -1e300,
];

/// Changes one value somewhere in `value` (descending into strings that hold JSON, as the
/// export's metadata does), or deletes or repeats an element. Returns false when the
/// chosen place had nothing to change.
fn damage_json(rng: &mut Rng, value: &mut Value) -> bool {
    match value {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).cloned();
            let Some(key) = key else { return false };
            if rng.below(12) == 0 {
                map.remove(&key);
                return true;
            }
            map.get_mut(&key).is_some_and(|v| damage_json(rng, v))
        }
        Value::Array(items) if !items.is_empty() => {
            let at = rng.below(items.len());
            match rng.below(12) {
                0 => {
                    items.remove(at);
                    true
                }
                1 => {
                    let copy = items[at].clone();
                    items.insert(at, copy);
                    true
                }
                _ => damage_json(rng, &mut items[at]),
            }
        }
        Value::String(text) => {
            if let Ok(mut inner) = serde_json::from_str::<Value>(text)
                && inner.is_object() | inner.is_array()
                && damage_json(rng, &mut inner)
            {
                *text = inner.to_string();
                return true;
            }
            const STRINGS: [&str; 8] = ["", "F64", "I8", "U8", "BF16", "PerBlock", "conv1", "x"];
            *text = STRINGS[rng.below(STRINGS.len())].to_string();
            true
        }
        Value::Number(_) | Value::Bool(_) | Value::Null => {
            let n = EXTREME_NUMBERS[rng.below(EXTREME_NUMBERS.len())];
            *value = match rng.below(8) {
                0 => Value::Bool(rng.below(2) == 0),
                1 => Value::Null,
                _ if n.fract() == 0.0 && (0.0..1.8e19).contains(&n) => Value::from(n as u64),
                _ if n.fract() == 0.0 && (-9.2e18..0.0).contains(&n) => Value::from(n as i64),
                _ => serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
            };
            true
        }
        _ => false,
    }
}

/// A safetensors file with one change in its JSON header (the tensor table and the
/// metadata); the tensor bytes are kept. None when the header is not JSON.
pub fn damage_safetensors_header(rng: &mut Rng, bytes: &[u8]) -> Option<Vec<u8>> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(len)?)?;
    let mut json: Value = serde_json::from_slice(header).ok()?;
    // A draw can land on an empty object or array; a few tries always find a value.
    (0..64).find(|_| damage_json(rng, &mut json))?;
    let text = json.to_string().into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    Some(out)
}

// ---------------------------------------------------------------------------------------
// The exports.

fn fashion_dir() -> PathBuf {
    crate::assets().join("fashion")
}

fn fashion_store() -> TensorStore {
    TensorStore::from_safetensors(
        &std::fs::read(fashion_dir().join("fashion-mnist-cnn.safetensors")).unwrap(),
    )
    .unwrap()
}

fn fashion_set(name: &str) -> FashionSet {
    FashionSet::from_bytes(&std::fs::read(fashion_dir().join(name)).unwrap()).unwrap()
}

/// What the worker does with a dropped export: load it, build the CPU network with its
/// integer kernels, compute the statistics the lab shows, and classify `input`.
fn load_and_run_export(bytes: &[u8], input: &[f32]) -> Result<(), compresslab::EngineError> {
    let model = CompressedModel::from_safetensors(bytes)?;
    model.stats()?;
    model.layer_stats()?;
    if model.layers.iter().any(|l| l.name == "conv1") {
        CpuFashionNet::from_compressed(&model, true)?.forward(input)?;
    } else {
        let classifier = compresslab::classifier::ImageClassifier::new_compressed_cpu(
            &model,
            compresslab::labels::Labels::default(),
        )?;
        futures_lite::future::block_on(classifier.logits(input))?;
    }
    Ok(())
}

/// Findings of one fuzz run.
#[derive(Default)]
struct Findings {
    cases: usize,
    loaded: usize,
    panics: Vec<String>,
    over_cap: Vec<String>,
    peak: usize,
}

/// `cases` damaged copies of `bytes` (half byte-level, half in the JSON header) through
/// `load_and_run_export`, each allowed `cap_factor` × the undamaged file's peak memory.
fn fuzz_export(what: &str, bytes: &[u8], input: &[f32], cases: usize, seed: u64) -> Findings {
    let (clean, clean_peak) = peak_bytes(|| load_and_run_export(bytes, input));
    clean.unwrap_or_else(|e| panic!("{what}: the undamaged export fails: {e}"));
    let cap = CAP_FACTOR * clean_peak;
    let cases = cases * scale();
    let mut rng = Rng(seed);
    let mut findings = Findings::default();
    let started = Instant::now();
    for case in 0..cases {
        let damaged = if case % 2 == 0 {
            damage_bytes(&mut rng, bytes, case / 2)
        } else {
            damage_safetensors_header(&mut rng, bytes).expect("the export's header is JSON")
        };
        let (outcome, peak) =
            peak_bytes(|| catch_unwind(AssertUnwindSafe(|| load_and_run_export(&damaged, input))));
        findings.cases += 1;
        findings.peak = findings.peak.max(peak);
        match outcome {
            Ok(Ok(())) => findings.loaded += 1,
            Ok(Err(_)) => {}
            Err(panic) => findings.panics.push(format!(
                "{what} case {case}: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
        if peak > cap {
            findings.over_cap.push(format!(
                "{what} case {case}: held {peak} bytes, cap {cap} ({CAP_FACTOR} × the undamaged {clean_peak})"
            ));
        }
    }
    println!(
        "{what}: {} damaged copies in {:.1} s, {} loaded and ran, the rest failed with an error; \
         peak memory {:.1} MB (undamaged {:.1} MB, cap {:.1} MB)",
        findings.cases,
        started.elapsed().as_secs_f64(),
        findings.loaded,
        findings.peak as f64 / 1e6,
        clean_peak as f64 / 1e6,
        cap as f64 / 1e6,
    );
    findings
}

/// `FUZZ_SCALE=N` runs N times the cases (a longer local run; CI runs the default 1).
pub fn scale() -> usize {
    std::env::var("FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// A damaged file may make the loader hold at most this many times what the undamaged one
/// needs (it holds the file, the parsed tensors and one network).
const CAP_FACTOR: usize = 2;

fn assert_clean(findings: &[Findings]) {
    let panics: Vec<&String> = findings.iter().flat_map(|f| &f.panics).collect();
    let over: Vec<&String> = findings.iter().flat_map(|f| &f.over_cap).collect();
    assert!(
        panics.is_empty() && over.is_empty(),
        "{} panics, {} over the memory cap:\n{}",
        panics.len(),
        over.len(),
        panics
            .iter()
            .chain(&over)
            .take(20)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn fashion_export(recipe: &Recipe) -> Vec<u8> {
    let calibration = calibration_batches(&fashion_set("calibration.bin"));
    compress(&fashion_store(), recipe, &calibration[..1], &mut |_, _| {
        Ok(())
    })
    .unwrap()
    .to_safetensors()
    .unwrap()
}

#[test]
fn damaged_fashion_exports_load_or_fail_cleanly() {
    let test = fashion_set("test.bin");
    let input = normalize(&test.images[..4 * PIXELS]);
    let w8a8 = Recipe::w8a8(Granularity::PerChannel, Observer::MinMax);
    let int4_pruned = Recipe {
        channel_pruning: Some(ChannelPruning {
            ratio: 0.5,
            ranking: ChannelRanking::L1,
        }),
        weights: Some(QuantScheme {
            bits: 4,
            symmetric: false,
            granularity: Granularity::PerBlock(32),
        }),
        ..Recipe::default()
    };
    assert_clean(&[
        fuzz_export(
            "Fashion W8A8 per-channel",
            &fashion_export(&w8a8),
            &input,
            2000,
            0x1234_5678_9abc_def1,
        ),
        fuzz_export(
            "Fashion int4 per-block(32), 50 % channels",
            &fashion_export(&int4_pruned),
            &input,
            2000,
            0x0fed_cba9_8765_4321,
        ),
    ]);
}

#[test]
fn damaged_efficientnet_exports_load_or_fail_cleanly() {
    // 18 MB per copy: fewer cases, mostly in the header where the shapes and schemes are.
    let recipe = Recipe::w8a8(Granularity::PerChannel, Observer::MinMax);
    let calibration = vec![vec![0.1f32; 3 * 224 * 224]];
    let bytes = compress(&crate::store(), &recipe, &calibration, &mut |_, _| Ok(()))
        .unwrap()
        .to_safetensors()
        .unwrap();
    let input = vec![0.2f32; 3 * 224 * 224];
    assert_clean(&[fuzz_export(
        "EfficientNet-Lite0 W8A8 per-channel",
        &bytes,
        &input,
        120,
        0x5555_aaaa_1357_9bdf,
    )]);
}

/// `bytes` (an export) with its layer table changed by `edit`.
fn with_layer_table(bytes: &[u8], edit: impl FnOnce(&mut Vec<Value>)) -> Vec<u8> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let table = &mut header["__metadata__"]["compresslab.layers"];
    let mut layers: Vec<Value> = serde_json::from_str(table.as_str().unwrap()).unwrap();
    edit(&mut layers);
    *table = Value::String(serde_json::to_string(&layers).unwrap());
    let text = header.to_string().into_bytes();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    out
}

#[test]
fn crafted_layer_tables_are_errors() {
    // The edits random damage reaches only rarely (a longer FUZZ_SCALE run found the first:
    // a shape whose product wraps made the group count loop for minutes).
    let bytes = fashion_export(&Recipe::w8a8(Granularity::PerBlock(16), Observer::MinMax));
    let input = normalize(&fashion_set("test.bin").images[..PIXELS]);
    type Edit = fn(&mut Vec<Value>);
    let edits: [(&str, Edit); 14] = [
        ("a shape whose product wraps to a small number", |l| {
            l[1]["shape"] = serde_json::json!([4_294_967_297u64, 4_294_967_297u64])
        }),
        ("a shape whose product overflows", |l| {
            l[1]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40])
        }),
        ("an empty shape", |l| l[1]["shape"] = serde_json::json!([])),
        ("a zero dimension", |l| {
            l[1]["shape"] = serde_json::json!([0, 32, 3, 3])
        }),
        ("0-bit weights", |l| l[1]["scheme"]["bits"] = 0.into()),
        ("9-bit weights", |l| l[1]["scheme"]["bits"] = 9.into()),
        ("255-bit weights", |l| l[1]["scheme"]["bits"] = 255.into()),
        ("block size 0", |l| {
            l[1]["scheme"]["granularity"] = serde_json::json!({"PerBlock": 0})
        }),
        ("a block longer than the tensor", |l| {
            l[1]["scheme"]["granularity"] = serde_json::json!({"PerBlock": 1u64 << 62})
        }),
        ("a negative activation scale", |l| {
            l[2]["activation"]["scale"] = (-1.0).into()
        }),
        ("a zero activation scale", |l| {
            l[2]["activation"]["scale"] = 0.0.into()
        }),
        ("activation qmin above qmax", |l| {
            l[2]["activation"]["qmin"] = 100.into();
            l[2]["activation"]["qmax"] = (-100).into();
        }),
        ("activation levels beyond int8", |l| {
            l[2]["activation"]["qmin"] = (-70_000).into();
            l[2]["activation"]["qmax"] = 70_000.into();
            l[2]["activation"]["zero_point"] = 1_000_000.into();
        }),
        ("a layer listed twice", |l| {
            let copy = l[1].clone();
            l.insert(1, copy);
        }),
    ];
    for (what, edit) in edits {
        let crafted = with_layer_table(&bytes, edit);
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| load_and_run_export(&crafted, &input)));
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Err(e)) => println!("{what}: {e} ({seconds:.3} s)"),
            Ok(Ok(())) => panic!("{what}: loaded and ran"),
            Err(_) => panic!("{what}: panicked"),
        }
        assert!(seconds < 1.0, "{what}: {seconds:.1} s to fail");
    }
}

/// Training settings a page or a CLI user can type: out-of-range values (NaN included)
/// are errors before any model is built; the page's defaults and its field bounds pass.
#[test]
fn distillation_settings_are_bounded() {
    use compresslab::distill::{DistillConfig, MAX_BATCH, MAX_EPOCHS, MAX_PHOTO_BATCH};
    let base = DistillConfig::default();
    assert!(base.validate().is_ok());
    type Edit = fn(&mut DistillConfig);
    let edits: [(&str, Edit); 10] = [
        ("no epochs", |c| c.epochs = 0),
        ("too many epochs", |c| c.epochs = MAX_EPOCHS + 1),
        ("batch 0", |c| c.batch_size = 0),
        ("huge batch", |c| c.batch_size = usize::MAX),
        ("NaN temperature", |c| c.temperature = f64::NAN),
        ("huge temperature", |c| c.temperature = 1e9),
        ("NaN α", |c| c.alpha = f64::NAN),
        ("infinite feature weight", |c| {
            c.feature_weight = f64::INFINITY
        }),
        ("NaN learning rate", |c| c.learning_rate = f64::NAN),
        ("learning rate 1", |c| c.learning_rate = 1.0),
    ];
    for (what, edit) in edits {
        let mut cfg = base.clone();
        edit(&mut cfg);
        assert!(cfg.validate().is_err(), "{what} was accepted");
    }
    let widest = DistillConfig {
        epochs: MAX_EPOCHS,
        batch_size: MAX_BATCH,
        temperature: 20.0,
        learning_rate: 0.1,
        feature_weight: 100.0,
        ..base.clone()
    };
    assert!(widest.validate().is_ok());
    // The photo model: its own smaller batch bound, with a message that says why.
    assert!(widest.validate_photo().is_err());
    let photo = DistillConfig {
        batch_size: MAX_PHOTO_BATCH,
        ..widest
    };
    assert!(photo.validate_photo().is_ok());
}

/// Calibration memory does not grow with the number of images: 6 000 one-image calibration
/// entries with a percentile observer keep at most the observers' budget (64 MB) of
/// samples. Before the budget every image kept every value of every layer's input (about
/// 250 MB here, and more with every image).
#[test]
fn percentile_calibration_memory_is_bounded() {
    let set = fashion_set("calibration.bin");
    let single: Vec<Vec<f32>> = set.images.chunks(PIXELS).map(normalize).collect();
    let images: Vec<Vec<f32>> = single.iter().cycle().take(6000).cloned().collect();
    let recipe = Recipe::w8a8(Granularity::PerChannel, Observer::Percentile(99.99));
    let store = fashion_store();
    let (model, peak) = peak_bytes(|| compress(&store, &recipe, &images, &mut |_, _| Ok(())));
    model.unwrap();
    println!(
        "percentile calibration on 6 000 images held {} MB at most",
        peak >> 20
    );
    assert!(peak < 80 << 20, "calibration held {} MB", peak >> 20);
}
