//! A classifier's last layer found in any graph by walking back from its first output, and
//! that layer replaced by one for other classes (transfer learning onto the user's own
//! classes): the features it reads stay, its weight and bias change width, and what follows
//! it (Softmax, Flatten, Reshape, Identity) carries the new class count to the output.

use super::{CLASS_NAME_KEYS, Constant, Dim, Graph, Node, Op, ValueInfo};
use crate::error::{EngineError, Result};

/// How the head's weight matrix is laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// `[classes, features]` (Gemm with `transB`), or `[classes, features, 1, 1]` (a 1×1 Conv).
    ClassesFirst,
    /// `[features, classes]` (MatMul, Gemm without `transB`).
    FeaturesFirst,
}

/// The layer that computes a classifier's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierHead {
    /// The node computing the logits: Gemm, MatMul or a 1×1 Conv.
    pub node: String,
    /// The value it reads (per image a vector of `width` features): what a new head is
    /// fitted on.
    pub features: String,
    pub width: usize,
    /// Outputs per image today.
    pub classes: usize,
    /// Its index in the graph's nodes, and its weight constant's name.
    at: usize,
    weight: String,
    /// Where the bias constant is read: (node index, input index) of the Gemm's or Conv's
    /// own, or of the Add right after a MatMul.
    bias: Option<(usize, usize)>,
    layout: Layout,
    /// Reshapes between the head and the output whose target shape spells out the class
    /// count (by node index): rewritten to the new count.
    reshapes: Vec<usize>,
}

/// A node that passes the class axis through to the graph's output unchanged in meaning.
fn passes_classes(op: &Op) -> bool {
    matches!(
        op,
        Op::Identity | Op::Softmax { .. } | Op::Flatten { .. } | Op::Reshape { .. }
    )
}

impl ClassifierHead {
    /// The head of `graph`: the Gemm, MatMul (with the Add of its bias) or 1×1 Conv whose
    /// output reaches the first graph output through Identity, Softmax, Flatten and Reshape
    /// only, with its weights a constant. `input` is one input's dims, to check that each
    /// image gets one output per class.
    pub fn find(graph: &Graph, input: &[usize]) -> Result<Self> {
        let unsupported = |why: String| {
            EngineError::Config(format!(
                "no classifier head to replace in this model: {why}"
            ))
        };
        let producer = |value: &str| {
            graph
                .nodes
                .iter()
                .position(|n| n.outputs.first().is_some_and(|o| o == value))
        };
        let output = graph
            .outputs
            .first()
            .ok_or_else(|| unsupported("the model has no output".into()))?;
        let mut at = producer(&output.name);
        let mut reshapes = Vec::new();
        let mut bias = None;
        loop {
            let Some(i) = at else {
                return Err(unsupported(format!(
                    "`{}` is not computed by a layer with constant weights",
                    output.name
                )));
            };
            let node = &graph.nodes[i];
            match &node.op {
                // An Add is a bias only right after the layer, not after a Softmax or reshape.
                op if passes_classes(op) && bias.is_some() => {
                    return Err(unsupported(format!(
                        "a constant is added after `{}` ({}), not to the layer's output",
                        node.name,
                        op.name()
                    )));
                }
                op if passes_classes(op) => {
                    if matches!(op, Op::Reshape { .. }) {
                        reshapes.push(i);
                    }
                    at = producer(&node.inputs[0]);
                }
                // A MatMul's bias: the Add's other input is a constant.
                Op::Add if bias.is_none() => {
                    let (computed, constant): (Vec<&String>, Vec<&String>) = node
                        .inputs
                        .iter()
                        .partition(|v| graph.constant(v).is_none());
                    match (computed.as_slice(), constant.as_slice()) {
                        ([x], [b]) => {
                            let input = node.inputs.iter().position(|v| v == *b).unwrap_or(1);
                            bias = Some((i, input));
                            at = producer(x);
                        }
                        _ => {
                            return Err(unsupported(format!(
                                "`{}` adds two computed values",
                                node.name
                            )));
                        }
                    }
                }
                _ => break,
            }
        }
        let Some(i) = at else {
            return Err(unsupported("nothing computes the output".into()));
        };
        let node = &graph.nodes[i];
        let weight_name = node
            .inputs
            .get(1)
            .filter(|w| graph.constant(w).is_some())
            .ok_or_else(|| {
                unsupported(format!(
                    "`{}` ({}) has no constant weights",
                    node.name,
                    node.op.name()
                ))
            })?;
        let weight = &graph.constants[weight_name];
        let own_bias = match node.inputs.get(2).filter(|b| !b.is_empty()) {
            Some(b) if graph.constant(b).is_some() => Some((i, 2)),
            Some(b) => {
                return Err(unsupported(format!(
                    "`{}` adds a computed value `{b}` to its output",
                    node.name
                )));
            }
            None => None,
        };
        let (layout, classes, width, bias) = match (&node.op, weight.dims.as_slice()) {
            (
                Op::Gemm {
                    trans_a: false,
                    trans_b,
                    ..
                },
                &[a, b],
            ) if bias.is_none() => {
                if *trans_b {
                    (Layout::ClassesFirst, a, b, own_bias)
                } else {
                    (Layout::FeaturesFirst, b, a, own_bias)
                }
            }
            (Op::MatMul, &[features, classes]) => (Layout::FeaturesFirst, classes, features, bias),
            (Op::Conv(conv), &[classes, features, 1, 1])
                if bias.is_none() && conv.group == 1 && conv.kernel == [1, 1] =>
            {
                (Layout::ClassesFirst, classes, features, own_bias)
            }
            (op, dims) => {
                return Err(unsupported(format!(
                    "the output comes from `{}`, a {} with weights {dims:?}; a Gemm, a MatMul or a 1×1 Conv is replaced",
                    node.name,
                    op.name()
                )));
            }
        };
        if let Some((n, k)) = bias {
            let b = &graph.nodes[n].inputs[k];
            let count = graph.constants[b].data.len();
            if count != classes {
                return Err(unsupported(format!(
                    "its bias `{b}` has {count} values for {classes} classes"
                )));
            }
        }
        let reshapes = reshapes
            .into_iter()
            .filter(|&r| match &graph.nodes[r].op {
                Op::Reshape { shape } => shape.iter().skip(1).any(|&d| d == classes as i64),
                _ => false,
            })
            .collect();
        let head = Self {
            node: node.name.clone(),
            features: node.inputs[0].clone(),
            width,
            classes,
            at: i,
            weight: weight_name.clone(),
            bias,
            layout,
            reshapes,
        };
        head.check_outputs(graph, input, classes)?;
        let features = graph
            .shapes(&super::known_dims(input))?
            .get(&head.features)
            .and_then(|d| super::concrete_dims(d));
        match features {
            Some(dims) if dims.iter().skip(1).product::<usize>() == width => Ok(head),
            dims => Err(unsupported(format!(
                "`{}` reads {:?}, not {width} features per image",
                head.node, dims
            ))),
        }
    }

