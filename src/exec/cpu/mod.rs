//! The CPU interpreter: runs any imported graph, channels-last (NHWC) for images so a 1×1
//! convolution is one GEMM over pixels (the `gemm` crate, SIMD128 on wasm), k×k and grouped
//! convolutions are im2col + GEMM per group, and depthwise ones are direct loops over
//! contiguous channels. Ops defined on NCHW positions (Reshape, Transpose, Flatten, Gemm,
//! Softmax, Concat off the channel axis) see their input in plain row-major order; the
//! interpreter converts only when a layout differs (free when H = W = 1).

mod chain;
mod conv;
mod linear;
mod ops;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

use super::{MAX_ACTIVATION_ELEMENTS, ShapeCache, Tensor};
use crate::error::{EngineError, Result};
use crate::graph::{CompressedGraph, Constant, Graph, Node, Op, batch_norm_affine, transpose};
use crate::quant::QuantizedTensor;
use chain::{Plan, plan_chains, run_chain};
use conv::{ConvKernel, Epilogue, Weights};
use linear::LinearKernel;
use ops::{apply_unary, broadcast_op, concat, pool, softmax};

/// `[n, rows, cols]` → `[n, cols, rows]`: NCHW ↔ NHWC (the generic transpose costs several
/// times more on a whole image).
fn swap_inner_axes(data: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    let image = rows * cols;
    for (src, dst) in data
        .chunks_exact(image.max(1))
        .zip(out.chunks_exact_mut(image.max(1)))
        .take(n)
    {
        for (r, row) in src.chunks_exact(cols).enumerate() {
            for (col, &v) in row.iter().enumerate() {
                dst[col * rows + r] = v;
            }
        }
    }
    out
}

/// A value while the graph runs: logical dims (NCHW for 4-D) and its physical layout.
#[derive(Debug, Clone)]
pub(super) struct Value {
    dims: Vec<usize>,
    data: Vec<f32>,
    /// 4-D data stored as NHWC.
    nhwc: bool,
}

impl Value {
    fn plain(dims: Vec<usize>, data: Vec<f32>) -> Self {
        Value {
            dims,
            data,
            nhwc: false,
        }
    }

    /// Whether NHWC and NCHW orders coincide (one pixel or one channel).
    fn layout_free(&self) -> bool {
        self.dims.len() != 4 || self.dims[2] * self.dims[3] == 1 || self.dims[1] == 1
    }

    fn into_plain(self) -> Value {
        if !self.nhwc || self.layout_free() {
            return Value {
                nhwc: false,
                ..self
            };
        }
        let [n, c, h, w] = [self.dims[0], self.dims[1], self.dims[2], self.dims[3]];
        let data = swap_inner_axes(&self.data, n, h * w, c);
        Value::plain(self.dims, data)
    }

    fn into_nhwc(self) -> Value {
        if self.dims.len() != 4 || self.nhwc {
            return self;
        }
        if self.layout_free() {
            return Value { nhwc: true, ..self };
        }
        let [n, c, h, w] = [self.dims[0], self.dims[1], self.dims[2], self.dims[3]];
        let data = swap_inner_axes(&self.data, n, c, h * w);
        Value {
            dims: self.dims,
            data,
            nhwc: true,
        }
    }

    /// Strides of each logical axis in the physical buffer.
    fn strides(&self) -> Vec<usize> {
        if self.nhwc && self.dims.len() == 4 {
            let [_, c, _, w] = [self.dims[0], self.dims[1], self.dims[2], self.dims[3]];
            return vec![self.dims[2] * w * c, 1, w * c, c];
        }
        let mut s = vec![1usize; self.dims.len()];
        for i in (0..self.dims.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.dims[i + 1];
        }
        s
    }
}

pub(super) fn exec_err(node: &Node, msg: impl std::fmt::Display) -> EngineError {
    EngineError::Execution(format!("{} node `{}`: {msg}", node.op.name(), node.name))
}

pub(super) fn checked_len(node: &Node, dims: &[usize]) -> Result<usize> {
    let n = crate::graph::element_count(dims)?;
    if n > MAX_ACTIVATION_ELEMENTS {
        return Err(exec_err(
            node,
            format!(
                "its output {dims:?} has {n} elements, more than the {MAX_ACTIVATION_ELEMENTS} allowed"
            ),
        ));
    }
    Ok(n)
}

