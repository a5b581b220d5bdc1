//! ONNX → [`Graph`], at run time (in the browser too): our own bounded protobuf reader
//! (`proto.rs`), constant folding of the shape arithmetic exporters write (Shape → Cast →
//! Slice/Gather → Concat → Reshape, Constant / ConstantOfShape), typed attributes, the
//! Add→Clip→Mul→Div hard-swish fused, and shape inference with symbolic batch and image
//! dims. Anything unsupported is an error that names the op, the node and the opset.

use std::collections::HashMap;

use super::proto::{Field, Reader, malformed};
use super::shape::{self, Dim, element_count, known};
use super::{ActivationParams, Constant, Conv, Graph, Node, Op, Padding, Pool, ValueInfo};
use crate::error::{EngineError, Result};

/// The largest model file we read (the browser worker holds it and its weights).
pub const MAX_MODEL_BYTES: usize = 256 << 20;
/// The largest constant that folding may create (ConstantOfShape, broadcasts).
const MAX_FOLDED_ELEMENTS: usize = 1 << 24;

// ---------------------------------------------------------------------------------------
// The ONNX messages, as read from the wire.

#[derive(Debug, Clone)]
enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Debug, Clone)]
struct RawTensor {
    name: String,
    dims: Vec<usize>,
    /// ONNX `TensorProto.DataType` (the integer width of quantized weights and zero points).
    data_type: i64,
    values: Values,
}

#[derive(Debug, Default)]
struct RawAttr {
    f: Option<f32>,
    i: Option<i64>,
    s: Option<String>,
    t: Option<RawTensor>,
    floats: Vec<f32>,
    ints: Vec<i64>,
}

#[derive(Debug, Default)]
struct RawNode {
    name: String,
    op_type: String,
    domain: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: HashMap<String, RawAttr>,
}

#[derive(Debug, Default)]
struct RawGraph {
    name: String,
    nodes: Vec<RawNode>,
    initializers: Vec<RawTensor>,
    inputs: Vec<ValueInfo>,
    outputs: Vec<ValueInfo>,
}

fn each_field<'a>(buf: &'a [u8], mut f: impl FnMut(u32, Field<'a>) -> Result<()>) -> Result<()> {
    let mut r = Reader::new(buf);
    while let Some((number, field)) = r.next_field()? {
        f(number, field)?;
    }
    Ok(())
}

fn dims_of(raw: &[i64], what: &str) -> Result<Vec<usize>> {
    raw.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| malformed(format!("{what}: negative dimension {d}")))
        })
        .collect()
}

