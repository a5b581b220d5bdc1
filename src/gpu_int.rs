//! Integer kernels on burn's wgpu device (WebGPU in the browser, Vulkan natively): the WGSL
//! files in `kernels/` launched through burn-wgpu's template mechanism on the tensors'
//! own GPU buffers (no CPU round trip).
//!
//! - int8 weights + int8 inputs: `quantize_pack_i8` packs the input four channels per word,
//!   `matmul_i8_dot4` multiplies with `dot4I8Packed` and applies scale and bias in one pass.
//! - int4 weight-only: `matmul_int4_weight_only` reads the packed nibbles and unpacks them in
//!   the kernel.
//!
//! In a graph on the burn interpreter ([`graph_on_integer_kernels`]) these run the quantized
//! plain 1×1 convolutions and Gemms; the other layers run as burn ops on the dequantized
//! weights (with inputs fake-quantized when calibrated).

use burn::backend::Wgpu;
use burn::backend::wgpu::{
    CubeDim, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::cubecl::CubeCount;
use burn::cubecl::prelude::KernelId;
use burn::cubecl::server::{KernelArguments, MetadataBindingInfo};
use burn::prelude::*;
use burn::tensor::{DType, Shape};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::compress::ActivationParams;
use crate::error::{EngineError, Result};
use crate::exec::{ChannelKernel, GraphModel};
use crate::graph::{CompressedGraph, Graph, Op, Padding};
use crate::quant::{Granularity, QuantizedTensor};

macro_rules! wgsl_kernel {
    ($name:ident, $file:literal) => {
        struct $name;
        impl KernelSource for $name {
            fn source(&self) -> SourceTemplate {
                SourceTemplate::new(include_str!(concat!("../kernels/", $file)))
            }
            fn id(&self) -> KernelId {
                KernelId::new::<Self>()
            }
            fn lang(&self) -> &'static str {
                "wgsl"
            }
        }
    };
}

wgsl_kernel!(QuantizePackI8, "quantize_pack_i8.wgsl");
wgsl_kernel!(MatmulI8Dot4, "matmul_i8_dot4.wgsl");
wgsl_kernel!(MatmulInt4WeightOnly, "matmul_int4_weight_only.wgsl");

const WORKGROUP: u32 = 64;

/// Uniform parameters as the 64-bit words cubecl uploads (two 32-bit fields each, little
/// endian), padded to 16 bytes.
fn uniform(words: &[u32]) -> MetadataBindingInfo {
    let mut w = words.to_vec();
    while !w.len().is_multiple_of(4) {
        w.push(0);
    }
    MetadataBindingInfo::custom(
        w.chunks(2)
            .map(|p| p[0] as u64 | (p[1] as u64) << 32)
            .collect(),
    )
}

fn cube(t: Tensor<1>) -> Result<CubeTensor> {
    t.try_into_primitive::<Wgpu>()
        .map(into_contiguous)
        .map_err(|e| EngineError::Execution(format!("integer kernels need the wgpu device: {e:?}")))
}

fn cube_int(t: Tensor<1, Int>) -> Result<CubeTensor> {
    t.try_into_primitive::<Wgpu>()
        .map(into_contiguous)
        .map_err(|e| EngineError::Execution(format!("integer kernels need the wgpu device: {e:?}")))
}

/// What the adapter lets the integer kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuFeatures {
    /// WGSL's `packed_4x8_integer_dot_product` language feature (`dot4I8Packed`), which the
    /// int8 kernel needs. Without it int8 layers run as float on their dequantized weights.
    pub packed_dot4: bool,
}

impl GpuFeatures {
    /// Native wgpu (Vulkan, Metal, DX12) always has `dot4I8Packed`.
    pub const NATIVE: Self = Self { packed_dot4: true };
}

