//! The built-in photo model's commands: converting the checkpoint into the site's assets,
//! classifying, preprocessing, exporting ONNX, compressing and fine-tuning on photos.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use compresslab::classifier::ImageClassifier;
use compresslab::compress::{CompressedModel, Recipe, compress};
use compresslab::decode::decode_file;
use compresslab::efficientnet_graph;
use compresslab::labels::Labels;
use compresslab::preprocess::{imagenet_crop, imagenet_input};
use compresslab::torch_legacy::read_legacy_state_dict;
use compresslab::weights::TensorStore;
use compresslab::{EngineError, Result};

use super::{
    LABELS_FILE, WEIGHTS_FILE, files_under, leading_flag, load, load_store, print_progress, read,
    read_recipe, usage_error, write,
};

pub fn convert(args: &[String]) -> Result<()> {
    let [pth, labels, out] = args else {
        return Err(usage_error("convert takes three arguments"));
    };
    let store = read_legacy_state_dict(&read(Path::new(pth))?)?;
    let labels = Labels::from_label_to_names_json(&read(Path::new(labels))?)?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|source| EngineError::Io {
        path: out.display().to_string(),
        source,
    })?;
    write(&out.join(WEIGHTS_FILE), &store.to_safetensors()?)?;
    write(&out.join(LABELS_FILE), labels.to_json().as_bytes())?;
    println!(
        "converted {} tensors, {} parameters, {} classes into {}",
        store.len(),
        store.parameter_count(),
        labels.len(),
        out.display()
    );
    Ok(())
}

pub fn classify(args: &[String]) -> Result<()> {
    let (backend, rest) = match args {
        [flag, name, rest @ ..] if flag == "--device" => (name.as_str(), rest),
        rest => ("cpu", rest),
    };
    let [assets, images @ ..] = rest else {
        return Err(usage_error("classify needs an assets dir and images"));
    };
    let classifier = load(Path::new(assets), backend)?;
    for image in images {
        let input = imagenet_input(&decode_file(Path::new(image))?);
        let start = Instant::now();
        let top = futures_lite::future::block_on(classifier.classify(&input, 5))?;
        println!("{image} ({:.1} ms)", start.elapsed().as_secs_f64() * 1e3);
        for p in top {
            println!(
                "  {:>5.1}%  {} ({})",
                p.probability * 100.0,
                p.label,
                p.class
            );
        }
    }
    Ok(())
}

pub fn export_onnx(args: &[String]) -> Result<()> {
    let [assets, image, out] = args else {
        return Err(usage_error("export-onnx takes three arguments"));
    };
    let assets = Path::new(assets);
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|source| EngineError::Io {
        path: out.display().to_string(),
        source,
    })?;
    let store = TensorStore::from_safetensors(&read(&assets.join(WEIGHTS_FILE))?)?;
    write(
        &out.join("model.onnx"),
        &efficientnet_graph::export_onnx(&store)?,
    )?;
    let input = imagenet_input(&decode_file(Path::new(image))?);
    let raw: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(&out.join("input.bin"), &raw)?;
    let classifier = load(assets, "cpu")?;
    let logits = futures_lite::future::block_on(classifier.logits(&input))?;
    let json = serde_json::to_string(&logits).map_err(|e| EngineError::Weights(e.to_string()))?;
    write(&out.join("logits.json"), json.as_bytes())?;
    println!(
        "wrote model.onnx, input.bin and logits.json to {}",
        out.display()
    );
    Ok(())
}

pub fn preprocess(args: &[String]) -> Result<()> {
    let [image, out] = args else {
        return Err(usage_error("preprocess takes two arguments"));
    };
    let crop = imagenet_crop(&decode_file(Path::new(image))?);
    write(Path::new(out), &crop.pixels)
}

pub fn compress_cmd(args: &[String]) -> Result<()> {
    let [assets, recipe, out, images @ ..] = args else {
        return Err(usage_error(
            "compress takes an assets dir, a recipe and an output file",
        ));
    };
    let store = load_store(Path::new(assets))?;
    let recipe_text = String::from_utf8_lossy(&read(Path::new(recipe))?).into_owned();
    let recipe = Recipe::from_json(&recipe_text)?;
    let calibration = images
        .iter()
        .map(|p| Ok(imagenet_input(&decode_file(Path::new(p))?)))
        .collect::<Result<Vec<_>>>()?;
    let model = compress(&store, &recipe, &calibration, &mut print_progress)?;
    let stats = model.stats()?;
    let original = CompressedModel::original(&store)?.stats()?;
    write(Path::new(out), &model.to_safetensors()?)?;
    println!(
        "parameters {} → {}, weight bytes {} → {} ({:.2}× smaller), MACs {:.0} M → {:.0} M",
        original.parameters,
        stats.parameters,
        original.weight_bytes,
        stats.weight_bytes,
        original.weight_bytes as f64 / stats.weight_bytes as f64,
        original.macs as f64 / 1e6,
        stats.macs as f64 / 1e6
    );
    Ok(())
}

