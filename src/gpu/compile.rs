//! NVRTC compilation of the embedded kernels, done once per configuration load.
//!
//! NVRTC does not touch the CUDA driver, so this is safe in the master process; each
//! worker then loads the PTX into its own context.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

use super::no_panic;

/// All kernels as one NVRTC program: the shared header first, then one file per op.
pub const KERNEL_SOURCE: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/echo.cu"),
    "\n",
    include_str!("../kernels/blake3.cu"),
);

/// Whether libnvrtc can be loaded; never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: is_culib_present only tries dlopen on candidate names.
    no_panic("loading libnvrtc", || Ok(unsafe { cudarc::nvrtc::sys::is_culib_present() }))
        .unwrap_or(false)
}

/// Compiles `source` to PTX. The error carries NVRTC's log.
pub fn compile_kernels(source: &str) -> Result<String, String> {
    let opts = CompileOptions {
        options: vec!["--std=c++17".into()],
        name: Some("ngx_http_gpu_module.cu".into()),
        ..Default::default()
    };
    no_panic("NVRTC", || match compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => {
            Err(format!("kernel compilation failed:\n{}", log.to_string_lossy().trim_end()))
        }
        Err(e) => Err(format!("kernel compilation failed: {e:?}")),
    })
}
