//! The interpreter's elementwise, pooling and layout operators, and its checked GEMM.

use super::{Value, checked_len, exec_err};
use crate::error::{EngineError, Result};
use crate::graph::{Node, Op, Pool};

/// The taps `k` of a window (0..kernel) that land inside an axis of `size` for output `o`
/// (`o·stride + k·dilation − pad ∈ [0, size)`), and the input index of tap 0.
pub(crate) fn tap_range(
    o: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    kernel: usize,
    size: usize,
) -> (std::ops::Range<usize>, isize) {
    let origin = (o * stride) as isize - pad as isize;
    let d = dilation.max(1) as isize;
    let first = if origin >= 0 {
        0
    } else {
        ((-origin + d - 1) / d) as usize
    };
    let room = size as isize - origin;
    let last = if room <= 0 {
        0
    } else {
        (((room + d - 1) / d) as usize).min(kernel)
    };
    (first..last.max(first), origin)
}

/// `dst[m×n] (row stride ldd) += scale · lhs[m×k] (row-major, row stride lda) · rhs`, where
/// `rhs[i][j]` is at `rhs[i·rs + j·cs]`. Bounds are checked here, not assumed.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldd: usize,
    lhs: &[f32],
    lda: usize,
    rhs: &[f32],
    rs: usize,
    cs: usize,
    scale: f32,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |rows: usize, row_stride: usize, cols: usize, col_stride: usize| {
        (rows - 1) * row_stride + (cols.max(1) - 1) * col_stride
    };
    let fits = last(m, ldd, n, 1) < dst.len()
        && (k == 0 || (last(m, lda, k, 1) < lhs.len() && last(k, rs, n, cs) < rhs.len()));
    if !fits || ldd < n {
        return Err(EngineError::Execution(
            "matrix product out of bounds".into(),
        ));
    }
    if k == 0 {
        return Ok(());
    }
    // SAFETY: every element the GEMM touches is inside the slices (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            true,
            lhs.as_ptr(),
            1,
            lda as isize,
            rhs.as_ptr(),
            cs as isize,
            rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

// Selects rather than `f32::max`/`min`, whose NaN rules cost extra instructions per lane
// (a NaN passes through, as in ONNX Runtime).
#[inline]
fn relu(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

#[inline]
fn clip(v: f32, min: f32, max: f32) -> f32 {
    let v = if v < min { min } else { v };
    if v > max { max } else { v }
}

fn unary(op: &Op, v: f32) -> f32 {
    match *op {
        Op::Relu => relu(v),
        Op::Clip { min, max } => clip(v, min, max),
        Op::LeakyRelu { alpha } => {
            if v < 0.0 {
                alpha * v
            } else {
                v
            }
        }
        Op::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        Op::HardSigmoid { alpha, beta } => (alpha * v + beta).clamp(0.0, 1.0),
        Op::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
        Op::QuantizeDequantize(p) => p.fake_quantize(v),
        _ => v,
    }
}

/// [`unary`] over a buffer, with the operator matched once (the common activations then
/// vectorise).
pub(super) fn apply_unary(op: &Op, data: &mut [f32]) {
    match *op {
        Op::Relu => data.iter_mut().for_each(|v| *v = relu(*v)),
        Op::Clip { min, max } => data.iter_mut().for_each(|v| *v = clip(*v, min, max)),
        Op::QuantizeDequantize(p) => data.iter_mut().for_each(|v| *v = p.fake_quantize(*v)),
        Op::Identity => {}
        ref other => data.iter_mut().for_each(|v| *v = unary(other, *v)),
    }
}

fn binary(op: &Op, a: f32, b: f32) -> f32 {
    match op {
        Op::Sub => a - b,
        Op::Mul => a * b,
        Op::Div => a / b,
        _ => a + b,
    }
}

/// Elementwise `a op b` with NumPy broadcasting, in whatever layouts the operands have.
pub(super) fn broadcast_op(node: &Node, op: &Op, a: &Value, b: &Value) -> Result<Value> {
    if a.dims == b.dims && a.nhwc == b.nhwc {
        let data = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(&x, &y)| binary(op, x, y))
            .collect();
        return Ok(Value {
            dims: a.dims.clone(),
            data,
            nhwc: a.nhwc,
        });
    }
    let rank = a.dims.len().max(b.dims.len());
    let mut out_dims = vec![1usize; rank];
    let pad = |v: &Value| -> (Vec<usize>, Vec<usize>) {
        let extra = rank - v.dims.len();
        let mut dims = vec![1; extra];
        dims.extend_from_slice(&v.dims);
        let mut strides = vec![0; extra];
        strides.extend(v.strides());
        // Broadcast axes read the same element.
        let strides = dims
            .iter()
            .zip(strides)
            .map(|(&d, s)| if d == 1 { 0 } else { s })
            .collect();
        (dims, strides)
    };
    let (ad, as_) = pad(a);
    let (bd, bs) = pad(b);
    for i in 0..rank {
        out_dims[i] = match (ad[i], bd[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            (x, y) => return Err(exec_err(node, format!("{x} and {y} do not broadcast"))),
        };
    }
    let len = checked_len(node, &out_dims)?;
    let nhwc = rank == 4 && ((a.nhwc && a.dims.len() == 4) || (b.nhwc && b.dims.len() == 4));
    // Iterate the output in its physical order: logical axes permuted for NHWC.
    let order: Vec<usize> = if nhwc {
        vec![0, 2, 3, 1]
    } else {
        (0..rank).collect()
    };
    let mut data = Vec::with_capacity(len);
    let mut index = vec![0usize; rank];
    let (mut ia, mut ib) = (0usize, 0usize);
    for _ in 0..len {
        data.push(binary(op, a.data[ia], b.data[ib]));
        for &axis in order.iter().rev() {
            index[axis] += 1;
            ia += as_[axis];
            ib += bs[axis];
            if index[axis] < out_dims[axis] {
                break;
            }
            ia -= as_[axis] * out_dims[axis];
            ib -= bs[axis] * out_dims[axis];
            index[axis] = 0;
        }
    }
    Ok(Value {
        dims: out_dims,
        data,
        nhwc,
    })
}

pub(super) fn pool(
    node: &Node,
    p: &Pool,
    max: bool,
    x: Value,
    out_dims: &[usize],
) -> Result<Value> {
    let x = x.into_nhwc();
    let [n, c, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
    let [oh, ow] = [out_dims[2], out_dims[3]];
    let len = checked_len(node, out_dims)?;
    let [pad_y, pad_x] = p.padding.leading([h, w], p.kernel, p.strides, p.dilations);
    let mut out = Vec::with_capacity(len);
    let mut acc = vec![0f32; c];
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                acc.fill(if max { f32::NEG_INFINITY } else { 0.0 });
                let mut inside = 0usize;
                let mut window = 0usize;
                for ky in 0..p.kernel[0] {
                    let y = (oy * p.strides[0] + ky * p.dilations[0]) as isize - pad_y as isize;
                    for kx in 0..p.kernel[1] {
                        let xx =
                            (ox * p.strides[1] + kx * p.dilations[1]) as isize - pad_x as isize;
                        // Padded positions (not past the padded edge in ceil mode) count for
                        // count_include_pad.
                        let in_padded = y < (h + pad_y) as isize && xx < (w + pad_x) as isize;
                        if in_padded {
                            window += 1;
                        }
                        if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                            continue;
                        }
                        inside += 1;
                        let at = ((b * h + y as usize) * w + xx as usize) * c;
                        for (a, &v) in acc.iter_mut().zip(&x.data[at..at + c]) {
                            *a = if max { a.max(v) } else { *a + v };
                        }
                    }
                }
                if !max {
                    let count = if p.count_include_pad { window } else { inside };
                    let scale = 1.0 / count.max(1) as f32;
                    acc.iter_mut().for_each(|a| *a *= scale);
                }
                out.extend_from_slice(&acc);
            }
        }
    }
    Ok(Value {
        dims: out_dims.to_vec(),
        data: out,
        nhwc: true,
    })
}