    /// Whether replacing the head adds an Add node for its bias (a MatMul without one).
    fn adds_bias_node(&self, graph: &Graph) -> bool {
        self.bias.is_none() && matches!(graph.nodes[self.at].op, Op::MatMul)
    }

    /// Errors unless `graph`'s first output holds `classes` values per image for `input`.
    fn check_outputs(&self, graph: &Graph, input: &[usize], classes: usize) -> Result<()> {
        let name = &graph.outputs[0].name;
        let per_image = graph
            .shapes(&super::known_dims(input))?
            .get(name)
            .and_then(|d| super::concrete_dims(d))
            .map(|d| d.iter().skip(1).product::<usize>());
        if per_image == Some(classes) {
            Ok(())
        } else {
            Err(EngineError::Config(format!(
                "the output `{name}` holds {per_image:?} values per image where the head `{}` computes {classes} classes",
                self.node
            )))
        }
    }

    /// `graph` ending at the features the head reads (`[N, width]` or `[N, width, 1, 1]`).
    pub fn feature_graph(&self, graph: &Graph) -> Graph {
        let mut g = graph.clone();
        let inferred = graph
            .input()
            .and_then(|input| graph.shapes(&input.dims))
            .ok()
            .and_then(|shapes| shapes.get(&self.features).cloned());
        g.outputs = vec![ValueInfo {
            name: self.features.clone(),
            dims: inferred
                .unwrap_or_else(|| vec![Dim::Sym("batch".into()), Dim::Known(self.width)]),
        }];
        g.metadata.clear();
        g.prune_unused();
        g
    }

