//! [`Graph`] → ONNX (opset 21, IR 10), for deployment anywhere ONNX runs: float weights as
//! initializers; integer weights as uint8 / int4 initializers read through DequantizeLinear
//! (per tensor, per output channel with `axis` 0, or per block with `block_size`, where a
//! convolution's filter is blocked as the `[out, in·kh·kw]` matrix and reshaped back); static
//! activation quantization as QuantizeLinear → DequantizeLinear pairs (QDQ). Pruned channels
//! are simply absent: the tensors are smaller.

use std::collections::BTreeMap;

use super::proto::Message;
use super::shape::Dim;
use super::{ActivationParams, Graph, Op, Padding, Pool};
use crate::error::{EngineError, Result};
use crate::quant::{Granularity, QuantizedTensor, pack_int4};

/// The opset every node is written in (int4 and blocked DequantizeLinear need 21).
pub const EXPORT_OPSET: i64 = 21;
const IR_VERSION: i64 = 10;

const FLOAT: i64 = 1;
const UINT8: i64 = 2;
const INT64: i64 = 7;
const UINT4: i64 = 21;
const INT4: i64 = 22;

fn tensor(name: &str, dims: &[usize], data_type: i64, raw: &[u8]) -> Message {
    let mut t = Message::default();
    for &d in dims {
        t.int(1, d as i64);
    }
    t.int(2, data_type).string(8, name).bytes(9, raw);
    t
}

fn float_tensor(name: &str, dims: &[usize], data: &[f32]) -> Message {
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor(name, dims, FLOAT, &raw)
}

/// Signed integers: int4 as they are; 8-bit ones as uint8 `v + 128` (the zero points shift with
/// them, so every dequantized value is the same). ONNX Runtime runs a uint8 QDQ convolution on
/// its u8·u8 kernels, exact on every CPU; int8 activations put it on u8·s8 kernels whose 16-bit
/// pair sums saturate on x86 without VNNI (measured on an AVX2 EPYC: EfficientNet-Lite0 W8A8
/// changed its top-1 on 4 of 4 photos, the Fashion CNN on 3.8 % of 500 images).
fn int_tensor(name: &str, dims: &[usize], values: &[i8], bits: u8) -> Message {
    if bits == 4 {
        tensor(name, dims, INT4, &pack_int4(values))
    } else {
        let raw: Vec<u8> = values.iter().map(|&v| v.cast_unsigned() ^ 0x80).collect();
        tensor(name, dims, UINT8, &raw)
    }
}

enum Attr<'a> {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(&'a str),
}

fn attribute(name: &str, value: &Attr) -> Message {
    let mut a = Message::default();
    a.string(1, name);
    match value {
        Attr::Float(f) => a.float(2, *f).int(20, 1),
        Attr::Int(i) => a.int(3, *i).int(20, 2),
        Attr::Str(s) => a.string(4, s).int(20, 3),
        Attr::Ints(v) => {
            for &i in v {
                a.int(8, i);
            }
            a.int(20, 7)
        }
    };
    a
}

fn value_info(name: &str, dims: &[Dim]) -> Message {
    let mut shape = Message::default();
    for d in dims {
        let mut dim = Message::default();
        match d {
            Dim::Known(n) => dim.int(1, *n as i64),
            Dim::Sym(s) => dim.string(2, s),
        };
        shape.message(1, &dim);
    }
    let mut tensor_type = Message::default();
    tensor_type.int(1, FLOAT).message(2, &shape);
    let mut ty = Message::default();
    ty.message(1, &tensor_type);
    let mut v = Message::default();
    v.string(1, name).message(2, &ty);
    v
}

/// The graph being written: nodes and initializers in order.
#[derive(Default)]
struct Writer {
    graph: Message,
    initializers: Message,
}

impl Writer {
    fn node(
        &mut self,
        name: &str,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: &[(&str, Attr)],
    ) {
        let mut n = Message::default();
        for i in inputs {
            n.string(1, i);
        }
        for o in outputs {
            n.string(2, o);
        }
        n.string(3, name).string(4, op);
        for (k, v) in attrs {
            n.message(5, &attribute(k, v));
        }
        self.graph.message(1, &n);
    }

    fn initializer(&mut self, t: Message) {
        self.initializers.message(5, &t);
    }

