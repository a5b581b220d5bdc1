//! ImageNet evaluation preprocessing, shared by the browser and native paths:
//! RGB → resize the shorter side to 256 (bicubic, antialiased as in PIL/torchvision)
//! → centre-crop 224×224 → `(x − 127) / 128` → NCHW f32.
//!
//! Only decoding differs between the paths (the browser's decoder vs the `image` crate);
//! everything from decoded pixels on is this one function. A user's own model says how its
//! input is made with an [`InputSpec`] (size, resize mode, normalisation, channel order).

pub use compresslab_spec::input::{CROP, InputSpec, MAX_INPUT_SIDE, Normalization, ResizeMode};

use crate::error::{EngineError, Result};

pub const RESIZE_SHORTER: usize = 256;
pub const MEAN: f32 = 127.0;
pub const STD: f32 = 128.0;

/// Images with more pixels than this are refused; the browser path downsamples huge
/// images while decoding so they arrive under it.
pub const MAX_PIXELS: u64 = 100_000_000;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        check_size(width, height)?;
        let expected = width * height * 3;
        if pixels.len() != expected {
            return Err(EngineError::PixelBuffer {
                found: pixels.len(),
                expected,
            });
        }
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    /// From RGBA bytes (canvas `ImageData`); alpha is dropped, as PIL's `convert("RGB")` does.
    pub fn from_rgba(width: usize, height: usize, rgba: &[u8]) -> Result<Self> {
        check_size(width, height)?;
        let expected = width * height * 4;
        if rgba.len() != expected {
            return Err(EngineError::PixelBuffer {
                found: rgba.len(),
                expected,
            });
        }
        let pixels = rgba
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        Ok(Self {
            width,
            height,
            pixels,
        })
    }
}

fn check_size(width: usize, height: usize) -> Result<()> {
    let reason = if width == 0 || height == 0 {
        Some("the image is empty")
    } else if (width as u64) * (height as u64) > MAX_PIXELS {
        Some("more than 100 megapixels")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EngineError::ImageSize {
            width: width as u32,
            height: height as u32,
            reason,
        }),
        None => Ok(()),
    }
}

/// Size after resizing the shorter side to `target` (torchvision truncates the longer side).
pub fn resized_dims(width: usize, height: usize, target: usize) -> (usize, usize) {
    if width <= height {
        (
            target,
            (target as f64 * height as f64 / width as f64) as usize,
        )
    } else {
        (
            (target as f64 * width as f64 / height as f64) as usize,
            target,
        )
    }
}

/// Keys' bicubic kernel with a = −0.5 (PIL's BICUBIC).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Filter taps for one output coordinate: first source index and normalised weights.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// PIL's antialiased resampling coefficients for output indices `range` of a
/// `in_size → out_size` resize (the kernel widens by the scale when downsampling).
fn taps(in_size: usize, out_size: usize, range: std::ops::Range<usize>) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    range
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(in_size);
            let mut w: Vec<f64> = (lo..hi)
                .map(|i| bicubic((i as f64 - center + 0.5) / filter_scale))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            Taps {
                start: lo,
                weights: w.into_iter().map(|v| v as f32).collect(),
            }
        })
        .collect()
}

/// Python's `round()` (half to even) for the crop offset, as torchvision computes it.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    };
    r.max(0.0) as usize
}

/// Resize (shorter side → `resize`) then centre-crop `crop`×`crop`, as 8-bit RGB.
/// Only the cropped window of the resized image is computed.
pub fn resize_and_crop(img: &RgbImage, resize: usize, crop: usize) -> RgbImage {
    let (rw, rh) = resized_dims(img.width, img.height, resize);
    let (rw, rh) = (rw.max(crop), rh.max(crop));
    let left = round_half_even((rw - crop) as f64 / 2.0);
    let top = round_half_even((rh - crop) as f64 / 2.0);
    resample_window(img, (rw, rh), (left, top), (crop, crop))
}