pub fn distil_photos(args: &[String]) -> Result<()> {
    use compresslab::distill::DistillConfig;
    use compresslab::finetune_photo::{PhotoFineTune, PhotoSet, folder_of, stored_photo};
    use std::sync::Arc;
    let (epochs, rest) = leading_flag::<usize>(args, "--epochs")?;
    let (batch, rest) = leading_flag::<usize>(rest, "--batch")?;
    let (features, rest) = leading_flag::<String>(rest, "--features")?;
    let feature_blocks = match features {
        Some(list) => list
            .split(',')
            .map(|b| b.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| usage_error("--features needs block numbers, e.g. 5,10,15"))?,
        None => Vec::new(),
    };
    let [assets, recipe, folder, out] = rest else {
        return Err(usage_error(
            "distil-photos needs <assets-dir> <recipe.json> <photo-folder> <out.safetensors>",
        ));
    };
    let recipe = read_recipe(recipe)?;
    let assets = Path::new(assets);
    let store = load_store(assets)?;
    let imagenet = Labels::from_json(&read(&assets.join(LABELS_FILE))?)?;
    let folder = Path::new(folder);
    // Paths as the page sees a chosen folder: "<folder>/<class>/<file>".
    let base = folder.parent().unwrap_or(folder);
    let (mut images, mut folders) = (Vec::new(), Vec::new());
    for path in files_under(folder)? {
        match decode_file(&path) {
            Ok(img) => {
                images.push(stored_photo(&img));
                let relative = path.strip_prefix(base).unwrap_or(&path);
                folders.push(folder_of(&relative.to_string_lossy().replace('\\', "/")));
            }
            Err(e) => eprintln!("skipped {}: {e}", path.display()),
        }
    }
    let set = Arc::new(PhotoSet::from_folders(images, &folders, &imagenet));
    println!("{} photos; labels: {}", set.len(), set.mode.describe());
    let cfg = DistillConfig {
        temperature: 2.0,
        alpha: 0.7,
        learning_rate: 2e-4,
        epochs: epochs.unwrap_or(3),
        batch_size: batch.unwrap_or(8),
        feature_blocks,
        weight_quant: recipe.weights,
        fp32_layers: recipe.keep_fp32.clone(),
        ..DistillConfig::default()
    };
    let device = Device::flex().autodiff();
    let mut run = futures_lite::future::block_on(PhotoFineTune::new(
        set.clone(),
        &store,
        &recipe,
        cfg,
        &device,
        &device,
        &mut |stage| println!("{stage}"),
    ))?;
    println!(
        "{} training and {} held-out photos, {} steps",
        run.train_images(),
        run.heldout_images(),
        run.total_steps()
    );
    let h = futures_lite::future::block_on(run.evaluate())?;
    println!(
        "before: held-out loss {:.4}, agreement {:.1} %",
        h.loss,
        100.0 * h.agreement
    );
    let started = Instant::now();
    let mut images = 0;
    while !run.is_done() {
        let r = futures_lite::future::block_on(run.step())?;
        images += r.images;
        if r.epoch_done {
            let h = futures_lite::future::block_on(run.evaluate())?;
            println!(
                "epoch {}: training loss {:.4}, held-out loss {:.4}, agreement {:.1} %{}",
                r.epoch + 1,
                r.epoch_loss,
                h.loss,
                100.0 * h.agreement,
                h.accuracy
                    .map(|a| format!(", accuracy {:.1} %", 100.0 * a))
                    .unwrap_or_default()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (before, after) = futures_lite::future::block_on(run.finish(&recipe))?;
    let labels = match set.own_classes() {
        Some(names) => Labels::from_names(names.to_vec())?,
        None => imagenet,
    };
    let teacher = ImageClassifier::new_cpu(run.teacher(), labels.clone())?;
    let teacher_preds = futures_lite::future::block_on(run.heldout_predictions(&teacher))?;
    if let (Some(accuracy), _) = run.scores(&teacher_preds, &teacher_preds) {
        println!(
            "   teacher: held-out accuracy {:.1} %, {} weight bytes",
            100.0 * accuracy,
            CompressedModel::original(run.teacher())?
                .stats()?
                .weight_bytes
        );
    }
    for (name, model) in [("compressed", &before), ("fine-tuned", &after)] {
        let net = ImageClassifier::new_compressed_cpu(model, labels.clone())?;
        let preds = futures_lite::future::block_on(run.heldout_predictions(&net))?;
        let (accuracy, agreement) = run.scores(&preds, &teacher_preds);
        println!(
            "{name:>10} (deployed, CPU): held-out agreement with the teacher {:.1} %{}, {} weight bytes",
            100.0 * agreement,
            accuracy
                .map(|a| format!(", accuracy {:.1} %", 100.0 * a))
                .unwrap_or_default(),
            model.stats()?.weight_bytes
        );
    }
    println!(
        "{images} training images in {secs:.1} s ({:.2} images/s)",
        images as f64 / secs.max(1e-9)
    );
    let bytes = after.to_safetensors()?;
    std::fs::write(out, bytes).map_err(|source| EngineError::Io {
        path: out.clone(),
        source,
    })?;
    println!("wrote {out}");
    Ok(())
}
