//! The encoder on the device: weights uploaded once per GPU in the configured precision
//! and shared by the workers there (`gpu::shared`, else once per worker), matrix products on cuBLAS (fp16/bf16 inputs with float32 accumulation on
//! tensor cores, or float32), the rest in `embed.cu`.
//!
//! A batch is packed without padding (its texts' tokens back to back), so the products run
//! over exactly the batch's tokens and nothing is sorted or bucketed; attention takes each
//! text's own keys. Per layer: 4 products and 4 kernels; 2 more launches per batch
//! (embeddings, pooling): 8 x layers + 2 in all (50 for all-MiniLM-L6-v2).
//!
//! The caller owns the memory of a batch: `Plan` says how much, `pack` fills the input on
//! the host, `embed` queues everything on a stream and never waits.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::files::{Activation, Pooling};
use super::weights::{Linear, Norm};
use super::{EmbedModel, Encoded, Precision};
use crate::gpu::shared::SharedRegion;
use crate::gpu::{launch_config, no_panic, DeviceLoader, GpuError, Program};

/// The program of the op's kernels (`embed.cu`), made once per process.
pub fn program() -> Arc<Program> {
    static P: OnceLock<Arc<Program>> = OnceLock::new();
    crate::ops::builtin_program(&P, "embed.cu", include_str!("embed.cu"))
}

/// Regions of the packed input and the scratch start at multiples of this.
const ALIGN: usize = 256;

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A batch's token rows are padded to a multiple of this: the products then see a few
/// hundred shapes instead of one per token count (cuBLAS looks its kernel up per shape),
/// and tensor-core tiles stay whole. The padding rows hold token 0 at position 0 and are
/// read by no text.
pub const ROW_ROUND: usize = 32;

/// `tokens` rounded up to `ROW_ROUND`.
pub fn padded_rows(tokens: usize) -> usize {
    tokens.div_ceil(ROW_ROUND) * ROW_ROUND
}

/// Where one batch's data goes. Input (u32s): token ids, token types, positions (each `T`),
/// then each text's first token and token count (each `n`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Texts, and tokens in all.
    pub n: usize,
    pub tokens: usize,
    /// Token rows the device computes: `tokens` padded (`padded_rows`).
    pub rows: usize,
    /// The longest text's tokens.
    pub longest: usize,
    /// Bytes of the packed input, of the device scratch, of the output (`n * dim` f32).
    pub input_bytes: usize,
    pub scratch_bytes: usize,
    pub out_bytes: usize,
    ids: usize,
    types: usize,
    pos: usize,
    start: usize,
    len: usize,
    /// Offsets in the scratch: residual stream x (f32), its copy in the products' input
    /// precision xh, the wide f32 product out (qkv or ffn), its narrow copy (ctx or ffn),
    /// the f32 product out of width h (y).
    x: usize,
    xh: usize,
    wide: usize,
    wide_h: usize,
    y: usize,
}

/// Weights on the device: matrices and embedding tables in the products' precision,
/// biases and norms in float32.
struct DevLinear {
    w: u64,
    b: u64,
    out: usize,
    inp: usize,
}

struct DevNorm {
    g: u64,
    b: u64,
}

struct DevLayer {
    qkv: DevLinear,
    attn_out: DevLinear,
    attn_norm: DevNorm,
    ffn_in: DevLinear,
    ffn_out: DevLinear,
    ffn_norm: DevNorm,
}

struct Kernels {
    embed_ln: CudaFunction,
    add_ln: CudaFunction,
    bias_act: CudaFunction,
    attention: CudaFunction,
    pool: CudaFunction,
}

/// A cuBLAS handle, destroyed with its encoder.
struct Blas(blas_sys::cublasHandle_t);

// SAFETY: a handle is used only under the encoder's lock (`embed` holds it while it queues
// products), so by one thread at a time.
unsafe impl Send for Blas {}

