// quantize_pack_i8: static int8 quantization of activations, four channels per word.
//
// Layout: x is f32 [channels, pixels] (one image, channel-major: NCHW with N = 1);
//         out is u32 [channels4, pixels], channels4 = ceil(channels / 4); byte j (low first)
//         of out[c4 * pixels + p] is q(channel 4·c4 + j, p) as two's-complement i8, and 0 for
//         padding channels past `channels`.
// Numerics: q = clamp(round(x / scale) + zero_point, qmin, qmax); WGSL round() is round half
//           to even, as src/quant.rs defines.
// Bindings: @group(0) @binding(0) x: array<f32> (read)
//           @group(0) @binding(1) out: array<u32> (write)
//           @group(0) @binding(2) uniform Params (8 × 32-bit words)
// Dispatch: workgroup 64; grid (ceil(pixels / 64), channels4, 1).
// All storage bindings are read_write: burn/cubecl allocates tensors inside shared pool
// buffers, and WebGPU forbids binding one buffer read-only and writable in one dispatch.
// Required features: none (core WGSL).

struct Params {
    channels: u32,
    pixels: u32,
    channels4: u32,
    zero_point: i32,
    scale: f32,
    qmin: i32,
    qmax: i32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.x;
    let c4 = gid.y;
    if (p >= params.pixels || c4 >= params.channels4) {
        return;
    }
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let c = c4 * 4u + j;
        if (c < params.channels) {
            let v = round(x[c * params.pixels + p] / params.scale);
            let q = clamp(i32(clamp(v, -1.0e6, 1.0e6)) + params.zero_point, params.qmin, params.qmax);
            word = word | ((u32(q) & 0xffu) << (8u * j));
        }
    }
    out[c4 * params.pixels + p] = word;
}