/// One layer's weights on the GPU, in the layout its kernel reads.
// A few dozen of these exist per model, built once: the size gap between variants is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum IntLayer {
    Int8 {
        /// Packed weights `[outputs, channels4]` (i32 words).
        weights: Tensor<1, Int>,
        /// Per output: weight row sum, weight zero point.
        ints: Tensor<1, Int>,
        /// Per output: input scale × weight scale, bias.
        epilogue: Tensor<1>,
        input: ActivationParams,
        channels: usize,
        outputs: usize,
    },
    Int4 {
        weights: Tensor<1, Int>,
        scales: Tensor<1>,
        zero_points: Tensor<1, Int>,
        bias: Tensor<1>,
        channels: usize,
        outputs: usize,
        words_per_row: usize,
        group_len: usize,
        groups: usize,
    },
}

impl IntLayer {
    /// The kernel form of a quantized 1×1 layer, or `None` when no kernel fits (it then runs
    /// as float on the dequantized weights).
    fn new(
        q: &QuantizedTensor,
        input: Option<ActivationParams>,
        bias: &[f32],
        device: &Device,
        features: GpuFeatures,
    ) -> Option<Self> {
        let outputs = q.shape[0];
        let channels = q.values.len() / outputs.max(1);
        let (group_len, _) = q.grouping();
        // Per-tensor groups span rows; give every row the tensor's one scale.
        let per_row_groups: Vec<(f32, i32)> = match q.scheme.granularity {
            Granularity::PerTensor => {
                vec![(q.scales[0], q.zero_points[0] as i32); outputs]
            }
            _ => q
                .scales
                .iter()
                .zip(&q.zero_points)
                .map(|(&s, &z)| (s, z as i32))
                .collect(),
        };
        let groups = per_row_groups.len() / outputs.max(1);
        match (q.scheme.bits, input) {
            (8, Some(input))
                if features.packed_dot4
                    && groups == 1
                    && input.qmin >= -128
                    && input.qmax <= 127 =>
            {
                let channels4 = channels.div_ceil(4);
                let mut words = vec![0i32; outputs * channels4];
                let mut ints = Vec::with_capacity(2 * outputs);
                let mut epilogue = Vec::with_capacity(2 * outputs);
                for o in 0..outputs {
                    let row = &q.values[o * channels..(o + 1) * channels];
                    for (k, &v) in row.iter().enumerate() {
                        words[o * channels4 + k / 4] |= ((v as u8 as u32) << (8 * (k % 4))) as i32;
                    }
                    ints.push(row.iter().map(|&v| v as i32).sum());
                    ints.push(per_row_groups[o].1);
                    epilogue.push(per_row_groups[o].0 * input.scale);
                    epilogue.push(bias[o]);
                }
                Some(Self::Int8 {
                    weights: int_tensor(words, device),
                    ints: int_tensor(ints, device),
                    epilogue: float_tensor(epilogue, device),
                    input,
                    channels,
                    outputs,
                })
            }
            (4, None) => {
                let group_len = if groups == 1 { channels } else { group_len };
                let words_per_row = channels.div_ceil(8);
                let mut words = vec![0i32; outputs * words_per_row];
                for o in 0..outputs {
                    for k in 0..channels {
                        let nibble = (q.values[o * channels + k] as u8 & 0x0f) as u32;
                        words[o * words_per_row + k / 8] |= (nibble << (4 * (k % 8))) as i32;
                    }
                }
                Some(Self::Int4 {
                    weights: int_tensor(words, device),
                    scales: float_tensor(per_row_groups.iter().map(|g| g.0).collect(), device),
                    zero_points: int_tensor(per_row_groups.iter().map(|g| g.1).collect(), device),
                    bias: float_tensor(bias.to_vec(), device),
                    channels,
                    outputs,
                    words_per_row,
                    group_len,
                    groups,
                })
            }
            _ => None,
        }
    }

    /// Bytes of its GPU buffers (every element is 4 bytes).
    fn bytes(&self) -> usize {
        let elements = match self {
            Self::Int8 {
                weights,
                ints,
                epilogue,
                ..
            } => weights.dims()[0] + ints.dims()[0] + epilogue.dims()[0],
            Self::Int4 {
                weights,
                scales,
                zero_points,
                bias,
                ..
            } => weights.dims()[0] + scales.dims()[0] + zero_points.dims()[0] + bias.dims()[0],
        };
        elements * 4
    }

