//! The device report's table: every standard compression on every executor of this
//! browser, timed on the visitor's machine, with its speed next to fp32 on the same executor.

use leptos::prelude::*;

use crate::lab_panel::{mb, speed_change};
use compresslab_spec::messages::{BackendKind, DeviceReport, DeviceRow};

fn executor_name(kind: &BackendKind) -> &'static str {
    match kind {
        BackendKind::WebGpu => "WebGPU",
        BackendKind::Cpu => "CPU fallback",
    }
}

/// The fp32 row's warm p50 on `kind` (every other row is compared with it).
fn fp32_p50(rows: &[DeviceRow], kind: &BackendKind) -> Option<f64> {
    rows.iter()
        .find(|r| &r.backend == kind && r.variant == "fp32")
        .map(|r| r.latency.p50_ms)
}

#[component]
pub fn DeviceReportTable(report: DeviceReport) -> impl IntoView {
    let executors = match &report.adapter {
        Some(adapter) => format!("WebGPU: {adapter} · CPU: {}", report.cpu),
        None => format!("No WebGPU on this page · CPU: {}", report.cpu),
    };
    let rows = report.rows.clone();
    view! {
        <div class="device-report" id="device-report">
            <h3>"Device report"</h3>
            <p class="hint" id="device-executors">{executors}</p>
            <p class="hint">
                {format!(
                    "On {}: one cold run (the first after building; on WebGPU it compiles shaders), then {} warm runs per variant, taken in turn across the variants of an executor. \"vs fp32\" compares warm p50 on the same executor. \"Held while running\" is what the network's weights occupy in the worker (the CPU path; WebGPU buffers are not counted yet).",
                    report.photo, report.runs
                )}
            </p>
            <table class="layers">
                <thead>
                    <tr>
                        <th>"Executor"</th><th>"Variant"</th><th>"Stored"</th><th>"Held while running"</th><th>"Cold"</th>
                        <th>"Warm p50"</th><th>"p95"</th><th>"vs fp32"</th><th>"Ran"</th>
                    </tr>
                </thead>
                <tbody>
                    {rows.iter().map(|r| {
                        let versus = match fp32_p50(&rows, &r.backend) {
                            Some(base) if r.variant != "fp32" => speed_change(base, r.latency.p50_ms),
                            _ => "—".to_string(),
                        };
                        view! {
                            <tr data-backend=executor_name(&r.backend) data-variant=r.variant.clone()>
                                <td>{executor_name(&r.backend)}</td>
                                <td>{r.variant.clone()}</td>
                                <td>{mb(r.weight_bytes)}</td>
                                <td class="held">{mb(r.held_bytes)}</td>
                                <td>{format!("{:.1} ms", r.latency.cold_ms)}</td>
                                <td class="p50">{format!("{:.1} ms", r.latency.p50_ms)}</td>
                                <td>{format!("{:.1} ms", r.latency.p95_ms)}</td>
                                <td class="versus">{versus}</td>
                                <td class="ran">{r.ran.clone()}</td>
                            </tr>
                        }
                    }).collect_view()}
                </tbody>
            </table>
        </div>
    }
}
