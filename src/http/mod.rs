//! The nginx side of a request: the `gpu_process` content handler and a request's life
//! (`handler.rs`), handing the body over (`body.rs`), responses (`response.rs`) and the
//! `$gpu_*` variables (`variables.rs`).

pub(crate) mod body;
pub(crate) mod handler;
pub(crate) mod kserve;
pub(crate) mod response;
pub(crate) mod variables;
