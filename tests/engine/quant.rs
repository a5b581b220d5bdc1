//! Quantization numerics on the real EfficientNet-Lite0 weights.

use compresslab::quant::{Granularity, QuantScheme, fake_quantize, sqnr_db};

use crate::store;

/// Why per-tensor int8 hurts depthwise layers and per-channel does not: their channels'
/// ranges differ by orders of magnitude.
#[test]
fn per_channel_int8_rescues_depthwise_layers() {
    let store = store();
    let scheme = |granularity| QuantScheme {
        bits: 8,
        symmetric: true,
        granularity,
    };
    let (mut worst_tensor, mut worst_channel) = (f64::INFINITY, f64::INFINITY);
    for t in store
        .iter()
        .filter(|t| t.name.ends_with("_depthwise_conv.weight"))
    {
        let per_tensor = sqnr_db(
            &t.data,
            &fake_quantize(&t.data, &t.shape, scheme(Granularity::PerTensor)),
        );
        let per_channel = sqnr_db(
            &t.data,
            &fake_quantize(&t.data, &t.shape, scheme(Granularity::PerChannel)),
        );
        println!(
            "{:<32} per-tensor {per_tensor:6.1} dB  per-channel {per_channel:6.1} dB",
            t.name
        );
        assert!(per_channel >= per_tensor, "{}", t.name);
        worst_tensor = worst_tensor.min(per_tensor);
        worst_channel = worst_channel.min(per_channel);
    }
    println!(
        "worst depthwise layer: per-tensor {worst_tensor:.1} dB, per-channel {worst_channel:.1} dB"
    );
    assert!(worst_channel > worst_tensor + 10.0);
}
