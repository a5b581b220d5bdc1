// matmul_int4_weight_only: f32 activations × int4 weights (unpacked in the kernel) → f32,
// a 1×1 convolution (or linear layer) with a fused epilogue. The weights stay packed in
// GPU memory: 8 × smaller than f32 plus one scale and zero point per group.
//
// Layout: x   f32 [channels, pixels]      activations, channel-major (NCHW, N = 1)
//         w   u32 [outputs, words_per_row] eight signed nibbles per word, low nibble first;
//                                          each row padded with zeros to a whole word
//         qp  f32 [outputs · groups]       scale of each group (groups of group_len inputs)
//         zps i32 [outputs · groups]       zero point of each group
//         epi f32 [outputs]                bias
//         res f32 [outputs, pixels]        residual (read only when params.residual = 1; otherwise
//                                          a separate dummy buffer: writable bindings must not alias)
//         out f32 [outputs, pixels]
// Numerics: y = Σ_groups scale_g · Σ_{k in g} x_k (q_k − zp_g) + bias; ReLU6 when
//           params.relu6 = 1; then + residual. Same definition as src/quant.rs dequantize.
// Bindings: @group(0) @binding(0) x, (1) w, (2) qp, (3) zps, (4) epi, (5) res, (6) out,
//           (7) uniform Params (8 × 32-bit words)
// Dispatch: workgroup 64; grid (ceil(pixels / 64), outputs, 1).
// All storage bindings are read_write: burn/cubecl allocates tensors inside shared pool
// buffers, and WebGPU forbids binding one buffer read-only and writable in one dispatch.
// Required features: none (core WGSL).

struct Params {
    channels: u32,
    pixels: u32,
    outputs: u32,
    words_per_row: u32,
    group_len: u32,
    groups: u32,
    relu6: u32,
    residual: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<u32>;
@group(0) @binding(2) var<storage, read_write> qp: array<f32>;
@group(0) @binding(3) var<storage, read_write> zps: array<i32>;
@group(0) @binding(4) var<storage, read_write> epi: array<f32>;
@group(0) @binding(5) var<storage, read_write> res: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<uniform> params: Params;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.x;
    let o = gid.y;
    if (p >= params.pixels || o >= params.outputs) {
        return;
    }
    var y = 0.0;
    for (var g = 0u; g < params.groups; g++) {
        let k0 = g * params.group_len;
        let k1 = min(k0 + params.group_len, params.channels);
        let zp = f32(zps[o * params.groups + g]);
        var acc = 0.0;
        for (var k = k0; k < k1; k++) {
            let word = w[o * params.words_per_row + k / 8u];
            // Sign-extend the nibble: shift it to the top, then arithmetic shift down.
            let q = i32(word << (28u - 4u * (k % 8u))) >> 28u;
            acc += x[k * params.pixels + p] * (f32(q) - zp);
        }
        y += acc * qp[o * params.groups + g];
    }
    y += epi[o];
    if (params.relu6 == 1u) {
        y = clamp(y, 0.0, 6.0);
    }
    let at = o * params.pixels + p;
    if (params.residual == 1u) {
        y = y + res[at];
    }
    out[at] = y;
}
