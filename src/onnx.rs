//! ONNX export of EfficientNet-Lite0 (BatchNorm folded; opset 13), written with a minimal
//! protobuf encoder. Used to run the *same* weights in other runtimes (ONNX Runtime Web in
//! the benchmark) and offered to developers as an export format.

use crate::efficientnet::{INPUT_SIZE, block_strides, folded_conv};
use crate::error::{EngineError, Result};
use crate::weights::TensorStore;

const ONNX_FLOAT: i64 = 1;

/// Protobuf wire-format writer for the handful of ONNX messages we emit.
#[derive(Default)]
struct Proto(Vec<u8>);

impl Proto {
    fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                break;
            }
            self.0.push(byte | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }
    fn int(&mut self, field: u32, v: i64) -> &mut Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Self {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, field: u32, s: &str) -> &mut Self {
        self.bytes(field, s.as_bytes())
    }
    fn msg(&mut self, field: u32, m: Proto) -> &mut Self {
        self.bytes(field, &m.0)
    }
    fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

fn attr_ints(name: &str, values: &[i64]) -> Proto {
    let mut a = Proto::default();
    a.str(1, name);
    for &v in values {
        a.int(8, v);
    }
    a.int(20, 7); // INTS
    a
}

fn attr_int(name: &str, v: i64) -> Proto {
    let mut a = Proto::default();
    a.str(1, name).int(3, v).int(20, 2); // INT
    a
}

fn tensor_proto(name: &str, dims: &[usize], data: &[f32]) -> Proto {
    let mut t = Proto::default();
    for &d in dims {
        t.int(1, d as i64);
    }
    t.int(2, ONNX_FLOAT).str(8, name);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.bytes(9, &raw);
    t
}

fn value_info(name: &str, dims: &[usize]) -> Proto {
    let mut shape = Proto::default();
    for &d in dims {
        let mut dim = Proto::default();
        dim.int(1, d as i64);
        shape.msg(1, dim);
    }
    let mut tensor_type = Proto::default();
    tensor_type.int(1, ONNX_FLOAT).msg(2, shape);
    let mut ty = Proto::default();
    ty.msg(1, tensor_type);
    let mut vi = Proto::default();
    vi.str(1, name).msg(2, ty);
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
            n.str(1, i);
        }
        n.str(2, &out)
            .str(3, &format!("{op}_{}", self.counter))
            .str(4, op);
        for a in attrs {
            n.msg(5, a);
        }
        self.nodes.msg(1, n);
        out
    }

    fn init(&mut self, name: &str, dims: &[usize], data: &[f32]) {
        self.initializers.msg(5, tensor_proto(name, dims, data));
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
        gemm.str(1, i);
    }
    gemm.str(2, "logits").str(3, "classifier").str(4, "Gemm");
    let mut trans_b = Proto::default();
    trans_b.str(1, "transB").int(3, 1).int(20, 2);
    gemm.msg(5, trans_b);
    let mut alpha = Proto::default();
    alpha.str(1, "alpha").float(2, 1.0).int(20, 1);
    gemm.msg(5, alpha);
    g.nodes.msg(1, gemm);

    let mut graph = Proto::default();
    graph.0.extend_from_slice(&g.nodes.0);
    graph.str(2, "efficientnet_lite0");
    graph.0.extend_from_slice(&g.initializers.0);
    graph.msg(11, value_info("input", &[1, 3, INPUT_SIZE, INPUT_SIZE]));
    graph.msg(12, value_info("logits", &[1, classes]));

    let mut opset = Proto::default();
    opset.str(1, "").int(2, 13);
    let mut model = Proto::default();
    model
        .int(1, 8)
        .str(2, "compresslab")
        .str(3, env!("CARGO_PKG_VERSION"))
        .msg(7, graph)
        .msg(8, opset);
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
