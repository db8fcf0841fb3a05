//! The ops that serve an encoder: `gpu_process embeddings <model> [max_inputs=<n>]
//! [truncate=on|off]` (the OpenAI embeddings API, `openai.rs`) and its instance per model
//! under `gpu_process kserve;` (input `TEXT` BYTES [n], output `EMBEDDING` FP32 [n, dim]).
//!
//! Bodies are decoded and tokenized on the GPU thread (`Op::decode`); a request's rows are
//! its tokens, so `Op::max_rows` (`gpu_batch_tokens`) bounds a batch's tokens. A batch is
//! every text of its requests, embedded together and cut back per request.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::openai::{self, Format};
use super::{host_tokens, DeviceEncoder, EmbedModel, Encoded};
use crate::engine::job::{Body, JobError};
use crate::gpu::{GpuError, Loader, Program};
use crate::http::kserve::decode;
use crate::http::kserve::encode::{Answer, Elements, Tensor};
use crate::ops::model::{key_values, Model};
use crate::ops::{
    Configured, Declared, Decoded, Item, Layout, Op, OpOnDevice, Output, Params, Placed, Target,
    Value,
};

/// `gpu_batch_tokens`' default: the most tokens of one batch.
pub const DEFAULT_BATCH_TOKENS: usize = 16384;
/// `max_inputs=`' default (OpenAI's own limit) and its largest value.
pub const DEFAULT_MAX_INPUTS: usize = 2048;
pub const MAX_INPUTS: usize = 65536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    OpenAi,
    KServe,
}

/// An embed op: one per `gpu_process embeddings` location, or per embed model under KServe.
pub struct Embed {
    name: String,
    protocol: Protocol,
    /// Texts in one request.
    max_inputs: usize,
    /// Whether texts over the model's `max_tokens` are cut (else refused with 400).
    truncate: bool,
    /// The model, bound by `resolve` (declared anywhere in the http block).
    model: OnceLock<Arc<dyn Model>>,
    /// `gpu_batch_bytes`: the largest body (set by `resolve`).
    max_body: AtomicU64,
    /// `gpu_batch_tokens` of the location (set when the configuration is merged).
    batch_tokens: AtomicUsize,
}

/// `gpu_process embeddings <model> [max_inputs=<n>] [truncate=on|off]`.
pub fn parse(args: &[&str]) -> Result<Configured, String> {
    let Some((name, rest)) = args.split_first() else {
        return Err("op \"embeddings\" needs a model name (gpu_process embeddings <model>)".into());
    };
    let mut op = Embed::new(name, Protocol::OpenAi);
    for (k, v) in key_values(rest, &["max_inputs", "truncate"])? {
        match k {
            "max_inputs" => {
                op.max_inputs = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_INPUTS).contains(n))
                    .ok_or_else(|| {
                        format!("max_inputs=\"{v}\" is not a number from 1 to {MAX_INPUTS}")
                    })?
            }
            _ => {
                op.truncate = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("truncate=\"{v}\" must be \"on\" or \"off\"")),
                }
            }
        }
    }
    Configured::plain(op)
}

/// The op serving `model` over KServe (`EmbedModel::serve`).
pub fn serving(model: Arc<dyn Model>) -> Embed {
    let op = Embed::new(model.name(), Protocol::KServe);
    let _ = op.model.set(model);
    op
}

/// A decoded request: its texts' tokens and how to answer.
pub struct Request {
    pub texts: Vec<Encoded>,
    /// Tokens in all (special tokens included, after truncation): the `usage`.
    pub tokens: usize,
    reply: Reply,
}

enum Reply {
    OpenAi(Format),
    KServe(Answer),
}

fn request(decoded: Option<&Decoded>) -> &Request {
    decoded
        .and_then(|d| d.state.downcast_ref::<Request>())
        .expect("embed requests are decoded")
}

/// A batch row per token, and at least one per text (a text of no tokens still takes an
/// output row).
fn rows(r: &Request) -> usize {
    r.texts.iter().map(|e| e.ids.len().max(1)).sum()
}

impl Embed {
    fn new(name: &str, protocol: Protocol) -> Embed {
        Embed {
            name: name.to_string(),
            protocol,
            max_inputs: DEFAULT_MAX_INPUTS,
            truncate: true,
            model: OnceLock::new(),
            max_body: AtomicU64::new(u64::MAX),
            batch_tokens: AtomicUsize::new(DEFAULT_BATCH_TOKENS),
        }
    }