fn read_tensor(buf: &[u8]) -> Result<RawTensor> {
    let (mut dims, mut data_type, mut name) = (Vec::new(), 0i64, String::new());
    let (mut floats, mut ints32, mut ints64, mut doubles) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut raw: Option<&[u8]> = None;
    let mut external = false;
    each_field(buf, |n, f| {
        match n {
            1 => f.ints("tensor dims", &mut dims)?,
            2 => data_type = f.int("tensor data_type")?,
            4 => f.floats("float_data", &mut floats)?,
            5 => f.ints("int32_data", &mut ints32)?,
            7 => f.ints("int64_data", &mut ints64)?,
            8 => name = f.string("tensor name")?,
            9 => raw = Some(f.bytes("raw_data")?),
            10 => match f {
                Field::Fixed64(b) => doubles.push(f64::from_le_bytes(b)),
                Field::Bytes(b) if b.len() % 8 == 0 => {
                    doubles.extend(b.chunks_exact(8).map(|c| {
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                    }))
                }
                _ => return Err(malformed("double_data")),
            },
            13 => external = true,
            14 => external |= f.int("data_location")? == 1,
            _ => {}
        }
        Ok(())
    })?;
    if external {
        return Err(malformed(format!(
            "tensor `{name}` keeps its data in an external file; save the model with its weights inside (onnx.save(model, path, save_as_external_data=False))"
        )));
    }
    let dims = dims_of(&dims, &name)?;
    let count = element_count(&dims)?;
    let sized = |len: usize, what: &str| -> Result<()> {
        if len == count {
            Ok(())
        } else {
            Err(malformed(format!(
                "tensor `{name}` of shape {dims:?} holds {len} {what} values, not {count}"
            )))
        }
    };
    let from_raw = |size: usize| -> Result<&[u8]> {
        let bytes = raw.unwrap_or_default();
        sized(bytes.len() / size, "raw")?;
        if !bytes.len().is_multiple_of(size) {
            return Err(malformed(format!(
                "tensor `{name}`: raw_data of {} bytes",
                bytes.len()
            )));
        }
        Ok(bytes)
    };
    let values = match (data_type, raw.is_some()) {
        (1, true) => Values::F32(
            from_raw(4)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        (1, false) => {
            sized(floats.len(), "float")?;
            Values::F32(floats)
        }
        (11, true) => Values::F32(
            from_raw(8)?
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
        ),
        (11, false) => {
            sized(doubles.len(), "double")?;
            Values::F32(doubles.into_iter().map(|d| d as f32).collect())
        }
        (7, true) => Values::I64(
            from_raw(8)?
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        (7, false) => {
            sized(ints64.len(), "int64")?;
            Values::I64(ints64)
        }
        (6, true) => Values::I64(
            from_raw(4)?
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        (6 | 5 | 4 | 3 | 2 | 9, false) => {
            sized(ints32.len(), "int32")?;
            Values::I64(ints32)
        }
        (3, true) => Values::I64(from_raw(1)?.iter().map(|&b| i64::from(b as i8)).collect()),
        // int4 / uint4: two per byte, the first in the low nibble.
        (22 | 21, true) => {
            let bytes = raw.unwrap_or_default();
            if bytes.len() != count.div_ceil(2) {
                return Err(malformed(format!(
                    "tensor `{name}` of shape {dims:?} holds {} bytes of 4-bit values, not {}",
                    bytes.len(),
                    count.div_ceil(2)
                )));
            }
            let signed = data_type == 22;
            let nibble = |n: u8| {
                if signed {
                    i64::from(((n << 4) as i8) >> 4)
                } else {
                    i64::from(n)
                }
            };
            Values::I64(
                bytes
                    .iter()
                    .flat_map(|&b| [nibble(b & 0x0f), nibble(b >> 4)])
                    .take(count)
                    .collect(),
            )
        }
        (2 | 9, true) => Values::I64(from_raw(1)?.iter().map(|&b| i64::from(b)).collect()),
        (other, _) => {
            return Err(malformed(format!(
                "tensor `{name}` has data type {} which is not supported",
                data_type_name(other)
            )));
        }
    };
    Ok(RawTensor {
        name,
        dims,
        data_type,
        values,
    })
}

fn data_type_name(t: i64) -> String {
    match t {
        10 => "float16".into(),
        16 => "bfloat16".into(),
        8 => "string".into(),
        other => format!("#{other}"),
    }
}

fn read_value_info(buf: &[u8]) -> Result<ValueInfo> {
    let mut name = String::new();
    let mut dims = Vec::new();
    each_field(buf, |n, f| {
        match n {
            1 => name = f.string("value name")?,
            2 => each_field(f.bytes("type")?, |n, f| {
                if n == 1 {
                    each_field(f.bytes("tensor_type")?, |n, f| {
                        if n == 2 {
                            each_field(f.bytes("shape")?, |n, f| {
                                if n == 1 {
                                    let mut dim = None;
                                    each_field(f.bytes("dim")?, |n, f| {
                                        match n {
                                            1 => {
                                                let v = f.int("dim_value")?;
                                                if v > 0 {
                                                    dim = Some(Dim::Known(v as usize));
                                                }
                                            }
                                            // "?" names no dimension in particular:
                                            // it gets a label of its own below.
                                            2 => {
                                                let p = f.string("dim_param")?;
                                                if !p.is_empty() && p != "?" {
                                                    dim = Some(Dim::Sym(p));
                                                }
                                            }
                                            _ => {}
                                        }
                                        Ok(())
                                    })?;
                                    dims.push(dim);
                                }
                                Ok(())
                            })?;
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })?,
            _ => {}
        }
        Ok(())
    })?;
    let dims = dims
        .into_iter()
        .enumerate()
        .map(|(i, d)| d.unwrap_or_else(|| Dim::Sym(format!("{name}[{i}]"))))
        .collect();
    Ok(ValueInfo { name, dims })
}

fn read_attr(buf: &[u8]) -> Result<(String, RawAttr)> {
    let mut name = String::new();
    let mut a = RawAttr::default();
    each_field(buf, |n, f| {
        match n {
            1 => name = f.string("attribute name")?,
            2 => a.f = Some(f.float("attribute f")?),
            3 => a.i = Some(f.int("attribute i")?),
            4 => a.s = Some(String::from_utf8_lossy(f.bytes("attribute s")?).into_owned()),
            5 => a.t = Some(read_tensor(f.bytes("attribute t")?)?),
            7 => f.floats("attribute floats", &mut a.floats)?,
            8 => f.ints("attribute ints", &mut a.ints)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok((name, a))
}

fn read_node(buf: &[u8]) -> Result<RawNode> {
    let mut node = RawNode::default();
    each_field(buf, |n, f| {
        match n {
            1 => node.inputs.push(f.string("node input")?),
            2 => node.outputs.push(f.string("node output")?),
            3 => node.name = f.string("node name")?,
            4 => node.op_type = f.string("op_type")?,
            5 => {
                let (k, v) = read_attr(f.bytes("attribute")?)?;
                node.attrs.insert(k, v);
            }
            7 => node.domain = f.string("domain")?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(node)
}

fn read_graph(buf: &[u8]) -> Result<RawGraph> {
    let mut g = RawGraph::default();
    each_field(buf, |n, f| {
        match n {
            1 => g.nodes.push(read_node(f.bytes("node")?)?),
            2 => g.name = f.string("graph name")?,
            5 => g.initializers.push(read_tensor(f.bytes("initializer")?)?),
            11 => g.inputs.push(read_value_info(f.bytes("input")?)?),
            12 => g.outputs.push(read_value_info(f.bytes("output")?)?),
            15 => return Err(malformed("sparse initializers are not supported")),
            _ => {}
        }
        Ok(())
    })?;
    Ok(g)
}

// ---------------------------------------------------------------------------------------
// Folding and conversion.

/// An integer that is known, or a dimension only known at run time (from `Shape`).
#[derive(Debug, Clone, PartialEq)]
enum SymInt {
    Known(i64),
    Dim(Dim),
}

#[derive(Debug, Clone)]
enum Folded {
    F32(Constant),
    Int { dims: Vec<usize>, data: Vec<SymInt> },
}

impl Folded {
    fn dims(&self) -> &[usize] {
        match self {
            Folded::F32(c) => &c.dims,
            Folded::Int { dims, .. } => dims,
        }
    }
}

enum Value {
    Const(Folded),
    Act(Vec<Dim>),
    /// The integers a QuantizeLinear writes (in our graph: its fake-quantized floats);
    /// only a DequantizeLinear with the same parameters may read them.
    Quantized(Vec<Dim>, ActivationParams),
}

struct Importer<'a> {
    opset: i64,
    /// Data types of integer constants (zero points say which integers a QDQ pair uses).
    types: &'a HashMap<String, i64>,
    values: HashMap<String, Value>,
    graph: Graph,
    node: &'a RawNode,
}

fn unsupported(node: &RawNode, opset: i64, why: &str) -> EngineError {
    EngineError::UnsupportedOp {
        op: node.op_type.clone(),
        node: node.name.clone(),
        opset,
        why: why.to_string(),
    }
}

impl Importer<'_> {
    fn fail(&self, why: impl AsRef<str>) -> EngineError {
        unsupported(self.node, self.opset, why.as_ref())
    }

    fn attr(&self, name: &str) -> Option<&RawAttr> {
        self.node.attrs.get(name)
    }
    fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).and_then(|a| a.i).unwrap_or(default)
    }
    fn float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).and_then(|a| a.f).unwrap_or(default)
    }
    fn ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }

    fn input_name(&self, i: usize) -> Option<&str> {
        self.node
            .inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn value(&self, i: usize) -> Result<&Value> {
        let name = self
            .input_name(i)
            .ok_or_else(|| self.fail(format!("input {i} is missing")))?;
        self.values.get(name).ok_or_else(|| {
            EngineError::Onnx(format!(
                "{} node `{}` reads `{name}`, which nothing computes before it",
                self.node.op_type, self.node.name
            ))
        })
    }

    fn act(&self, i: usize) -> Result<Vec<Dim>> {
        match self.value(i)? {
            Value::Act(d) => Ok(d.clone()),
            Value::Quantized(..) => Err(self.reads_integers()),
            Value::Const(Folded::F32(c)) => Ok(known(&c.dims)),
            Value::Const(Folded::Int { .. }) => {
                Err(self.fail("integer tensors are only supported as shapes"))
            }
        }
    }

    fn folded(&self, i: usize) -> Result<&Folded> {
        match self.value(i)? {
            Value::Const(f) => Ok(f),
            Value::Act(_) | Value::Quantized(..) => {
                Err(self.fail(format!("input {i} must be a constant")))
            }
        }
    }

    /// A constant input's values as integers known at import.
    fn const_ints(&self, i: usize) -> Result<Vec<i64>> {
        match self.folded(i)? {
            Folded::Int { data, .. } => data
                .iter()
                .map(|v| match v {
                    SymInt::Known(k) => Ok(*k),
                    SymInt::Dim(_) => {
                        Err(self.fail(format!("input {i} depends on the input's size")))
                    }
                })
                .collect(),
            Folded::F32(c) => Ok(c.data.iter().map(|&v| v as i64).collect()),
        }
    }

    fn const_scalar(&self, i: usize) -> Result<Option<f32>> {
        if self.input_name(i).is_none() {
            return Ok(None);
        }
        let v = match self.folded(i)? {
            Folded::F32(c) => c.data.clone(),
            Folded::Int { .. } => self.const_ints(i)?.into_iter().map(|v| v as f32).collect(),
        };
        match v.as_slice() {
            [one] => Ok(Some(*one)),
            _ => Err(self.fail(format!("input {i} must be a scalar"))),
        }
    }

    /// Makes constant input `i` a graph constant (weights the executors read by name).
    fn use_constant(&mut self, i: usize) -> Result<String> {
        let name = self
            .input_name(i)
            .ok_or_else(|| self.fail(format!("input {i} is missing")))?
            .to_string();
        if !self.graph.constants.contains_key(&name) {
            let c = match self.folded(i)? {
                Folded::F32(c) => c.clone(),
                Folded::Int { .. } => return Err(self.fail("integer weights are not supported")),
            };
            self.graph.constants.insert(name.clone(), c);
        }
        Ok(name)
    }

    fn axis(&self, axis: i64, rank: usize) -> Result<usize> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if (0..r.max(1)).contains(&a) {
            Ok(a as usize)
        } else {
            Err(self.fail(format!("axis {axis} is out of range for rank {rank}")))
        }
    }

    fn pair(&self, name: &str, default: usize) -> Result<[usize; 2]> {
        match self.ints(name) {
            None | Some([]) => Ok([default; 2]),
            Some(&[a, b]) if a >= 1 && b >= 1 => Ok([a as usize, b as usize]),
            Some(v) => Err(self.fail(format!(
                "{name} {v:?}: only 2-D windows with values ≥ 1 are supported"
            ))),
        }
    }

    fn padding(&self) -> Result<Padding> {
        match self
            .attr("auto_pad")
            .and_then(|a| a.s.as_deref())
            .unwrap_or("NOTSET")
        {
            "SAME_UPPER" => Ok(Padding::Same { upper: true }),
            "SAME_LOWER" => Ok(Padding::Same { upper: false }),
            "VALID" => Ok(Padding::Explicit([0; 4])),
            "NOTSET" | "" => match self.ints("pads") {
                None | Some([]) => Ok(Padding::Explicit([0; 4])),
                Some(p) if p.len() == 4 && p.iter().all(|&v| (0..=1 << 16).contains(&v)) => {
                    Ok(Padding::Explicit([
                        p[0] as usize,
                        p[1] as usize,
                        p[2] as usize,
                        p[3] as usize,
                    ]))
                }
                Some(p) => Err(self.fail(format!(
                    "pads {p:?}: four values from 0 to 65536 are supported"
                ))),
            },
            other => Err(self.fail(format!("auto_pad {other}"))),
        }
    }

    fn pool(&self) -> Result<Pool> {
        let kernel = match self.ints("kernel_shape") {
            Some(&[a, b]) if a >= 1 && b >= 1 => [a as usize, b as usize],
            other => {
                return Err(self.fail(format!(
                    "kernel_shape {other:?}: only 2-D pooling is supported"
                )));
            }
        };
        Ok(Pool {
            kernel,
            strides: self.pair("strides", 1)?,
            dilations: self.pair("dilations", 1)?,
            padding: self.padding()?,
            ceil_mode: self.int("ceil_mode", 0) != 0,
            count_include_pad: self.int("count_include_pad", 0) != 0,
        })
    }

    /// `dims` after this Squeeze / Unsqueeze node (axes from the attribute, or input 1 from
    /// opset 13); `one` is a dimension of size 1.
    fn squeezed<T: Clone>(
        &self,
        mut dims: Vec<T>,
        one: T,
        is_one: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>> {
        let axes = match self.ints("axes") {
            Some(a) => a.to_vec(),
            None if self.input_name(1).is_some() => self.const_ints(1)?,
            None => Vec::new(),
        };
        if self.node.op_type == "Unsqueeze" {
            let rank = dims.len() + axes.len();
            let mut axes = axes
                .iter()
                .map(|&a| self.axis(a, rank))
                .collect::<Result<Vec<_>>>()?;
            axes.sort_unstable();
            for a in axes {
                if a > dims.len() {
                    return Err(self.fail("bad axes"));
                }
                dims.insert(a, one.clone());
            }
            return Ok(dims);
        }
        let axes: Vec<usize> = if axes.is_empty() {
            (0..dims.len()).filter(|&i| is_one(&dims[i])).collect()
        } else {
            axes.iter()
                .map(|&a| self.axis(a, dims.len()))
                .collect::<Result<_>>()?
        };
        Ok(dims
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, d)| d)
            .collect())
    }

    /// The symbolic shape `dims` as a Reshape target for an input of shape `x`.
    fn reshape_target(&self, x: &[Dim], dims: &[SymInt]) -> Result<Vec<i64>> {
        let mut unknown = 0;
        let mut target = Vec::with_capacity(dims.len());
        for (i, d) in dims.iter().enumerate() {
            target.push(match d {
                SymInt::Known(v) => *v,
                SymInt::Dim(Dim::Known(v)) => *v as i64,
                SymInt::Dim(d) if x.get(i) == Some(d) => 0,
                SymInt::Dim(_) => {
                    unknown += 1;
                    -1
                }
            });
        }
        if unknown > 1 {
            return Err(self.fail("the target shape has more than one size known only at run time"));
        }
        Ok(target)
    }

    /// Folds a node whose inputs are all constants (or shapes); `None` if it cannot be.
    fn fold(&self) -> Result<Option<Folded>> {
        let n = self.node;
        let inputs: Vec<&Folded> = match (0..n.inputs.len())
            .filter(|&i| self.input_name(i).is_some())
            .map(|i| match self.value(i) {
                Ok(Value::Const(f)) => Ok(Some(f)),
                Ok(Value::Act(_) | Value::Quantized(..)) => Ok(None),
                Err(e) => Err(e),
            })
            .collect::<Result<Option<Vec<_>>>>()?
        {
            Some(v) => v,
            None => return Ok(None),
        };
        let first = inputs.first().copied();
        let reshaped = |f: &Folded, dims: Vec<usize>| -> Result<Folded> {
            if element_count(&dims)? != element_count(f.dims())? {
                return Err(self.fail(format!("{:?} does not reshape to {dims:?}", f.dims())));
            }
            Ok(match f {
                Folded::F32(c) => Folded::F32(Constant {
                    dims,
                    data: c.data.clone(),
                }),
                Folded::Int { data, .. } => Folded::Int {
                    dims,
                    data: data.clone(),
                },
            })
        };
        Ok(Some(match (n.op_type.as_str(), first) {
            ("Identity" | "Dropout", Some(f)) => f.clone(),
            ("Shape", Some(f)) => Folded::Int {
                dims: vec![f.dims().len()],
                data: f.dims().iter().map(|&d| SymInt::Known(d as i64)).collect(),
            },
            ("Cast", Some(f)) => match (self.int("to", 1), f) {
                (1 | 11 | 10, Folded::Int { dims, data }) => {
                    let data = data
                        .iter()
                        .map(|v| match v {
                            SymInt::Known(k) => Ok(*k as f32),
                            SymInt::Dim(_) => Err(self.fail("a run-time size cast to float")),
                        })
                        .collect::<Result<_>>()?;
                    Folded::F32(Constant {
                        dims: dims.clone(),
                        data,
                    })
                }
                (1 | 11 | 10, f) => f.clone(),
                (_, Folded::F32(c)) => Folded::Int {
                    dims: c.dims.clone(),
                    data: c.data.iter().map(|&v| SymInt::Known(v as i64)).collect(),
                },
                (_, f) => f.clone(),
            },
            ("Reshape", Some(f)) => {
                let target: Vec<Dim> = known(f.dims());
                let shape = self.const_ints(1)?;
                let out = shape::reshape_dims(&self.fake_node(), &target, &shape)?;
                let dims = shape::concrete(&out).ok_or_else(|| self.fail("unknown size"))?;
                reshaped(f, dims)?
            }
            ("Flatten", Some(f)) => {
                let axis = self.axis(self.int("axis", 1), f.dims().len())?;
                let outer = element_count(&f.dims()[..axis])?;
                reshaped(f, vec![outer, element_count(&f.dims()[axis..])?])?
            }
            ("Unsqueeze" | "Squeeze", Some(f)) => {
                reshaped(f, self.squeezed(f.dims().to_vec(), 1, |&d| d == 1)?)?
            }
            ("Concat", Some(_)) => {
                let ints: Vec<&Vec<SymInt>> = inputs
                    .iter()
                    .map(|f| match f {
                        Folded::Int { dims, data } if dims.len() <= 1 => Ok(data),
                        _ => {
                            Err(self.fail("only 1-D integer constants are concatenated at import"))
                        }
                    })
                    .collect::<Result<_>>()?;
                let data: Vec<SymInt> = ints.into_iter().flatten().cloned().collect();
                Folded::Int {
                    dims: vec![data.len()],
                    data,
                }
            }
            ("Slice", Some(Folded::Int { dims, data })) if dims.len() == 1 => {
                let (starts, ends, steps) = if self.opset < 10 {
                    (
                        self.ints("starts").unwrap_or_default().to_vec(),
                        self.ints("ends").unwrap_or_default().to_vec(),
                        vec![1],
                    )
                } else {
                    let steps = if self.input_name(4).is_some() {
                        self.const_ints(4)?
                    } else {
                        vec![1]
                    };
                    (self.const_ints(1)?, self.const_ints(2)?, steps)
                };
                let (&[start], &[end], &[1]) =
                    (starts.as_slice(), ends.as_slice(), steps.as_slice())
                else {
                    return Err(self.fail("only one-axis slices with step 1 are folded"));
                };
                let len = data.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + len } else { v }).clamp(0, len) as usize;
                let (s, e) = (clamp(start), clamp(end));
                let data: Vec<SymInt> = data.get(s..e.max(s)).unwrap_or_default().to_vec();
                Folded::Int {
                    dims: vec![data.len()],
                    data,
                }
            }
            ("Gather", Some(Folded::Int { dims, data })) if dims.len() == 1 => {
                let idx = self.const_ints(1)?;
                let idx_dims = inputs.get(1).map(|f| f.dims().to_vec()).unwrap_or_default();
                let len = data.len() as i64;
                let picked = idx
                    .iter()
                    .map(|&i| {
                        let i = if i < 0 { i + len } else { i };
                        data.get(usize::try_from(i).unwrap_or(usize::MAX))
                            .cloned()
                            .ok_or_else(|| self.fail(format!("index {i} out of range")))
                    })
                    .collect::<Result<_>>()?;
                Folded::Int {
                    dims: idx_dims,
                    data: picked,
                }
            }
            ("ConstantOfShape", Some(_)) => {
                let dims = dims_of(&self.const_ints(0)?, "ConstantOfShape")?;
                let count = element_count(&dims)?;
                if count > MAX_FOLDED_ELEMENTS {
                    return Err(self.fail(format!("a constant of {count} elements is too large")));
                }
                match self
                    .attr("value")
                    .and_then(|a| a.t.as_ref())
                    .map(|t| &t.values)
                {
                    Some(Values::I64(v)) => Folded::Int {
                        dims,
                        data: vec![SymInt::Known(v.first().copied().unwrap_or(0)); count],
                    },
                    Some(Values::F32(v)) => Folded::F32(Constant {
                        dims,
                        data: vec![v.first().copied().unwrap_or(0.0); count],
                    }),
                    None => Folded::F32(Constant {
                        dims,
                        data: vec![0.0; count],
                    }),
                }
            }
            ("Add" | "Sub" | "Mul" | "Div", Some(a)) => {
                let b = inputs
                    .get(1)
                    .copied()
                    .ok_or_else(|| self.fail("needs two inputs"))?;
                self.fold_binary(a, b)?
            }
            ("DequantizeLinear", Some(Folded::Int { dims, data })) => {
                Folded::F32(self.dequantize_constant(data, dims)?)
            }
            ("Transpose", Some(Folded::F32(c))) => {
                let perm = self.perm(c.dims.len())?;
                let (dims, data) = transpose(&c.dims, &c.data, &perm);
                Folded::F32(Constant { dims, data })
            }
            _ => return Ok(None),
        }))
    }

    fn fold_binary(&self, a: &Folded, b: &Folded) -> Result<Folded> {
        let op = self.node.op_type.as_str();
        match (a, b) {
            (Folded::F32(a), Folded::F32(b)) => {
                let f = |x: f32, y: f32| match op {
                    "Add" => x + y,
                    "Sub" => x - y,
                    "Mul" => x * y,
                    _ => x / y,
                };
                let (dims, data) = if a.dims == b.dims {
                    (
                        a.dims.clone(),
                        a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect(),
                    )
                } else if let [y] = b.data.as_slice() {
                    (a.dims.clone(), a.data.iter().map(|&x| f(x, *y)).collect())
                } else if let [x] = a.data.as_slice() {
                    (b.dims.clone(), b.data.iter().map(|&y| f(*x, y)).collect())
                } else {
                    return Err(self.fail("constant operands of different shapes"));
                };
                Ok(Folded::F32(Constant { dims, data }))
            }
            (Folded::Int { dims, data: x }, Folded::Int { data: y, .. })
                if x.len() == y.len() || y.len() == 1 =>
            {
                let data = x
                    .iter()
                    .enumerate()
                    .map(|(i, xv)| {
                        let yv = if y.len() == 1 { &y[0] } else { &y[i] };
                        match (xv, yv) {
                            (SymInt::Known(p), SymInt::Known(q)) => Ok(SymInt::Known(
                                match op {
                                    "Add" => p.checked_add(*q),
                                    "Sub" => p.checked_sub(*q),
                                    "Mul" => p.checked_mul(*q),
                                    _ => p.checked_div(*q),
                                }
                                .ok_or_else(|| self.fail("integer overflow"))?,
                            )),
                            _ => Err(self.fail("arithmetic on sizes known only at run time")),
                        }
                    })
                    .collect::<Result<_>>()?;
                Ok(Folded::Int {
                    dims: dims.clone(),
                    data,
                })
            }
            _ => Err(self.fail("mixed integer and float constants")),
        }
    }

    fn perm(&self, rank: usize) -> Result<Vec<usize>> {
        let perm: Vec<usize> = match self.ints("perm") {
            Some(p) if !p.is_empty() => p
                .iter()
                .map(|&a| self.axis(a, rank))
                .collect::<Result<_>>()?,
            _ => (0..rank).rev().collect(),
        };
        let mut seen = vec![false; rank];
        for &p in &perm {
            if p >= rank || std::mem::replace(&mut seen[p], true) {
                return Err(self.fail(format!("perm {perm:?} is not a permutation")));
            }
        }
        if perm.len() != rank {
            return Err(self.fail(format!("perm {perm:?} for rank {rank}")));
        }
        Ok(perm)
    }

    fn reads_integers(&self) -> EngineError {
        self.fail("reads the integers a QuantizeLinear wrote; only a DequantizeLinear may")
    }

    /// Scale, zero point and integer range of a QuantizeLinear / DequantizeLinear pair.
    fn quantization(&self) -> Result<ActivationParams> {
        let scale = self.const_scalar(1)?.ok_or_else(|| self.fail("no scale"))?;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(self.fail(format!("scale {scale} is not a positive number")));
        }
        let zero_point = self.const_scalar(2)?.unwrap_or(0.0) as i32;
        let data_type = match self.input_name(2) {
            Some(zp) => self.types.get(zp).copied().unwrap_or(2),
            None => self.int("output_dtype", 2),
        };
        let (qmin, qmax) = match data_type {
            2 => (0, 255),
            3 => (-128, 127),
            21 => (0, 15),
            22 => (-8, 7),
            other => {
                return Err(self.fail(format!(
                    "quantization to data type {other} (8- and 4-bit integers are supported)"
                )));
            }
        };
        if !(qmin..=qmax).contains(&zero_point) {
            return Err(self.fail(format!("zero point {zero_point} outside {qmin}..={qmax}")));
        }
        Ok(ActivationParams {
            scale,
            zero_point,
            qmin,
            qmax,
        })
    }

    /// A DequantizeLinear of integer weights: `(q − zero_point)·scale` per tensor, per slice
    /// along `axis`, or per block of `block_size` along `axis`.
    fn dequantize_constant(&self, q: &[SymInt], dims: &[usize]) -> Result<Constant> {
        let ints = |i: usize| -> Result<Vec<i64>> {
            if self.input_name(i).is_none() {
                return Ok(Vec::new());
            }
            self.const_ints(i)
        };
        let values: Vec<i64> = q
            .iter()
            .map(|v| match v {
                SymInt::Known(k) => Ok(*k),
                SymInt::Dim(_) => Err(self.fail("weights that depend on the input's size")),
            })
            .collect::<Result<_>>()?;
        let scale = match self.folded(1)? {
            Folded::F32(c) => c.clone(),
            Folded::Int { .. } => return Err(self.fail("an integer scale")),
        };
        let zero_points = ints(2)?;
        let rank = dims.len();
        // Per tensor: one scale. Per axis: scale[e]. Blocked: scale has x's shape with the
        // axis divided into blocks, scale[o][e / block][k].
        let per_axis = scale.data.len() > 1 && self.int("block_size", 0) == 0;
        let (outer, extent, inner, block) = if scale.data.len() == 1 {
            (1, values.len(), 1, values.len().max(1))
        } else {
            let axis = self.axis(self.int("axis", 1), rank)?;
            let block = match self.int("block_size", 0) {
                0 => 1,
                b => usize::try_from(b).map_err(|_| self.fail("negative block_size"))?,
            };
            (
                element_count(&dims[..axis])?,
                dims[axis],
                element_count(&dims[axis + 1..])?,
                block,
            )
        };
        let blocks = extent.div_ceil(block.max(1));
        let groups = if per_axis {
            Some(extent)
        } else {
            outer.checked_mul(blocks).and_then(|g| g.checked_mul(inner))
        }
        .ok_or_else(|| self.fail("too many scales"))?;
        if scale.data.len() != groups || !(zero_points.is_empty() || zero_points.len() == groups) {
            return Err(self.fail(format!(
                "{} scales and {} zero points for a {dims:?} tensor ({groups} expected)",
                scale.data.len(),
                zero_points.len()
            )));
        }
        let mut data = Vec::with_capacity(values.len());
        for (i, &v) in values.iter().enumerate() {
            let (o, rest) = (i / (extent * inner).max(1), i % (extent * inner).max(1));
            let (e, k) = (rest / inner.max(1), rest % inner.max(1));
            let g = if per_axis {
                e
            } else {
                (o * blocks + e / block.max(1)) * inner + k
            };
            let zp = zero_points.get(g).copied().unwrap_or(0);
            data.push((v - zp) as f32 * scale.data[g]);
        }
        Ok(Constant {
            dims: dims.to_vec(),
            data,
        })
    }

    /// A stand-in node for error messages of shape rules used while folding.
    fn fake_node(&self) -> Node {
        Node {
            name: self.node.name.clone(),
            op: Op::Identity,
            inputs: Vec::new(),
            outputs: self.node.outputs.clone(),
        }
    }

    /// The typed node for this ONNX node (its inputs are activations).
    fn convert(&mut self) -> Result<Node> {
        let n = self.node;
        if n.op_type == "DequantizeLinear" {
            // QuantizeLinear → DequantizeLinear with the same parameters is one
            // QuantizeDequantize node: this half passes its values on.
            let Value::Quantized(_, quantized) = self.value(0)? else {
                return Err(self.fail("dequantizes a float activation"));
            };
            let p = self.quantization()?;
            if (p.scale, p.zero_point) != (quantized.scale, quantized.zero_point) {
                return Err(
                    self.fail("dequantizes with other parameters than its QuantizeLinear used")
                );
            }
        }
        let x = match (n.op_type.as_str(), self.value(0)?) {
            ("DequantizeLinear", Value::Quantized(d, _)) => d.clone(),
            _ => self.act(0)?,
        };
        let mut inputs = vec![self.input_name(0).unwrap_or_default().to_string()];
        let op = match n.op_type.as_str() {
            "Conv" => {
                let w = self.use_constant(1)?;
                inputs.push(w.clone());
                if self.input_name(2).is_some() {
                    inputs.push(self.use_constant(2)?);
                }
                let wdims = self
                    .graph
                    .constants
                    .get(&w)
                    .map(|c| c.dims.clone())
                    .unwrap_or_default();
                if wdims.len() != 4 {
                    return Err(self.fail(format!(
                        "only 2-D convolutions are supported (weight {wdims:?})"
                    )));
                }
                let kernel = match self.ints("kernel_shape") {
                    None | Some([]) => [wdims[2], wdims[3]],
                    Some(_) => self.pair("kernel_shape", 1)?,
                };
                let group = self.int("group", 1);
                Op::Conv(Conv {
                    kernel,
                    strides: self.pair("strides", 1)?,
                    dilations: self.pair("dilations", 1)?,
                    padding: self.padding()?,
                    group: usize::try_from(group)
                        .ok()
                        .filter(|&g| g >= 1)
                        .ok_or_else(|| self.fail("group < 1"))?,
                })
            }
            "BatchNormalization" => {
                if self.int("training_mode", 0) != 0 {
                    return Err(self.fail("training mode"));
                }
                for i in 1..5 {
                    inputs.push(self.use_constant(i)?);
                }
                Op::BatchNorm {
                    epsilon: self.float("epsilon", 1e-5),
                }
            }
            "Relu" => Op::Relu,
            "Sigmoid" => Op::Sigmoid,
            "HardSwish" => Op::HardSwish,
            "LeakyRelu" => Op::LeakyRelu {
                alpha: self.float("alpha", 0.01),
            },
            "HardSigmoid" => Op::HardSigmoid {
                alpha: self.float("alpha", 0.2),
                beta: self.float("beta", 0.5),
            },
            "Clip" => {
                let (min, max) = if self.opset < 11 {
                    (self.float("min", f32::MIN), self.float("max", f32::MAX))
                } else {
                    (
                        self.const_scalar(1)?.unwrap_or(f32::MIN),
                        self.const_scalar(2)?.unwrap_or(f32::MAX),
                    )
                };
                Op::Clip { min, max }
            }
            "Add" | "Sub" | "Mul" | "Div" | "Sum" => {
                for i in 1..n.inputs.len() {
                    inputs.push(match self.value(i)? {
                        Value::Act(_) => self.input_name(i).unwrap_or_default().to_string(),
                        Value::Const(_) => self.use_constant(i)?,
                        Value::Quantized(..) => return Err(self.reads_integers()),
                    });
                }
                // A constant first operand: the executors want the activation first.
                if matches!(self.value(0)?, Value::Const(_)) {
                    inputs[0] = self.use_constant(0)?;
                }
                match n.op_type.as_str() {
                    "Add" => Op::Add,
                    "Sub" => Op::Sub,
                    "Mul" => Op::Mul,
                    "Div" => Op::Div,
                    _ => Op::Sum,
                }
            }
            "Concat" => {
                for i in 1..n.inputs.len() {
                    inputs.push(match self.value(i)? {
                        Value::Act(_) => self.input_name(i).unwrap_or_default().to_string(),
                        Value::Const(_) => self.use_constant(i)?,
                        Value::Quantized(..) => return Err(self.reads_integers()),
                    });
                }
                Op::Concat {
                    axis: self.axis(self.int("axis", 0), x.len())?,
                }
            }
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "AveragePool" => Op::AveragePool(self.pool()?),
            "MaxPool" => {
                if n.outputs.get(1).is_some_and(|o| !o.is_empty()) {
                    return Err(self.fail("MaxPool's indices output"));
                }
                if self.int("storage_order", 0) != 0 {
                    return Err(self.fail("storage_order 1"));
                }
                Op::MaxPool(self.pool()?)
            }
            "Flatten" => Op::Flatten {
                axis: self.axis(self.int("axis", 1), x.len() + 1)?,
            },
            "Reshape" => {
                let shape = match self.folded(1)? {
                    Folded::Int { data, .. } => self.reshape_target(&x, data)?,
                    Folded::F32(_) => self.const_ints(1)?,
                };
                if self.int("allowzero", 0) != 0 && shape.contains(&0) {
                    return Err(self.fail("allowzero with a zero in the shape"));
                }
                Op::Reshape { shape }
            }
            "Squeeze" | "Unsqueeze" => {
                let one = SymInt::Dim(Dim::Known(1));
                let dims = x.iter().cloned().map(SymInt::Dim).collect();
                let dims = self.squeezed(dims, one.clone(), |d| *d == one)?;
                Op::Reshape {
                    shape: self.reshape_target(&x, &dims)?,
                }
            }
            "Transpose" => Op::Transpose {
                perm: self.perm(x.len())?,
            },
            "Gemm" => {
                if !matches!(self.value(1)?, Value::Const(_)) {
                    return Err(
                        self.fail("Gemm with a computed B (only constant weights are supported)")
                    );
                }
                inputs.push(self.use_constant(1)?);
                if self.input_name(2).is_some() {
                    inputs.push(self.use_constant(2)?);
                }
                Op::Gemm {
                    alpha: self.float("alpha", 1.0),
                    beta: self.float("beta", 1.0),
                    trans_a: self.int("transA", 0) != 0,
                    trans_b: self.int("transB", 0) != 0,
                }
            }
            "MatMul" => {
                if !matches!(self.value(1)?, Value::Const(_)) {
                    return Err(self.fail(
                        "MatMul of two computed tensors (only constant weights are supported)",
                    ));
                }
                inputs.push(self.use_constant(1)?);
                Op::MatMul
            }
            "Softmax" => {
                let legacy = self.opset < 13;
                let axis = self.int("axis", if legacy { 1 } else { -1 });
                Op::Softmax {
                    axis: self.axis(axis, x.len())?,
                    legacy,
                }
            }
            "QuantizeLinear" => {
                if self.const_scalar(1).is_err() {
                    return Err(self.fail("per-channel activation quantization"));
                }
                Op::QuantizeDequantize(self.quantization()?)
            }
            "DequantizeLinear" => Op::Identity,
            "Identity" | "Dropout" => {
                if n.outputs.get(1).is_some_and(|o| !o.is_empty()) {
                    return Err(self.fail("Dropout's mask output"));
                }
                Op::Identity
            }
            "Cast" => match self.int("to", 1) {
                1 => Op::Identity,
                to => return Err(self.fail(format!("a cast of activations to data type {to}"))),
            },
            _ => return Err(self.fail("this operator is not supported")),
        };
        let output = n
            .outputs
            .first()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| self.fail("has no output"))?
            .clone();
        Ok(Node {
            name: if n.name.is_empty() {
                output.clone()
            } else {
                n.name.clone()
            },
            op,
            inputs,
            outputs: vec![output],
        })
    }
}

/// Generic n-d transpose of a row-major tensor.
pub fn transpose(dims: &[usize], data: &[f32], perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let rank = dims.len();
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; rank];
    for _ in 0..data.len() {
        let at: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(data[at]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            if index[axis] < out_dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    (out_dims, out)
}

fn folded_from(t: RawTensor) -> Folded {
    match t.values {
        Values::F32(data) => Folded::F32(Constant { dims: t.dims, data }),
        Values::I64(v) => Folded::Int {
            dims: t.dims,
            data: v.into_iter().map(SymInt::Known).collect(),
        },
    }
}

fn constant_node(node: &RawNode, opset: i64) -> Result<Folded> {
    let attr = |n: &str| node.attrs.get(n);
    if let Some(t) = attr("value").and_then(|a| a.t.clone()) {
        return Ok(folded_from(t));
    }
    if let Some(f) = attr("value_float").and_then(|a| a.f) {
        return Ok(Folded::F32(Constant {
            dims: vec![],
            data: vec![f],
        }));
    }
    if let Some(a) = attr("value_floats") {
        return Ok(Folded::F32(Constant {
            dims: vec![a.floats.len()],
            data: a.floats.clone(),
        }));
    }
    if let Some(i) = attr("value_int").and_then(|a| a.i) {
        return Ok(Folded::Int {
            dims: vec![],
            data: vec![SymInt::Known(i)],
        });
    }
    if let Some(a) = attr("value_ints") {
        return Ok(Folded::Int {
            dims: vec![a.ints.len()],
            data: a.ints.iter().map(|&i| SymInt::Known(i)).collect(),
        });
    }
    Err(unsupported(
        node,
        opset,
        "a Constant without a tensor, float or int value",
    ))
}

/// Add(x, 3) → Clip(0, 6) → Mul(x, ·) → Div(·, 6) (or Mul by 1/6), each step used once,
/// becomes one HardSwish(x): older exporters write hard-swish this way.
fn fuse_hard_swish(graph: &mut Graph) {
    let is_scalar = |g: &Graph, name: &str, v: f32| {
        g.constant(name)
            .is_some_and(|c| c.data.len() == 1 && (c.data[0] - v).abs() <= 1e-6 * v.abs().max(1.0))
    };
    let producer: HashMap<String, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.clone(), i)))
        .collect();
    let uses: HashMap<String, usize> = graph
        .consumers()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.len()))
        .collect();
    let outputs: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    let single = |name: &str| uses.get(name) == Some(&1) && !outputs.iter().any(|o| o == name);
    let mut fused = Vec::new();
    for (i, div) in graph.nodes.iter().enumerate() {
        let scaled = match (&div.op, div.inputs.as_slice()) {
            (Op::Div, [m, six]) if is_scalar(graph, six, 6.0) => m,
            (Op::Mul, [m, sixth]) if is_scalar(graph, sixth, 1.0 / 6.0) => m,
            _ => continue,
        };
        let Some(&mi) = producer.get(scaled) else {
            continue;
        };
        let mul = &graph.nodes[mi];
        let (Op::Mul, [p, q]) = (&mul.op, mul.inputs.as_slice()) else {
            continue;
        };
        let find_clip = |x: &String, c: &String| -> Option<(usize, usize)> {
            let ci = *producer.get(c)?;
            let clip = &graph.nodes[ci];
            let (Op::Clip { min, max }, [a]) = (&clip.op, clip.inputs.as_slice()) else {
                return None;
            };
            if *min != 0.0 || *max != 6.0 {
                return None;
            }
            let ai = *producer.get(a)?;
            let add = &graph.nodes[ai];
            match (&add.op, add.inputs.as_slice()) {
                (Op::Add, [ax, three]) if ax == x && is_scalar(graph, three, 3.0) => {
                    (single(a.as_str()) && single(c.as_str())).then_some((ci, ai))
                }
                _ => None,
            }
        };
        let Some((x, _)) = [(p, q), (q, p)]
            .into_iter()
            .find_map(|(x, c)| find_clip(x, c).map(|found| (x.clone(), found)))
        else {
            continue;
        };
        if single(scaled.as_str()) {
            fused.push((i, x));
        }
    }
    for (i, x) in fused {
        let node = &mut graph.nodes[i];
        node.op = Op::HardSwish;
        node.inputs = vec![x];
    }
}