impl Blas {
    /// A handle on the current context.
    fn new() -> Result<Blas, GpuError> {
        no_panic("cublasCreate", || {
            blas::create_handle().map_err(|e| format!("cublasCreate: {e}"))
        })
        .map(Blas)
        .map_err(GpuError::Unavailable)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by create_handle and destroyed once, here. A failure (a context
        // already gone) leaves nothing to do.
        let _ = no_panic("cublasDestroy", || {
            Ok(unsafe { blas::destroy_handle(self.0) })
        });
    }
}

pub struct DeviceEncoder {
    precision: Precision,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    eps: f32,
    act: i32,
    vocab: u32,
    ntypes: u32,
    npos: u32,
    position_offset: usize,
    /// Texts are cut here, as the CPU path does (only a hand-made `Encoded` is longer).
    max_tokens: usize,
    cls: bool,
    normalize: bool,
    word: u64,
    position: u64,
    token_type: u64,
    emb_norm: DevNorm,
    layers: Vec<DevLayer>,
    kernels: Kernels,
    /// One cuBLAS handle per stream it ran on (a handle's workspace must not be shared by
    /// two streams' products in flight at once), made on first use.
    blas: Mutex<Vec<(usize, Blas)>>,
    /// Bytes of device memory the weights take (aligned places included).
    weight_bytes: usize,
    // Dropped after the handles (fields drop in order): the weights they may still read,
    // this worker's own or shared by the workers on the device (`gpu::shared`).
    _memory: Vec<CudaSlice<u8>>,
    _shared: Option<SharedRegion>,
}

// The op's per-worker state must be able to move to the GPU thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<DeviceEncoder>();
};

fn blas_error(e: blas::CublasError, what: &str) -> GpuError {
    use blas_sys::cublasStatus_t::*;
    let msg = format!("{what}: {:?}", e.0);
    match e.0 {
        CUBLAS_STATUS_ALLOC_FAILED => GpuError::OutOfMemory(msg),
        CUBLAS_STATUS_INVALID_VALUE | CUBLAS_STATUS_NOT_SUPPORTED | CUBLAS_STATUS_ARCH_MISMATCH => {
            GpuError::BadLaunch(msg)
        }
        _ => GpuError::Lost(msg),
    }
}

/// Host bytes of `v` in the device's storage precision.
fn narrow(v: &[f32], p: Precision) -> Vec<u8> {
    match p {
        Precision::Fp32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Precision::Fp16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Precision::Bf16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn suffix(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "f32",
        Precision::Fp16 => "f16",
        Precision::Bf16 => "bf16",
    }
}

/// The attention kernel's head width: the head's dimensions rounded up.
fn head_width(dh: usize) -> usize {
    if dh <= 32 {
        32
    } else {
        64
    }
}

/// Largest head the attention kernel takes (its registers and shared tiles).
pub const MAX_HEAD: usize = 64;

/// Where `Uploader` puts the weights.
enum Target<'a> {
    /// One allocation per tensor, this worker's own.
    Own {
        stream: Arc<CudaStream>,
        memory: &'a mut Vec<CudaSlice<u8>>,
    },
    /// A dry pass: lays the tensors out in one region and hashes their bytes (the region's
    /// content key), copying nothing.
    Plan(Box<blake3::Hasher>),
    /// Copies each tensor to its place in the region at `base` (synchronous copies).
    Write(u64),
    /// Only says where each tensor lies in the region at `base` (it is there already).
    Place(u64),
}

/// Puts the weights on the device, tensor after tensor, at 256-byte aligned places of one
/// region (or in allocations of their own); every pass over the same model visits the
/// same tensors in the same order (`upload`), so places agree between passes.
struct Uploader<'a> {
    into: Target<'a>,
    at: usize,
}