enum Kernel {
    Conv(Box<ConvKernel>),
    /// `y = x·scale + shift` per channel (inference BatchNorm).
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Linear(Box<LinearKernel>),
    /// A node whose work a layer before it does (an activation or residual Add in that
    /// layer's epilogue), or an activation quantizer that only int8 kernels read (they
    /// quantize their inputs themselves): passes input `.0` on.
    PassOn(usize),
    Other,
}

impl Kernel {
    fn has_int8(&self) -> bool {
        match self {
            Kernel::Conv(k) => matches!(k.weights, Weights::Int8(_) | Weights::Int8Depthwise(_)),
            Kernel::Linear(k) => matches!(k.weights, Weights::Int8(_)),
            _ => false,
        }
    }

    fn has_int4(&self) -> bool {
        match self {
            Kernel::Conv(k) => matches!(k.weights, Weights::Int4(_)),
            Kernel::Linear(k) => matches!(k.weights, Weights::Int4(_)),
            _ => false,
        }
    }
}

/// What a compressed graph's quantized layers run on in a [`CpuExecutor`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelUse {
    /// int8 weights and inputs on the int8 dot-product kernel.
    pub int8: usize,
    /// int4 weights kept packed, unpacked inside the layer as it runs.
    pub int4: usize,
    /// Quantized layers without an integer kernel (int8 weights without int8 inputs, per-
    /// block int8 k×k filters, grouped int8, depthwise blocks smaller than a channel):
    /// float arithmetic on their dequantized weights.
    pub dequantized: usize,
    /// int8 layers (of `int8`) in chains that pass quantized values from layer to layer
    /// (expansion → depthwise → projection) instead of floats.
    pub chained: usize,
}

/// A graph prepared for the CPU: weights rearranged once, values freed after their last use.
pub struct CpuExecutor {
    /// The graph; the constants the kernels took over keep their dims, not their data.
    graph: Graph,
    kernels: Vec<Kernel>,
    /// For each node, whether it runs its kernel, a chain of int8 layers, or nothing (part
    /// of a chain).
    plan: Vec<Plan>,
    /// For each node, the values whose last reader it is.
    frees: Vec<Vec<String>>,
    shapes: ShapeCache,
    dequantized: usize,
}

/// A value owned: moved out when nothing else holds it, else copied.
fn owned(v: Rc<Value>) -> Value {
    Rc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone())
}

impl CpuExecutor {
    /// Runs `graph` in float.
    pub fn new(graph: &Graph) -> Result<Self> {
        Self::build(graph.clone(), None)
    }

    /// [`Self::new`] taking the graph over: the kernels take the weights they run on, and
    /// the graph's copy is freed as they do (no second copy of the model while it loads).
    pub fn from_graph(graph: Graph) -> Result<Self> {
        Self::build(graph, None)
    }

    /// Runs a compressed graph with its quantized layers on the integer kernels where one
    /// exists for them (see [`KernelUse`]); the others compute in float on the dequantized
    /// weights, as [`Self::new`] would. The outputs match [`Self::new`] on the same graph
    /// up to float summation order: the int8 kernel's products of grid values are exact.
    pub fn compressed(compressed: &CompressedGraph) -> Result<Self> {
        Self::quantized(compressed.graph.clone(), &compressed.weights)
    }

    /// [`Self::compressed`] for a graph (taken over, as [`Self::from_graph`] does) and its
    /// integer weights by constant name.
    pub fn quantized(graph: Graph, weights: &BTreeMap<String, QuantizedTensor>) -> Result<Self> {
        Self::build(graph, Some(weights))
    }

