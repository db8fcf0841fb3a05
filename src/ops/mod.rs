//! Ops: the kinds of payload work `gpu_process` runs.
//!
//! An op is one folder here that owns everything about itself: its `gpu_process` arguments,
//! its kernels (CUDA C beside it), its per-worker device state, how a batch of its requests
//! is laid out, packed, launched and cut back into answers, its CPU path (or why it has
//! none) and its encoder. It implements two traits:
//! - `Op`: one instance per `gpu_process` location, made at configuration time and shared,
//!   read-only, by every worker's event loop and GPU thread;
//! - `OpOnDevice`: the op on one worker's device (kernels loaded, device memory held),
//!   made when the device opens.
//!
//! The engine (`engine/`) and the device (`gpu/`) know no op by name. Adding an op: a
//! folder with a `parse` function, and one line in `REGISTRY`.

pub mod blake3;
pub mod bytes;
pub mod echo;
pub mod embed;
pub mod kernel;
pub mod knn;
pub mod model;
pub mod search;

use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

use crate::engine::batch::Piece;
use crate::engine::job::{Body, JobError};
use crate::gpu::{GpuError, Launch, Loader, Program};

/// The ops `gpu_process` knows; its first argument names one.
pub const REGISTRY: &[(&str, Parse)] = &[
    ("echo", echo::parse),
    ("blake3", blake3::parse),
    ("kernel", kernel::parse),
    ("embeddings", embed::op::parse),
    ("search", search::parse),
];

/// The header the built-in ops' kernels share, served to NVRTC by name.
pub const COMMON_HEADER: (&str, &str) = ("ngx_gpu_common.cuh", include_str!("common.cuh"));

/// A built-in op's program: its `.cu` file with the common header, made once per process.
pub fn builtin_program(
    cell: &'static std::sync::OnceLock<Arc<Program>>,
    name: &str,
    source: &str,
) -> Arc<Program> {
    cell.get_or_init(|| Arc::new(Program::new(name, source, Vec::new(), vec![COMMON_HEADER])))
        .clone()
}

/// Makes an op from the arguments of `gpu_process` after its name.
pub type Parse = fn(&[&str]) -> Result<Configured, String>;

/// A `gpu_process` location's op, and the values it evaluates per request (nginx
/// variables allowed: `$arg_width`); `Op::admit` receives them evaluated.
pub struct Configured {
    pub op: Arc<dyn Op>,
    pub values: Vec<String>,
}

impl Configured {
    pub fn plain(op: impl Op) -> Result<Configured, String> {
        Ok(Configured {
            op: Arc::new(op),
            values: Vec::new(),
        })
    }
}

/// Parses `gpu_process <op> [args]`.
pub fn parse(args: &[&str]) -> Result<Configured, String> {
    let Some((name, rest)) = args.split_first() else {
        return Err("needs an op".into());
    };
    match REGISTRY.iter().find(|(n, _)| n == name) {
        Some((_, parse)) => parse(rest),
        None => {
            // `kserve` is a protocol, not one op: the location's directive handler takes it
            // before the registry (conf/mod.rs), but users name it the same way.
            let mut known: Vec<&str> = REGISTRY.iter().map(|(n, _)| *n).collect();
            known.push("kserve");
            Err(format!(
                "unknown op \"{name}\" (known ops: {})",
                known.join(", ")
            ))
        }
    }
}

/// What the http block declares by name, for ops that refer to it (`gpu_kernel`,
/// `gpu_model`), and the limits ops check requests against.
#[derive(Default)]
pub struct Declared {
    pub kernels: Vec<Arc<kernel::Decl>>,
    /// `gpu_model`, in the order declared.
    pub models: Vec<Arc<dyn model::Model>>,
    /// `gpu_batch_bytes`: ops whose bodies cannot be cut refuse larger ones.
    pub max_body: u64,
}

/// A request's parameters, from its evaluated `gpu_process` values (see `Op::admit`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(pub Vec<Value>);

/// One typed parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    I64(i64),
    U64(u64),
    F64(f64),
}

/// The answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    pub content_type: Arc<str>,
    pub body: Vec<u8>,
    /// Headers the protocol adds to a 200 answer (`Inference-Header-Content-Length`).
    pub headers: Vec<(&'static str, String)>,
}

impl Output {
    pub fn new(content_type: Arc<str>, body: Vec<u8>) -> Output {
        Output {
            content_type,
            body,
            headers: Vec::new(),
        }
    }
}

/// A request decoded on the GPU thread before it is batched (`Op::decode`): what its batch
/// needs to know of it, and the op's own typed input and answer settings.
pub struct Decoded {
    /// Rows the request adds to a batch (counted against `Op::max_rows`): query rows for
    /// knn, tokens for the embed ops (so `gpu_batch_tokens`, their `max_rows`, bounds a
    /// batch's tokens with this one mechanism).
    pub rows: usize,
    /// The op's own state (the typed input, what the encoder needs: requested outputs,
    /// binary or JSON, k); the op downcasts it.
    pub state: Box<dyn Any + Send>,
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoded").field("rows", &self.rows).finish()
    }
}