impl Uploader<'_> {
    fn tensor(&mut self, v: &[f32], p: Precision) -> Result<u64, GpuError> {
        let fail = |e| GpuError::from_driver(e, "uploading the embed model's weights");
        let width = if p == Precision::Fp32 { 4 } else { 2 };
        let len = v.len() * width;
        let at = self.at;
        self.at += len.div_ceil(256) * 256;
        match &mut self.into {
            Target::Own { stream, memory } => {
                let s = stream.clone_htod(&narrow(v, p)).map_err(fail)?;
                let (ptr, _) = s.device_ptr(stream);
                memory.push(s);
                Ok(ptr)
            }
            Target::Plan(h) => {
                h.update(&(len as u64).to_le_bytes());
                h.update(&narrow(v, p));
                Ok(at as u64)
            }
            Target::Write(base) => {
                let bytes = narrow(v, p);
                // SAFETY: the region holds the plan's bytes, and this tensor's place within
                // them is at..at + len; the copy is synchronous.
                unsafe { cudarc::driver::result::memcpy_htod_sync(*base + at as u64, &bytes) }
                    .map_err(fail)?;
                Ok(*base + at as u64)
            }
            Target::Place(base) => Ok(*base + at as u64),
        }
    }

    fn f32(&mut self, v: &[f32]) -> Result<u64, GpuError> {
        self.tensor(v, Precision::Fp32)
    }

    fn linear(&mut self, l: &Linear, p: Precision) -> Result<DevLinear, GpuError> {
        Ok(DevLinear {
            w: self.tensor(&l.w, p)?,
            b: self.f32(&l.b)?,
            out: l.out,
            inp: l.inp,
        })
    }

    fn norm(&mut self, n: &Norm) -> Result<DevNorm, GpuError> {
        Ok(DevNorm {
            g: self.f32(&n.g)?,
            b: self.f32(&n.b)?,
        })
    }

    /// Every tensor of `model`, in one fixed order: the embeddings, then layer by layer.
    fn upload(&mut self, model: &EmbedModel) -> Result<Placed, GpuError> {
        let (w, p) = (&model.weights, model.precision);
        let word = self.tensor(&w.word, p)?;
        let position = self.tensor(&w.position, p)?;
        let token_type = self.tensor(&w.token_type, p)?;
        let emb_norm = self.norm(&w.emb_norm)?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(DevLayer {
                qkv: self.linear(&l.qkv, p)?,
                attn_out: self.linear(&l.attn_out, p)?,
                attn_norm: self.norm(&l.attn_norm)?,
                ffn_in: self.linear(&l.ffn_in, p)?,
                ffn_out: self.linear(&l.ffn_out, p)?,
                ffn_norm: self.norm(&l.ffn_norm)?,
            });
        }
        Ok(Placed {
            word,
            position,
            token_type,
            emb_norm,
            layers,
        })
    }
}

/// Where the weights lie on the device.
struct Placed {
    word: u64,
    position: u64,
    token_type: u64,
    emb_norm: DevNorm,
    layers: Vec<DevLayer>,
}

