//! Native image decoding with the `image` crate (the browser uses its own decoder).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::error::{EngineError, Result};
use crate::preprocess::RgbImage;

/// Decodes PNG/JPEG/GIF (first frame)/WebP/BMP bytes, applies EXIF orientation, converts to RGB.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(EngineError::Decode("the file is empty".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| EngineError::Decode(e.to_string()))?;
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| EngineError::Decode(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if (w as u64) * (h as u64) > crate::preprocess::MAX_PIXELS {
        return Err(EngineError::ImageSize {
            width: w,
            height: h,
            reason: "more than 100 megapixels",
        });
    }
    let orientation = decoder
        .orientation()
        .map_err(|e| EngineError::Decode(e.to_string()))?;
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| EngineError::Decode(e.to_string()))?;
    img.apply_orientation(orientation);
    let rgb = img.to_rgb8();
    RgbImage::new(rgb.width() as usize, rgb.height() as usize, rgb.into_raw())
}

pub fn decode_file(path: &std::path::Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_image(&bytes)
}