/// A configured op (one per `gpu_process` location).
pub trait Op: Send + Sync + 'static {
    /// `echo`, `kernel blur`: in log lines and error messages.
    fn name(&self) -> &str;

    /// Binds names to what the http block declares, once the whole configuration is read
    /// (a kernel may be declared after the locations that use it), and checks what needed
    /// them (argument counts, literal values).
    fn resolve(&self, _declared: &Declared) -> Result<(), String> {
        Ok(())
    }

    /// The CUDA C programs the op's kernels come from, compiled once per configuration load
    /// (programs with the same source and options are compiled once).
    fn programs(&self) -> Vec<Arc<Program>>;

    /// After compiling: checks what only the compiled code can tell (an entry point's
    /// name and signature). `ptx` finds a program's PTX.
    fn check_compiled(&self, _ptx: &dyn Fn(&Program) -> Option<Arc<str>>) -> Result<(), String> {
        Ok(())
    }

    /// Whether a body may be cut into pieces that go in separate batches (see
    /// `engine/batch.rs`); such an op implements `cpu_piece` and `assembly`.
    fn splittable(&self) -> bool {
        false
    }

    /// The most staging a batch of `n` requests with `bytes` body bytes can take:
    /// (descriptor bytes, output bytes). For `gpu_pinned_limit`.
    fn worst_case(&self, n: usize, bytes: usize) -> (usize, usize);

    /// Checks a request at the event loop before it is queued (cheap: no body bytes, only
    /// its length) and turns its evaluated values into parameters. An error is the
    /// request's answer (400, 413).
    fn admit(&self, _body_len: u64, _values: &[Vec<u8>]) -> Result<Params, JobError> {
        Ok(Params::default())
    }

    /// Whether the op can serve now, beyond the device: false while something it needs
    /// is still being made ready (a model or an index loading). Readiness
    /// (`gpu_health ready`) waits for it; the GPU thread looks again each second while
    /// any op says false. Called on the GPU thread.
    fn ready(&self) -> bool {
        true
    }

    /// Decodes a request's body on the GPU thread, before it is batched (never at the event
    /// loop). `None`: the op batches raw bodies (by bytes). An error is the request's
    /// answer; the request never reaches a batch.
    fn decode(&self, _body: &Body, _params: &Params) -> Result<Option<Decoded>, JobError> {
        Ok(None)
    }

    /// For ops that decode: the most rows (`Decoded::rows`) in one batch. A request of
    /// more rows goes in a batch of its own.
    fn max_rows(&self) -> usize {
        usize::MAX
    }

    /// `gpu_batch_tokens` of the op's location, given once the configuration is merged;
    /// ops that count tokens as rows take it as their `max_rows`.
    fn set_batch_tokens(&self, _n: usize) {}

    /// Whether the op takes POST only (else POST and PUT).
    fn post_only(&self) -> bool {
        false
    }

    /// The body of an error answer in the op's protocol (the OpenAI API's error object);
    /// `None`: the module's `{"error": message}`.
    fn error_body(&self, _status: u16, _message: &str) -> Option<Vec<u8>> {
        None
    }

    /// Whether the op has a CPU path (`run_cpu`). Without one, its requests get 503 where
    /// there is no GPU, and 500 when the GPU fails under their batch.
    fn has_cpu(&self) -> bool {
        true
    }

    /// Whether its requests take the CPU path while the worker's device is still opening
    /// (`true`, the default: a byte op's CPU path keeps up). `false` for ops whose CPU path
    /// is orders of magnitude slower than the device (an encoder's forward pass, a search
    /// over a large index): their requests wait for the device (1-2 s at a worker's start,
    /// within their `gpu_timeout`), and take the CPU path only if it does not open.
    fn cpu_while_opening(&self) -> bool {
        true
    }

    /// The CPU path over one whole request (the fallback, and the tests' reference);
    /// `JobError::Unavailable` (503) where the op has none. Ops that decode get their
    /// decoded request (and an empty body: they read what they need while decoding).
    fn run_cpu(
        &self,
        body: Vec<u8>,
        params: &Params,
        decoded: Option<&Decoded>,
    ) -> Result<Output, JobError>;

    /// The answer from a whole request's result bytes (and its decoded state, for ops that
    /// decode).
    fn finish(&self, result: &[u8], decoded: Option<&Decoded>) -> Output;

    /// For splittable ops: one piece on the CPU, giving what the device leaves for it.
    fn cpu_piece(&self, _data: &[u8], _piece: &Piece, _out: &mut Vec<u8>) {
        unreachable!("{} is not splittable", self.name())
    }

    /// For splittable ops: puts a body's answer together from its pieces' results.
    fn assembly(&self, _body_len: u64, _pieces: u32, _piece_len: u64) -> Box<dyn Assembly> {
        unreachable!("{} is not splittable", self.name())
    }

    /// The op on a worker's device: its kernels loaded, its device memory allocated. On the
    /// test device (`Loader::Host`) an op runs a CPU version of its batched output, or
    /// declines.
    /// `None`: the op does not run on this device (its requests take the CPU path, or get
    /// 503 where it has none).
    fn load(&self, loader: &mut Loader) -> Result<Option<Box<dyn OpOnDevice>>, GpuError>;
}

