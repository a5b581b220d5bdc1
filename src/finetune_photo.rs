//! A whole photo-model fine-tune, as the page and the command line run it: the user's
//! photos with labels from their folder names, a stratified held-out split, the teacher
//! (the original, or its backbone with a head fitted on the user's own classes), the
//! compressed student, and epochs of shuffled, augmented batches one step at a time.

use std::sync::Arc;

use crate::classifier::ImageClassifier;
use crate::compress::{CompressedModel, Recipe, compress};
use crate::distill::{
    DistillConfig, HELDOUT_FRACTION, HeldOutReport, NetworkDistiller, SPLIT_SEED, StepReport,
    argmax, requantize, student_for,
};
use crate::distill_photo::{augment_photo, fit_head, with_head};
use crate::error::{EngineError, Result};
use crate::fashion::{SplitMix, stratified_split};
use crate::labels::Labels;
use crate::preprocess::{CROP, RESIZE_SHORTER, RgbImage, box_reduce, resize_and_crop, to_nchw};
use crate::weights::TensorStore;
use burn::prelude::*;
use compresslab_spec::labels::{class_for_name, folder_classes};

/// What the folder names make of the labels.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelMode {
    /// Every folder names an ImageNet class: the 1000-way head learns them.
    ImageNet,
    /// The user's own classes (sorted folder names): a new head.
    Own(Vec<String>),
    /// No folders (or a single one that is no ImageNet class): the teacher's outputs alone.
    Unlabelled,
}

impl LabelMode {
    /// A sentence for the page and the command line.
    pub fn describe(&self) -> String {
        match self {
            LabelMode::ImageNet => "ImageNet classes: the folder names are ImageNet classes, so the 1000-way head learns them (cross-entropy next to the teacher's outputs)".into(),
            LabelMode::Own(names) => format!(
                "your own {} classes ({}): a new head is first fitted on the original network's features (the teacher), then the compressed network with its own copy of that head learns from it",
                names.len(),
                names.join(", ")
            ),
            LabelMode::Unlabelled => "none: no folders name classes, so the student learns the teacher's outputs alone (label-free)".into(),
        }
    }
}

/// Labels from each photo's folder name: ImageNet classes when every folder names one,
/// the user's own classes when there are two or more folders, otherwise none.
pub fn resolve_labels(
    folders: &[Option<String>],
    imagenet: &Labels,
) -> (Vec<Option<usize>>, LabelMode) {
    let mut names: Vec<String> = folders.iter().flatten().cloned().collect();
    names.sort();
    names.dedup();
    if !names.is_empty() && names.iter().all(|n| imagenet.class_for_name(n).is_some()) {
        let labels = folders
            .iter()
            .map(|f| f.as_deref().and_then(|n| imagenet.class_for_name(n)))
            .collect();
        return (labels, LabelMode::ImageNet);
    }
    let names = folder_classes(folders.iter().flatten().map(String::as_str));
    if names.len() < 2 {
        return (vec![None; folders.len()], LabelMode::Unlabelled);
    }
    let labels = folders
        .iter()
        .map(|f| class_for_name(&names, f.as_deref()?))
        .collect();
    (labels, LabelMode::Own(names))
}

/// The parent folder's name in a `/`-separated path, if the path has one.
pub fn folder_of(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    parts
        .len()
        .checked_sub(2)
        .and_then(|i| parts.get(i))
        .map(|f| f.to_string())
}

/// Side of a kept photo: the inference resize, so the held-out input is its centre crop.
pub const STORED_SIDE: usize = RESIZE_SHORTER;

/// A decoded photo as kept for fine-tuning: shorter side 256, the centre square
/// (192 KiB), from which training crops are taken.
pub fn stored_photo(image: &RgbImage) -> RgbImage {
    resize_and_crop(&box_reduce(image, STORED_SIDE), STORED_SIDE, STORED_SIDE)
}

/// Photos (as [`stored_photo`] keeps them) and their labels.
#[derive(Debug, Clone)]
pub struct PhotoSet {
    pub images: Vec<RgbImage>,
    pub labels: Vec<Option<usize>>,
    pub mode: LabelMode,
}