    fn model(&self) -> &EmbedModel {
        self.model
            .get()
            .and_then(|m| m.as_any().downcast_ref::<EmbedModel>())
            .expect("resolved to an embed model")
    }

    /// Tokenizes `texts`; a text over `max_tokens` is cut, or refused without `truncate`.
    fn tokenize(&self, texts: &[Vec<u8>], what: &str) -> Result<Vec<Encoded>, JobError> {
        let m = self.model();
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let text = std::str::from_utf8(t)
                    .map_err(|_| JobError::BadInput(format!("{what}[{i}] is not valid UTF-8")))?;
                let e = m.tokenize(text).map_err(JobError::Internal)?;
                if e.truncated && !self.truncate {
                    return Err(JobError::BadInput(format!(
                        "{what}[{i}] has more than the model's {} tokens (max_tokens), and \
                         this location does not truncate",
                        m.max_tokens
                    )));
                }
                Ok(e)
            })
            .collect()
    }

    fn decode_bytes(&self, body: &[u8], params: &Params) -> Result<Request, JobError> {
        let (texts, reply) = match self.protocol {
            Protocol::OpenAi => {
                let limits = openai::Limits {
                    model: &self.name,
                    dim: self.model().dim(),
                    max_inputs: self.max_inputs,
                };
                let r = openai::parse(body, &limits).map_err(|e| match e.status {
                    404 => JobError::NotFound(e.message),
                    413 => JobError::TooLarge(e.message),
                    _ => JobError::BadInput(e.message),
                })?;
                let texts: Vec<Vec<u8>> = r.texts.into_iter().map(String::into_bytes).collect();
                (self.tokenize(&texts, "\"input\"")?, Reply::OpenAi(r.format))
            }
            Protocol::KServe => {
                let header_len = match params.0.first() {
                    Some(Value::I64(n)) if *n >= 0 => Some(*n as u64),
                    _ => None,
                };
                let (texts, answer) = self
                    .kserve_texts(body, header_len)
                    .map_err(JobError::BadInput)?;
                (
                    self.tokenize(&texts, "input \"TEXT\"")?,
                    Reply::KServe(answer),
                )
            }
        };
        let tokens = texts.iter().map(|e| e.ids.len()).sum();
        Ok(Request {
            texts,
            tokens,
            reply,
        })
    }

    fn kserve_texts(
        &self,
        body: &[u8],
        header_len: Option<u64>,
    ) -> Result<(Vec<Vec<u8>>, Answer), String> {
        let req = decode::decode(body, header_len)?;
        let mut text = None;
        for input in &req.inputs {
            if input.name != "TEXT" {
                return Err(format!("unknown input \"{}\" (inputs: TEXT)", input.name));
            }
            text = Some(input);
        }
        let text = text.ok_or("the request has no input \"TEXT\"")?;
        if text.shape.len() != 1 || text.shape[0] == 0 {
            return Err(format!(
                "input \"TEXT\" has shape {:?}: expected [n] with n >= 1",
                text.shape
            ));
        }
        if text.shape[0] > self.max_inputs as u64 {
            return Err(format!(
                "input \"TEXT\" has {} elements: at most {} per request",
                text.shape[0], self.max_inputs
            ));
        }
        let texts = text.to_bytes()?;
        let answer = Answer::of(Arc::from(self.name.as_str()), &req, &["EMBEDDING"])?;
        Ok((texts, answer))
    }

    /// The answer from a request's embeddings (`n * dim` little-endian float32).
    fn encode(&self, req: &Request, result: &[u8]) -> Output {
        let dim = self.model().dim();
        let flat: Vec<f32> = result
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        match &req.reply {
            Reply::OpenAi(format) => {
                let rows: Vec<&[f32]> = flat.chunks(dim.max(1)).collect();
                Output::new(
                    Arc::from("application/json"),
                    openai::answer(&self.name, *format, &rows, req.tokens),
                )
            }
            Reply::KServe(answer) => answer.encode(&[Tensor {
                name: "EMBEDDING",
                shape: vec![req.texts.len() as u64, dim as u64],
                data: Elements::F32(flat),
            }]),
        }
    }
}

fn to_bytes(v: &[Vec<f32>]) -> Vec<u8> {
    v.iter().flatten().flat_map(|x| x.to_le_bytes()).collect()
}

impl Op for Embed {
    fn name(&self) -> &str {
        &self.name
    }

