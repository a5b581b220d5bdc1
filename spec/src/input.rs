//! How an image becomes a model's input: size, resizing, normalisation, channel order.

use serde::{Deserialize, Serialize};

/// ImageNet's evaluation crop side.
pub const CROP: usize = 224;

/// How an image is brought to a model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResizeMode {
    /// Shorter side to `size / 0.875` (256 for 224), then the centre `height`×`width`.
    ShorterSideCentreCrop,
    /// Scaled to the input height, the width following the aspect ratio up to the input
    /// width (squeezed beyond), the rest padded on the right with zeros after normalisation:
    /// how PaddleOCR-style text-line models are fed.
    HeightAndPadRight,
    /// Stretched to `height`×`width`.
    Stretch,
}

/// How 8-bit values become the model's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Normalization {
    /// `(x/255 − mean)/std` with ImageNet's mean and std per channel.
    ImageNet,
    /// `(x − 127.5)/127.5`: [−1, 1].
    MinusOneToOne,
    /// `x/255`: [0, 1].
    ZeroToOne,
    /// `x`: [0, 255].
    Raw,
}

/// What a user tells the page about their model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub height: usize,
    pub width: usize,
    pub resize: ResizeMode,
    pub normalization: Normalization,
    /// Channels in BGR order (OpenCV-trained models).
    pub bgr: bool,
}

impl Default for InputSpec {
    /// ImageNet's evaluation transform at 224×224.
    fn default() -> Self {
        Self {
            height: CROP,
            width: CROP,
            resize: ResizeMode::ShorterSideCentreCrop,
            normalization: Normalization::ImageNet,
            bgr: false,
        }
    }
}

/// The largest input side the page accepts for a user's model.
pub const MAX_INPUT_SIDE: usize = 4096;
