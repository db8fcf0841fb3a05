//! Placeholder for the device search (the GPU helper's `gpu.rs` and `topk.cu` replace it):
//! loading always answers `GpuError::Unavailable`, so knn runs on the CPU path.

use std::sync::{Arc, OnceLock};

use super::index::Index;
use crate::gpu::{DeviceLoader, GpuError, Program};

/// The largest k the device search selects.
pub const MAX_K: usize = 2048;

/// The knn program (a stub kernel until the device search lands).
pub fn program() -> Arc<Program> {
    static P: OnceLock<Arc<Program>> = OnceLock::new();
    crate::ops::builtin_program(
        &P,
        "knn_topk.cu",
        "extern \"C\" __global__ void knn_placeholder() {}\n",
    )
}

/// An index in device memory.
pub struct DeviceIndex {
    _private: (),
}

impl DeviceIndex {
    pub fn load(_loader: &mut DeviceLoader, _index: &Index) -> Result<DeviceIndex, GpuError> {
        Err(GpuError::Unavailable(
            "the knn device search is not built yet".into(),
        ))
    }

    pub fn scratch_bytes(&self, _nq: usize, _k: usize) -> usize {
        0
    }

    /// Queues the search of `nq` queries at `queries`; see the module's contract.
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        _stream: &Arc<cudarc::driver::CudaStream>,
        _queries: u64,
        _nq: usize,
        _k: usize,
        _scratch: u64,
        _rows_out: u64,
        _scores_out: u64,
    ) -> Result<(), GpuError> {
        Err(GpuError::Unavailable(
            "the knn device search is not built yet".into(),
        ))
    }
}