    /// An integer weight and the DequantizeLinear that turns it into the float `name`.
    fn quantized_weight(&mut self, name: &str, q: &QuantizedTensor) -> Result<()> {
        let (scale, zp) = (format!("{name}.scale"), format!("{name}.zero_point"));
        let ints = format!("{name}.int{}", q.scheme.bits);
        let (group_len, row_len) = q.grouping();
        let rows = q.values.len() / row_len.max(1);
        let bits = q.scheme.bits;
        let (int_dims, scale_dims, attrs, reshaped) = match q.scheme.granularity {
            Granularity::PerTensor => (q.shape.clone(), vec![], vec![], false),
            Granularity::PerChannel => (
                q.shape.clone(),
                vec![rows],
                vec![("axis", Attr::Int(0))],
                false,
            ),
            Granularity::PerBlock(_) => (
                vec![rows, row_len],
                vec![rows, row_len.div_ceil(group_len.max(1))],
                vec![
                    ("axis", Attr::Int(1)),
                    ("block_size", Attr::Int(group_len as i64)),
                ],
                q.shape.len() != 2,
            ),
        };
        if scale_dims.iter().product::<usize>() != q.scales.len() {
            return Err(EngineError::Onnx(format!(
                "`{name}`: {} scales for a {:?} grid",
                q.scales.len(),
                scale_dims
            )));
        }
        self.initializer(int_tensor(&ints, &int_dims, &q.values, bits));
        self.initializer(float_tensor(&scale, &scale_dims, &q.scales));
        self.initializer(int_tensor(&zp, &scale_dims, &q.zero_points, bits));
        let dequantized = if reshaped {
            format!("{name}.2d")
        } else {
            name.to_string()
        };
        self.node(
            &format!("{name}.dequantize"),
            "DequantizeLinear",
            &[ints.as_str(), scale.as_str(), zp.as_str()],
            &[dequantized.as_str()],
            &attrs,
        );
        if reshaped {
            let shape = format!("{name}.shape");
            let dims: Vec<i64> = q.shape.iter().map(|&d| d as i64).collect();
            self.initializer(int64_tensor(&shape, &dims));
            self.node(
                &format!("{name}.reshape"),
                "Reshape",
                &[dequantized.as_str(), shape.as_str()],
                &[name],
                &[],
            );
        }
        Ok(())
    }

    fn activation_quantizer(&mut self, name: &str, x: &str, y: &str, p: &ActivationParams) {
        // The grid's integer type (an imported model's unsigned grids stay unsigned).
        let zp = |lo: i32, hi: i32| p.zero_point.clamp(lo, hi);
        let (bits, zero) = match (p.qmin, p.qmax) {
            (0.., ..=15) => (4, tensor(&zp_name(name), &[], UINT4, &[zp(0, 15) as u8])),
            (-8.., ..=7) => (4, int_tensor(&zp_name(name), &[], &[zp(-8, 7) as i8], 4)),
            (0.., _) => (8, tensor(&zp_name(name), &[], UINT8, &[zp(0, 255) as u8])),
            _ => (
                8,
                int_tensor(&zp_name(name), &[], &[zp(-128, 127) as i8], 8),
            ),
        };
        let (scale, zp, ints) = (
            format!("{name}.scale"),
            zp_name(name),
            format!("{y}.int{bits}"),
        );
        self.initializer(float_tensor(&scale, &[], &[p.scale]));
        self.initializer(zero);
        self.node(
            name,
            "QuantizeLinear",
            &[x, scale.as_str(), zp.as_str()],
            &[ints.as_str()],
            &[],
        );
        self.node(
            &format!("{name}.dequantize"),
            "DequantizeLinear",
            &[ints.as_str(), scale.as_str(), zp.as_str()],
            &[y],
            &[],
        );
    }
}

fn zp_name(quantizer: &str) -> String {
    format!("{quantizer}.zero_point")
}

fn int64_tensor(name: &str, values: &[i64]) -> Message {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor(name, &[values.len()], INT64, &raw)
}

fn pair(v: [usize; 2]) -> Attr<'static> {
    Attr::Ints(v.iter().map(|&x| x as i64).collect())
}

fn padding_attr(p: &Padding) -> (&'static str, Attr<'static>) {
    match p {
        Padding::Explicit(pads) => ("pads", Attr::Ints(pads.iter().map(|&x| x as i64).collect())),
        Padding::Same { upper: true } => ("auto_pad", Attr::Str("SAME_UPPER")),
        Padding::Same { upper: false } => ("auto_pad", Attr::Str("SAME_LOWER")),
    }
}

fn pool_attrs(p: &Pool) -> Vec<(&'static str, Attr<'static>)> {
    vec![
        ("kernel_shape", pair(p.kernel)),
        ("strides", pair(p.strides)),
        ("dilations", pair(p.dilations)),
        padding_attr(&p.padding),
        ("ceil_mode", Attr::Int(i64::from(p.ceil_mode))),
    ]
}