impl PhotoSet {
    /// Labels from the folder names (see [`resolve_labels`]).
    pub fn from_folders(
        images: Vec<RgbImage>,
        folders: &[Option<String>],
        imagenet: &Labels,
    ) -> Self {
        let (labels, mode) = resolve_labels(folders, imagenet);
        Self {
            images,
            labels,
            mode,
        }
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The network's input for photo `i`: its centre 224² crop, as for inference.
    pub fn input(&self, i: usize) -> Vec<f32> {
        to_nchw(&resize_and_crop(&self.images[i], STORED_SIDE, CROP))
    }

    /// (training, held-out) indices: 20 % of each class held out, fixed seed.
    pub fn split(&self) -> (Vec<usize>, Vec<usize>) {
        stratified_split(&self.labels, HELDOUT_FRACTION, SPLIT_SEED)
    }

    /// The class names of the labels (`None` for ImageNet's, which the caller has).
    pub fn own_classes(&self) -> Option<&[String]> {
        match &self.mode {
            LabelMode::Own(names) => Some(names),
            _ => None,
        }
    }
}

/// Calibration images for activation quantization (the first training photos).
const CALIBRATION_IMAGES: usize = 8;

/// A fine-tune of the photo model on a [`PhotoSet`], one step at a time.
pub struct PhotoFineTune {
    set: Arc<PhotoSet>,
    train: Vec<usize>,
    heldout: Vec<usize>,
    heldout_inputs: Vec<Vec<f32>>,
    heldout_labels: Vec<Option<usize>>,
    teacher: TensorStore,
    distiller: NetworkDistiller,
    order: Vec<usize>,
    rng: SplitMix,
    batch: usize,
    epochs: usize,
    epoch: usize,
    step: usize,
    epoch_loss_sum: f64,
}

impl PhotoFineTune {
    /// Splits the set, builds the teacher (fitting a head first for the user's own
    /// classes, on `head_device`, an autodiff device) and the student `recipe` makes of
    /// it, to train on `device` (autodiff). `stage` hears what is being prepared.
    pub async fn new(
        set: Arc<PhotoSet>,
        original: &TensorStore,
        recipe: &Recipe,
        cfg: DistillConfig,
        device: &Device,
        head_device: &Device,
        stage: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        cfg.validate_photo()?;
        let (train, heldout) = set.split();
        if train.is_empty() || heldout.is_empty() {
            return Err(EngineError::Config(format!(
                "{} photos are too few: distillation needs some to train on and some to hold out (at least 2 per folder)",
                set.len()
            )));
        }
        let teacher = match set.own_classes() {
            Some(names) => {
                stage(&format!(
                    "Fitting a {}-class head on the original network's features",
                    names.len()
                ));
                let labelled: Vec<usize> = train
                    .iter()
                    .copied()
                    .filter(|&i| set.labels[i].is_some())
                    .collect();
                let inputs: Vec<Vec<f32>> = labelled.iter().map(|&i| set.input(i)).collect();
                let ys: Vec<usize> = labelled.iter().filter_map(|&i| set.labels[i]).collect();
                let head = fit_head(original, &inputs, &ys, names.len(), head_device).await?;
                with_head(original, &head)
            }
            None => original.clone(),
        };
        stage("Building the student");
        let (student, masks) = student_for(&teacher, recipe)?;
        let (batch, epochs, seed) = (cfg.batch_size, cfg.epochs, cfg.seed);
        let total = train.len().div_ceil(batch) * epochs;
        let distiller = NetworkDistiller::new(
            &teacher,
            &student,
            masks,
            recipe.channel_pruning.as_ref(),
            cfg,
            total,
            device,
        )?;
        let mut rng = SplitMix::new(seed);
        let mut order = train.clone();
        rng.shuffle(&mut order);
        Ok(Self {
            heldout_inputs: heldout.iter().map(|&i| set.input(i)).collect(),
            heldout_labels: heldout.iter().map(|&i| set.labels[i]).collect(),
            set,
            train,
            heldout,
            teacher,
            distiller,
            order,
            rng,
            batch,
            epochs,
            epoch: 0,
            step: 0,
            epoch_loss_sum: 0.0,
        })
    }

    pub fn train_images(&self) -> usize {
        self.train.len()
    }

    pub fn heldout_images(&self) -> usize {
        self.heldout.len()
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.batch)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.epochs
    }

    pub fn steps_done(&self) -> usize {
        self.epoch * self.steps_per_epoch() + self.step
    }

    pub fn is_done(&self) -> bool {
        self.epoch >= self.epochs
    }

    /// The teacher's weights (the original, or with the fitted head).
    pub fn teacher(&self) -> &TensorStore {
        &self.teacher
    }

    pub fn heldout_inputs(&self) -> &[Vec<f32>] {
        &self.heldout_inputs
    }

    pub fn heldout_labels(&self) -> &[Option<usize>] {
        &self.heldout_labels
    }

