//! Shape inference: one set of rules for the importer (with symbolic dims such as a
//! dynamic batch), `inspect` and the executors (with known dims). All arithmetic is checked.

use std::collections::HashMap;
use std::fmt;

use super::{Conv, Graph, Node, Op, Padding, Pool};
use crate::error::{EngineError, Result};

/// One dimension: known, or symbolic (a dynamic batch, an image size chosen at run time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(usize),
    Sym(String),
}

impl Dim {
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => write!(f, "{s}"),
        }
    }
}

/// Dims of every value (activations and constants) by name.
pub type Shapes = HashMap<String, Vec<Dim>>;

pub fn known(dims: &[usize]) -> Vec<Dim> {
    dims.iter().map(|&d| Dim::Known(d)).collect()
}

/// All dims known, or `None`.
pub fn concrete(dims: &[Dim]) -> Option<Vec<usize>> {
    dims.iter().map(Dim::known).collect()
}

pub fn element_count(dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| EngineError::Onnx(format!("tensor of shape {dims:?} is too large")))
    })
}

fn err(node: &Node, msg: impl fmt::Display) -> EngineError {
    EngineError::Onnx(format!("{} node `{}`: {msg}", node.op.name(), node.name))
}

/// `floor((size + pads − span) / stride) + 1` (or `ceil` for pooling's `ceil_mode`).
#[allow(clippy::too_many_arguments)]
fn window_out(
    node: &Node,
    size: &Dim,
    axis: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    padding: &Padding,
    ceil: bool,
) -> Result<Dim> {
    let Dim::Known(size) = *size else {
        return Ok(Dim::Sym(format!("{}[{}]", node.outputs[0], axis + 2)));
    };
    if stride == 0 || dilation == 0 || kernel == 0 {
        return Err(err(node, "kernel, stride and dilation must be ≥ 1"));
    }
    let (before, after) = padding.resolve(axis, size, kernel, stride, dilation);
    let span = (kernel - 1)
        .checked_mul(dilation)
        .and_then(|s| s.checked_add(1))
        .ok_or_else(|| err(node, "kernel too large"))?;
    let padded = size
        .checked_add(before)
        .and_then(|s| s.checked_add(after))
        .ok_or_else(|| err(node, "padding too large"))?;
    if padded < span {
        return Err(err(
            node,
            format!("window of {span} is larger than the padded input ({padded})"),
        ));
    }
    let steps = padded - span;
    let out = if ceil {
        let mut out = steps.div_ceil(stride) + 1;
        // The last window must start inside the input or its left padding (ONNX, PyTorch).
        if (out - 1) * stride >= size + before {
            out -= 1;
        }
        out
    } else {
        steps / stride + 1
    };
    Ok(Dim::Known(out))
}

fn broadcast(node: &Node, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    let rank = a.len().max(b.len());
    let at = |v: &[Dim], i: usize| -> Dim {
        let pad = rank - v.len();
        if i < pad {
            Dim::Known(1)
        } else {
            v[i - pad].clone()
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (Dim::Known(1), d) | (d, Dim::Known(1)) => Ok(d),
            (Dim::Known(x), Dim::Known(y)) if x != y => Err(err(
                node,
                format!("shapes {a:?} and {b:?} do not broadcast"),
            )),
            (Dim::Sym(_), Dim::Known(y)) => Ok(Dim::Known(y)),
            (d, _) => Ok(d),
        })
        .collect()
}

fn rank4<'a>(node: &Node, dims: &'a [Dim]) -> Result<&'a [Dim]> {
    if dims.len() != 4 {
        return Err(err(
            node,
            format!("expects an NCHW input, got rank {}", dims.len()),
        ));
    }
    Ok(dims)
}

fn check_channels(node: &Node, what: &str, found: &Dim, expected: usize) -> Result<()> {
    match found {
        Dim::Known(c) if *c != expected => Err(err(
            node,
            format!("{what} has {expected} channels but its input has {c}"),
        )),
        _ => Ok(()),
    }
}

fn conv_shape(node: &Node, c: &Conv, x: &[Dim], w: &[usize]) -> Result<Vec<Dim>> {
    let x = rank4(node, x)?;
    let &[cout, cin_per_group, kh, kw] = w else {
        return Err(err(node, format!("weight of shape {w:?} is not 4-D")));
    };
    if c.group == 0 || cout % c.group != 0 {
        return Err(err(
            node,
            format!("{cout} outputs do not split into {} groups", c.group),
        ));
    }
    if [kh, kw] != c.kernel {
        return Err(err(
            node,
            format!("kernel_shape {:?} but weight {w:?}", c.kernel),
        ));
    }
    let cin = cin_per_group
        .checked_mul(c.group)
        .ok_or_else(|| err(node, "too many groups"))?;
    check_channels(node, "the weight", &x[1], cin)?;
    Ok(vec![
        x[0].clone(),
        Dim::Known(cout),
        window_out(
            node,
            &x[2],
            0,
            kh,
            c.strides[0],
            c.dilations[0],
            &c.padding,
            false,
        )?,
        window_out(
            node,
            &x[3],
            1,
            kw,
            c.strides[1],
            c.dilations[1],
            &c.padding,
            false,
        )?,
    ])
}

