//! ONNX export of EfficientNet-Lite0 (BatchNorm folded; opset 13), written with a minimal
//! protobuf encoder. Used to run the *same* weights in other runtimes (ONNX Runtime Web in
//! the benchmark) and offered to developers as an export format.

use crate::efficientnet::{INPUT_SIZE, block_strides, folded_conv};
use crate::error::{EngineError, Result};
use crate::graph::ProtoMessage as Proto;
use crate::weights::TensorStore;

const ONNX_FLOAT: i64 = 1;

fn attr_ints(name: &str, values: &[i64]) -> Proto {
    let mut a = Proto::default();
    a.string(1, name);
    for &v in values {
        a.int(8, v);
    }
    a.int(20, 7); // INTS
    a
}

fn attr_int(name: &str, v: i64) -> Proto {
    let mut a = Proto::default();
    a.string(1, name).int(3, v).int(20, 2); // INT
    a
}

fn tensor_proto(name: &str, dims: &[usize], data: &[f32]) -> Proto {
    let mut t = Proto::default();
    for &d in dims {
        t.int(1, d as i64);
    }
    t.int(2, ONNX_FLOAT).string(8, name);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.bytes(9, &raw);
    t
}

fn value_info(name: &str, dims: &[usize]) -> Proto {
    let mut shape = Proto::default();
    for &d in dims {
        let mut dim = Proto::default();
        dim.int(1, d as i64);
        shape.message(1, &dim);
    }
    let mut tensor_type = Proto::default();
    tensor_type.int(1, ONNX_FLOAT).message(2, &shape);
    let mut ty = Proto::default();
    ty.message(1, &tensor_type);
    let mut vi = Proto::default();
    vi.string(1, name).message(2, &ty);
    vi
}

struct Graph {
    nodes: Proto,
    initializers: Proto,
    counter: usize,
}

impl Graph {
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<Proto>) -> String {
        self.counter += 1;
        let out = format!("t{}", self.counter);
        let mut n = Proto::default();
        for i in inputs {
            n.string(1, i);
        }
        n.string(2, &out)
            .string(3, &format!("{op}_{}", self.counter))
            .string(4, op);
        for a in attrs {
            n.message(5, &a);
        }
        self.nodes.message(1, &n);
        out
    }

    fn init(&mut self, name: &str, dims: &[usize], data: &[f32]) {
        self.initializers
            .message(5, &tensor_proto(name, dims, data));
    }

    /// Folded conv (+ ReLU6) with TF "SAME" pads for a `size`×`size` input; returns the output name.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        store: &TensorStore,
        x: &str,
        conv: &str,
        bn: &str,
        stride: usize,
        group: usize,
        relu6: bool,
        size: usize,
    ) -> Result<String> {
        let (shape, fw, fb) = folded_conv(store, conv, bn)?;
        let (out_ch, k) = (shape[0], shape[2]);
        self.init(&format!("{conv}.w"), &shape, &fw);
        self.init(&format!("{conv}.b"), &[out_ch], &fb);
        let out = size.div_ceil(stride);
        let total = ((out - 1) * stride + k).saturating_sub(size) as i64;
        let (before, after) = (total / 2, total - total / 2);
        let y = self.node(
            "Conv",
            &[x, &format!("{conv}.w"), &format!("{conv}.b")],
            vec![
                attr_ints("kernel_shape", &[k as i64, k as i64]),
                attr_ints("strides", &[stride as i64, stride as i64]),
                attr_ints("pads", &[before, before, after, after]),
                attr_int("group", group as i64),
            ],
        );
        Ok(if relu6 {
            self.node("Clip", &[&y, "relu6.min", "relu6.max"], vec![])
        } else {
            y
        })
    }
}