pub(super) fn concat(
    node: &Node,
    axis: usize,
    values: Vec<Value>,
    out_dims: &[usize],
) -> Result<Value> {
    let len = checked_len(node, out_dims)?;
    let channels_last = axis == 1 && out_dims.len() == 4;
    let values: Vec<Value> = values
        .into_iter()
        .map(|v| {
            if channels_last {
                v.into_nhwc()
            } else {
                v.into_plain()
            }
        })
        .collect();
    // Copy blocks of `inner` for each of `outer` positions.
    let (outer, inner): (usize, Vec<usize>) = if channels_last {
        (
            out_dims[0] * out_dims[2] * out_dims[3],
            values.iter().map(|v| v.dims[1]).collect(),
        )
    } else {
        (
            out_dims[..axis].iter().product(),
            values
                .iter()
                .map(|v| v.dims[axis..].iter().product())
                .collect(),
        )
    };
    let mut out = Vec::with_capacity(len);
    for o in 0..outer {
        for (v, &block) in values.iter().zip(&inner) {
            out.extend_from_slice(&v.data[o * block..(o + 1) * block]);
        }
    }
    Ok(Value {
        dims: out_dims.to_vec(),
        data: out,
        nhwc: channels_last,
    })
}

pub(super) fn softmax(x: Value, axis: usize, legacy: bool) -> Value {
    let x = x.into_plain();
    let dims = x.dims.clone();
    let (outer, size, inner) = if legacy {
        (
            dims[..axis].iter().product::<usize>(),
            dims[axis..].iter().product::<usize>(),
            1,
        )
    } else {
        (
            dims[..axis].iter().product::<usize>(),
            dims[axis],
            dims[axis + 1..].iter().product::<usize>(),
        )
    };
    let mut data = x.data;
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * size + j) * inner + i;
            let max = (0..size)
                .map(|j| data[at(j)])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for j in 0..size {
                let e = (data[at(j)] - max).exp();
                data[at(j)] = e;
                sum += e;
            }
            for j in 0..size {
                data[at(j)] /= sum;
            }
        }
    }
    Value::plain(dims, data)
}

#[cfg(test)]
mod tests {
    use super::tap_range;

    #[test]
    fn taps_clip_to_the_input() {
        // 3×3 stride 2 at 224: pad 0 before, so the last output's third tap is padding.
        assert_eq!(tap_range(0, 2, 1, 0, 3, 224), (0..3, 0));
        assert_eq!(tap_range(111, 2, 1, 0, 3, 224), (0..2, 222));
        // 5×5 stride 1, pad 2: the first output skips two taps.
        assert_eq!(tap_range(0, 1, 1, 2, 5, 7), (2..5, -2));
        assert_eq!(tap_range(6, 1, 1, 2, 5, 7), (0..3, 4));
        // Dilation 2: taps 0, 2, 4 of a 3-tap window at pad 2 land at −2, 0, 2.
        assert_eq!(tap_range(0, 1, 2, 2, 3, 7), (1..3, -2));
    }
}
