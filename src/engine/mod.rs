//! The per-worker engine: the event-loop side (`worker.rs`: the GPU thread's eventfd,
//! waiting requests), what travels between the two (`job.rs`), and the GPU thread itself
//! (`thread.rs`: batching from `batch.rs`, the device or the CPU path, supervision), and
//! which device each worker takes (`devices.rs`).

pub mod batch;
pub mod devices;
pub mod job;
pub mod notify;
pub mod stats;
pub mod thread;
pub(crate) mod worker;
