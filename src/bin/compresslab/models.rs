//! Subcommands on any ONNX model: `inspect`, `run` and `compress` (the graph engine).

use std::path::Path;
use std::time::Instant;

use burn::prelude::{Device, DeviceKind};
use compresslab::compress::Recipe;
use compresslab::exec::{CpuExecutor, GraphModel};
use compresslab::graph::{Dim, channel_groups, compress_graph, export_onnx, import_onnx};
use compresslab::npy::{read_npy, write_npy};
use compresslab::{EngineError, Result};

use super::{read, usage_error, write};

/// `inspect MODEL.onnx [--shape 1x3x224x224]`: ops, parameters, MACs, inputs and outputs.
pub fn inspect(args: &[String]) -> Result<()> {
    let (model, shape) = match args {
        [model] => (model, None),
        [model, flag, shape] if flag == "--shape" => (model, Some(shape)),
        _ => return Err(usage_error("inspect takes MODEL.onnx [--shape NxCxHxW]")),
    };
    let graph = import_onnx(&read(Path::new(model))?)?;
    let declared = graph.input()?.dims.clone();
    let dims: Vec<Dim> = match shape {
        Some(s) => s
            .split('x')
            .map(|d| {
                d.parse()
                    .map(Dim::Known)
                    .map_err(|_| usage_error("--shape like 1x3x224x224"))
            })
            .collect::<Result<_>>()?,
        // Unknown dims: batch 1 for the MAC count; other unknown dims stay unknown.
        None => declared
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if i == 0 && d.known().is_none() {
                    Dim::Known(1)
                } else {
                    d.clone()
                }
            })
            .collect(),
    };
    let summary = graph.summary(&dims)?;
    let show = |d: &[Dim]| {
        d.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("×")
    };
    println!(
        "model: {} (producer {}, opset {})",
        graph.name, graph.producer, graph.opset
    );
    for i in &summary.inputs {
        println!("input  {}: {}", i.name, show(&i.dims));
    }
    for o in &summary.outputs {
        println!(
            "output {}: {} (for input {})",
            o.name,
            show(&o.dims),
            show(&dims)
        );
    }
    println!("nodes: {}", summary.nodes);
    for (op, n) in &summary.ops {
        println!("  {op:<20} {n}");
    }
    println!("parameters: {}", summary.parameters);
    match summary.macs {
        Some(m) => println!("MACs per input of {}: {m}", show(&dims)),
        None => println!("MACs: unknown until the input size is known (pass --shape)"),
    }
    for (k, v) in &graph.metadata {
        println!("metadata {k}: {v}");
    }
    Ok(())
}

/// `run MODEL.onnx IN.npy OUT.npy [--device cpu|flex|wgpu]`: the model on an NCHW float32
/// batch, on the CPU interpreter (default) or the burn interpreter on Flex or wgpu.
pub fn run(args: &[String]) -> Result<()> {
    let (model, input, output, device) = match args {
        [m, i, o] => (m, i, o, "cpu"),
        [m, i, o, flag, device] if flag == "--device" => (m, i, o, device.as_str()),
        _ => {
            return Err(usage_error(
                "run takes MODEL.onnx IN.npy OUT.npy [--device cpu|flex|wgpu]",
            ));
        }
    };
    let graph = import_onnx(&read(Path::new(model))?)?;
    let input = read_npy(&read(Path::new(input))?)?;
    let burn_device = match device {
        "cpu" => None,
        "flex" => Some(Device::flex()),
        "wgpu" => Some(Device::wgpu(DeviceKind::DefaultDevice)),
        other => {
            return Err(usage_error(&format!(
                "--device {other}: one of cpu, flex, wgpu"
            )));
        }
    };
    let (outputs, ms, ran) = match &burn_device {
        None => {
            let executor = CpuExecutor::new(&graph)?;
            let start = Instant::now();
            let outputs = executor.run(&input)?;
            (outputs, start.elapsed(), "the CPU interpreter".to_string())
        }
        Some(d) => {
            let model = GraphModel::new(&graph, d)?;
            let start = Instant::now();
            let outputs = futures_lite::future::block_on(model.run(&input, d))?;
            (
                outputs,
                start.elapsed(),
                format!("the burn interpreter on {device}"),
            )
        }
    };
    let ms = ms.as_secs_f64() * 1e3;
    let first = outputs
        .first()
        .ok_or_else(|| EngineError::Execution("the model has no outputs".into()))?;
    write(Path::new(output), &write_npy(first))?;
    println!(
        "{:?} → {:?} in {ms:.1} ms on {ran} (first run: includes set-up); wrote {output}",
        input.dims, first.dims
    );
    Ok(())
}

