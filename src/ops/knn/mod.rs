//! `knn`: exact nearest-neighbour search over an index declared with
//! `gpu_model <name> knn <index.npy> [...]`.
//!
//! - `index.rs`: the index as loaded (rows, metric, precision, external ids);
//! - `cpu.rs`: the exact search on the CPU (fallback and the tests' reference);
//! - `gpu.rs` + `topk.cu`: the search on the device (one matrix product per tile of the
//!   index, a top-k selection within each tile, a merge of the tiles' candidates).

pub mod cpu;
pub mod gpu;
pub mod index;
