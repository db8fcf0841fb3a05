//! Typed CUDA failures, and what each means for the worker: a transient failure fails one
//! batch (its requests fall back) and the device is kept; a lost device fails the batches in
//! flight and the worker is replaced (CUDA documents these errors as leaving the process's
//! context unusable until the process exits, and a kernel that never finishes cannot be
//! stopped from inside the process).

use cudarc::driver::{sys::CUresult, DriverError};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    /// Device or pinned memory exhausted (a reload's overlap, other processes): transient.
    #[error("out of memory while {0}")]
    OutOfMemory(String),
    /// A launch the device refused (resources, configuration): transient, this batch only.
    #[error("launch refused while {0}")]
    BadLaunch(String),
    /// The context is unusable (illegal address, launch failure, ECC, ...): sticky.
    #[error("device lost while {0}")]
    Lost(String),
    /// A batch ran past its deadline: its kernel cannot be stopped, the device is lost.
    #[error("a {op} batch has not finished {secs:.1} s after its launch (deadline passed)")]
    Hung { op: String, secs: f64 },
    /// No usable GPU here, and waiting will not change that (no driver, no device, a PTX
    /// the driver cannot load).
    #[error("{0}")]
    Unavailable(String),
    /// Opening failed in a way that may pass (memory, MPS server not ready): retried.
    #[error("{0}")]
    Busy(String),
}

impl GpuError {
    /// Whether the device must be given up (the worker is replaced).
    pub fn is_lost(&self) -> bool {
        matches!(self, GpuError::Lost(_) | GpuError::Hung { .. })
    }

    /// Classifies a driver error raised while doing `what`.
    pub fn from_driver(e: DriverError, what: &str) -> GpuError {
        let msg = format!("{what}: {}", describe(e));
        match kind(e.0) {
            Kind::Memory => GpuError::OutOfMemory(msg),
            Kind::Launch => GpuError::BadLaunch(msg),
            Kind::Sticky => GpuError::Lost(msg),
        }
    }

    /// Classifies a driver error raised while opening the device.
    pub fn opening(e: DriverError, what: &str) -> GpuError {
        let msg = format!("{what}: {}", describe(e));
        use CUresult::*;
        match e.0 {
            CUDA_ERROR_OUT_OF_MEMORY
            | CUDA_ERROR_DEVICE_UNAVAILABLE
            | CUDA_ERROR_MPS_CONNECTION_FAILED
            | CUDA_ERROR_MPS_RPC_FAILURE
            | CUDA_ERROR_MPS_SERVER_NOT_READY
            | CUDA_ERROR_MPS_MAX_CLIENTS_REACHED
            | CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED
            | CUDA_ERROR_SYSTEM_NOT_READY
            | CUDA_ERROR_UNKNOWN => GpuError::Busy(msg),
            _ => GpuError::Unavailable(msg),
        }
    }
}

enum Kind {
    Memory,
    Launch,
    Sticky,
}

/// Everything not known to be harmless to the context is taken as sticky: a wrong guess
/// costs a worker restart, the other way round wrong answers.
fn kind(r: CUresult) -> Kind {
    use CUresult::*;
    match r {
        CUDA_ERROR_OUT_OF_MEMORY => Kind::Memory,
        CUDA_ERROR_INVALID_VALUE
        | CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
        | CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
        | CUDA_ERROR_NOT_SUPPORTED => Kind::Launch,
        _ => Kind::Sticky,
    }
}

/// `CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access was encountered)`.
fn describe(e: DriverError) -> String {
    // cuGetErrorString needs libcuda: cudarc panics without it (errors made up by the fault
    // injection or the tests have no driver behind them).
    // SAFETY: only tries dlopen on candidate names.
    let text = unsafe { cudarc::driver::sys::is_culib_present() }
        .then(|| {
            e.error_string()
                .ok()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .flatten();
    match text {
        Some(s) => format!("{:?} ({s})", e.0),
        None => format!("{:?}", e.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CUresult::*;

    #[test]
    fn memory_and_launch_errors_are_transient_the_rest_lose_the_device() {
        let e = GpuError::from_driver(DriverError(CUDA_ERROR_OUT_OF_MEMORY), "growing a buffer");
        assert!(
            matches!(e, GpuError::OutOfMemory(_)) && !e.is_lost(),
            "{e:?}"
        );
        let e = GpuError::from_driver(DriverError(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES), "launch");
        assert!(matches!(e, GpuError::BadLaunch(_)) && !e.is_lost(), "{e:?}");
        for r in [
            CUDA_ERROR_ILLEGAL_ADDRESS,
            CUDA_ERROR_LAUNCH_FAILED,
            CUDA_ERROR_ECC_UNCORRECTABLE,
            CUDA_ERROR_ILLEGAL_INSTRUCTION,
            CUDA_ERROR_ASSERT,
            CUDA_ERROR_UNKNOWN,
        ] {
            assert!(
                GpuError::from_driver(DriverError(r), "x").is_lost(),
                "{r:?}"
            );
        }
        assert!(GpuError::Hung {
            op: "echo".into(),
            secs: 2.0
        }
        .is_lost());
    }

    #[test]
    fn opening_failures_that_may_pass_are_busy() {
        for r in [CUDA_ERROR_OUT_OF_MEMORY, CUDA_ERROR_MPS_SERVER_NOT_READY] {
            assert!(matches!(
                GpuError::opening(DriverError(r), "x"),
                GpuError::Busy(_)
            ));
        }
        for r in [CUDA_ERROR_NO_DEVICE, CUDA_ERROR_UNSUPPORTED_PTX_VERSION] {
            assert!(matches!(
                GpuError::opening(DriverError(r), "x"),
                GpuError::Unavailable(_)
            ));
        }
    }

    #[test]
    fn the_message_says_what_and_which_error() {
        let e = GpuError::from_driver(DriverError(CUDA_ERROR_ILLEGAL_ADDRESS), "running blake3");
        let s = e.to_string();
        assert!(
            s.starts_with("device lost while running blake3: CUDA_ERROR_ILLEGAL_ADDRESS"),
            "{s}"
        );
    }
}