    /// Runs the layer on `x` (`[channels, pixels]` contiguous); returns `[outputs, pixels]`.
    /// The kernels can also apply ReLU6 and add a residual as they write; the graph runs
    /// those as nodes of their own, so both flags are off.
    fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let [_, pixels] = x.dims();
        let x = cube(x.reshape([-1]))?;
        let (client, device) = (x.client.clone(), x.device.clone());
        let grid_x = (pixels as u32).div_ceil(WORKGROUP);
        let outputs = match self {
            Self::Int8 { outputs, .. } | Self::Int4 { outputs, .. } => *outputs,
        };
        // Without a residual the kernel never reads binding `res`, but it must be bound: a
        // buffer of its own (WebGPU forbids aliasing writable bindings).
        let res_binding = client.empty(16).binding();
        let out = client.empty(outputs * pixels * 4);
        match self {
            Self::Int8 {
                weights,
                ints,
                epilogue,
                input,
                channels,
                ..
            } => {
                let channels4 = channels.div_ceil(4);
                let packed = client.empty(channels4 * pixels * 4);
                client.launch(
                    Box::new(SourceKernel::new(
                        QuantizePackI8,
                        CubeDim::new_1d(WORKGROUP),
                    )),
                    CubeCount::Static(grid_x, channels4 as u32, 1),
                    KernelArguments::new()
                        .with_buffer(x.handle.clone().binding())
                        .with_buffer(packed.clone().binding())
                        .with_info(uniform(&[
                            *channels as u32,
                            pixels as u32,
                            channels4 as u32,
                            input.zero_point as u32,
                            input.scale.to_bits(),
                            input.qmin as u32,
                            input.qmax as u32,
                        ])),
                );
                let (w, ints, epi) = (
                    cube_int(weights.clone())?,
                    cube_int(ints.clone())?,
                    cube(epilogue.clone())?,
                );
                client.launch(
                    Box::new(SourceKernel::new(MatmulI8Dot4, CubeDim::new_1d(WORKGROUP))),
                    CubeCount::Static(grid_x, outputs as u32, 1),
                    KernelArguments::new()
                        .with_buffer(packed.binding())
                        .with_buffer(w.handle.clone().binding())
                        .with_buffer(ints.handle.clone().binding())
                        .with_buffer(epi.handle.clone().binding())
                        .with_buffer(res_binding)
                        .with_buffer(out.clone().binding())
                        .with_info(uniform(&[
                            *channels as u32,
                            channels4 as u32,
                            pixels as u32,
                            outputs as u32,
                            input.zero_point as u32,
                            0,
                            0,
                        ])),
                );
            }
            Self::Int4 {
                weights,
                scales,
                zero_points,
                bias,
                channels,
                words_per_row,
                group_len,
                groups,
                ..
            } => {
                let (w, qp, zps, epi) = (
                    cube_int(weights.clone())?,
                    cube(scales.clone())?,
                    cube_int(zero_points.clone())?,
                    cube(bias.clone())?,
                );
                client.launch(
                    Box::new(SourceKernel::new(
                        MatmulInt4WeightOnly,
                        CubeDim::new_1d(WORKGROUP),
                    )),
                    CubeCount::Static(grid_x, outputs as u32, 1),
                    KernelArguments::new()
                        .with_buffer(x.handle.clone().binding())
                        .with_buffer(w.handle.clone().binding())
                        .with_buffer(qp.handle.clone().binding())
                        .with_buffer(zps.handle.clone().binding())
                        .with_buffer(epi.handle.clone().binding())
                        .with_buffer(res_binding)
                        .with_buffer(out.clone().binding())
                        .with_info(uniform(&[
                            *channels as u32,
                            pixels as u32,
                            outputs as u32,
                            *words_per_row as u32,
                            *group_len as u32,
                            *groups as u32,
                            0,
                            0,
                        ])),
                );
            }
        }
        let out = CubeTensor::new_contiguous(
            client,
            device,
            Shape::new([outputs * pixels]),
            out,
            DType::F32,
        );
        Ok(Tensor::<1>::from_primitive::<Wgpu>(out).reshape([outputs, pixels]))
    }
}