/// `compress MODEL.onnx RECIPE.json OUT.onnx [--calibration IN.npy]`: the lab's recipe on any
/// imported model, written as ONNX.
pub fn compress(args: &[String]) -> Result<()> {
    let (model, recipe, out, calibration) = match args {
        [m, r, o] => (m, r, o, None),
        [m, r, o, flag, c] if flag == "--calibration" => (m, r, o, Some(c)),
        _ => {
            return Err(usage_error(
                "compress takes MODEL.onnx RECIPE.json OUT.onnx [--calibration IN.npy]",
            ));
        }
    };
    let graph = import_onnx(&read(Path::new(model))?)?;
    let text = String::from_utf8_lossy(&read(Path::new(recipe))?).into_owned();
    let recipe = Recipe::from_json(&text)?;
    let calibration = match calibration {
        Some(path) => vec![read_npy(&read(Path::new(path))?)?],
        None => Vec::new(),
    };
    if recipe.channel_pruning.is_some() {
        let groups = channel_groups(&graph)?;
        let prunable = groups.iter().filter(|g| g.fixed.is_none()).count();
        println!(
            "channel groups: {} ({prunable} prunable, {} fixed)",
            groups.len(),
            groups.len() - prunable
        );
    }
    let compressed = compress_graph(&graph, &recipe, &calibration, &mut |_, _| Ok(()))?;
    // MACs for one input of the calibration batch's size when the model leaves it open.
    let fed: Vec<Dim> = match calibration.first() {
        Some(t) => std::iter::once(Dim::Known(1))
            .chain(t.dims.iter().skip(1).map(|&d| Dim::Known(d)))
            .collect(),
        None => {
            let mut dims = graph.input()?.dims.clone();
            if let Some(batch) = dims.first_mut() {
                *batch = Dim::Known(1);
            }
            dims
        }
    };
    let before = graph.stats_at(&fed, &Default::default())?;
    let after = compressed.graph.stats_at(&fed, &compressed.weights)?;
    for layer in &compressed.layers {
        println!(
            "  {:<32} {:<5} {:>9} params  {:>5.1} % zero  {}{}",
            layer.node,
            layer.op,
            layer.parameters,
            100.0 * layer.zeros as f64 / layer.parameters.max(1) as f64,
            layer
                .bits
                .map_or("fp32".to_string(), |b| format!("int{b} weights")),
            match layer.activation {
                Some(a) => format!(", activations scale {:.3e} zp {}", a.scale, a.zero_point),
                None => String::new(),
            }
        );
    }
    let show_macs = |m: Option<u64>| m.map_or("unknown".into(), |m| m.to_string());
    println!(
        "parameters {} → {}, weight bytes {} → {}, MACs {} → {}",
        before.parameters,
        after.parameters,
        before.weight_bytes,
        after.weight_bytes,
        show_macs(before.macs),
        show_macs(after.macs)
    );
    let bytes = export_onnx(
        &compressed.graph,
        &compressed.weights,
        &[("compresslab.recipe".to_string(), recipe.to_json())],
    )?;
    write(Path::new(out), &bytes)?;
    println!("wrote {out} ({} bytes)", bytes.len());
    Ok(())
}