/// The Identity nodes that stand for the DequantizeLinear half of a QDQ pair: their readers
/// read the QuantizeDequantize node's output directly.
fn drop_dequantize_halves(graph: &mut Graph) {
    let qdq: std::collections::HashSet<String> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::QuantizeDequantize(_)))
        .map(|n| n.outputs[0].clone())
        .collect();
    let outputs: std::collections::HashSet<&String> =
        graph.outputs.iter().map(|o| &o.name).collect();
    let mut alias: HashMap<String, String> = HashMap::new();
    graph.nodes.retain(|n| {
        let drop =
            n.op == Op::Identity && qdq.contains(&n.inputs[0]) && !outputs.contains(&n.outputs[0]);
        if drop {
            alias.insert(n.outputs[0].clone(), n.inputs[0].clone());
        }
        !drop
    });
    for node in &mut graph.nodes {
        for input in &mut node.inputs {
            if let Some(a) = alias.get(input) {
                *input = a.clone();
            }
        }
    }
}

/// Reads an ONNX model file.
pub fn import_onnx(bytes: &[u8]) -> Result<Graph> {
    if bytes.len() > MAX_MODEL_BYTES {
        return Err(EngineError::Onnx(format!(
            "the file is {} MB; at most {} MB is read",
            bytes.len() >> 20,
            MAX_MODEL_BYTES >> 20
        )));
    }
    let mut raw_graph = None;
    let mut opset = None;
    let mut producer = String::new();
    let mut metadata = Vec::new();
    let mut ir_version = 0;
    each_field(bytes, |n, f| {
        match n {
            1 => ir_version = f.int("ir_version")?,
            2 => producer = f.string("producer_name")?,
            7 => raw_graph = Some(read_graph(f.bytes("graph")?)?),
            8 => {
                let (mut domain, mut version) = (String::new(), 0);
                each_field(f.bytes("opset_import")?, |n, f| {
                    match n {
                        1 => domain = f.string("opset domain")?,
                        2 => version = f.int("opset version")?,
                        _ => {}
                    }
                    Ok(())
                })?;
                if domain.is_empty() || domain == "ai.onnx" {
                    opset = Some(version);
                }
            }
            14 => {
                let (mut k, mut v) = (String::new(), String::new());
                each_field(f.bytes("metadata_props")?, |n, f| {
                    match n {
                        1 => k = f.string("metadata key")?,
                        2 => v = f.string("metadata value")?,
                        _ => {}
                    }
                    Ok(())
                })?;
                metadata.push((k, v));
            }
            _ => {}
        }
        Ok(())
    })?;
    let raw = raw_graph
        .ok_or_else(|| malformed("not an ONNX model: no graph (is this an .onnx file?)"))?;
    if ir_version <= 0 {
        return Err(malformed("not an ONNX model: no IR version"));
    }
    let opset = opset.ok_or_else(|| malformed("the model declares no default-domain opset"))?;

    let mut values: HashMap<String, Value> = HashMap::new();
    let mut types: HashMap<String, i64> = HashMap::new();
    for node in raw.nodes.iter().filter(|n| n.op_type == "Constant") {
        if let (Some(t), Some(out)) = (
            node.attrs.get("value").and_then(|a| a.t.as_ref()),
            node.outputs.first(),
        ) {
            types.insert(out.clone(), t.data_type);
        }
    }
    for t in raw.initializers {
        types.insert(t.name.clone(), t.data_type);
        values.insert(t.name.clone(), Value::Const(folded_from(t)));
    }
    let mut graph = Graph {
        name: raw.name,
        opset,
        producer,
        metadata,
        ..Graph::default()
    };
    for input in raw.inputs {
        if !values.contains_key(&input.name) {
            values.insert(input.name.clone(), Value::Act(input.dims.clone()));
            graph.inputs.push(input);
        }
    }
    for node in &raw.nodes {
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(unsupported(
                node,
                opset,
                &format!("operators of domain `{}`", node.domain),
            ));
        }
        let output = node
            .outputs
            .first()
            .filter(|o| !o.is_empty())
            .cloned()
            .ok_or_else(|| unsupported(node, opset, "a node without an output"))?;
        if node.op_type == "Constant" {
            values.insert(output, Value::Const(constant_node(node, opset)?));
            continue;
        }
        let mut im = Importer {
            opset,
            types: &types,
            values,
            graph,
            node,
        };
        let result = (|| -> Result<Value> {
            if node.op_type == "Shape"
                && let Value::Act(dims) = im.value(0)?
            {
                let rank = dims.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
                let start = clamp(im.int("start", 0));
                let end = clamp(im.int("end", rank));
                let data: Vec<SymInt> = dims
                    .get(start..end.max(start))
                    .unwrap_or_default()
                    .iter()
                    .map(|d| match d {
                        Dim::Known(k) => SymInt::Known(*k as i64),
                        d => SymInt::Dim(d.clone()),
                    })
                    .collect();
                return Ok(Value::Const(Folded::Int {
                    dims: vec![data.len()],
                    data,
                }));
            }
            if let Some(f) = im.fold()? {
                if element_count(f.dims())? > MAX_FOLDED_ELEMENTS {
                    return Err(im.fail("a folded constant is too large"));
                }
                return Ok(Value::Const(f));
            }
            let typed = im.convert()?;
            let input_dims: Vec<Vec<Dim>> =
                typed
                    .inputs
                    .iter()
                    .map(|i| match im.values.get(i) {
                        Some(Value::Act(d) | Value::Quantized(d, _)) => Ok(d.clone()),
                        _ => im.graph.constant(i).map(|c| known(&c.dims)).ok_or_else(|| {
                            im.fail(format!("`{i}` is not computed before this node"))
                        }),
                    })
                    .collect::<Result<_>>()?;
            let refs: Vec<&[Dim]> = input_dims.iter().map(Vec::as_slice).collect();
            let out = shape::node_output(&im.graph, &typed, &refs)?;
            let value = match typed.op {
                Op::QuantizeDequantize(p) => Value::Quantized(out, p),
                _ => Value::Act(out),
            };
            im.graph.nodes.push(typed);
            Ok(value)
        })();
        let value = result?;
        values = im.values;
        graph = im.graph;
        values.insert(output, value);
    }
    for out in raw.outputs {
        match values.get(&out.name) {
            Some(Value::Act(_)) => graph.outputs.push(out),
            Some(Value::Quantized(..)) => {
                return Err(EngineError::Onnx(format!(
                    "output `{}` holds the integers of a QuantizeLinear",
                    out.name
                )));
            }
            Some(Value::Const(_)) => {
                return Err(EngineError::Onnx(format!(
                    "output `{}` is a constant",
                    out.name
                )));
            }
            None => {
                return Err(EngineError::Onnx(format!(
                    "output `{}` is never computed",
                    out.name
                )));
            }
        }
    }
    graph.input()?;
    fuse_hard_swish(&mut graph);
    drop_dequantize_halves(&mut graph);
    graph.prune_unused();
    let input_dims = graph.input()?.dims.clone();
    graph.shapes(&input_dims)?;
    Ok(graph)
}
