//! A compression recipe: what the user chose, serialised as the JSON recipe next to an export.

use serde::{Deserialize, Serialize};

use crate::error::{Result, SpecError};

/// How activation ranges are observed during calibration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Observer {
    /// The full range seen on the calibration images.
    MinMax,
    /// The given percentile of |values| (e.g. 99.99), ignoring rare outliers.
    Percentile(f32),
}

/// Static (calibrated) per-tensor quantization of each layer's input activations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActivationQuant {
    pub bits: u8,
    pub symmetric: bool,
    pub observer: Observer,
}

/// Everything the user chose; serialised as the JSON recipe next to an export. Missing
/// fields take their defaults (nothing applied).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Recipe {
    pub channel_pruning: Option<ChannelPruning>,
    pub magnitude_pruning: Option<MagnitudePruning>,
    pub weights: Option<QuantScheme>,
    pub activations: Option<ActivationQuant>,
    /// Layers left in fp32 (mixed precision): neither weights nor inputs quantized.
    pub keep_fp32: Vec<String>,
}

impl Recipe {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// int8 symmetric weights at `granularity` and asymmetric int8 activations (W8A8),
    /// the setting the integer kernels run.
    pub fn w8a8(granularity: Granularity, observer: Observer) -> Self {
        Self {
            weights: Some(QuantScheme {
                bits: 8,
                symmetric: true,
                granularity,
            }),
            activations: Some(ActivationQuant {
                bits: 8,
                symmetric: false,
                observer,
            }),
            ..Self::default()
        }
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| SpecError::Config(format!("recipe: {e}")))
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(m) = &self.magnitude_pruning {
            check_fraction("sparsity", m.sparsity)?;
        }
        if let Some(c) = &self.channel_pruning {
            check_fraction("channel ratio", c.ratio)?;
        }
        if let Some(w) = &self.weights {
            check_scheme("weights", w.bits, w.granularity)?;
        }
        if let Some(a) = &self.activations {
            check_scheme("activations", a.bits, Granularity::PerTensor)?;
            if let Observer::Percentile(p) = a.observer
                && !(50.0..=100.0).contains(&p)
            {
                return Err(SpecError::Config(format!(
                    "percentile must be between 50 and 100, got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// A pruning fraction: 0 to 0.95 (NaN is not one).
pub fn check_fraction(what: &str, f: f32) -> Result<()> {
    if (0.0..=0.95).contains(&f) {
        Ok(())
    } else {
        Err(SpecError::Config(format!(
            "{what} must be between 0 and 0.95, got {f}"
        )))
    }
}

fn check_scheme(what: &str, bits: u8, granularity: Granularity) -> Result<()> {
    if bits != 8 && bits != 4 {
        return Err(SpecError::Config(format!(
            "{what}: {bits} bits (use 8 or 4)"
        )));
    }
    if let Granularity::PerBlock(0) = granularity {
        return Err(SpecError::Config(format!("{what}: block size 0")));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    PerTensor,
    PerChannel,
    PerBlock(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantScheme {
    pub bits: u8,
    pub symmetric: bool,
    pub granularity: Granularity,
}

impl QuantScheme {
    #[inline]
    pub fn qrange(&self) -> (i32, i32) {
        let half = 1i32 << (self.bits - 1);
        if self.symmetric {
            (-(half - 1), half - 1)
        } else {
            (-half, half - 1)
        }
    }
}

/// How unstructured magnitude pruning picks its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PruneScope {
    /// Every layer loses the same fraction of its weights.
    PerLayer,
    /// One magnitude threshold over all included layers (layers with small weights lose more).
    Global,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MagnitudePruning {
    /// Fraction of weights set to zero, 0.0–0.95.
    pub sparsity: f32,
    pub scope: PruneScope,
    /// Layer names (e.g. `_conv_stem`, `_fc`) left untouched.
    pub exclude: Vec<String>,
    /// The first and the last layer with weights (in graph order: the stem and the
    /// classifier of a CNN) left untouched as well, whatever they are called.
    #[serde(default)]
    pub exclude_ends: bool,
}

/// How channels are ranked before the weakest are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelRanking {
    /// L1 norm of the producing convolution's filter.
    L1,
    /// L2 norm of the producing convolution's filter.
    L2,
    /// |γ| of the BatchNorm after the producing convolution (raw stores only).
    BatchNormGamma,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelPruning {
    /// Fraction of each prunable group's channels removed, 0.0–0.95.
    pub ratio: f32,
    pub ranking: ChannelRanking,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_fractions_outside_0_to_0_95_are_refused_before_any_work() {
        let with = |sparsity: f32, ratio: f32| Recipe {
            magnitude_pruning: Some(MagnitudePruning {
                sparsity,
                scope: PruneScope::PerLayer,
                exclude: Vec::new(),
                exclude_ends: false,
            }),
            channel_pruning: Some(ChannelPruning {
                ratio,
                ranking: ChannelRanking::L1,
            }),
            ..Recipe::default()
        };
        assert!(with(0.0, 0.0).validate().is_ok());
        assert!(with(0.95, 0.95).validate().is_ok());
        for (s, r) in [
            (-0.1, 0.0),
            (0.0, -0.1),
            (f32::NAN, 0.0),
            (0.0, f32::NAN),
            (0.96, 0.0),
        ] {
            assert!(with(s, r).validate().is_err(), "sparsity {s}, ratio {r}");
        }
    }
}