/// The whole network as an ONNX model (`input` `[1,3,224,224]` → `logits` `[1,1000]`).
pub fn export_onnx(store: &TensorStore) -> Result<Vec<u8>> {
    let mut g = Graph {
        nodes: Proto::default(),
        initializers: Proto::default(),
        counter: 0,
    };
    g.init("relu6.min", &[], &[0.0]);
    g.init("relu6.max", &[], &[6.0]);
    let mut size = INPUT_SIZE;
    let mut x = g.conv(store, "input", "_conv_stem", "_bn0", 2, 1, true, size)?;
    size = size.div_ceil(2);
    for (i, stride) in block_strides().iter().copied().enumerate() {
        let p = format!("_blocks.{i}.");
        let input = x.clone();
        let mut h = x.clone();
        if store.contains(&format!("{p}_expand_conv.weight")) {
            h = g.conv(
                store,
                &h,
                &format!("{p}_expand_conv"),
                &format!("{p}_bn0"),
                1,
                1,
                true,
                size,
            )?;
        }
        let dw = format!("{p}_depthwise_conv");
        let channels = store.get(&format!("{dw}.weight"))?.shape[0];
        h = g.conv(
            store,
            &h,
            &dw,
            &format!("{p}_bn1"),
            stride,
            channels,
            true,
            size,
        )?;
        size = size.div_ceil(stride);
        h = g.conv(
            store,
            &h,
            &format!("{p}_project_conv"),
            &format!("{p}_bn2"),
            1,
            1,
            false,
            size,
        )?;
        let in_ch = match store.get(&format!("{p}_expand_conv.weight")) {
            Ok(e) => e.shape[1],
            Err(_) => channels,
        };
        let out_ch = store.get(&format!("{p}_project_conv.weight"))?.shape[0];
        x = if stride == 1 && in_ch == out_ch {
            g.node("Add", &[&h, &input], vec![])
        } else {
            h
        };
    }
    x = g.conv(store, &x, "_conv_head", "_bn1", 1, 1, true, size)?;
    let pooled = g.node("GlobalAveragePool", &[&x], vec![]);
    let flat = g.node("Flatten", &[&pooled], vec![attr_int("axis", 1)]);
    let fc_w = store.get("_fc.weight")?;
    let fc_b = store.get("_fc.bias")?;
    g.init("_fc.weight", &fc_w.shape, &fc_w.data);
    g.init("_fc.bias", &fc_b.shape, &fc_b.data);
    let classes = fc_w.shape[0];
    // Gemm with transB: PyTorch's [out, in] weight as it is.
    let mut gemm = Proto::default();
    for i in [flat.as_str(), "_fc.weight", "_fc.bias"] {
        gemm.string(1, i);
    }
    gemm.string(2, "logits")
        .string(3, "classifier")
        .string(4, "Gemm");
    let mut trans_b = Proto::default();
    trans_b.string(1, "transB").int(3, 1).int(20, 2);
    gemm.message(5, &trans_b);
    let mut alpha = Proto::default();
    alpha.string(1, "alpha").float(2, 1.0).int(20, 1);
    gemm.message(5, &alpha);
    g.nodes.message(1, &gemm);

    let mut graph = Proto::default();
    graph.0.extend_from_slice(&g.nodes.0);
    graph.string(2, "efficientnet_lite0");
    graph.0.extend_from_slice(&g.initializers.0);
    graph.message(11, &value_info("input", &[1, 3, INPUT_SIZE, INPUT_SIZE]));
    graph.message(12, &value_info("logits", &[1, classes]));

    let mut opset = Proto::default();
    opset.string(1, "").int(2, 13);
    let mut model = Proto::default();
    model
        .int(1, 8)
        .string(2, "compresslab")
        .string(3, env!("CARGO_PKG_VERSION"))
        .message(7, &graph)
        .message(8, &opset);
    if model.0.len() > i32::MAX as usize {
        return Err(EngineError::Weights("model too large for protobuf".into()));
    }
    Ok(model.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_encode_as_protobuf() {
        let mut p = Proto::default();
        p.varint(1);
        p.varint(300);
        p.varint(u64::MAX);
        assert_eq!(&p.0[..3], &[0x01, 0xac, 0x02]);
        assert_eq!(p.0.len(), 3 + 10);
    }
}
