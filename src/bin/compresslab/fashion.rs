//! The Fashion-MNIST commands: assets, training, evaluation, sweeps, image folders and
//! distillation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use compresslab::compress::{Recipe, compress};
use compresslab::weights::TensorStore;
use compresslab::{EngineError, Result};

use super::{files_under, leading_flag, read_recipe, usage_error, write};

fn read_idx_pair(dir: &Path, split: &str) -> Result<compresslab::fashion::FashionSet> {
    let read = |name: String| {
        let path = dir.join(&name);
        std::fs::read(&path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    compresslab::fashion::FashionSet::from_idx(
        &read(format!("{split}-images-idx3-ubyte"))?,
        &read(format!("{split}-labels-idx1-ubyte"))?,
    )
}

pub fn fashion_assets(args: &[String]) -> Result<()> {
    let [idx, out] = args else {
        return Err(usage_error("fashion-assets needs <idx-dir> <out-dir>"));
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|source| EngineError::Io {
        path: out.display().to_string(),
        source,
    })?;
    let test = read_idx_pair(Path::new(idx), "t10k")?;
    let calibration = read_idx_pair(Path::new(idx), "train")?.stratified(100);
    write(&out.join("test.bin"), &test.to_bytes())?;
    write(&out.join("calibration.bin"), &calibration.to_bytes())?;
    println!(
        "wrote {} test and {} calibration images to {}",
        test.len(),
        calibration.len(),
        out.display()
    );
    Ok(())
}

pub fn train_fashion(args: &[String]) -> Result<()> {
    use compresslab::fashion::{TrainConfig, train};
    let mut cfg = TrainConfig::default();
    let rest = match args {
        [flag, n, rest @ ..] if flag == "--epochs" => {
            cfg.epochs = n
                .parse()
                .map_err(|_| usage_error("--epochs needs a number"))?;
            rest
        }
        rest => rest,
    };
    let [idx, out] = rest else {
        return Err(usage_error(
            "train-fashion needs <idx-dir> <out.safetensors>",
        ));
    };
    let idx = Path::new(idx);
    let train_set = read_idx_pair(idx, "train")?;
    let test_set = read_idx_pair(idx, "t10k")?;
    println!("training on {} images: {cfg:?}", train_set.len());
    let device = Device::flex().autodiff();
    let started = Instant::now();
    let mut last_print = Instant::now();
    let store = futures_lite::future::block_on(train(&train_set, &cfg, &device, &mut |p| {
        if p.step + 1 == p.steps || last_print.elapsed().as_secs() >= 30 {
            last_print = Instant::now();
            println!(
                "epoch {} step {}/{} loss {:.4} ({:.0} s)",
                p.epoch + 1,
                p.step + 1,
                p.steps,
                p.loss,
                started.elapsed().as_secs_f64()
            );
        }
    }))?;
    let train_secs = started.elapsed().as_secs_f64();
    let net = compresslab::fashion_cpu::CpuFashionNet::from_store(&store)?;
    let eval = compresslab::fashion_cpu::evaluate(&net, &test_set)?;
    write(Path::new(out), &store.to_safetensors()?)?;
    println!(
        "trained in {train_secs:.0} s ({:.0} images/s); test accuracy {:.2} % ({}/{}); wrote {out}",
        (cfg.epochs * train_set.len()) as f64 / train_secs,
        100.0 * eval.accuracy(),
        eval.correct,
        eval.images
    );
    Ok(())
}

/// The Fashion-MNIST assets the site serves: trained weights, test set, calibration set.
struct FashionAssets {
    weights: TensorStore,
    test: compresslab::fashion::FashionSet,
    training_sample: compresslab::fashion::FashionSet,
    calibration: Vec<Vec<f32>>,
}

const FASHION_WEIGHTS_FILE: &str = "fashion-mnist-cnn.safetensors";

fn fashion_assets_from(dir: &str) -> Result<FashionAssets> {
    use compresslab::fashion::FashionSet;
    let read = |name: &str| {
        let path = Path::new(dir).join(name);
        std::fs::read(&path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    let training_sample = FashionSet::from_bytes(&read("calibration.bin")?)?;
    Ok(FashionAssets {
        weights: TensorStore::from_safetensors(&read(FASHION_WEIGHTS_FILE)?)?,
        test: FashionSet::from_bytes(&read("test.bin")?)?,
        calibration: compresslab::sweep::calibration_batches(&training_sample),
        training_sample,
    })
}

pub fn fashion_eval(args: &[String]) -> Result<()> {
    use compresslab::fashion::CLASS_NAMES;
    let (dir, recipe) = match args {
        [dir] => (dir, Recipe::default()),
        [dir, recipe] => {
            let text = std::fs::read_to_string(recipe).map_err(|source| EngineError::Io {
                path: recipe.clone(),
                source,
            })?;
            (dir, Recipe::from_json(&text)?)
        }
        _ => {
            return Err(usage_error(
                "fashion-eval needs <fashion-dir> [recipe.json]",
            ));
        }
    };
    let a = fashion_assets_from(dir)?;
    let started = Instant::now();
    let model = compress(&a.weights, &recipe, &a.calibration, &mut |_, _| Ok(()))?;
    let eval = compresslab::sweep::evaluate_model(&model, &a.test, a.test.len())?;
    let secs = started.elapsed().as_secs_f64();
    let stats = model.stats()?;
    println!(
        "accuracy {:.2} % ({}/{}), {} weight bytes, {} non-zero MACs; compress + evaluate {secs:.2} s",
        100.0 * eval.accuracy(),
        eval.correct,
        eval.images,
        stats.weight_bytes,
        stats.nonzero_macs
    );
    println!(
        "{:>12} {:>7}  confusion (rows: true class, columns: predicted)",
        "class", "acc %"
    );
    for (c, row) in eval.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>4}")).collect();
        println!(
            "{:>12} {:>7.2}  {}",
            CLASS_NAMES[c],
            100.0 * eval.class_accuracy()[c],
            cells.join(" ")
        );
    }
    Ok(())
}

pub fn sweep_cmd(args: &[String]) -> Result<()> {
    let (images, rest) = match args {
        [flag, n, rest @ ..] if flag == "--images" => (
            n.parse::<usize>()
                .map_err(|_| usage_error("--images needs a number"))?,
            rest,
        ),
        rest => (usize::MAX, rest),
    };
    let [dir] = rest else {
        return Err(usage_error("sweep needs <fashion-dir>"));
    };
    let a = fashion_assets_from(dir)?;
    let base = compresslab::sweep::run_case(
        &a.weights,
        &compresslab::sweep::SweepCase {
            axis: compresslab::sweep::SweepAxis::Quantization,
            label: "fp32".into(),
            x: 32.0,
            recipe: Recipe::default(),
        },
        &a.calibration,
        &a.test,
        images,
        &mut |_, _| Ok(()),
    )?;
    println!(
        "fp32: accuracy {:.2} % on {} test images, {} weight bytes",
        100.0 * base.accuracy,
        base.images,
        base.weight_bytes
    );
    println!(
        "{:<26} {:>10} {:>9} {:>12} {:>7}",
        "setting", "accuracy", "Δ pt", "weight bytes", "size ×"
    );
    for case in compresslab::sweep::sweep_cases() {
        let p = compresslab::sweep::run_case(
            &a.weights,
            &case,
            &a.calibration,
            &a.test,
            images,
            &mut |_, _| Ok(()),
        )?;
        println!(
            "{:<26} {:>9.2}% {:>+9.2} {:>12} {:>7.2}",
            p.label,
            100.0 * p.accuracy,
            100.0 * (p.accuracy - base.accuracy),
            p.weight_bytes,
            base.weight_bytes as f64 / p.weight_bytes.max(1) as f64
        );
    }
    Ok(())
}

pub fn fashion_folder(args: &[String]) -> Result<()> {
    use compresslab::fashion::{CLASS_NAMES, SIDE};
    let (per_class, rest) = leading_flag::<usize>(args, "--per-class")?;
    let per_class = per_class.unwrap_or(10);
    let [dir, out] = rest else {
        return Err(usage_error("fashion-folder needs <fashion-dir> <out-dir>"));
    };
    let a = fashion_assets_from(dir)?;
    let sample = a.training_sample.stratified(per_class);
    let mut written = 0;
    for i in 0..sample.len() {
        let class = CLASS_NAMES[usize::from(sample.labels[i])].replace('/', "_");
        let folder = Path::new(out).join(&class);
        std::fs::create_dir_all(&folder).map_err(|source| EngineError::Io {
            path: folder.display().to_string(),
            source,
        })?;
        let image = image::GrayImage::from_raw(SIDE as u32, SIDE as u32, sample.image(i).to_vec())
            .ok_or_else(|| EngineError::Dataset("image buffer size".into()))?;
        let path = folder.join(format!("{i:04}.png"));
        image
            .save(&path)
            .map_err(|e| EngineError::Decode(format!("{}: {e}", path.display())))?;
        written += 1;
    }
    println!(
        "wrote {written} PNGs in {} class folders under {out}",
        CLASS_NAMES.len()
    );
    Ok(())
}

fn read_image_folder(dir: &Path) -> Result<compresslab::fashion::FashionSet> {
    use compresslab::fashion::{
        FashionSet, UNLABELLED, class_for_name, fitted_size, pixels_from_fitted,
    };
    let files = files_under(dir)?;
    let mut set = FashionSet::default();
    for path in files {
        let Ok(img) = image::open(&path) else {
            eprintln!("skipped {} (not an image)", path.display());
            continue;
        };
        let rgba = img.to_rgba8();
        let (w, h) = fitted_size(rgba.width() as usize, rgba.height() as usize);
        let small = image::imageops::resize(
            &rgba,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        );
        let label = path
            .parent()
            .filter(|p| *p != dir)
            .and_then(|p| p.file_name())
            .and_then(|n| class_for_name(&n.to_string_lossy()))
            .unwrap_or(UNLABELLED);
        set.labels.push(label);
        set.images.extend(pixels_from_fitted(small.as_raw(), w, h)?);
    }
    Ok(set)
}

pub fn distil_cmd(args: &[String]) -> Result<()> {
    use compresslab::distill::{
        DistillConfig, Distiller, HELDOUT_FRACTION, SPLIT_SEED, requantize, student_for,
    };
    use compresslab::fashion::UNLABELLED;
    let (epochs, rest) = leading_flag::<usize>(args, "--epochs")?;
    let (images, rest) = leading_flag::<String>(rest, "--images")?;
    let [dir, recipe, out] = rest else {
        return Err(usage_error(
            "distil needs <fashion-dir> <recipe.json> <out.safetensors>",
        ));
    };
    let recipe = read_recipe(recipe)?;
    let a = fashion_assets_from(dir)?;
    let data = match &images {
        Some(folder) => read_image_folder(Path::new(folder))?,
        None => a.training_sample.clone(),
    };
    let (train_idx, heldout_idx) = data.stratified_split(HELDOUT_FRACTION, SPLIT_SEED);
    let (train, heldout) = (data.subset(&train_idx), data.subset(&heldout_idx));
    let (student, masks) = student_for(&a.weights, &recipe)?;
    let cfg = DistillConfig {
        epochs: epochs.unwrap_or(3),
        batch_size: 32,
        alpha: 0.7,
        weight_quant: recipe.weights,
        fp32_layers: recipe.keep_fp32.clone(),
        ..DistillConfig::default()
    };
    println!(
        "{} training and {} held-out images ({} unlabelled); {cfg:?}",
        train.len(),
        heldout.len(),
        data.labels.iter().filter(|&&l| l == UNLABELLED).count()
    );
    let mut run = Distiller::new(
        &a.weights,
        &student,
        masks,
        train.clone(),
        cfg,
        &Device::flex().autodiff(),
    )?;
    let before = futures_lite::future::block_on(run.evaluate(&heldout))?;
    let started = Instant::now();
    while !run.is_done() {
        let r = futures_lite::future::block_on(run.step())?;
        if r.epoch_done {
            let h = futures_lite::future::block_on(run.evaluate(&heldout))?;
            println!(
                "epoch {}: training loss {:.4}, held-out loss {:.4}, agreement {:.1} %",
                r.epoch + 1,
                r.epoch_loss,
                h.loss,
                100.0 * h.agreement
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let trained = futures_lite::future::block_on(run.student())?;
    let before_model = compress(&a.weights, &recipe, &a.calibration, &mut |_, _| Ok(()))?;
    let after_model = requantize(&trained, &recipe, &a.calibration)?;
    let labelled: Vec<usize> = (0..heldout.len())
        .filter(|&i| heldout.labels[i] != UNLABELLED)
        .collect();
    let labelled = heldout.subset(&labelled);
    for (name, model) in [("compressed", &before_model), ("fine-tuned", &after_model)] {
        let test = compresslab::sweep::evaluate_model(model, &a.test, a.test.len())?;
        let held = compresslab::sweep::evaluate_model(model, &labelled, labelled.len())?;
        println!(
            "{name:>10}: test accuracy {:.2} %, held-out accuracy {:.1} % ({} labelled), {} weight bytes",
            100.0 * test.accuracy(),
            100.0 * held.accuracy(),
            labelled.len(),
            model.stats()?.weight_bytes
        );
    }
    let trained_images = train.len() * run.total_steps() / run.steps_per_epoch().max(1);
    println!(
        "held-out loss {:.4} before training; {trained_images} training images in {secs:.1} s: {:.0} images/s (Flex CPU, batch 32, 28×28)",
        before.loss,
        trained_images as f64 / secs
    );
    write(Path::new(out), &after_model.to_safetensors()?)?;
    println!("wrote {out}");
    Ok(())
}