    fn build(
        mut graph: Graph,
        quantized: Option<&BTreeMap<String, QuantizedTensor>>,
    ) -> Result<Self> {
        fn constant<'g>(graph: &'g Graph, node: &Node, i: usize) -> Result<&'g Constant> {
            node.inputs
                .get(i)
                .and_then(|n| graph.constants.get(n))
                .ok_or_else(|| exec_err(node, format!("input {i} must be a constant")))
        }
        fn optional<'g>(graph: &'g Graph, node: &Node, i: usize) -> Result<Option<&'g Constant>> {
            if node.inputs.len() > i {
                constant(graph, node, i).map(Some)
            } else {
                Ok(None)
            }
        }
        // A node with a kernel of its own (convolution, BatchNorm, Gemm, MatMul) copies its
        // weights (the inputs after the first) into it. The graph keeps the data of only the
        // constants other nodes read, and drops each of the others as soon as the last kernel
        // that needs it has its copy: the model is never held twice while it loads.
        let inputs_read = |op: &Op, inputs: usize| {
            let owns_weights = matches!(
                op,
                Op::Conv(_) | Op::BatchNorm { .. } | Op::Gemm { .. } | Op::MatMul
            );
            if owns_weights { 1 } else { inputs }
        };
        let mut read: HashSet<String> = HashSet::new();
        let mut last_kernel: HashMap<String, usize> = HashMap::new();
        for (n, node) in graph.nodes.iter().enumerate() {
            let taken = inputs_read(&node.op, node.inputs.len());
            read.extend(node.inputs.iter().take(taken).cloned());
            for name in node.inputs.iter().skip(taken) {
                last_kernel.insert(name.clone(), n);
            }
        }
        let mut kernels = Vec::with_capacity(graph.nodes.len());
        for n in 0..graph.nodes.len() {
            let node = &graph.nodes[n];
            let kernel = match &node.op {
                Op::Conv(c) => {
                    let bias = optional(&graph, node, 2)?;
                    let w = constant(&graph, node, 1)?;
                    let groups_fit = w.dims.len() == 4
                        && c.group >= 1
                        && w.dims[0] % c.group == 0
                        && bias.is_none_or(|b| b.data.len() == w.dims[0]);
                    if !groups_fit {
                        return Err(exec_err(
                            node,
                            format!("weight {:?} does not fit the convolution", w.dims),
                        ));
                    }
                    let bias = bias.map(|b| b.data.as_slice());
                    Kernel::Conv(Box::new(ConvKernel::new(c, &w.dims, &w.data, bias)))
                }
                Op::BatchNorm { epsilon } => {
                    let [g, b, m, v] = [1, 2, 3, 4].map(|i| constant(&graph, node, i));
                    let (g, b, m, v) = (g?, b?, m?, v?);
                    if [b, m, v].iter().any(|p| p.data.len() != g.data.len()) {
                        return Err(exec_err(node, "BatchNorm parameters differ in length"));
                    }
                    let (scale, shift) = batch_norm_affine(g, b, m, v, *epsilon);
                    Kernel::Affine { scale, shift }
                }
                Op::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => Kernel::Linear(Box::new(LinearKernel::new(
                    node,
                    constant(&graph, node, 1)?,
                    optional(&graph, node, 2)?,
                    [*alpha, *beta],
                    [*trans_a, *trans_b],
                )?)),
                Op::MatMul => Kernel::Linear(Box::new(LinearKernel::new(
                    node,
                    constant(&graph, node, 1)?,
                    None,
                    [1.0, 1.0],
                    [false, false],
                )?)),
                _ => Kernel::Other,
            };
            kernels.push(kernel);
            let node = &graph.nodes[n];
            let copied: Vec<String> = node
                .inputs
                .iter()
                .skip(inputs_read(&node.op, node.inputs.len()))
                .filter(|name| !read.contains(*name) && last_kernel.get(*name) == Some(&n))
                .cloned()
                .collect();
            for name in copied {
                if let Some(c) = graph.constants.get_mut(&name) {
                    c.data = Vec::new();
                }
            }
        }
        let producers: HashMap<&str, usize> = graph
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let input_grid = |i: usize| match producers.get(graph.nodes[i].inputs[0].as_str()) {
            Some(&p) => match graph.nodes[p].op {
                Op::QuantizeDequantize(q) if q.is_valid() => Some(q),
                _ => None,
            },
            None => None,
        };
        let mut dequantized = 0;
        if let Some(quantized) = quantized {
            for (i, node) in graph.nodes.iter().enumerate() {
                let Some(q) = node.inputs.get(1).and_then(|w| quantized.get(w)) else {
                    continue;
                };
                let grid = input_grid(i);
                let integer = match &mut kernels[i] {
                    Kernel::Conv(k) => k.use_quantized(q, grid.as_ref())?,
                    Kernel::Linear(k) => k.use_quantized(q, grid.as_ref())?,
                    _ => continue,
                };
                if !integer {
                    dequantized += 1;
                }
            }
        }
        let outputs: HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
        let consumers = graph.consumers();
        // An activation quantizer read only by int8 kernels: they quantize their input
        // themselves, so its own pass would be wasted.
        for (i, node) in graph.nodes.iter().enumerate() {
            let out = node.outputs[0].as_str();
            let readers = consumers.get(out).map(Vec::as_slice).unwrap_or_default();
            if matches!(node.op, Op::QuantizeDequantize(_))
                && !outputs.contains(out)
                && !readers.is_empty()
                && readers.iter().all(|&r| {
                    kernels[r].has_int8() && graph.nodes[r].inputs.first().is_some_and(|x| x == out)
                })
            {
                kernels[i] = Kernel::PassOn(0);
            }
        }
        fuse_epilogues(&graph, &mut kernels, &producers, &consumers, &outputs);
        let plan = plan_chains(&graph, &kernels, &producers, &consumers, &outputs);
        let frees = graph.last_readers();
        // Whatever no node reads any more (the weights a kernel took over) is dropped;
        // shape inference still sees every dims.
        for (name, c) in graph.constants.iter_mut() {
            if !read.contains(name) {
                c.data = Vec::new();
            }
        }
        Ok(Self {
            graph,
            kernels,
            plan,
            frees,
            shapes: ShapeCache::default(),
            dequantized,
        })
    }

    /// Which kernels the quantized layers run on (all zero for a float graph).
    pub fn kernel_use(&self) -> KernelUse {
        KernelUse {
            int8: self.kernels.iter().filter(|k| k.has_int8()).count(),
            int4: self.kernels.iter().filter(|k| k.has_int4()).count(),
            dequantized: self.dequantized,
            chained: self
                .plan
                .iter()
                .enumerate()
                .map(|(i, p)| match p {
                    Plan::Chain { depthwise, project } => {
                        1 + usize::from(i != *depthwise) + usize::from(project.is_some())
                    }
                    _ => 0,
                })
                .sum(),
        }
    }

    /// Bytes the executor holds for the model's weights and other constants (what it
    /// keeps in memory between runs).
    pub fn weight_bytes(&self) -> usize {
        let kernels: usize = self
            .kernels
            .iter()
            .map(|k| match k {
                Kernel::Conv(k) => k.bytes(),
                Kernel::Linear(k) => k.bytes(),
                Kernel::Affine { scale, shift } => 4 * (scale.len() + shift.len()),
                _ => 0,
            })
            .sum();
        let constants: usize = self
            .graph
            .constants
            .values()
            .map(|c| 4 * c.data.len())
            .sum();
        kernels + constants
    }

    /// Runs the graph on one NCHW input; returns the outputs in the graph's order.
    pub fn run(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        self.run_observed(input, &mut |_, _| {})
    }

    /// [`Self::run`], showing `observe` every value as it is computed (the input too), by
    /// name, in whatever element order the interpreter keeps it (calibration only needs the
    /// values). A layer's raw output is not shown when the nodes after it are fused into
    /// it: they show the value it wrote; nor are the values inside a chain of int8 layers
    /// (see `chain.rs`: only a compressed graph has them), which never exist as floats.
    pub fn run_observed(
        &self,
        input: &Tensor,
        observe: &mut dyn FnMut(&str, &[f32]),
    ) -> Result<Vec<Tensor>> {
        let info = self.graph.input()?;
        super::check_input_dims(&self.graph, &input.dims)?;
        if crate::graph::element_count(&input.dims)? != input.data.len() {
            return Err(EngineError::Execution(
                "input data does not match its dims".into(),
            ));
        }
        let shapes = self.shapes.get(&self.graph, &input.dims)?;
        let mut values: HashMap<&str, Rc<Value>> = HashMap::new();
        observe(&info.name, &input.data);
        let first = match input.dims.as_slice() {
            &[n, c, h, w] if c > 1 && h * w > 1 => Value {
                dims: input.dims.clone(),
                data: swap_inner_axes(&input.data, n, c, h * w),
                nhwc: true,
            },
            _ => Value::plain(input.dims.clone(), input.data.clone()).into_nhwc(),
        };
        values.insert(info.name.as_str(), Rc::new(first));
        let dims_of = |name: &str| -> Result<Vec<usize>> {
            shapes
                .get(name)
                .and_then(|d| crate::graph::concrete_dims(d))
                .ok_or_else(|| EngineError::Execution(format!("shape of `{name}` unknown")))
        };
        let steps = self.graph.nodes.iter().zip(&self.kernels).zip(&self.frees);
        for (i, ((node, kernel), frees)) in steps.enumerate() {
            let (at, out) = match self.plan[i] {
                Plan::Skip => {
                    for f in frees {
                        values.remove(f.as_str());
                    }
                    continue;
                }
                Plan::Chain { depthwise, project } => {
                    let out = run_chain(
                        &self.graph,
                        &self.kernels,
                        [i, depthwise],
                        project,
                        &values,
                        &dims_of,
                    )?;
                    (project.unwrap_or(depthwise), Rc::new(out))
                }
                Plan::Run => {
                    let out_dims = dims_of(&node.outputs[0])?;
                    (i, self.step(node, kernel, &values, &out_dims)?)
                }
            };
            // A chain's output is its last node's.
            let (node, kernel) = (&self.graph.nodes[at], &self.kernels[at]);
            let out_dims = dims_of(&node.outputs[0])?;
            for f in frees {
                values.remove(f.as_str());
            }
            if out.dims != out_dims {
                return Err(exec_err(
                    node,
                    format!("computed {:?}, expected {out_dims:?}", out.dims),
                ));
            }
            let fused = matches!(kernel, Kernel::Conv(k) if !k.epilogue.is_empty());
            if !fused {
                observe(&node.outputs[0], &out.data);
            }
            values.insert(node.outputs[0].as_str(), out);
        }
        self.graph
            .outputs
            .iter()
            .map(|o| {
                let v = values.remove(o.name.as_str()).ok_or_else(|| {
                    EngineError::Execution(format!("output `{}` was not computed", o.name))
                })?;
                let v = owned(v).into_plain();
                Ok(Tensor {
                    dims: v.dims,
                    data: v.data,
                })
            })
            .collect()
    }

    /// One node's output. Values are shared, not copied: a node that changes its input in
    /// place takes it over when it is the last reader (the caller frees its entry
    /// afterwards), else works on a copy.
    fn step(
        &self,
        node: &Node,
        kernel: &Kernel,
        values: &HashMap<&str, Rc<Value>>,
        out_dims: &[usize],
    ) -> Result<Rc<Value>> {
        let get = |i: usize| -> Result<Rc<Value>> {
            let name = node
                .inputs
                .get(i)
                .ok_or_else(|| exec_err(node, "missing input"))?;
            if let Some(c) = self.graph.constant(name) {
                return Ok(Rc::new(Value::plain(c.dims.clone(), c.data.clone())));
            }
            values
                .get(name.as_str())
                .cloned()
                .ok_or_else(|| exec_err(node, format!("`{name}` is not computed")))
        };
        let out = match (&node.op, kernel) {
            (_, Kernel::PassOn(i)) => return get(*i),
            (Op::Conv(_), Kernel::Conv(k)) => {
                let residual = match &k.epilogue.residual {
                    Some(name) => Some(values.get(name.as_str()).ok_or_else(|| {
                        exec_err(node, format!("its residual `{name}` is not computed"))
                    })?),
                    None => None,
                };
                k.forward(node, &*get(0)?, residual.map(|r| &**r), out_dims)?
            }
            (Op::BatchNorm { .. }, Kernel::Affine { scale, shift }) => {
                let mut x = owned(get(0)?).into_nhwc();
                let c = scale.len();
                if x.dims.get(1) != Some(&c) {
                    return Err(exec_err(
                        node,
                        format!("{c} BatchNorm channels for an input {:?}", x.dims),
                    ));
                }
                if x.nhwc || x.dims.len() == 2 {
                    for px in x.data.chunks_mut(c) {
                        for ((v, s), b) in px.iter_mut().zip(scale).zip(shift) {
                            *v = *v * s + b;
                        }
                    }
                } else {
                    let inner: usize = x.dims[2..].iter().product();
                    for (i, block) in x.data.chunks_mut(inner.max(1)).enumerate() {
                        let ch = i % c;
                        block
                            .iter_mut()
                            .for_each(|v| *v = *v * scale[ch] + shift[ch]);
                    }
                }
                x
            }
            (op, _) if op.is_unary() => {
                let mut x = owned(get(0)?);
                apply_unary(&node.op, &mut x.data);
                x
            }
            (Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Sum, _) => {
                let mut acc = get(0)?;
                for i in 1..node.inputs.len() {
                    acc = Rc::new(broadcast_op(node, &node.op, &acc, &*get(i)?)?);
                }
                return Ok(acc);
            }
            (Op::Concat { axis }, _) => {
                let parts = (0..node.inputs.len())
                    .map(|i| get(i).map(owned))
                    .collect::<Result<Vec<_>>>()?;
                concat(node, *axis, parts, out_dims)?
            }
            (Op::GlobalAveragePool, _) => {
                let x = owned(get(0)?).into_nhwc();
                let [n, c, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
                let mut out = vec![0f32; n * c];
                for b in 0..n {
                    let acc = &mut out[b * c..(b + 1) * c];
                    for px in x.data[b * h * w * c..(b + 1) * h * w * c].chunks(c) {
                        acc.iter_mut().zip(px).for_each(|(a, v)| *a += v);
                    }
                    let scale = 1.0 / (h * w).max(1) as f32;
                    acc.iter_mut().for_each(|a| *a *= scale);
                }
                Value {
                    dims: out_dims.to_vec(),
                    data: out,
                    nhwc: true,
                }
            }
            (Op::AveragePool(p), _) => pool(node, p, false, owned(get(0)?), out_dims)?,
            (Op::MaxPool(p), _) => pool(node, p, true, owned(get(0)?), out_dims)?,
            (Op::Flatten { .. } | Op::Reshape { .. }, _) => {
                let x = owned(get(0)?).into_plain();
                Value::plain(out_dims.to_vec(), x.data)
            }
            (Op::Transpose { perm }, _) => {
                let x = owned(get(0)?).into_plain();
                let (dims, data) = transpose(&x.dims, &x.data, perm);
                Value::plain(dims, data)
            }
            (Op::Gemm { .. } | Op::MatMul, Kernel::Linear(k)) => {
                k.forward(node, owned(get(0)?), out_dims)?
            }
            (Op::Softmax { axis, legacy }, _) => softmax(owned(get(0)?), *axis, *legacy),
            _ => return Err(exec_err(node, "has no CPU kernel")),
        };
        Ok(Rc::new(out))
    }
}