impl ChannelKernel for IntLayer {
    fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        IntLayer::forward(self, x)
    }

    fn weight_bits(&self) -> u8 {
        match self {
            Self::Int8 { .. } => 8,
            Self::Int4 { .. } => 4,
        }
    }

    fn bytes(&self) -> usize {
        IntLayer::bytes(self)
    }
}

/// A compressed graph on the wgpu device, its quantized 1×1 convolutions and Gemms (`transB`,
/// no scaling of the product) on the integer kernels where one fits them, everything else as
/// burn ops on the dequantized weights. The f32 weights of a layer on a kernel are never
/// uploaded.
pub fn graph_on_integer_kernels(
    compressed: &CompressedGraph,
    device: &Device,
    features: GpuFeatures,
) -> Result<GraphModel> {
    quantized_graph_on_integer_kernels(&compressed.graph, &compressed.weights, device, features)
}

/// [`graph_on_integer_kernels`] for a graph and its integer weights by constant name.
pub fn quantized_graph_on_integer_kernels(
    graph: &Graph,
    weights: &BTreeMap<String, QuantizedTensor>,
    device: &Device,
    features: GpuFeatures,
) -> Result<GraphModel> {
    let producers: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut kernels: HashMap<usize, Arc<dyn ChannelKernel>> = HashMap::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        let Some(q) = node.inputs.get(1).and_then(|w| weights.get(w)) else {
            continue;
        };
        let outputs = q.shape.first().copied().unwrap_or(0);
        let c = node.inputs.get(2).and_then(|b| graph.constant(b));
        // A bias of one value per output (`[N]` or `[1, N]`) or one for all; Gemm's C may
        // be any broadcastable shape, and the others stay burn ops.
        let per_output = c.is_none_or(|c| match c.dims.as_slice() {
            [n] | [1, n] => *n == outputs || *n == 1,
            [] => true,
            _ => false,
        });
        if !per_output {
            continue;
        }
        let given = c.map(|c| c.data.as_slice());
        let bias: Option<Vec<f32>> = match &node.op {
            Op::Conv(c) => {
                let no_pad = match c.padding {
                    Padding::Explicit(p) => p == [0; 4],
                    Padding::Same { .. } => true,
                };
                let one_by_one = c.kernel == [1, 1]
                    && c.strides == [1, 1]
                    && c.dilations == [1, 1]
                    && c.group == 1
                    && no_pad;
                match given {
                    _ if !one_by_one => None,
                    None => Some(vec![0.0; outputs]),
                    Some(b) if b.len() == outputs => Some(b.to_vec()),
                    Some(_) => None,
                }
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a: false,
                trans_b: true,
            } if *alpha == 1.0 => match given {
                None => Some(vec![0.0; outputs]),
                Some(&[one]) => Some(vec![beta * one; outputs]),
                Some(b) if b.len() == outputs => Some(b.iter().map(|v| beta * v).collect()),
                Some(_) => None,
            },
            _ => None,
        };
        let Some(bias) = bias else { continue };
        // int8 quantizes its input on the grid of the activation quantizer before it;
        // int4 is weight-only (that quantizer, if any, stays a node of its own).
        let grid = match producers.get(node.inputs[0].as_str()) {
            Some(&p) if q.scheme.bits == 8 => match &graph.nodes[p].op {
                Op::QuantizeDequantize(g) if g.is_valid() => Some(*g),
                _ => None,
            },
            _ => None,
        };
        if let Some(layer) = IntLayer::new(q, grid, &bias, device, features) {
            kernels.insert(i, Arc::new(layer));
        }
    }
    GraphModel::with_kernels(graph, device, kernels)
}

fn int_tensor(v: Vec<i32>, device: &Device) -> Tensor<1, Int> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn float_tensor(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}