/// `gpu_process <op>` for ops that take no arguments.
pub fn no_args(op: &str, args: &[&str]) -> Result<(), String> {
    match args.first() {
        Some(extra) => Err(format!("op \"{op}\" takes no arguments, got \"{extra}\"")),
        None => Ok(()),
    }
}

/// Puts a body cut into pieces back together as the pieces' results arrive (any order).
pub trait Assembly: Send {
    /// Takes piece `index`'s result; true when every piece has arrived.
    fn add(&mut self, index: u32, result: &[u8]) -> bool;
    fn finish(self: Box<Self>) -> Output;
}

/// One piece of one request in a batch, as the op sees it.
pub struct Item<'a> {
    pub piece: &'a Piece,
    pub body: &'a Body,
    pub params: &'a Params,
    /// What `Op::decode` made of the request, for ops that decode.
    pub decoded: Option<&'a Decoded>,
}

/// Where a batch's items go: in the staged input (after the descriptors), in the output,
/// and the device scratch the batch needs. Made by `OpOnDevice::layout`.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub desc_len: usize,
    pub data_len: usize,
    pub out_len: usize,
    /// Bytes of each device scratch buffer the launch uses (`Launch::scratch`).
    pub scratch: Vec<usize>,
    pub items: Vec<Placed>,
}

/// One item's place in a batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Placed {
    /// Where its bytes start in the staged data.
    pub data_off: u64,
    pub len: u64,
    /// Where its output starts, and how much of it there may be.
    pub out_off: u64,
    pub out_cap: u64,
}

/// Where a batch runs: on the device (addresses of the slot's buffers, the stream), or on
/// the test device, which hands the op host memory to compute the same output in.
pub enum Target<'a> {
    Device(&'a Launch<'a>),
    Host {
        desc: &'a [u8],
        data: &'a [u8],
        out: &'a mut [u8],
    },
}

/// An op on one worker's device.
pub trait OpOnDevice: Send {
    /// Where the items go, and what the batch needs.
    fn layout(&self, items: &[Item]) -> Layout;

    /// Writes the descriptors and the items' data into the slot's staging input. Items
    /// that cannot be packed (a temp file that cannot be read) are returned with their
    /// error; the rest of the batch goes on.
    fn pack(
        &self,
        items: &[Item],
        layout: &Layout,
        desc: &mut [u8],
        data: &mut [u8],
    ) -> Vec<(usize, JobError)>;

    /// Queues the batch's kernels (device), or computes its output (test device). What
    /// the kernels need of the items, `pack` put in the descriptors.
    fn launch(&self, layout: &Layout, target: Target) -> Result<(), GpuError>;

    /// Item `i`'s result bytes in the batch's output (borrowed where they lie together,
    /// owned where the op gathers them from several places), or why it has none (a kernel
    /// that rejected its input, or wrote past its capacity).
    fn result<'o>(
        &self,
        layout: &Layout,
        i: usize,
        out: &'o [u8],
    ) -> Result<Cow<'o, [u8]>, JobError>;

    /// The most batches of this op the device may have in flight at once (at most the
    /// device's slots). An op whose every batch streams the same large data (a knn index)
    /// may ask for fewer, so that requests join one larger batch instead of a second
    /// small one.
    fn max_in_flight(&self) -> usize {
        usize::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_process_selects_an_op_from_the_registry() {
        for name in ["echo", "blake3"] {
            let c = parse(&[name]).unwrap();
            assert_eq!(c.op.name(), name);
            assert!(c.values.is_empty());
        }
        let c = parse(&["kernel", "blur", "$arg_width", "3"]).unwrap();
        assert_eq!(c.op.name(), "kernel blur");
        assert_eq!(c.values, ["$arg_width", "3"]);
    }

    #[test]
    fn unknown_ops_and_extra_arguments_are_refused() {
        let e = parse(&["sha1"]).err().unwrap();
        assert_eq!(
            e,
            "unknown op \"sha1\" (known ops: echo, blake3, kernel, embeddings, search, kserve)"
        );
        let e = parse(&["echo", "x"]).err().unwrap();
        assert_eq!(e, "op \"echo\" takes no arguments, got \"x\"");
        assert!(parse(&[]).is_err());
        assert!(parse(&["kernel"]).is_err());
    }

    #[test]
    fn only_splittable_ops_cut_bodies_and_only_kernels_have_no_cpu_path() {
        let echo = parse(&["echo"]).unwrap().op;
        let kernel = parse(&["kernel", "k"]).unwrap().op;
        assert!(echo.splittable() && echo.has_cpu());
        assert!(!kernel.splittable() && !kernel.has_cpu());
        assert!(matches!(
            kernel.run_cpu(Vec::new(), &Params::default(), None),
            Err(JobError::Unavailable(_))
        ));
    }
}
