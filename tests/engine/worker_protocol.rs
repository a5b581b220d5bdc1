//! What the page decides from the worker's messages (the `compresslab-spec` crate has no
//! test binary of its own: one link less).

use compresslab_spec::messages::CrashCause;

/// A panic inside the GPU stack moves the page to the CPU fallback; a panic anywhere else
/// (our engine, burn's tensor checks, the standard library) restarts the worker on the
/// same backend, because the GPU is not at fault.
#[test]
fn a_panic_blames_the_gpu_only_when_it_comes_from_the_gpu_stack() {
    let registry = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f";
    for gpu in [
        "wgpu-27.0.1/src/backend/webgpu.rs",
        "wgpu-core-27.0.3/src/device/resource.rs",
        "cubecl-runtime-0.9.0/src/memory_management/memory_manage.rs",
        "cubecl-wgpu-0.9.0/src/compute/server.rs",
        "burn-cubecl-0.22.1/src/ops/base.rs",
        "naga-27.0.0/src/back/wgsl/writer.rs",
    ] {
        let file = format!("{registry}/{gpu}");
        assert_eq!(CrashCause::of_panic_at(&file), CrashCause::Gpu, "{file}");
    }
    for not_gpu in [
        format!("{registry}/burn-tensor-0.22.1/src/tensor/api/check.rs"),
        format!("{registry}/burn-flex-0.22.1/src/ops/conv.rs"),
        "/rustc/59807616e/library/core/src/slice/index.rs".to_string(),
        "src/exec/cpu.rs".to_string(),
        "worker/src/user_model.rs".to_string(),
        // Our own file that merely mentions a GPU in its name.
        "src/gpu_int.rs".to_string(),
        "src/wgpu_helpers.rs".to_string(),
        String::new(),
    ] {
        assert_eq!(
            CrashCause::of_panic_at(&not_gpu),
            CrashCause::Panic,
            "{not_gpu}"
        );
    }
}
