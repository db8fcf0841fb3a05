//! Counters of one worker's GPU thread, written by the thread and read by the event loop
//! (logged when the worker exits): how big batches were, where their time went, what
//! failed, and the memory the device holds for batches.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::gpu::Memory;

#[derive(Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub pieces: AtomicU64,
    pub bytes: AtomicU64,
    /// Jobs answered (with a result or an error).
    pub answered: AtomicU64,
    /// Summed over jobs: from queueing to their first batch.
    pub queue_ns: AtomicU64,
    /// Summed over batches: packing into pinned memory and queueing the GPU work.
    pub pack_ns: AtomicU64,
    /// Summed over GPU batches: the part of `pack_ns` spent in `Device::launch` (the
    /// driver calls that queue the copies, kernels and done signal), apart from packing.
    pub launch_ns: AtomicU64,
    /// Summed over GPU batches: from launch to the thread seeing it done.
    pub gpu_ns: AtomicU64,
    /// Summed over batches: handing results back (GPU) or running them (CPU path).
    pub finish_ns: AtomicU64,
    /// Attempts to open the device.
    pub opens: AtomicU64,
    /// CUDA failures (transient or not).
    pub gpu_errors: AtomicU64,
    /// Requests answered by the fallback after a GPU failure.
    pub fallbacks: AtomicU64,
    /// Panics the supervisor caught.
    pub panics: AtomicU64,
    /// Bytes of idle buffers freed.
    pub trimmed: AtomicU64,
    /// Pinned host and device memory held for batches now.
    pub pinned: AtomicU64,
    pub device_mem: AtomicU64,
    /// The GPU thread's kernel thread id (0 until it runs): for `top -H`, perf, /proc.
    pub tid: AtomicI32,
}

pub fn add(c: &AtomicU64, d: Duration) {
    c.fetch_add(d.as_nanos() as u64, Relaxed);
}

impl Stats {
    pub fn set_memory(&self, m: Memory) {
        self.pinned.store(m.pinned as u64, Relaxed);
        self.device_mem.store(m.device as u64, Relaxed);
    }

    pub fn summary(&self) -> String {
        let b = self.batches.load(Relaxed).max(1) as f64;
        let us = |c: &AtomicU64, n: f64| c.load(Relaxed) as f64 / n / 1e3;
        let answered = self.answered.load(Relaxed);
        format!(
            "gpu: {} batches, {} pieces ({:.1} per batch), {} MiB, {} requests answered; \
             mean per batch: pack {:.1} us (of which launch calls {:.1} us), GPU {:.1} us, \
             finish {:.1} us; \
             mean queue time {:.1} us; {} GPU errors, {} fallbacks, {} panics; \
             holding {} MiB pinned and {} MiB device memory",
            self.batches.load(Relaxed),
            self.pieces.load(Relaxed),
            self.pieces.load(Relaxed) as f64 / b,
            self.bytes.load(Relaxed) >> 20,
            answered,
            us(&self.pack_ns, b),
            us(&self.launch_ns, b),
            us(&self.gpu_ns, b),
            us(&self.finish_ns, b),
            us(&self.queue_ns, answered.max(1) as f64),
            self.gpu_errors.load(Relaxed),
            self.fallbacks.load(Relaxed),
            self.panics.load(Relaxed),
            self.pinned.load(Relaxed) >> 20,
            self.device_mem.load(Relaxed) >> 20,
        )
    }
}
