// matmul_i8_dot4: int8 × int8 → int32 1×1 convolution (or linear layer) with a fused
// float epilogue, on dot4I8Packed (four int8 multiply-adds per instruction).
//
// Layout: a   u32 [channels4, pixels]  activations packed by quantize_pack_i8.wgsl
//         w   u32 [outputs, channels4] weights, row = output channel, same packing
//         ints i32 [2 · outputs]        per output: Σ_k q_w (weight row sum), weight zero point
//         epi f32 [2 · outputs]         per output: input scale × weight scale, bias
//         res f32 [outputs, pixels]     residual added after the epilogue (read only when
//                                       params.residual = 1; otherwise bind a separate
//                                       dummy buffer: writable bindings must not alias)
//         out f32 [outputs, pixels]
// Numerics: acc = Σ_k (q_a − zp_a)(q_w − zp_w), expanded as
//           Σ q_a q_w − zp_w Σ q_a − zp_a Σ q_w + K zp_a zp_w (exact in i32 for K ≤ 32 768),
//           y = acc · scale + bias, then ReLU6 when params.relu6 = 1, then + residual.
//           Padding channels are 0 in both a and w, so they add nothing to any sum.
// Bindings: @group(0) @binding(0) a, (1) w, (2) ints, (3) epi, (4) res, (5) out,
//           (6) uniform Params (8 × 32-bit words)
// Dispatch: workgroup 64; grid (ceil(pixels / 64), outputs, 1).
// All storage bindings are read_write: burn/cubecl allocates tensors inside shared pool
// buffers, and WebGPU forbids binding one buffer read-only and writable in one dispatch.
// Required: WGSL language extension packed_4x8_integer_dot_product (dot4I8Packed);
//           Chromium and SwiftShader have it, naga polyfills it on Vulkan without
//           VK_KHR_shader_integer_dot_product.

struct Params {
    channels: u32,
    channels4: u32,
    pixels: u32,
    outputs: u32,
    input_zero_point: i32,
    relu6: u32,
    residual: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read_write> a: array<u32>;
@group(0) @binding(1) var<storage, read_write> w: array<u32>;
@group(0) @binding(2) var<storage, read_write> ints: array<i32>;
@group(0) @binding(3) var<storage, read_write> epi: array<f32>;
@group(0) @binding(4) var<storage, read_write> res: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.x;
    let o = gid.y;
    if (p >= params.pixels || o >= params.outputs) {
        return;
    }
    var acc = 0i;
    var a_sum = 0i;
    let row = o * params.channels4;
    for (var c4 = 0u; c4 < params.channels4; c4++) {
        let av = a[c4 * params.pixels + p];
        acc += dot4I8Packed(av, w[row + c4]);
        a_sum += dot4I8Packed(av, 0x01010101u);
    }
    let w_sum = ints[2u * o];
    let w_zp = ints[2u * o + 1u];
    let a_zp = params.input_zero_point;
    let centred = acc - w_zp * a_sum - a_zp * w_sum + i32(params.channels) * a_zp * w_zp;
    var y = f32(centred) * epi[2u * o] + epi[2u * o + 1u];
    if (params.relu6 == 1u) {
        y = clamp(y, 0.0, 6.0);
    }
    let at = o * params.pixels + p;
    if (params.residual == 1u) {
        y = y + res[at];
    }
    out[at] = y;
}