/// Moves the nodes after each convolution into its epilogue while they form a chain its
/// output alone feeds: activations and activation quantizers, and one residual Add whose
/// other operand has the same shape and is computed before the convolution runs.
fn fuse_epilogues(
    graph: &Graph,
    kernels: &mut [Kernel],
    producers: &HashMap<&str, usize>,
    consumers: &HashMap<&str, Vec<usize>>,
    outputs: &HashSet<&str>,
) {
    let shapes = graph
        .input()
        .ok()
        .and_then(|info| graph.shapes(&info.dims).ok());
    let input = graph.input().ok().map(|i| i.name.as_str());
    let constant_rest = |node: &Node| node.inputs[1..].iter().all(|n| graph.constant(n).is_some());
    for i in 0..graph.nodes.len() {
        if !matches!(kernels[i], Kernel::Conv(_)) {
            continue;
        }
        let mut epilogue = Epilogue::default();
        let mut value = graph.nodes[i].outputs[0].as_str();
        while !outputs.contains(value) {
            let Some(&[j]) = consumers.get(value).map(Vec::as_slice) else {
                break;
            };
            let next = &graph.nodes[j];
            if !matches!(kernels[j], Kernel::Other) {
                break;
            }
            let passes = match &next.op {
                op if op.is_activation() || matches!(op, Op::QuantizeDequantize(_)) => {
                    if next.inputs[0] != value || !constant_rest(next) {
                        break;
                    }
                    epilogue.push_unary(op.clone());
                    0
                }
                Op::Add if epilogue.residual.is_none() && next.inputs.len() == 2 => {
                    let Some(at) = next.inputs.iter().position(|n| n == value) else {
                        break;
                    };
                    let other = next.inputs[1 - at].as_str();
                    let earlier =
                        input == Some(other) || producers.get(other).is_some_and(|&p| p < i);
                    let same_shape = shapes
                        .as_ref()
                        .and_then(|s| Some(s.get(other)? == s.get(value)?))
                        .unwrap_or(false);
                    if other == value || !earlier || !same_shape {
                        break;
                    }
                    epilogue.push_residual(other.to_string());
                    at
                }
                _ => break,
            };
            kernels[j] = Kernel::PassOn(passes);
            value = next.outputs[0].as_str();
        }
        if let Kernel::Conv(k) = &mut kernels[i] {
            k.epilogue = epilogue;
        }
    }
}
