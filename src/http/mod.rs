//! The nginx side of a request: the `gpu_process` content handler and a request's life
//! (`handler.rs`), handing the body over (`body.rs`), responses (`response.rs`) and the
//! `$gpu_*` variables (`variables.rs`); the metrics, health and status endpoints
//! (`endpoints.rs`, with the status page `status.html`).

pub(crate) mod body;
pub(crate) mod endpoints;
pub(crate) mod handler;
pub(crate) mod kserve;
pub(crate) mod response;
pub(crate) mod variables;