/// The `(cw, ch)` window at `(left, top)` of `img` resized (antialiased bicubic, as PIL) to
/// `(rw, rh)`; only the window is computed.
pub fn resample_window(
    img: &RgbImage,
    (rw, rh): (usize, usize),
    (left, top): (usize, usize),
    (cw, ch): (usize, usize),
) -> RgbImage {
    let xt = taps(img.width, rw, left..left + cw);
    let yt = taps(img.height, rh, top..top + ch);

    // Vertical pass first, over only the source rows the window needs.
    let w = img.width;
    let mut vert = vec![0f32; ch * w * 3];
    for (oy, t) in yt.iter().enumerate() {
        let out = &mut vert[oy * w * 3..(oy + 1) * w * 3];
        for (k, &wt) in t.weights.iter().enumerate() {
            let sy = t.start + k;
            let src = &img.pixels[sy * w * 3..(sy + 1) * w * 3];
            for (o, &s) in out.iter_mut().zip(src) {
                *o += wt * s as f32;
            }
        }
    }
    let mut pixels = Vec::with_capacity(cw * ch * 3);
    for oy in 0..ch {
        let row = &vert[oy * w * 3..(oy + 1) * w * 3];
        for t in &xt {
            let mut acc = [0f32; 3];
            for (k, &wt) in t.weights.iter().enumerate() {
                let p = &row[(t.start + k) * 3..(t.start + k) * 3 + 3];
                acc[0] += wt * p[0];
                acc[1] += wt * p[1];
                acc[2] += wt * p[2];
            }
            pixels.extend(acc.iter().map(|v| v.round().clamp(0.0, 255.0) as u8));
        }
    }
    RgbImage {
        width: cw,
        height: ch,
        pixels,
    }
}

/// Integer box reduction for very large images before the bicubic pass (as PIL's
/// `reducing_gap` does): keeps the shorter side at least `2 × target`.
pub fn box_reduce(img: &RgbImage, target_shorter: usize) -> RgbImage {
    let shorter = img.width.min(img.height);
    let factor = shorter / (2 * target_shorter);
    if factor < 2 {
        return img.clone();
    }
    let (w, h) = (img.width / factor, img.height / factor);
    let mut pixels = Vec::with_capacity(w * h * 3);
    let area = (factor * factor) as u32;
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0u32; 3];
            for dy in 0..factor {
                let row = (y * factor + dy) * img.width;
                for dx in 0..factor {
                    let p = (row + x * factor + dx) * 3;
                    acc[0] += img.pixels[p] as u32;
                    acc[1] += img.pixels[p + 1] as u32;
                    acc[2] += img.pixels[p + 2] as u32;
                }
            }
            pixels.extend(acc.iter().map(|&v| ((v + area / 2) / area) as u8));
        }
    }
    RgbImage {
        width: w,
        height: h,
        pixels,
    }
}

/// What the model sees: the 224×224 8-bit crop after the resize.
pub fn imagenet_crop(img: &RgbImage) -> RgbImage {
    let reduced = box_reduce(img, RESIZE_SHORTER);
    resize_and_crop(&reduced, RESIZE_SHORTER, CROP)
}

/// The full evaluation transform: NCHW `[1, 3, 224, 224]` values, `(x − 127) / 128`.
pub fn imagenet_input(img: &RgbImage) -> Vec<f32> {
    to_nchw(&imagenet_crop(img))
}

/// Normalises an 8-bit RGB image into planar NCHW floats.
pub fn to_nchw(img: &RgbImage) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 - MEAN) / STD;
        }
    }
    out
}

