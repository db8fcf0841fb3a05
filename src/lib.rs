pub mod gpu;
pub mod gpu_thread;
pub mod job;
pub mod notify;
pub mod ops;