fn pool_shape(node: &Node, p: &Pool, x: &[Dim]) -> Result<Vec<Dim>> {
    let x = rank4(node, x)?;
    Ok(vec![
        x[0].clone(),
        x[1].clone(),
        window_out(
            node,
            &x[2],
            0,
            p.kernel[0],
            p.strides[0],
            p.dilations[0],
            &p.padding,
            p.ceil_mode,
        )?,
        window_out(
            node,
            &x[3],
            1,
            p.kernel[1],
            p.strides[1],
            p.dilations[1],
            &p.padding,
            p.ceil_mode,
        )?,
    ])
}

fn product(dims: &[Dim]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |acc, d| d.known().and_then(|d| acc.checked_mul(d)))
}

/// ONNX Reshape: 0 copies the input dim, −1 takes the rest.
pub(crate) fn reshape_dims(node: &Node, x: &[Dim], shape: &[i64]) -> Result<Vec<Dim>> {
    let mut out = Vec::with_capacity(shape.len());
    let mut infer_at = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 => out.push(
                x.get(i)
                    .cloned()
                    .ok_or_else(|| err(node, format!("0 at axis {i} has no input dim to copy")))?,
            ),
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(Dim::Known(1));
            }
            s if s > 0 => out.push(Dim::Known(
                usize::try_from(s).map_err(|_| err(node, "dimension too large"))?,
            )),
            _ => return Err(err(node, format!("invalid target shape {shape:?}"))),
        }
    }
    if let Some(i) = infer_at {
        out[i] = match (product(x), product(&out)) {
            (Some(total), Some(rest)) if rest > 0 && total % rest == 0 => Dim::Known(total / rest),
            (Some(total), Some(rest)) => {
                return Err(err(
                    node,
                    format!("{total} elements do not reshape to {shape:?} ({rest})"),
                ));
            }
            _ => Dim::Sym(format!("{}[{i}]", node.outputs[0])),
        };
    } else if let (Some(a), Some(b)) = (product(x), product(&out))
        && a != b
    {
        return Err(err(
            node,
            format!("{a} elements do not reshape to {shape:?}"),
        ));
    }
    Ok(out)
}

fn constant_dims<'g>(graph: &'g Graph, node: &Node, i: usize) -> Result<&'g [usize]> {
    node.inputs
        .get(i)
        .and_then(|n| graph.constant(n))
        .map(|c| c.dims.as_slice())
        .ok_or_else(|| err(node, format!("input {i} must be a constant")))
}