/// `[1, 3, height, width]` values for `img` as `spec` describes the model's input.
pub fn input_tensor(spec: &InputSpec, img: &RgbImage) -> Result<Vec<f32>> {
    let (h, w) = (spec.height, spec.width);
    if !(1..=MAX_INPUT_SIDE).contains(&h) || !(1..=MAX_INPUT_SIDE).contains(&w) {
        return Err(EngineError::Config(format!(
            "input size {h}×{w}: each side must be 1–{MAX_INPUT_SIDE}"
        )));
    }
    let (placed, valid_w, valid_h) = match spec.resize {
        ResizeMode::Stretch => (resample_window(img, (w, h), (0, 0), (w, h)), w, h),
        ResizeMode::ShorterSideCentreCrop => {
            let side = ((h.max(w) as f64) / 0.875).round() as usize;
            let reduced = box_reduce(img, side);
            let (rw, rh) = resized_dims(reduced.width, reduced.height, side);
            let (rw, rh) = (rw.max(w), rh.max(h));
            let left = round_half_even((rw - w) as f64 / 2.0);
            let top = round_half_even((rh - h) as f64 / 2.0);
            (
                resample_window(&reduced, (rw, rh), (left, top), (w, h)),
                w,
                h,
            )
        }
        ResizeMode::HeightAndPadRight => {
            let aspect = img.width as f64 / img.height.max(1) as f64;
            let fw = ((h as f64 * aspect).round() as usize).clamp(1, w);
            (resample_window(img, (fw, h), (0, 0), (fw, h)), fw, h)
        }
    };
    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];
    let norm = |v: u8, c: usize| -> f32 {
        let x = f32::from(v);
        match spec.normalization {
            Normalization::ImageNet => (x / 255.0 - MEAN[c]) / STD[c],
            Normalization::MinusOneToOne => (x - 127.5) / 127.5,
            Normalization::ZeroToOne => x / 255.0,
            Normalization::Raw => x,
        }
    };
    let plane = h * w;
    let mut out = vec![0f32; 3 * plane];
    for y in 0..valid_h {
        for x in 0..valid_w {
            let p = &placed.pixels[(y * valid_w + x) * 3..(y * valid_w + x) * 3 + 3];
            for c in 0..3 {
                let source = if spec.bgr { 2 - c } else { c };
                out[c * plane + y * w + x] = norm(p[source], source);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_kernel_matches_pil() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert!((bicubic(0.5) - 0.5625).abs() < 1e-12);
        assert!((bicubic(1.5) + 0.0625).abs() < 1e-12);
    }

    #[test]
    fn resized_dims_follow_torchvision() {
        assert_eq!(resized_dims(451, 300, 256), (384, 256)); // int(256*451/300)=384
        assert_eq!(resized_dims(300, 451, 256), (256, 384));
        assert_eq!(resized_dims(256, 256, 256), (256, 256));
    }

    #[test]
    fn crop_offset_rounds_half_to_even() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(16.0), 16);
    }

    #[test]
    fn flat_image_stays_flat_and_normalises() {
        let img = RgbImage::new(400, 300, [10u8, 127, 255].repeat(400 * 300)).unwrap();
        let out = imagenet_input(&img);
        assert_eq!(out.len(), 3 * 224 * 224);
        assert!(
            out[..224 * 224]
                .iter()
                .all(|&v| v == (10.0 - 127.0) / 128.0)
        );
        assert!(out[224 * 224..2 * 224 * 224].iter().all(|&v| v == 0.0));
        assert!(out[2 * 224 * 224..].iter().all(|&v| v == 128.0 / 128.0));
    }

    #[test]
    fn identity_when_already_cropped_size() {
        // 256×256 resize is identity; centre crop takes rows/cols 16..240.
        let pixels: Vec<u8> = (0..256 * 256 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let img = RgbImage::new(256, 256, pixels.clone()).unwrap();
        let out = resize_and_crop(&img, 256, 224);
        for y in 0..224 {
            for x in 0..224 {
                for c in 0..3 {
                    let src = pixels[((y + 16) * 256 + x + 16) * 3 + c];
                    assert_eq!(out.pixels[(y * 224 + x) * 3 + c], src);
                }
            }
        }
    }

    #[test]
    fn rejects_bad_buffers() {
        assert!(RgbImage::new(0, 10, vec![]).is_err());
        assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
        assert!(RgbImage::from_rgba(2, 2, &[0; 15]).is_err());
        assert!(RgbImage::new(20_000, 20_000, vec![]).is_err());
    }
}