impl DeviceEncoder {
    /// Uploads `model`'s weights in its precision, loads the kernels and opens cuBLAS. A
    /// missing libcublas is `GpuError::Unavailable`, never a panic.
    pub fn load(loader: &mut DeviceLoader, model: &EmbedModel) -> Result<Self, GpuError> {
        // SAFETY: only tries dlopen on candidate names.
        let present = no_panic("loading libcublas", || {
            Ok(unsafe { blas_sys::is_culib_present() })
        })
        .unwrap_or(false);
        if !present {
            return Err(GpuError::Unavailable(
                "libcublas not found (the embed op needs cuBLAS from CUDA 13: put it on \
                 LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let a = &model.arch;
        if a.hidden / a.heads > MAX_HEAD {
            return Err(GpuError::Unavailable(format!(
                "heads of {} dimensions are more than the device path's {MAX_HEAD}",
                a.hidden / a.heads
            )));
        }
        let p = model.precision;
        let s = suffix(p);
        let prog = program();
        let kernels = Kernels {
            embed_ln: loader.function(&prog, &format!("embed_ln_{s}"))?,
            add_ln: loader.function(&prog, &format!("embed_add_ln_{s}"))?,
            bias_act: loader.function(&prog, &format!("embed_bias_act_{s}"))?,
            attention: loader.function(
                &prog,
                &format!("embed_attention_{s}_{}", head_width(a.hidden / a.heads)),
            )?,
            pool: loader.function(&prog, "embed_pool")?,
        };
        let ctx = loader.ctx.clone();
        ctx.bind_to_thread()
            .map_err(|e| GpuError::opening(e, "binding the context"))?;
        // One handle now: a library that does not open fails the load, not a batch.
        let blas = vec![(0, Blas::new()?)];

        let mut memory = Vec::new();
        let mut shared = None;
        let stream = ctx.default_stream();
        if crate::gpu::shared::enabled() {
            // One copy of the weights per GPU for all workers (gpu::shared), keyed by the
            // bytes the device holds: a dry pass lays them out and hashes them.
            let mut plan = Uploader {
                into: Target::Plan(Box::new(blake3::Hasher::new_derive_key(
                    "ngx-gpu embed weights v1",
                ))),
                at: 0,
            };
            plan.upload(model)?;
            let bytes = plan.at;
            let Target::Plan(h) = plan.into else {
                unreachable!()
            };
            let key = *h.finalize().as_bytes();
            let mib = bytes as f64 / (1 << 20) as f64;
            let started = std::time::Instant::now();
            let fill = |base: u64| {
                Uploader {
                    into: Target::Write(base),
                    at: 0,
                }
                .upload(model)?;
                ctx.synchronize()
                    .map_err(|e| GpuError::from_driver(e, "uploading the embed model's weights"))
            };
            match crate::gpu::shared::obtain(&ctx, &key, bytes, fill) {
                Ok((region, origin)) => {
                    loader.notes.push(match origin {
                        crate::gpu::shared::Origin::Imported => format!(
                            "gpu: embed weights shared on gpu{}, imported from another worker \
                             ({mib:.1} MiB, nothing uploaded)",
                            ctx.ordinal()
                        ),
                        crate::gpu::shared::Origin::Allocated => format!(
                            "gpu: embed weights shared on gpu{}, uploaded by this worker in {} \
                             ms ({mib:.1} MiB) for the others",
                            ctx.ordinal(),
                            started.elapsed().as_millis()
                        ),
                    });
                    shared = Some(region);
                }
                Err(why) => loader.notes.push(format!(
                    "gpu: embed weights not shared ({why}); this worker loads a copy of its own"
                )),
            }
        }
        let mut up = Uploader {
            into: match &shared {
                Some(region) => Target::Place(region.ptr()),
                None => Target::Own {
                    stream: stream.clone(),
                    memory: &mut memory,
                },
            },
            at: 0,
        };
        let Placed {
            word,
            position,
            token_type,
            emb_norm,
            layers,
        } = up.upload(model)?;
        let weight_bytes = up.at;
        drop(up);
        stream
            .synchronize()
            .map_err(|e| GpuError::from_driver(e, "uploading the embed model's weights"))?;
        Ok(DeviceEncoder {
            precision: p,
            hidden: a.hidden,
            intermediate: a.intermediate,
            heads: a.heads,
            eps: a.eps,
            act: match a.act {
                Activation::Gelu => 0,
                Activation::GeluTanh => 1,
                Activation::Relu => 2,
            },
            vocab: a.vocab as u32,
            ntypes: a.type_vocab as u32,
            npos: a.max_positions as u32,
            position_offset: a.position_offset,
            max_tokens: model.max_tokens,
            cls: model.pooling == Pooling::Cls,
            normalize: model.normalize,
            word,
            position,
            token_type,
            emb_norm,
            layers,
            kernels,
            blas: Mutex::new(blas),
            weight_bytes,
            _memory: memory,
            _shared: shared,
        })
    }

    /// Bytes of device memory the weights take.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// Bytes per element of what the products read.
    fn narrow_bytes(&self) -> usize {
        match self.precision {
            Precision::Fp32 => 4,
            _ => 2,
        }
    }

    fn len(&self, e: &Encoded) -> usize {
        e.ids.len().min(self.max_tokens)
    }

    /// Where a batch's input, scratch and output go.
    pub fn plan(&self, batch: &[&Encoded]) -> Plan {
        let n = batch.len();
        let tokens: usize = batch.iter().map(|e| self.len(e)).sum();
        let longest = batch.iter().map(|e| self.len(e)).max().unwrap_or(0);
        self.plan_of(n, tokens, longest)
    }

    /// The plan of a batch of `n` texts, `tokens` in all (each cut at `max_tokens`), the
    /// longest of `longest`: what `plan` gives for such a batch (the op makes it again at
    /// launch from these three numbers).
    pub fn plan_of(&self, n: usize, tokens: usize, longest: usize) -> Plan {
        plan_for(
            (self.hidden, self.intermediate, self.narrow_bytes()),
            n,
            tokens,
            longest,
        )
    }

    /// Writes the batch's tokens into `input` (`plan.input_bytes`, host memory that is
    /// copied to the device address `embed` is given).
    pub fn pack(&self, plan: &Plan, batch: &[&Encoded], input: &mut [u8]) {
        pack_tokens(plan, batch, self.max_tokens, self.position_offset, input);
    }

    /// Queues the batch on `stream`: `input` is the device copy of what `pack` wrote,
    /// `scratch` has `plan.scratch_bytes`, and `out` receives `n * dim` float32, text by
    /// text in the batch's order. Never waits.
    pub fn embed(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        input: u64,
        scratch: u64,
        out: u64,
    ) -> Result<(), GpuError> {
        if plan.n == 0 {
            return Ok(());
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| GpuError::from_driver(e, "binding the context"))?;
        let mut handles = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        let key = stream.cu_stream() as usize;
        let handle = match handles.iter().position(|(k, _)| *k == key) {
            Some(i) => handles[i].1 .0,
            None => {
                // The handle made at load time goes to the first stream.
                let i = match handles.iter().position(|(k, _)| *k == 0) {
                    Some(i) => i,
                    None => {
                        handles.push((0, Blas::new()?));
                        handles.len() - 1
                    }
                };
                handles[i].0 = key;
                // SAFETY: the handle is this encoder's and the stream is alive; each
                // handle is bound to one stream for good.
                unsafe { blas::set_stream(handles[i].1 .0, stream.cu_stream() as _) }
                    .map_err(|e| blas_error(e, "cublasSetStream"))?;
                handles[i].1 .0
            }
        };
        // `handles` stays locked until every product is queued.
        // Every row-wise step runs over the padded rows; attention and pooling read only
        // the texts' own (start, len).
        let (h, t) = (self.hidden, plan.rows);
        let at = |base: u64, off: usize| base + off as u64;
        let (ids, types, pos) = (
            at(input, plan.ids),
            at(input, plan.types),
            at(input, plan.pos),
        );
        let (start, len) = (at(input, plan.start), at(input, plan.len));
        let (x, xh) = (at(scratch, plan.x), at(scratch, plan.xh));
        let (wide, wide_h, y) = (
            at(scratch, plan.wide),
            at(scratch, plan.wide_h),
            at(scratch, plan.y),
        );
        let h_i = h as i32;
        let row_blocks = |rows: usize| LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (h * 4) as u32,
        };
        if t > 0 {
            let mut l = stream.launch_builder(&self.kernels.embed_ln);
            l.arg(&ids)
                .arg(&types)
                .arg(&pos)
                .arg(&self.word)
                .arg(&self.position)
                .arg(&self.token_type)
                .arg(&self.emb_norm.g)
                .arg(&self.emb_norm.b)
                .arg(&x)
                .arg(&xh)
                .arg(&h_i)
                .arg(&self.eps)
                .arg(&self.vocab)
                .arg(&self.ntypes)
                .arg(&self.npos);
            // SAFETY: embed_ln_<p>(const u32 *ids, *types, *pos, const P *word, *posemb,
            // *typemb, const float *g, *b, float *x, P *xh, int h, float eps, u32 vocab,
            // ntypes, npos); one block per token, all buffers sized by `plan`.
            unsafe { l.launch(row_blocks(t)) }?;
        }
        let dh = h / self.heads;
        let dh_i = dh as i32;
        let scale = 1.0 / (dh as f32).sqrt();
        let q_blocks = plan.longest.div_ceil(64).max(1) as u32;
        for layer in &self.layers {
            if t == 0 {
                break;
            }
            self.gemm(handle, layer.qkv.w, xh, wide, &layer.qkv, t)?;
            let mut l = stream.launch_builder(&self.kernels.attention);
            l.arg(&wide)
                .arg(&layer.qkv.b)
                .arg(&wide_h)
                .arg(&start)
                .arg(&len)
                .arg(&h_i)
                .arg(&dh_i)
                .arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (plan.n as u32, self.heads as u32, q_blocks),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: embed_attention_<p>_<DH>(const float *qkv, const float *bias, P *ctx,
            // const u32 *start, const u32 *len, int h, int dh, float scale); grid (texts,
            // heads, query blocks of 64), every text's tokens inside [0, T).
            unsafe { l.launch(cfg) }?;
            self.gemm(handle, layer.attn_out.w, wide_h, y, &layer.attn_out, t)?;
            self.add_ln(stream, y, &layer.attn_out, &layer.attn_norm, x, xh, t)?;
            self.gemm(handle, layer.ffn_in.w, xh, wide, &layer.ffn_in, t)?;
            let n = t as u64;
            let w = self.intermediate as i32;
            let mut l = stream.launch_builder(&self.kernels.bias_act);
            l.arg(&wide)
                .arg(&layer.ffn_in.b)
                .arg(&wide_h)
                .arg(&n)
                .arg(&w)
                .arg(&self.act);
            // SAFETY: embed_bias_act_<p>(const float *y, const float *bias, P *out, u64 n,
            // int w, int act): n rows of w, grid-stride.
            unsafe { l.launch(launch_config(n * w as u64)) }?;
            self.gemm(handle, layer.ffn_out.w, wide_h, y, &layer.ffn_out, t)?;
            self.add_ln(stream, y, &layer.ffn_out, &layer.ffn_norm, x, xh, t)?;
        }
        let (cls, normalize) = (self.cls as i32, self.normalize as i32);
        let mut l = stream.launch_builder(&self.kernels.pool);
        l.arg(&x)
            .arg(&start)
            .arg(&len)
            .arg(&out)
            .arg(&h_i)
            .arg(&cls)
            .arg(&normalize);
        // SAFETY: embed_pool(const float *x, const u32 *start, const u32 *len, float *out,
        // int h, int cls, int normalize); one block per text, out holds n * h floats.
        unsafe { l.launch(row_blocks(plan.n)) }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_ln(
        &self,
        stream: &Arc<CudaStream>,
        y: u64,
        lin: &DevLinear,
        norm: &DevNorm,
        x: u64,
        xh: u64,
        t: usize,
    ) -> Result<(), GpuError> {
        let h_i = self.hidden as i32;
        let mut l = stream.launch_builder(&self.kernels.add_ln);
        l.arg(&y)
            .arg(&lin.b)
            .arg(&x)
            .arg(&xh)
            .arg(&norm.g)
            .arg(&norm.b)
            .arg(&h_i)
            .arg(&self.eps);
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (self.hidden * 4) as u32,
        };
        // SAFETY: embed_add_ln_<p>(const float *y, const float *bias, float *x, P *xh,
        // const float *g, const float *b, int h, float eps); one block per token.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    /// `y[t, out] = x[t, inp] W[out, inp]^T` (row-major), float32 out, no bias (the next
    /// kernel adds it). In cuBLAS's column-major terms: `Y^T = W^T-as-stored^T X^T`.
    fn gemm(
        &self,
        handle: blas_sys::cublasHandle_t,
        w: u64,
        x: u64,
        y: u64,
        lin: &DevLinear,
        t: usize,
    ) -> Result<(), GpuError> {
        use blas_sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
        let ty = match self.precision {
            Precision::Fp32 => cudaDataType::CUDA_R_32F,
            Precision::Fp16 => cudaDataType::CUDA_R_16F,
            Precision::Bf16 => cudaDataType::CUDA_R_16BF,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (m, n, k) = (lin.out as i32, t as i32, lin.inp as i32);
        // SAFETY: the handle is bound to the stream of the launch; w holds out x inp, x
        // holds t x inp, y has room for t x out, all on this handle's context; alpha and beta are host floats (the default pointer mode).
        unsafe {
            blas::gemm_ex(
                handle,
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const _,
                w as *const _,
                ty,
                k,
                x as *const _,
                ty,
                k,
                &beta as *const f32 as *const _,
                y as *mut _,
                cudaDataType::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_error(e, "a matrix product (cublasGemmEx)"))
    }

    /// One batch start to end on `stream`, waiting for it: for tests and tools (the op
    /// pipelines with `plan`, `pack` and `embed` on its own buffers).
    pub fn embed_now(
        &self,
        stream: &Arc<CudaStream>,
        batch: &[&Encoded],
    ) -> Result<Vec<Vec<f32>>, GpuError> {
        let plan = self.plan(batch);
        if plan.n == 0 {
            return Ok(Vec::new());
        }
        let mut host = vec![0u8; plan.input_bytes.max(4)];
        self.pack(&plan, batch, &mut host);
        let d = |e| GpuError::from_driver(e, "running an embed batch");
        let input = stream.clone_htod(&host).map_err(d)?;
        let scratch = stream
            .alloc_zeros::<u8>(plan.scratch_bytes.max(4))
            .map_err(d)?;
        let out = stream.alloc_zeros::<f32>(plan.n * self.hidden).map_err(d)?;
        let ptr = |s: &CudaSlice<u8>| s.device_ptr(stream).0;
        self.embed(
            stream,
            &plan,
            ptr(&input),
            ptr(&scratch),
            out.device_ptr(stream).0,
        )?;
        let flat = stream.clone_dtoh(&out).map_err(d)?;
        stream.synchronize().map_err(d)?;
        Ok(flat.chunks(self.hidden).map(<[f32]>::to_vec).collect())
    }
}

/// The plan of a batch for an encoder of `(hidden, intermediate, bytes of the products'
/// inputs)`: `n` texts, `tokens` in all, the longest of `longest`.
fn plan_for(
    (h, intermediate, nb): (usize, usize, usize),
    n: usize,
    tokens: usize,
    longest: usize,
) -> Plan {
    let rows = padded_rows(tokens);
    let mut off = 0;
    let mut region = |bytes: usize| {
        let at = off;
        off += align(bytes);
        at
    };
    let (ids, types, pos) = (region(4 * rows), region(4 * rows), region(4 * rows));
    let (start, len) = (region(4 * n), region(4 * n));
    let input_bytes = off;
    off = 0;
    let mut region = |bytes: usize| {
        let at = off;
        off += align(bytes);
        at
    };
    let x = region(rows * h * 4);
    let xh = region(rows * h * nb);
    let wide = region(rows * (3 * h).max(intermediate) * 4);
    let wide_h = region(rows * h.max(intermediate) * nb);
    let y = region(rows * h * 4);
    Plan {
        n,
        tokens,
        rows,
        longest,
        input_bytes,
        scratch_bytes: off,
        out_bytes: n * h * 4,
        ids,
        types,
        pos,
        start,
        len,
        x,
        xh,
        wide,
        wide_h,
        y,
    }
}

/// `DeviceEncoder::pack` for texts cut at `max_tokens` whose positions start at
/// `position_offset`.
fn pack_tokens(
    plan: &Plan,
    batch: &[&Encoded],
    max_tokens: usize,
    position_offset: usize,
    input: &mut [u8],
) {
    let len = |e: &Encoded| e.ids.len().min(max_tokens);
    let mut put = |at: usize, i: usize, v: u32| {
        input[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v.to_le_bytes())
    };
    let mut t = 0;
    for (s, e) in batch.iter().enumerate() {
        put(plan.start, s, t as u32);
        put(plan.len, s, len(e) as u32);
        for (k, &id) in e.ids[..len(e)].iter().enumerate() {
            put(plan.ids, t, id);
            put(plan.types, t, e.type_ids.get(k).copied().unwrap_or(0));
            put(plan.pos, t, (position_offset + k) as u32);
            t += 1;
        }
    }
    // The padding rows: token 0, type 0, position 0 (the staging buffer is reused, so
    // whatever a larger batch left there would otherwise be read as ids).
    for r in t..plan.rows {
        put(plan.ids, r, 0);
        put(plan.types, r, 0);
        put(plan.pos, r, 0);
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::testing::Rng;

    /// Random batches (empty texts, texts over max_tokens, token counts just under, at and
    /// over a multiple of ROW_ROUND): the rows are the tokens rounded up to ROW_ROUND, every
    /// region fits its input, each text's tokens land where start/len say with positions from
    /// the offset, and the padding rows are token 0 / type 0 / position 0 even over a buffer
    /// left full of other bytes.
    #[test]
    fn batches_are_padded_to_whole_row_blocks() {
        let mut rng = Rng::fresh();
        let word = |b: &[u8], at: usize, i: usize| {
            u32::from_le_bytes(b[at + 4 * i..at + 4 * i + 4].try_into().unwrap())
        };
        for case in 0..60 {
            let max = [1usize, 5, 31, 32, 33, 512][case % 6];
            let n = 1 + rng.below(9) as usize;
            let batch: Vec<Encoded> = (0..n)
                .map(|_| {
                    let k = rng.below(2 * max as u64 + 2) as usize;
                    Encoded {
                        ids: (0..k).map(|_| 1 + rng.below(30000) as u32).collect(),
                        type_ids: (0..k).map(|_| rng.below(2) as u32).collect(),
                        truncated: false,
                    }
                })
                .collect();
            let refs: Vec<&Encoded> = batch.iter().collect();
            let tokens: usize = batch.iter().map(|e| e.ids.len().min(max)).sum();
            let longest = batch.iter().map(|e| e.ids.len().min(max)).max().unwrap();
            let plan = plan_for((384, 1536, 2), n, tokens, longest);
            assert_eq!(plan.rows % ROW_ROUND, 0);
            assert!(plan.rows >= tokens && plan.rows < tokens + ROW_ROUND);
            assert!(plan.pos + 4 * plan.rows <= plan.input_bytes);
            assert!(plan.y + 4 * 384 * plan.rows <= plan.scratch_bytes);
            let mut input = vec![0xffu8; plan.input_bytes];
            pack_tokens(&plan, &refs, max, 2, &mut input);
            let mut t = 0;
            for (s, e) in batch.iter().enumerate() {
                let k = e.ids.len().min(max);
                assert_eq!(word(&input, plan.start, s) as usize, t);
                assert_eq!(word(&input, plan.len, s) as usize, k);
                for j in 0..k {
                    assert_eq!(word(&input, plan.ids, t + j), e.ids[j]);
                    assert_eq!(word(&input, plan.types, t + j), e.type_ids[j]);
                    assert_eq!(word(&input, plan.pos, t + j) as usize, 2 + j);
                }
                t += k;
            }
            for r in tokens..plan.rows {
                let row = [plan.ids, plan.types, plan.pos].map(|at| word(&input, at, r));
                assert_eq!(row, [0, 0, 0], "padding row {r} of {}", plan.rows);
            }
        }
    }
}