/// Writes `graph` as an ONNX model; the constants named in `quantized` are written as their
/// integers and dequantized in the graph. `metadata` is added to the graph's own.
pub fn export_onnx(
    graph: &Graph,
    quantized: &BTreeMap<String, QuantizedTensor>,
    metadata: &[(String, String)],
) -> Result<Vec<u8>> {
    let input = graph.input()?;
    let shapes = graph.shapes(&input.dims)?;
    let mut w = Writer::default();
    for (name, c) in &graph.constants {
        match quantized.get(name) {
            Some(q) => w.quantized_weight(name, q)?,
            None => w.initializer(float_tensor(name, &c.dims, &c.data)),
        }
    }
    for node in &graph.nodes {
        let inputs: Vec<&str> = node.inputs.iter().map(String::as_str).collect();
        let out = node.outputs[0].as_str();
        let name = node.name.as_str();
        let attrs: Vec<(&str, Attr)> = match &node.op {
            Op::Conv(c) => vec![
                ("kernel_shape", pair(c.kernel)),
                ("strides", pair(c.strides)),
                ("dilations", pair(c.dilations)),
                ("group", Attr::Int(c.group as i64)),
                padding_attr(&c.padding),
            ],
            Op::BatchNorm { epsilon } => vec![("epsilon", Attr::Float(*epsilon))],
            Op::LeakyRelu { alpha } => vec![("alpha", Attr::Float(*alpha))],
            Op::HardSigmoid { alpha, beta } => {
                vec![("alpha", Attr::Float(*alpha)), ("beta", Attr::Float(*beta))]
            }
            Op::Concat { axis } | Op::Flatten { axis } => vec![("axis", Attr::Int(*axis as i64))],
            Op::AveragePool(p) => {
                let mut a = pool_attrs(p);
                a.push((
                    "count_include_pad",
                    Attr::Int(i64::from(p.count_include_pad)),
                ));
                a
            }
            Op::MaxPool(p) => pool_attrs(p),
            Op::Transpose { perm } => {
                vec![("perm", Attr::Ints(perm.iter().map(|&p| p as i64).collect()))]
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => vec![
                ("alpha", Attr::Float(*alpha)),
                ("beta", Attr::Float(*beta)),
                ("transA", Attr::Int(i64::from(*trans_a))),
                ("transB", Attr::Int(i64::from(*trans_b))),
            ],
            Op::Softmax { axis, legacy } => {
                let rank = shapes.get(&node.inputs[0]).map_or(0, Vec::len);
                if *legacy && *axis + 1 != rank {
                    return Err(EngineError::Onnx(format!(
                        "Softmax `{name}` normalises over axes {axis}.. of a rank-{rank} input (opset < 13), which opset {EXPORT_OPSET} cannot write as one node"
                    )));
                }
                vec![("axis", Attr::Int(*axis as i64))]
            }
            _ => vec![],
        };
        match &node.op {
            Op::Clip { min, max } => {
                let mut bound = |value: f32, unbounded: f32, which: &str| {
                    if value == unbounded {
                        return String::new();
                    }
                    let n = format!("{name}.{which}");
                    w.initializer(float_tensor(&n, &[], &[value]));
                    n
                };
                let (lo, hi) = (bound(*min, f32::MIN, "min"), bound(*max, f32::MAX, "max"));
                w.node(
                    name,
                    "Clip",
                    &[inputs[0], lo.as_str(), hi.as_str()],
                    &[out],
                    &[],
                );
            }
            Op::Reshape { shape } => {
                let n = format!("{name}.shape");
                w.initializer(int64_tensor(&n, shape));
                w.node(name, "Reshape", &[inputs[0], n.as_str()], &[out], &[]);
            }
            Op::QuantizeDequantize(p) => w.activation_quantizer(name, inputs[0], out, p),
            op => w.node(name, op.name(), &inputs, &[out], &attrs),
        }
    }
    let mut g = std::mem::take(&mut w.graph);
    g.string(2, &graph.name);
    g.0.extend_from_slice(&w.initializers.0);
    for i in &graph.inputs {
        g.message(11, &value_info(&i.name, &i.dims));
    }
    for o in &graph.outputs {
        let dims = shapes
            .get(&o.name)
            .cloned()
            .unwrap_or_else(|| o.dims.clone());
        g.message(12, &value_info(&o.name, &dims));
    }
    let mut model = Message::default();
    model
        .int(1, IR_VERSION)
        .string(2, "compresslab")
        .string(3, env!("CARGO_PKG_VERSION"))
        .message(7, &g);
    let mut opset = Message::default();
    opset.string(1, "").int(2, EXPORT_OPSET);
    model.message(8, &opset);
    for (k, v) in graph.metadata.iter().chain(metadata) {
        let mut entry = Message::default();
        entry.string(1, k).string(2, v);
        model.message(14, &entry);
    }
    Ok(model.0)
}