    /// `graph` with this head replaced: `weight` is `[classes, width]` row-major, `bias`
    /// `[classes]`; the class names go into the metadata (`labels`, a JSON list, replacing
    /// any the model had), and the output's declared class count follows.
    pub fn replaced(
        &self,
        graph: &Graph,
        weight: &[f32],
        bias: &[f32],
        class_names: &[String],
        input: &[usize],
    ) -> Result<Graph> {
        let classes = bias.len();
        if classes < 2
            || class_names.len() != classes
            || Some(weight.len()) != classes.checked_mul(self.width)
        {
            return Err(EngineError::Config(format!(
                "a new head for {} class names takes {} × {} weights and a bias per class; got {} weights and {classes} biases",
                class_names.len(),
                class_names.len(),
                self.width,
                weight.len()
            )));
        }
        if graph.nodes.get(self.at).map(|n| &n.name) != Some(&self.node) {
            return Err(EngineError::Config(format!(
                "the head `{}` was found in another graph",
                self.node
            )));
        }
        let mut g = graph.clone();
        let (dims, data) = match self.layout {
            Layout::ClassesFirst => {
                let mut dims = vec![classes, self.width];
                dims.extend(g.constants[&self.weight].dims.iter().skip(2));
                (dims, weight.to_vec())
            }
            Layout::FeaturesFirst => (
                vec![self.width, classes],
                super::transpose(&[classes, self.width], weight, &[1, 0]).1,
            ),
        };
        // Fresh names: the old constants may be read elsewhere too (a shared initializer).
        let fresh = |g: &Graph, what: &str| {
            let base = format!("{}::new_head_{what}", self.node);
            (0..)
                .map(|k| {
                    if k == 0 {
                        base.clone()
                    } else {
                        format!("{base}.{k}")
                    }
                })
                .find(|n| !g.constants.contains_key(n))
                .unwrap_or(base)
        };
        let weight_name = fresh(&g, "weight");
        g.constants
            .insert(weight_name.clone(), Constant { dims, data });
        g.nodes[self.at].inputs[1] = weight_name;
        let bias_name = fresh(&g, "bias");
        let bias_dims = match self.bias {
            Some((n, k)) => {
                let old = &g.nodes[n].inputs[k];
                let mut dims = g.constants[old].dims.clone();
                if let Some(last) = dims.last_mut() {
                    *last = classes;
                }
                g.nodes[n].inputs[k] = bias_name.clone();
                dims
            }
            None if self.adds_bias_node(graph) => {
                // A MatMul has no bias input: an Add after it takes the fitted one.
                let head = &mut g.nodes[self.at];
                let out = head.outputs[0].clone();
                let product = format!("{out}::without_bias");
                head.outputs[0] = product.clone();
                let add = Node {
                    name: format!("{}::new_head_bias_add", self.node),
                    op: Op::Add,
                    inputs: vec![product, bias_name.clone()],
                    outputs: vec![out],
                };
                g.nodes.insert(self.at + 1, add);
                vec![classes]
            }
            None => {
                // A Gemm or Conv without a bias gets one (the fitted head has one).
                let inputs = &mut g.nodes[self.at].inputs;
                inputs.truncate(2);
                inputs.push(bias_name.clone());
                vec![classes]
            }
        };
        g.constants.insert(
            bias_name,
            Constant {
                dims: bias_dims,
                data: bias.to_vec(),
            },
        );
        // A Gemm's alpha and beta would scale the fitted values.
        if let Op::Gemm { alpha, beta, .. } = &mut g.nodes[self.at].op {
            (*alpha, *beta) = (1.0, 1.0);
        }
        // The reshapes come after the head: an inserted Add moved them one place on.
        let shift = usize::from(self.adds_bias_node(graph));
        for &r in &self.reshapes {
            if let Op::Reshape { shape } = &mut g.nodes[r + shift].op {
                // Past the batch axis (a fixed batch may equal the class count).
                for d in shape
                    .iter_mut()
                    .skip(1)
                    .filter(|d| **d == self.classes as i64)
                {
                    *d = classes as i64;
                }
            }
        }
        // Every output's declared dims follow (a second output may read the logits too).
        let inferred = g.shapes(&g.input()?.dims.clone())?;
        for output in &mut g.outputs {
            if let Some(dims) = inferred.get(&output.name) {
                output.dims = dims.clone();
            }
        }
        g.metadata
            .retain(|(k, _)| !CLASS_NAME_KEYS.contains(&k.to_ascii_lowercase().as_str()));
        let names = serde_json::to_string(class_names)
            .map_err(|e| EngineError::Config(format!("class names: {e}")))?;
        g.metadata.push(("labels".into(), names));
        g.prune_unused();
        self.check_outputs(&g, input, classes)?;
        Ok(g)
    }
}