    /// One Adam step on the next batch of augmented training photos.
    pub async fn step(&mut self) -> Result<StepReport> {
        if self.is_done() {
            return Err(EngineError::Config("fine-tuning already finished".into()));
        }
        let steps = self.steps_per_epoch();
        let chunk: Vec<usize> = self.order
            [self.step * self.batch..((self.step + 1) * self.batch).min(self.order.len())]
            .to_vec();
        let inputs: Vec<f32> = chunk
            .iter()
            .flat_map(|&i| augment_photo(&self.set.images[i], &mut self.rng))
            .collect();
        let labels: Vec<Option<usize>> = chunk.iter().map(|&i| self.set.labels[i]).collect();
        let loss = self.distiller.step(inputs, &labels).await?;
        self.epoch_loss_sum += loss;
        let report = StepReport {
            epoch: self.epoch,
            step: self.step,
            steps,
            loss,
            epoch_loss: self.epoch_loss_sum / (self.step + 1) as f64,
            images: chunk.len(),
            epoch_done: self.step + 1 == steps,
        };
        self.step += 1;
        if self.step == steps {
            self.step = 0;
            self.epoch += 1;
            self.epoch_loss_sum = 0.0;
            self.rng.shuffle(&mut self.order);
        }
        Ok(report)
    }

    /// The student as it stands on the held-out photos (centre crops).
    pub async fn evaluate(&self) -> Result<HeldOutReport> {
        self.distiller
            .evaluate(&self.heldout_inputs, &self.heldout_labels)
            .await
    }

    /// Top-1 predictions of a network (any executor) on the held-out photos.
    pub async fn heldout_predictions(&self, classifier: &ImageClassifier) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(self.heldout_inputs.len());
        for x in &self.heldout_inputs {
            out.push(argmax(&classifier.logits(x).await?));
        }
        Ok(out)
    }

    /// Accuracy of `predictions` on the labelled held-out photos (when there are any),
    /// and their agreement with `reference` (the teacher's predictions).
    pub fn scores(&self, predictions: &[usize], reference: &[usize]) -> (Option<f64>, f64) {
        let labelled: Vec<(usize, usize)> = self
            .heldout_labels
            .iter()
            .zip(predictions)
            .filter_map(|(l, &p)| l.map(|y| (y, p)))
            .collect();
        let accuracy = (!labelled.is_empty()).then(|| {
            labelled.iter().filter(|(y, p)| y == p).count() as f64 / labelled.len() as f64
        });
        let agree = predictions
            .iter()
            .zip(reference)
            .filter(|(a, b)| a == b)
            .count();
        (accuracy, agree as f64 / predictions.len().max(1) as f64)
    }

    /// The recipe's network before fine-tuning and the fine-tuned one, both quantized
    /// as deployed (activations calibrated on the first training photos); the fine-tuned
    /// one's per-layer error is against its fine-tuned float weights.
    pub async fn finish(&self, recipe: &Recipe) -> Result<(CompressedModel, CompressedModel)> {
        let calibration: Vec<Vec<f32>> = self
            .train
            .iter()
            .take(CALIBRATION_IMAGES)
            .map(|&i| self.set.input(i))
            .collect();
        let trained = self.distiller.student().await?;
        let after = requantize(&trained, recipe, &calibration)?;
        let before = compress(&self.teacher, recipe, &calibration, &mut |_, _| Ok(()))?;
        Ok((before, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_decide_the_labels() {
        let imagenet =
            Labels::from_json(br#"["tench","espresso","tabby","golden retriever"]"#).unwrap();
        let f = |v: &[Option<&str>]| -> Vec<Option<String>> {
            v.iter().map(|s| s.map(String::from)).collect()
        };
        let (labels, mode) =
            resolve_labels(&f(&[Some("espresso"), Some("Tabby"), None]), &imagenet);
        assert_eq!(mode, LabelMode::ImageNet);
        assert_eq!(labels, vec![Some(1), Some(2), None]);
        // One folder that is no ImageNet class makes them all the user's own.
        let (labels, mode) = resolve_labels(
            &f(&[Some("espresso"), Some("holiday"), Some("espresso")]),
            &imagenet,
        );
        assert_eq!(
            mode,
            LabelMode::Own(vec!["espresso".into(), "holiday".into()])
        );
        assert_eq!(labels, vec![Some(0), Some(1), Some(0)]);
        // Folder names compared as labels are: "Cats" and "cats" are one class.
        let (labels, mode) = resolve_labels(
            &f(&[Some("Cats"), Some("dogs"), Some("cats"), None]),
            &imagenet,
        );
        assert_eq!(mode, LabelMode::Own(vec!["Cats".into(), "dogs".into()]));
        assert_eq!(labels, vec![Some(0), Some(1), Some(0), None]);
        let (labels, mode) = resolve_labels(&f(&[Some("holiday"), None]), &imagenet);
        assert_eq!(mode, LabelMode::Unlabelled);
        assert_eq!(labels, vec![None, None]);
        assert_eq!(folder_of("a/b/cat.png").as_deref(), Some("b"));
        assert_eq!(folder_of("cat.png"), None);
    }
}
