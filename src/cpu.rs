//! Float GEMM and the 1×1 layer built on it, shared by the Fashion-MNIST network's CPU path
//! (`fashion_cpu.rs`) and the int4 kernel's float tiles. (This was EfficientNet-Lite's
//! dedicated CPU path; the photo model now runs on the graph interpreter, `src/exec/cpu/`.)

use crate::compress::{ActivationParams, CompressedLayer};
use crate::error::Result;
use crate::int4_cpu::Int4Weights;
use crate::int8_cpu::{FusedEpilogue, Int8Pointwise};

/// `out[p][j] += Σ_k input[p][k] · weights[j][k]` for `pixels` rows of `cin` inputs and
/// `weights.len() / cin` outputs, the rows of `out` `out_stride` apart (a tile of output
/// columns writes into the whole layer's output).
pub(crate) fn gemm_accumulate(
    out: &mut [f32],
    out_stride: usize,
    input: &[f32],
    weights: &[f32],
    pixels: usize,
    cin: usize,
) {
    let n = weights.len() / cin.max(1);
    assert_eq!(input.len(), pixels * cin);
    assert_eq!(weights.len(), n * cin);
    assert!(n <= out_stride && out.len() >= pixels.saturating_sub(1) * out_stride + n);
    if pixels == 0 || n == 0 {
        return;
    }
    // SAFETY: `input` holds `pixels × cin` and `weights` `n × cin` elements, and `out` holds
    // `pixels` rows of `n` values `out_stride` apart, as the asserts check.
    unsafe {
        gemm::gemm(
            pixels,
            n,
            cin,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            true,
            input.as_ptr(),
            1,
            cin as isize,
            weights.as_ptr(),
            cin as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A 1×1 convolution as a GEMM: `[pixels, cin] · [cin, cout]` (also a linear layer, and
/// a k×k convolution after im2col).
pub(crate) struct Pointwise {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    /// PyTorch layout `[cout, cin]`, read transposed by the GEMM.
    weight: Vec<f32>,
    bias: Vec<f32>,
    relu6: bool,
    /// Static quantization of the input (fake-quant on the float path).
    input_quant: Option<ActivationParams>,
    /// The next layer's input quantization, applied to the output here (that layer then
    /// skips its own pass over the data).
    output_grid: Option<ActivationParams>,
    /// Integer weights: when present the layer runs on [`Int8Pointwise`].
    int8: Option<Int8Pointwise>,
    /// Packed int4 weights (weight-only): when present `weight` is empty and the GEMM
    /// unpacks a tile at a time.
    int4: Option<Int4Weights>,
}

impl Pointwise {
    /// A float layer from PyTorch-layout weights `[cout, cin]`.
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        weight: Vec<f32>,
        bias: Vec<f32>,
        relu6: bool,
    ) -> Self {
        Self {
            cin,
            cout,
            weight,
            bias,
            relu6,
            input_quant: None,
            output_grid: None,
            int8: None,
            int4: None,
        }
    }

    /// Takes the layer's input quantization, and its integer kernel: int8 where both
    /// weights and inputs are int8, packed int4 weights where the weights are 4-bit (unless
    /// `integer_kernels` is false: then it stays the float fake-quant reference).
    pub(crate) fn attach(&mut self, layer: &CompressedLayer, integer_kernels: bool) -> Result<()> {
        self.input_quant = layer.activation;
        if let (true, Some(q), Some(a)) = (integer_kernels, &layer.weights, &layer.activation) {
            self.int8 = Int8Pointwise::new(q, a, self.cin, self.cout)?;
        }
        if let (true, None, Some(q)) = (integer_kernels, &self.int8, &layer.weights) {
            self.int4 = Int4Weights::new(q, self.cin, self.cout);
        }
        if self.int8.is_some() || self.int4.is_some() {
            // The integer weights replace the float copy (a variant must not hold both).
            self.weight = Vec::new();
        }
        Ok(())
    }

    /// Whether this layer runs on the int8 kernel.
    pub(crate) fn is_integer(&self) -> bool {
        self.int8.is_some()
    }

    pub(crate) fn forward(
        &self,
        input: &[f32],
        pixels: usize,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        if let Some(int8) = &self.int8 {
            let epilogue = FusedEpilogue {
                relu6: self.relu6,
                residual,
                grid: self.output_grid.as_ref(),
            };
            return int8.forward(input, pixels, &self.bias, epilogue);
        }
        let quantized;
        let input = match &self.input_quant {
            Some(q) => {
                quantized = fake_quantize_all(input, q);
                &quantized[..]
            }
            None => input,
        };
        if let Some(int4) = &self.int4 {
            let out = int4.product(input, pixels, &self.bias);
            return self.epilogue(out, residual);
        }
        let mut out = Vec::with_capacity(pixels * self.cout);
        for _ in 0..pixels {
            out.extend_from_slice(&self.bias);
        }
        gemm_accumulate(&mut out, self.cout, input, &self.weight, pixels, self.cin);
        self.epilogue(out, residual)
    }

    /// ReLU6 (where the layer has it), then the residual, then the next layer's input
    /// quantization.
    fn epilogue(&self, mut out: Vec<f32>, residual: Option<&[f32]>) -> Vec<f32> {
        if self.relu6 {
            out.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
        }
        if let Some(res) = residual {
            out.iter_mut().zip(res).for_each(|(o, r)| *o += r);
        }
        if let Some(grid) = &self.output_grid {
            out.iter_mut().for_each(|v| *v = grid.fake_quantize(*v));
        }
        out
    }
}

/// Fake-quantizes every value (the float reference for a quantized input).
fn fake_quantize_all(input: &[f32], q: &ActivationParams) -> Vec<f32> {
    input.iter().map(|&x| q.fake_quantize(x)).collect()
}