    /// The CPU forward pass takes tens of milliseconds a sentence: wait for the device.
    fn cpu_while_opening(&self) -> bool {
        false
    }

    fn resolve(&self, declared: &Declared) -> Result<(), String> {
        self.max_body.store(declared.max_body, Ordering::Relaxed);
        if self.model.get().is_some() {
            return Ok(());
        }
        let Some(m) = declared.models.iter().find(|m| m.name() == self.name) else {
            return Err(format!(
                "no model \"{}\" is declared (gpu_model {} embed <dir>;)",
                self.name, self.name
            ));
        };
        if m.as_any().downcast_ref::<EmbedModel>().is_none() {
            return Err(format!(
                "model \"{}\" is a {} model: op \"embeddings\" needs an embed model",
                self.name,
                m.kind()
            ));
        }
        let _ = self.model.set(m.clone());
        Ok(())
    }

    fn programs(&self) -> Vec<Arc<Program>> {
        vec![super::program()]
    }

    /// Tokens (ids, types, positions: 12 bytes each, padded to `ROW_ROUND` rows) and a
    /// start and length per text in the staged input; `dim` float32 per text out. A batch holds at most
    /// `max(gpu_batch_tokens, max_inputs * max_tokens)` tokens (one request over
    /// `gpu_batch_tokens` goes alone) and at most `max(gpu_batch_tokens, max_inputs)`
    /// texts (a text takes at least one row).
    fn worst_case(&self, _n: usize, _bytes: usize) -> (usize, usize) {
        let m = self.model();
        let bt = self.batch_tokens.load(Ordering::Relaxed);
        let tokens = bt.max(self.max_inputs * m.max_tokens);
        let texts = bt.max(self.max_inputs);
        (
            12 * super::gpu::padded_rows(tokens) + 8 * texts + 5 * 256,
            texts * m.dim() * 4,
        )
    }

    fn admit(&self, body_len: u64, _values: &[Vec<u8>]) -> Result<Params, JobError> {
        let max = self.max_body.load(Ordering::Relaxed);
        if body_len > max {
            return Err(JobError::TooLarge(format!(
                "the request body is {body_len} bytes, more than gpu_batch_bytes ({max})"
            )));
        }
        Ok(Params::default())
    }

    fn decode(&self, body: &Body, params: &Params) -> Result<Option<Decoded>, JobError> {
        let bytes = body
            .to_vec()
            .map_err(|e| JobError::Internal(format!("reading the request body: {e}")))?;
        let req = self.decode_bytes(&bytes, params)?;
        Ok(Some(Decoded {
            rows: rows(&req),
            state: Box::new(req),
        }))
    }

    fn max_rows(&self) -> usize {
        self.batch_tokens.load(Ordering::Relaxed)
    }

    fn set_batch_tokens(&self, n: usize) {
        self.batch_tokens.store(n, Ordering::Relaxed);
    }

    fn post_only(&self) -> bool {
        self.protocol == Protocol::OpenAi
    }

    fn error_body(&self, status: u16, message: &str) -> Option<Vec<u8>> {
        (self.protocol == Protocol::OpenAi).then(|| openai::error(status, message))
    }

    fn run_cpu(
        &self,
        body: Vec<u8>,
        params: &Params,
        decoded: Option<&Decoded>,
    ) -> Result<Output, JobError> {
        let fresh;
        let req = match decoded {
            Some(d) => request(Some(d)),
            None => {
                fresh = self.decode_bytes(&body, params)?;
                &fresh
            }
        };
        let out = self
            .model()
            .cpu_embed(&req.texts.iter().collect::<Vec<_>>());
        Ok(self.encode(req, &to_bytes(&out)))
    }

    fn finish(&self, result: &[u8], decoded: Option<&Decoded>) -> Output {
        self.encode(request(decoded), result)
    }

    fn load(&self, loader: &mut Loader) -> Result<Option<Box<dyn OpOnDevice>>, GpuError> {
        let model = self.model.get().expect("resolved").clone();
        let device = match loader {
            Loader::Host => None,
            // Unavailable (no cuBLAS): the thread says so, and the CPU path serves.
            Loader::Device(d) => Some(DeviceEncoder::load(d, self.model())?),
        };
        Ok(Some(Box::new(OnDevice { model, device })))
    }
}