/// Output dims of one node, given its input dims.
pub(crate) fn node_output(graph: &Graph, node: &Node, inputs: &[&[Dim]]) -> Result<Vec<Dim>> {
    let x = inputs
        .first()
        .copied()
        .ok_or_else(|| err(node, "has no inputs"))?;
    let constant = |i: usize| constant_dims(graph, node, i);
    let channels = |x: &[Dim]| -> Result<Dim> {
        x.get(1)
            .cloned()
            .ok_or_else(|| err(node, "input has no channel axis"))
    };
    Ok(match &node.op {
        Op::Conv(c) => {
            let w = constant(1)?;
            let out = conv_shape(node, c, x, w)?;
            if node.inputs.len() > 2 && constant(2)? != [w[0]] {
                return Err(err(node, "bias length differs from the output channels"));
            }
            out
        }
        Op::BatchNorm { .. } => {
            let c = channels(x)?;
            for i in 1..5 {
                let p = constant(i)?;
                if p.len() != 1 {
                    return Err(err(node, "BatchNorm parameters must be vectors"));
                }
                check_channels(node, "a BatchNorm parameter", &c, p[0])?;
            }
            x.to_vec()
        }
        // Elementwise: listed one by one so that a new operator must say its shape rule.
        Op::Relu
        | Op::Clip { .. }
        | Op::LeakyRelu { .. }
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::HardSwish
        | Op::Identity
        | Op::QuantizeDequantize(_) => x.to_vec(),
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Sum => {
            let mut out = x.to_vec();
            for other in &inputs[1..] {
                out = broadcast(node, &out, other)?;
            }
            out
        }
        Op::Concat { axis } => {
            let mut out = x.to_vec();
            if *axis >= out.len() {
                return Err(err(node, format!("axis {axis} out of range")));
            }
            for other in &inputs[1..] {
                if other.len() != out.len() {
                    return Err(err(node, "inputs differ in rank"));
                }
                out[*axis] = match (&out[*axis], &other[*axis]) {
                    (Dim::Known(a), Dim::Known(b)) => {
                        Dim::Known(a.checked_add(*b).ok_or_else(|| err(node, "too large"))?)
                    }
                    _ => Dim::Sym(format!("{}[{axis}]", node.outputs[0])),
                };
            }
            out
        }
        Op::GlobalAveragePool => {
            let x = rank4(node, x)?;
            vec![x[0].clone(), x[1].clone(), Dim::Known(1), Dim::Known(1)]
        }
        Op::AveragePool(p) | Op::MaxPool(p) => pool_shape(node, p, x)?,
        Op::Flatten { axis } => {
            if *axis > x.len() {
                return Err(err(node, format!("axis {axis} out of range")));
            }
            let flat = |d: &[Dim], part: usize| {
                product(d).map_or_else(
                    || Dim::Sym(format!("{}[{part}]", node.outputs[0])),
                    Dim::Known,
                )
            };
            // A lone symbolic batch stays itself.
            let outer = match &x[..*axis] {
                [one] => one.clone(),
                d => flat(d, 0),
            };
            vec![outer, flat(&x[*axis..], 1)]
        }
        Op::Reshape { shape } => reshape_dims(node, x, shape)?,
        Op::Transpose { perm } => {
            if perm.len() != x.len() {
                return Err(err(node, "perm and input rank differ"));
            }
            perm.iter()
                .map(|&p| x.get(p).cloned().ok_or_else(|| err(node, "bad perm")))
                .collect::<Result<_>>()?
        }
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            let [m, k] = match x {
                [a, b] if *trans_a => [b.clone(), a.clone()],
                [a, b] => [a.clone(), b.clone()],
                _ => return Err(err(node, "A must be 2-D")),
            };
            let b = constant(1)?;
            let &[b0, b1] = b else {
                return Err(err(node, "B must be a 2-D constant"));
            };
            let (bk, n) = if *trans_b { (b1, b0) } else { (b0, b1) };
            check_channels(node, "B", &k, bk)?;
            if node.inputs.len() > 2 {
                let c = constant(2)?;
                if element_count(c)? != n && element_count(c)? != 1 && c != [1, n] {
                    return Err(err(
                        node,
                        format!("C of shape {c:?} does not broadcast to N={n}"),
                    ));
                }
            }
            vec![m, Dim::Known(n)]
        }
        Op::MatMul => {
            let b = constant(1)?;
            let &[bk, n] = b else {
                return Err(err(node, "B must be a 2-D constant"));
            };
            let Some((k, rest)) = x.split_last() else {
                return Err(err(node, "A is a scalar"));
            };
            check_channels(node, "B", k, bk)?;
            let mut out = rest.to_vec();
            out.push(Dim::Known(n));
            out
        }
        Op::Softmax { axis, .. } => {
            if *axis >= x.len() {
                return Err(err(node, format!("axis {axis} out of range")));
            }
            x.to_vec()
        }
    })
}

pub(crate) fn infer(graph: &Graph, input: &[Dim]) -> Result<Shapes> {
    let mut shapes = Shapes::new();
    shapes.insert(graph.input()?.name.clone(), input.to_vec());
    for (name, c) in &graph.constants {
        shapes.insert(name.clone(), known(&c.dims));
    }
    for node in &graph.nodes {
        let inputs = node
            .inputs
            .iter()
            .map(|i| {
                shapes.get(i).map(Vec::as_slice).ok_or_else(|| {
                    err(
                        node,
                        format!("reads `{i}`, which nothing computes before it"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let out = node_output(graph, node, &inputs)?;
        let [name] = node.outputs.as_slice() else {
            return Err(err(node, "must have exactly one output"));
        };
        shapes.insert(name.clone(), out);
    }
    Ok(shapes)
}

/// Multiply-accumulates of convolutions and matrix products (None while a dim is unknown).
pub(crate) fn macs(graph: &Graph, shapes: &Shapes) -> Option<u64> {
    graph.nodes.iter().try_fold(0u64, |total, node| {
        total.checked_add(node_macs(graph, shapes, node)?)
    })
}

/// Multiply-accumulates of one node (0 for nodes without weights); `None` when a dim is
/// unknown.
pub fn node_macs(graph: &Graph, shapes: &Shapes, node: &Node) -> Option<u64> {
    let w = node.inputs.get(1).and_then(|n| graph.constant(n));
    let per_output = match (&node.op, w) {
        (Op::Conv(_), Some(w)) => w.dims.iter().skip(1).product::<usize>(),
        (Op::Gemm { trans_b, .. }, Some(w)) => *w.dims.get(usize::from(*trans_b))?,
        (Op::MatMul, Some(w)) => *w.dims.first()?,
        _ => return Some(0),
    };
    let out = concrete(shapes.get(node.outputs.first()?)?)?;
    let outputs = element_count(&out).ok()?;
    (outputs as u64).checked_mul(per_output as u64)
}
