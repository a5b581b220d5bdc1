//! Subcommands on any ONNX model: `inspect` and `run` (the graph engine).

use std::path::Path;
use std::time::Instant;

use compresslab::exec::CpuExecutor;
use compresslab::graph::{Dim, import_onnx};
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

/// `run MODEL.onnx IN.npy OUT.npy [--device cpu]`: the model on an NCHW float32 batch.
pub fn run(args: &[String]) -> Result<()> {
    let (model, input, output) = match args {
        [m, i, o] => (m, i, o),
        [m, i, o, flag, device] if flag == "--device" && device == "cpu" => (m, i, o),
        [_, _, _, flag, device] if flag == "--device" => {
            return Err(EngineError::Config(format!(
                "--device {device}: the graph engine runs on the CPU interpreter so far"
            )));
        }
        _ => {
            return Err(usage_error(
                "run takes MODEL.onnx IN.npy OUT.npy [--device cpu]",
            ));
        }
    };
    let graph = import_onnx(&read(Path::new(model))?)?;
    let executor = CpuExecutor::new(&graph)?;
    let input = read_npy(&read(Path::new(input))?)?;
    let start = Instant::now();
    let outputs = executor.run(&input)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let first = outputs
        .first()
        .ok_or_else(|| EngineError::Execution("the model has no outputs".into()))?;
    write(Path::new(output), &write_npy(first))?;
    println!(
        "{:?} → {:?} in {ms:.1} ms on the CPU interpreter; wrote {output}",
        input.dims, first.dims
    );
    Ok(())
}