/// The op on a worker's device (or on the test device: `device` is `None`, and the batch
/// runs through the CPU path, packed and cut as on the device).
pub struct OnDevice {
    model: Arc<dyn Model>,
    device: Option<DeviceEncoder>,
}

/// Every text of the batch, in order.
fn texts<'a>(items: &'a [Item]) -> Vec<&'a Encoded> {
    items
        .iter()
        .flat_map(|it| request(it.decoded).texts.iter())
        .collect()
}

/// A batch's layout, item by item: `len` its tokens (each text cut at `max_tokens`),
/// `data_off` its longest text's tokens (the device plan is made again at launch from the
/// sum of the one and the largest of the other), `out_off`/`out_cap` its embeddings'
/// bytes in the output. The staged data is the device plan's input (`DeviceEncoder::plan`),
/// or on the test device each text's token count, ids and types (u32s).
impl OnDevice {
    fn model(&self) -> &EmbedModel {
        self.model
            .as_any()
            .downcast_ref::<EmbedModel>()
            .expect("an embed model")
    }

    /// (texts, tokens, longest) of a batch from its layout.
    fn shape(&self, layout: &Layout) -> (usize, usize, usize) {
        let dim4 = self.model().dim() * 4;
        (
            layout.out_len / dim4.max(1),
            layout.items.iter().map(|p| p.len as usize).sum(),
            layout
                .items
                .iter()
                .map(|p| p.data_off as usize)
                .max()
                .unwrap_or(0),
        )
    }
}

impl OpOnDevice for OnDevice {
    fn layout(&self, items: &[Item]) -> Layout {
        let m = self.model();
        let dim4 = m.dim() * 4;
        let cut = |e: &Encoded| e.ids.len().min(m.max_tokens);
        let mut l = Layout::default();
        let mut n = 0usize;
        for it in items {
            let req = request(it.decoded);
            l.items.push(Placed {
                data_off: req.texts.iter().map(cut).max().unwrap_or(0) as u64,
                len: req.texts.iter().map(cut).sum::<usize>() as u64,
                out_off: (n * dim4) as u64,
                out_cap: (req.texts.len() * dim4) as u64,
            });
            n += req.texts.len();
        }
        l.out_len = n * dim4;
        match &self.device {
            Some(enc) => {
                let (n, tokens, longest) = self.shape(&l);
                let plan = enc.plan_of(n, tokens, longest);
                l.data_len = plan.input_bytes;
                l.scratch = vec![plan.scratch_bytes.max(4)];
            }
            None => {
                l.data_len = host_tokens::bytes(&texts(items), m.max_tokens);
            }
        }
        l
    }

    fn pack(
        &self,
        items: &[Item],
        layout: &Layout,
        _desc: &mut [u8],
        data: &mut [u8],
    ) -> Vec<(usize, JobError)> {
        let all = texts(items);
        match &self.device {
            Some(enc) => {
                let plan = enc.plan(&all);
                enc.pack(&plan, &all, &mut data[..plan.input_bytes]);
            }
            None => {
                let max = self.model().max_tokens;
                debug_assert_eq!(host_tokens::bytes(&all, max), layout.data_len);
                host_tokens::pack(&all, max, data);
            }
        }
        Vec::new()
    }

    fn launch(&self, layout: &Layout, target: Target) -> Result<(), GpuError> {
        let (n, tokens, longest) = self.shape(layout);
        match target {
            Target::Device(l) => {
                let enc = self.device.as_ref().expect("loaded on a device");
                let plan = enc.plan_of(n, tokens, longest);
                let scratch = l.scratch.first().copied().unwrap_or(0);
                enc.embed(l.stream, &plan, l.data, scratch, l.out)
            }
            Target::Host { data, out, .. } => {
                let batch = host_tokens::unpack(data, n);
                let v = self.model().cpu_embed(&batch.iter().collect::<Vec<_>>());
                let bytes = to_bytes(&v);
                out[..bytes.len()].copy_from_slice(&bytes);
                Ok(())
            }
        }
    }

    fn result<'o>(
        &self,
        layout: &Layout,
        i: usize,
        out: &'o [u8],
    ) -> Result<Cow<'o, [u8]>, JobError> {
        let p = &layout.items[i];
        let mine = &out[p.out_off as usize..(p.out_off + p.out_cap) as usize];
        let finite = mine
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
        if !finite {
            return Err(JobError::Internal(
                "the device encoder returned a NaN or infinite value".into(),
            ));
        }
        Ok(Cow::Borrowed(mine))
    }
}
