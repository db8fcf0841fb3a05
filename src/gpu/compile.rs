//! NVRTC compilation of the embedded kernels, done once per configuration load, in a
//! short-lived child of the master (see `compile_isolated`); each worker then loads the PTX
//! into its own context.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

use super::no_panic;

/// All kernels as one NVRTC program: the shared header first, then one file per op.
#[cfg(not(any(test, feature = "fault-injection")))]
pub const KERNEL_SOURCE: &str = concat!(
    include_str!("../ops/common.cuh"),
    "\n",
    include_str!("../ops/echo/echo.cu"),
    "\n",
    include_str!("../ops/blake3/blake3.cu"),
);

/// Test and fault-injection builds add kernels that fail on purpose (`faults.rs`).
#[cfg(any(test, feature = "fault-injection"))]
pub const KERNEL_SOURCE: &str = concat!(
    include_str!("../ops/common.cuh"),
    "\n",
    include_str!("../ops/echo/echo.cu"),
    "\n",
    include_str!("../ops/blake3/blake3.cu"),
    "\n",
    include_str!("../faults/faults.cu"),
);

/// Whether libnvrtc can be loaded; never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: is_culib_present only tries dlopen on candidate names.
    no_panic("loading libnvrtc", || {
        Ok(unsafe { cudarc::nvrtc::sys::is_culib_present() })
    })
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
        Err(CompileError::CompileError { log, .. }) => Err(format!(
            "kernel compilation failed:\n{}",
            log.to_string_lossy().trim_end()
        )),
        Err(e) => Err(format!("kernel compilation failed: {e:?}")),
    })
}

/// What compiling at configuration time gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Compiled {
    Ptx(String),
    /// No libnvrtc: the GPU path is off, not an error.
    NoNvrtc(String),
    /// The kernels do not compile (NVRTC's log), or the compiler process failed.
    Failed(String),
}

/// Compiles `source` in a short-lived child process and returns its PTX.
///
/// Measured on the GPU machine: with libnvrtc loaded into the nginx master, workers it
/// forked failed cuInit ("initialization error") or crashed. A child keeps every CUDA
/// library out of the master; nginx is single-threaded while it reads its
/// configuration, so forking here is safe. Not for multi-threaded callers: the child
/// could inherit a lock another thread held. The integration tests cover it.
pub fn compile_isolated(source: &str) -> Compiled {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: plain syscalls on descriptors this function owns.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Compiled::Failed(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        let pid = libc::fork();
        if pid < 0 {
            libc::close(fds[0]);
            libc::close(fds[1]);
            return Compiled::Failed(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            libc::close(fds[0]);
            let msg = if !nvrtc_present() {
                b"N".to_vec()
            } else {
                match compile_kernels(source) {
                    Ok(ptx) => [b"P", ptx.as_bytes()].concat(),
                    Err(log) => [b"E", log.as_bytes()].concat(),
                }
            };
            let mut w = std::fs::File::from_raw_fd(fds[1]);
            let ok = w.write_all(&msg).is_ok();
            // _exit: no atexit handlers or destructors of the nginx master's state.
            libc::_exit(if ok { 0 } else { 1 });
        }
        libc::close(fds[1]);
        let mut out = Vec::new();
        let read = std::fs::File::from_raw_fd(fds[0]).read_to_end(&mut out);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
        if let Err(e) = read {
            return Compiled::Failed(format!("reading from the compiler process: {e}"));
        }
        match out.split_first() {
            Some((b'P', ptx)) => Compiled::Ptx(String::from_utf8_lossy(ptx).into_owned()),
            Some((b'E', log)) => Compiled::Failed(String::from_utf8_lossy(log).into_owned()),
            Some((b'N', _)) => Compiled::NoNvrtc("libnvrtc not found".into()),
            _ => Compiled::Failed(format!(
                "the kernel compiler process failed (wait status {status:#x})"
            )),
        }
    }
}
