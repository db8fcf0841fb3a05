//! The exact knn search on the device: cuBLAS matrix products over tiles of the index, a
//! radix top-k selection within each tile (`topk.cu`), and a merge of the tiles' candidates.
//!
//! Design, for a batch of `nq` queries (taken in chunks of at most `QUERY_CHUNK`):
//! 1. `knn_prep` copies the queries to scratch, normalized for `Cosine`, as float16 for
//!    `Fp16`, and writes their squared norms for `L2`.
//! 2. The index is cut into tiles of `tile` rows, sized so that one tile's product block
//!    (queries x rows, float32) stays within `TILE_BYTES` (32 MiB, in the H100's 50 MB L2)
//!    and a multiple of the selection segment (4096). For each tile, one cuBLAS GEMM writes
//!    `rows . queries` (fp32: CUBLAS_COMPUTE_32F, no TF32; tf32: CUBLAS_COMPUTE_32F_FAST_TF32;
//!    fp16: float16 inputs, float32 accumulation and output).
//! 3. `knn_select_tile`: one block per (4096-column segment, query) turns its products into
//!    scores (L2: `|q|^2 + |x|^2 - 2 q.x`, clamped at 0, row norms computed at load) and
//!    selects its best k. Each score becomes a 64-bit candidate, key bits (the float made
//!    order-preserving, inverted for L2) above the row's complement: one unsigned compare
//!    orders by score, then by lower row, and every candidate is unique. Selection is a
//!    radix select over those bits (11/11/10-bit digits of the key, then of the row only on
//!    exact ties; shared-memory histograms, the values held in registers), which finds the
//!    k-th best exactly and stops as soon as the remaining bucket is exactly what is needed;
//!    then a gather. A block with at most 512 values that are not fillers ranks them by
//!    counting instead. Whole rows are never sorted.
//! 4. Each query keeps a running best-k list at the head of its candidate buffer, followed
//!    by the tile's segments' candidates; `knn_select_list` reduces that list by segments of
//!    4096 (ping-ponging between two buffers) until one block per query can take it, and that
//!    block writes the new running list in place, and its k-th best as the query's running
//!    threshold: later tiles' candidates no better than it become fillers as they are read,
//!    so that once a few tiles are done a segment's selection is one pass over its values.
//!    After the last tile that block bitonic-sorts the k in shared memory and writes row
//!    numbers and scores, best first.
//!
//! Batches of two or more queries on float16 indexes, k up to `FUSED_MAX_K` (64), on
//! devices of compute capability 8.0 and later, take the fused path (`fused.cu`), which
//! never writes the products to memory:
//! the first tile (at most 16,384 rows) goes as above and gives each query its running
//! list and threshold; every later tile goes through one kernel, a block per (4096-row
//! segment, 16/32/64 queries), that streams the segment's rows through shared memory
//! (the next chunk loaded into registers meanwhile), multiplies them with the queries on
//! the tensor cores
//! (mma.sync m16n8k16, float32 sums), and keeps per query only the scores that reach the
//! threshold's score (one float comparison a product) and are better than it and than the
//! block's k-th best so far (candidates in shared memory, compacted to the k best by a
//! warp's exact bitwise select when they fill); it writes the segment's k candidates where
//! `knn_select_tile` would, and step 4 is unchanged. With a threshold from the first tile
//! almost no product passes on data of any spread; on adversarial orders (every row better
//! than the last) the block compacts every step: slower, never wrong.
//!
//! k is at most `MAX_K` (2048, FAISS's GPU cap; the selection keeps k candidates in shared
//! memory). Where k exceeds the index's rows, the extra places hold row -1 and the worst
//! score (-inf, +inf for L2). Scratch (`scratch_bytes`) does not grow with `nq` past
//! `QUERY_CHUNK` nor with the index past one tile: cuBLAS's workspace (32 MiB), the
//! queries (chunk x d x 4), the product block (at most 32 MiB, or chunk x 4096 x 4), and
//! the candidate buffers (chunk x k x 8 x (1 + tile / 4096), at most k x 8 x 4096 = 64 MiB
//! for k = 2048, and half that again): about 65 MiB for k = 10, under 165 MiB + 8 KiB x d
//! for any batch and k. The fused path's scratch is smaller: a first tile's products of
//! at most 16 MiB and candidates of at most 16 MiB for 1024 queries a chunk.
//! `search` only queues work on the caller's stream: kernels, GEMMs and memsets.

use std::sync::{Arc, OnceLock};

use cudarc::cublas::{result::CublasError, sys as cublas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::index::{Index, Metric, Precision};
use crate::gpu::shared::SharedRegion;
use crate::gpu::{no_panic, DeviceLoader, GpuError, Program};

/// The largest k a search takes.
pub const MAX_K: usize = 2048;
/// Values one selection block takes (topk.cu's KNN_SEG).
const SEG: usize = 4096;
const THREADS: u32 = 256;
/// The most bytes of one tile's product block (queries x tile rows x 4).
const TILE_BYTES: usize = 32 << 20;
/// Queries per pass over the index: bounds the scratch for any batch.
const QUERY_CHUNK: usize = 2048;
/// cuBLAS's workspace, a region of each search's scratch: cuBLAS then allocates nothing, and
/// searches in flight on different streams never share one (NVIDIA's size for Hopper).
const WORKSPACE: usize = 32 << 20;
/// Scratch regions start at multiples of this.
const ALIGN: usize = 256;

/// The NVRTC program of the search's kernels.
pub fn program() -> Arc<Program> {
    static P: OnceLock<Arc<Program>> = OnceLock::new();
    crate::ops::builtin_program(&P, "topk.cu", include_str!("topk.cu"))
}

/// The NVRTC program of the fused float16 search (`fused.cu`): tensor-core instructions of
/// compute capability 8.0, so compiled for it and loaded only where the device takes it.
pub fn fused_program() -> Arc<Program> {
    static P: OnceLock<Arc<Program>> = OnceLock::new();
    P.get_or_init(|| {
        Arc::new(Program::new(
            "fused.cu",
            include_str!("fused.cu"),
            vec!["--gpu-architecture=compute_80".to_string()],
            vec![crate::ops::COMMON_HEADER],
        ))
    })
    .clone()
}

/// The largest k the fused search takes (fused.cu's KF_MAX_K).
pub const FUSED_MAX_K: usize = 64;
/// Queries per pass over the index on the fused path (its scratch stays that of the
/// two-step path's 2048-query chunk).
const FUSED_CHUNK: usize = 1024;
/// The fused path's first tile (two-step, for the running thresholds): at most this many
/// rows, and a product block of at most FIRST_BYTES.
const FIRST_ROWS: usize = 4 * SEG;
const FIRST_BYTES: usize = 16 << 20;
/// The most bytes of one fused tile's candidates (k per segment and query).
const FUSED_CANDS: usize = 16 << 20;
/// The fused kernels' shapes: (name, queries per block, threads, dynamic shared memory),
/// as fused.cu's KfShape<WR, WQ, NS> states them: QB = 16 WQ queries, RS = 32 WR rows a
/// step, 32 WR WQ threads, BQ = 64 + RS candidates a query, NS stages; QB BQ 8 + QB 20 +
/// NS (RS + QB) 72 2 bytes. A batch takes the first whose blocks hold it, else the last
/// (several blocks).
const FUSED_SHAPES: [(&str, usize, u32, usize); 3] = [
    ("knn_fused_q16", 16, 256, fused_smem(8, 1, 1)),
    ("knn_fused_q32", 32, 256, fused_smem(4, 2, 2)),
    ("knn_fused_q64", 64, 256, fused_smem(2, 4, 2)),
];

const fn fused_smem(wr: usize, wq: usize, stages: usize) -> usize {
    let (rs, qb) = (32 * wr, 16 * wq);
    qb * (FUSED_MAX_K + rs) * 8 + qb * 20 + stages * (rs + qb) * 72 * 2
}

/// How a search of a batch walks the index (a function of n, the batch, k and the path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// Queries per chunk.
    chunk: usize,
    /// Index rows of the first tile, and of every tile after it (multiples of SEG).
    first: usize,
    tile: usize,
    /// Tiles after the first are searched by the fused kernel.
    fused: bool,
    /// Candidates per query in buffer A (running list, then one k per tile segment) and B.
    a_stride: usize,
    b_stride: usize,
}

impl Plan {
    /// The two-step plan (every tile: GEMM, then selection), or with `fused` (an index the
    /// fused kernel can search, k up to FUSED_MAX_K, more rows than the first tile) the
    /// fused one: a small two-step first tile gives each query a running threshold, then
    /// tiles as large as the candidates' budget allows go through the fused kernel. A lone
    /// query goes two-step: the first tile's extra launches cost more than the fused kernel
    /// saves at batch 1 (8,648 against 8,154 queries/s on the H100, 1M x 128).
    fn new(n: usize, nq: usize, k: usize, tile_bytes: usize, fused: bool) -> Plan {
        let whole = n.div_ceil(SEG).max(1) * SEG;
        let fit = |chunk: usize, bytes: usize| (bytes / (4 * chunk) / SEG).max(1) * SEG;
        let with = |chunk: usize, first: usize, tile: usize, fused: bool| {
            let a_stride = k * (1 + first.max(tile) / SEG);
            let b_stride = if a_stride > SEG {
                k * a_stride.div_ceil(SEG)
            } else {
                0
            };
            Plan {
                chunk,
                first,
                tile,
                fused,
                a_stride,
                b_stride,
            }
        };
        if fused && k <= FUSED_MAX_K && nq > 1 {
            let chunk = nq.clamp(1, FUSED_CHUNK);
            let first = fit(chunk, tile_bytes.min(FIRST_BYTES)).min(FIRST_ROWS);
            if first < n {
                let budget = FUSED_CANDS.min(tile_bytes / 2) / (8 * chunk * k);
                let segs = budget.saturating_sub(1).clamp(1, 65535);
                let tile = (segs * SEG).min((n - first).div_ceil(SEG) * SEG);
                return with(chunk, first, tile, true);
            }
        }
        let chunk = nq.clamp(1, QUERY_CHUNK);
        let tile = fit(chunk, tile_bytes).min(whole);
        with(chunk, tile, tile, false)
    }

    /// Byte offsets of the scratch regions: cuBLAS's workspace, queries, query norms,
    /// product block, A, B, the running thresholds; and the total.
    fn regions(&self, d: usize) -> ([usize; 7], usize) {
        let sizes = [
            WORKSPACE,
            self.chunk * d * 4,
            self.chunk * 4,
            self.chunk * self.first * 4,
            self.chunk * self.a_stride * 8,
            self.chunk * self.b_stride * 8,
            self.chunk * 8,
        ];
        let mut offs = [0; 7];
        let mut at = 0;
        for (o, s) in offs.iter_mut().zip(sizes) {
            *o = at;
            at += s.div_ceil(ALIGN) * ALIGN;
        }
        (offs, at)
    }
}

/// Searches kept as CUDA graphs at most (a pipeline slot's searches come in
/// `graph_rows` sizes: about 20 sizes up to a chunk, times the slots and k values in use).
const GRAPHS: usize = 64;

/// One search's arguments, device addresses: `nq` f32 queries (row-major nq*d at
/// `queries`, not normalized), `k` neighbours each, the search's scratch
/// (`DeviceIndex::scratch_bytes`), and where the row numbers (i64, nq*k) and scores (f32,
/// nq*k) go, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SearchArgs {
    pub queries: u64,
    pub nq: usize,
    pub k: usize,
    pub scratch: u64,
    pub rows_out: u64,
    pub scores_out: u64,
}

/// What a captured search was captured for (its stream and arguments): a graph replays
/// these exactly.
type GraphKey = (usize, SearchArgs);

/// A captured search. CUDA graphs may be used from any one thread at a time; the index's
/// mutex serializes them.
struct Graph(cudarc::driver::CudaGraph);

// SAFETY: a CudaGraph holds driver handles that are not tied to a thread; every use goes
// through DeviceIndex::graphs' mutex, so one thread at a time.
unsafe impl Send for Graph {}

/// The captured searches, oldest first; `enabled` false once a capture failed.
struct Graphs {
    enabled: bool,
    kept: std::collections::VecDeque<(GraphKey, Graph)>,
}

impl Default for Graphs {
    fn default() -> Graphs {
        Graphs {
            enabled: true,
            kept: std::collections::VecDeque::new(),
        }
    }
}

impl Graphs {
    fn get(&self, key: &GraphKey) -> Option<&cudarc::driver::CudaGraph> {
        self.kept.iter().find(|(a, _)| a == key).map(|(_, g)| &g.0)
    }

    /// Keeps a new graph, dropping the oldest past `GRAPHS` (a graph dropped while its
    /// launch runs is freed by the driver when that launch is done).
    fn insert(&mut self, key: GraphKey, graph: cudarc::driver::CudaGraph) {
        if self.kept.len() >= GRAPHS {
            self.kept.pop_front();
        }
        self.kept.push_back((key, Graph(graph)));
    }

    #[cfg(test)]
    fn clear(&mut self) {
        self.kept.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.len()
    }
}

/// The number of queries a batch of `nq` is searched as: rounded up to one of about 20
/// sizes (steps of at most half, then of 512 past 2048), so that a slot's searches replay
/// a few CUDA graphs rather than capture one per batch size. The extra queries are zeros
/// and their hits are never read; at most a third of the search is spent on them.
pub fn graph_rows(nq: usize) -> usize {
    if nq <= 4 {
        return nq;
    }
    if nq > QUERY_CHUNK {
        return nq.div_ceil(512) * 512;
    }
    // 4, 6, 8, 12, 16, 24, 32, 48, ...: powers of two and the midpoints between them.
    let p = nq.next_power_of_two();
    let mid = p / 2 + p / 4;
    if nq <= mid {
        mid
    } else {
        p
    }
}

/// An index on one device: its rows in the index's precision, row norms for L2, the
/// kernels and a cuBLAS handle.
pub struct DeviceIndex {
    handle: CublasHandle,
    n: usize,
    d: usize,
    metric: Metric,
    precision: Precision,
    /// Device address of the rows (float32, or float16 for Fp16), and of their squared
    /// norms (L2 only, else 0).
    rows: u64,
    norms: u64,
    prep: CudaFunction,
    select_tile: CudaFunction,
    select_list: CudaFunction,
    /// The fused kernels (FUSED_SHAPES' order), for a float16 index on a device that runs
    /// them; `fused_on` false searches two-step anyway (tests and benchmarks).
    fused: Option<[CudaFunction; 3]>,
    fused_on: bool,
    tile_bytes: usize,
    /// Searches captured as CUDA graphs (see `search`).
    graphs: std::sync::Mutex<Graphs>,
    /// The memory of the rows and norms (`Stored`): this worker's own, or shared.
    _own: Option<CudaSlice<u8>>,
    _shared: Option<SharedRegion>,
    ctx: Arc<CudaContext>,
}

/// A cuBLAS handle (its workspace is each search's scratch).
struct CublasHandle {
    raw: cublas::cublasHandle_t,
}

// SAFETY: the handle is used by one thread at a time (the worker's GPU thread owns the
// DeviceIndex); cuBLAS allows a handle to move between threads of its context.
unsafe impl Send for CublasHandle {}

impl Drop for CublasHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate and destroyed once, here.
        let _ = unsafe { cudarc::cublas::result::destroy_handle(self.raw) };
    }
}

/// Whether libcublas can be loaded; never panics.
pub fn cublas_present() -> bool {
    // SAFETY: is_culib_present only tries dlopen on candidate names.
    no_panic("loading libcublas", || {
        Ok(unsafe { cublas::is_culib_present() })
    })
    .unwrap_or(false)
}

fn cublas_error(e: CublasError, what: &str) -> GpuError {
    use cublas::cublasStatus_t::*;
    let msg = format!("{what}: cuBLAS {:?}", e.0);
    match e.0 {
        CUBLAS_STATUS_ALLOC_FAILED => GpuError::OutOfMemory(msg),
        CUBLAS_STATUS_INVALID_VALUE | CUBLAS_STATUS_NOT_SUPPORTED => GpuError::BadLaunch(msg),
        _ => GpuError::Lost(msg),
    }
}

fn cfg(grid: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// How the index lies on the device: rows (float32, or float16 for Fp16) from byte 0,
/// then (L2) the rows' squared norms as float32 at `norms`; `bytes` in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stored {
    bytes: usize,
    norms: Option<usize>,
}

impl Stored {
    fn of(index: &Index) -> Stored {
        let width = match index.precision {
            Precision::Fp16 => 2,
            _ => 4,
        };
        let rows = index.n * index.d * width;
        match index.metric {
            Metric::L2 => {
                let at = rows.div_ceil(ALIGN) * ALIGN;
                Stored {
                    bytes: at + index.n * 4,
                    norms: Some(at),
                }
            }
            _ => Stored {
                bytes: rows,
                norms: None,
            },
        }
    }
}

/// The key of what `Stored` holds for this index, for sharing it between workers: the
/// digest of the rows (`index_digest`, taken once in the master), the shape, metric,
/// precision and this layout's version. The model's name is left out on purpose: two
/// models with the same content share one copy.
pub fn content_key(index: &Index, digest: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"knn stored v1");
    h.update(digest);
    h.update(&(index.n as u64).to_le_bytes());
    h.update(&(index.d as u64).to_le_bytes());
    h.update(format!("{:?} {:?}", index.metric, index.precision).as_bytes());
    *h.finalize().as_bytes()
}

/// The digest of an index's rows (float32 as loaded, little-endian bytes).
pub fn index_digest(rows: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any byte is a valid u8; the slice covers exactly
        // the rows' memory, borrowed for the call.
        let bytes =
            unsafe { std::slice::from_raw_parts(rows.as_ptr().cast::<u8>(), rows.len() * 4) };
        h.update(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for v in rows {
        h.update(&v.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// Writes the index's `Stored` form at device address `base` (`Stored::of(index).bytes`
/// bytes) and waits for it: float32 rows copied, or float16 rows converted on the device
/// from a float32 copy freed after; L2 norms computed by `knn_prep`.
fn fill_stored(
    stream: &Arc<CudaStream>,
    prep: &CudaFunction,
    index: &Index,
    layout: &Stored,
    base: u64,
) -> Result<(), GpuError> {
    let (n, d) = (index.n, index.d);
    let alloc = |e| GpuError::from_driver(e, "loading a knn index");
    let norms_at = layout.norms.map_or(0, |off| base + off as u64);
    let half = matches!(index.precision, Precision::Fp16);
    let mut staged = None;
    let x = if half {
        let rows32 = stream.clone_htod(&index.rows).map_err(alloc)?;
        let at = rows32.device_ptr(stream).0;
        staged = Some(rows32);
        at
    } else {
        // SAFETY: base holds at least n * d floats (Stored); the copy is synchronous.
        unsafe { cudarc::driver::result::memcpy_htod_sync(base, &index.rows) }.map_err(alloc)?;
        base
    };
    if half || norms_at != 0 {
        let (n32, d32) = (n as u32, d as u32);
        let (normalize, half) = (0i32, i32::from(half));
        let out = if half != 0 { base } else { 0 };
        let mut l = stream.launch_builder(prep);
        l.arg(&x)
            .arg(&n32)
            .arg(&d32)
            .arg(&normalize)
            .arg(&half)
            .arg(&out)
            .arg(&norms_at);
        // SAFETY: knn_prep(const float *x, u32 n, u32 d, int normalize, int half, void
        // *out, float *norm2): x holds n * d floats, out (if not 0) n * d halves, norm2
        // (if not 0) n floats, all within `Stored`'s bytes at base or the staged copy.
        unsafe { l.launch(cfg(((n as u32).min(65535), 1), 128)) }?;
    }
    stream.synchronize().map_err(alloc)?;
    drop(staged);
    Ok(())
}

/// The fused kernels, allowed their dynamic shared memory; an error where the device does
/// not take compute capability 8.0 code (or fused.cu was not compiled for this op).
fn load_fused(loader: &mut DeviceLoader) -> Result<[CudaFunction; 3], GpuError> {
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SHARED;
    let program = fused_program();
    let mut load = |(name, _, _, smem): (&str, usize, u32, usize)| {
        let f = loader.function(&program, name)?;
        f.set_attribute(MAX_SHARED, smem as i32)
            .map_err(|e| GpuError::from_driver(e, &format!("allowing {name} its shared memory")))?;
        Ok::<_, GpuError>(f)
    };
    Ok([
        load(FUSED_SHAPES[0])?,
        load(FUSED_SHAPES[1])?,
        load(FUSED_SHAPES[2])?,
    ])
}

impl DeviceIndex {
    /// Puts the index on the device (float16 rows converted there, row norms computed for
    /// L2) and opens cuBLAS. With `share` (the model's name and content digest, see
    /// `content_key`), in a worker of nginx (`gpu::shared::enabled`), the rows live in memory shared by every worker of this nginx on the
    /// device (`gpu::shared`): imported from a worker that holds them, or uploaded here
    /// for the others; where that is not possible, a copy of this worker's own, and one
    /// line in `loader.notes` says which. Waits for the copies.
    pub fn load(
        loader: &mut DeviceLoader,
        index: &Index,
        share: Option<(&str, &[u8; 32])>,
    ) -> Result<DeviceIndex, GpuError> {
        let (n, d) = (index.n, index.d);
        if n == 0 || d == 0 || index.rows.len() != n * d {
            return Err(GpuError::Unavailable(format!(
                "a knn index of {n} x {d} with {} values cannot be searched",
                index.rows.len()
            )));
        }
        if n >= i32::MAX as usize || d >= i32::MAX as usize / 2 {
            return Err(GpuError::Unavailable(format!(
                "a knn index of {n} x {d} is beyond the device search's 2^31 rows and columns"
            )));
        }
        if !cublas_present() {
            return Err(GpuError::Unavailable(
                "libcublas.so not found (the knn search needs cuBLAS from CUDA 13)".into(),
            ));
        }
        let program = program();
        let prep = loader.function(&program, "knn_prep")?;
        let select_tile = loader.function(&program, "knn_select_tile")?;
        let select_list = loader.function(&program, "knn_select_list")?;
        let fused = if index.precision == Precision::Fp16 {
            load_fused(loader)
                .map_err(|e| {
                    loader.notes.push(format!(
                        "gpu: knn: float16 index searched two-step, without the fused kernel \
                         ({e})"
                    ))
                })
                .ok()
        } else {
            None
        };
        let ctx = loader.ctx.clone();
        let opening = |e| GpuError::opening(e, "loading a knn index");
        ctx.bind_to_thread().map_err(opening)?;
        let stream = ctx.default_stream();
        let layout = Stored::of(index);
        let mut shared = None;
        let mut own = None;
        if let Some((name, digest)) = share.filter(|_| crate::gpu::shared::enabled()) {
            let started = std::time::Instant::now();
            let fill = |base: u64| fill_stored(&stream, &prep, index, &layout, base);
            let mib = layout.bytes as f64 / (1 << 20) as f64;
            let gpu = ctx.ordinal();
            match crate::gpu::shared::obtain(&ctx, &content_key(index, digest), layout.bytes, fill)
            {
                Ok((region, origin)) => {
                    loader.notes.push(match origin {
                        crate::gpu::shared::Origin::Imported => format!(
                            "gpu: knn \"{name}\": index shared on gpu{gpu}, imported from \
                             another worker ({mib:.1} MiB, nothing uploaded)"
                        ),
                        crate::gpu::shared::Origin::Allocated => format!(
                            "gpu: knn \"{name}\": index shared on gpu{gpu}, uploaded by this \
                             worker in {} ms ({mib:.1} MiB) for the others",
                            started.elapsed().as_millis()
                        ),
                    });
                    shared = Some(region);
                }
                Err(why) => loader.notes.push(format!(
                    "gpu: knn \"{name}\": index not shared ({why}); this worker loads a copy \
                     of its own"
                )),
            }
        }
        let base = match &shared {
            Some(region) => region.ptr(),
            None => {
                let alloc = |e| GpuError::from_driver(e, "loading a knn index");
                let mem = stream.alloc_zeros::<u8>(layout.bytes).map_err(alloc)?;
                let base = mem.device_ptr(&stream).0;
                fill_stored(&stream, &prep, index, &layout, base)?;
                own = Some(mem);
                base
            }
        };
        let raw = no_panic("opening cuBLAS", || {
            cudarc::cublas::result::create_handle()
                .map_err(|e| format!("opening cuBLAS: {:?}", e.0))
        })
        .map_err(GpuError::Unavailable)?;
        let handle = CublasHandle { raw };
        Ok(DeviceIndex {
            handle,
            n,
            d,
            metric: index.metric,
            precision: index.precision,
            rows: base,
            norms: layout.norms.map_or(0, |off| base + off as u64),
            prep,
            select_tile,
            select_list,
            fused,
            fused_on: true,
            tile_bytes: TILE_BYTES,
            graphs: std::sync::Mutex::new(Graphs::default()),
            _own: own,
            _shared: shared,
            ctx,
        })
    }

    /// Rows and dimension.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.d)
    }

    /// The metric as the kernels take it (topk.cu's and fused.cu's `metric`).
    fn metric_code(&self) -> i32 {
        match self.metric {
            Metric::Ip => 0,
            Metric::Cosine => 1,
            Metric::L2 => 2,
        }
    }

    /// Smaller tiles (tests: several tiles on small indexes).
    #[cfg(test)]
    fn set_tile_bytes(&mut self, bytes: usize) {
        self.tile_bytes = bytes;
        self.graphs.get_mut().unwrap().clear();
    }

    /// The fused path on or off (tests: both paths on one index).
    #[cfg(test)]
    fn set_fused(&mut self, on: bool) {
        self.fused_on = on;
        self.graphs.get_mut().unwrap().clear();
    }

    /// Whether searches for k go through the fused kernel (for part of the index).
    #[cfg(test)]
    fn fuses(&self, nq: usize, k: usize) -> bool {
        self.plan(nq, k).fused
    }

    fn plan(&self, nq: usize, k: usize) -> Plan {
        let fused = self.fused_on && self.fused.is_some();
        Plan::new(self.n, nq, k, self.tile_bytes, fused)
    }

    /// Device scratch a search of `nq` queries for `k` neighbours needs.
    pub fn scratch_bytes(&self, nq: usize, k: usize) -> usize {
        self.plan(nq, k.clamp(1, MAX_K)).regions(self.d).1
    }

    /// Queues the search `a` on `stream`. Never synchronizes.
    ///
    /// A search is some 3 launches per tile (tens of driver calls, ~10 us each under MPS),
    /// so it is queued as a CUDA graph: captured the first time these arguments come on
    /// this stream (a pipeline slot's buffers are reused), replayed after with one launch.
    /// Only searches of a `graph_rows` size are captured (the knn op rounds its batches up
    /// to one): others, such as the search op's batches of any number of texts, are queued
    /// call by call, rather than each new size capturing a graph and evicting another.
    /// Where capture fails the search is queued call by call, and so are all of this
    /// index's after.
    pub fn search(&self, stream: &Arc<CudaStream>, a: SearchArgs) -> Result<(), GpuError> {
        let k = a.k;
        if k == 0 || k > MAX_K {
            return Err(GpuError::BadLaunch(format!(
                "knn search for k = {k} (1 to {MAX_K})"
            )));
        }
        if a.nq == 0 {
            return Ok(());
        }
        let key = (stream.cu_stream() as usize, a);
        let mut graphs = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        if !graphs.enabled || graph_rows(a.nq) != a.nq {
            drop(graphs);
            return self.queue_search(stream, &a);
        }
        if let Some(g) = graphs.get(&key) {
            return g
                .launch()
                .map_err(|e| GpuError::from_driver(e, "launching a knn search graph"));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| GpuError::from_driver(e, "binding the context"))?;
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if stream.begin_capture(mode).is_ok() {
            let queued = self.queue_search(stream, &a);
            let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
            // A launch that failed to queue under capture fails the same way uncaptured (a
            // bad k is checked above): it says so below, where the search goes call by call.
            if let (Ok(()), Ok(Some(graph))) = (queued, stream.end_capture(flags)) {
                graph
                    .launch()
                    .map_err(|e| GpuError::from_driver(e, "launching a knn search graph"))?;
                graphs.insert(key, graph);
                return Ok(());
            }
        }
        graphs.enabled = false;
        drop(graphs);
        self.queue_search(stream, &a)
    }

    /// Queues the search's launches, GEMMs and memsets on `stream` (see `search`).
    fn queue_search(&self, stream: &Arc<CudaStream>, a: &SearchArgs) -> Result<(), GpuError> {
        let SearchArgs {
            queries,
            nq,
            k,
            scratch,
            rows_out,
            scores_out,
        } = *a;
        let plan = self.plan(nq, k);
        let (offs, _) = plan.regions(self.d);
        let at = |i: usize| scratch + offs[i] as u64;
        let (workspace, qbuf, qnorm, prod, buf_a, buf_b, thresh) =
            (at(0), at(1), at(2), at(3), at(4), at(5), at(6));
        self.ctx
            .bind_to_thread()
            .map_err(|e| GpuError::from_driver(e, "binding the context"))?;
        // SAFETY: the handle is this index's; the stream is alive for the call (cuBLAS only
        // queues on it).
        unsafe { cublas::cublasSetStream_v2(self.handle.raw, stream.cu_stream() as _) }
            .result()
            .map_err(|e| cublas_error(e, "setting the cuBLAS stream"))?;
        // SAFETY: the workspace region is this search's, WORKSPACE bytes, used on `stream`
        // alone until the caller's scratch is reused after the search.
        unsafe { cublas::cublasSetWorkspace_v2(self.handle.raw, workspace as *mut _, WORKSPACE) }
            .result()
            .map_err(|e| cublas_error(e, "giving cuBLAS its workspace"))?;
        let l2 = self.metric == Metric::L2;
        let metric = self.metric_code();
        let (d, k32) = (self.d as u32, k as u32);
        let zero = 0u64;
        for c0 in (0..nq).step_by(plan.chunk) {
            let m = plan.chunk.min(nq - c0);
            let m32 = m as u32;
            // 1. The chunk's queries.
            {
                let x = queries + (c0 * self.d * 4) as u64;
                let normalize = i32::from(self.metric == Metric::Cosine);
                let half = i32::from(self.precision == Precision::Fp16);
                let norm2 = if l2 { qnorm } else { 0 };
                let mut l = stream.launch_builder(&self.prep);
                l.arg(&x)
                    .arg(&m32)
                    .arg(&d)
                    .arg(&normalize)
                    .arg(&half)
                    .arg(&qbuf)
                    .arg(&norm2);
                // SAFETY: as in load; qbuf holds chunk * d floats, qnorm chunk floats.
                unsafe { l.launch(cfg((m32.min(65535), 1), 128)) }?;
            }
            // The running lists start as fillers, their thresholds as the worst.
            for (at, len) in [(buf_a, m * plan.a_stride * 8), (thresh, m * 8)] {
                // SAFETY: the region at `at` holds `len` bytes (see Plan::regions).
                unsafe { cudarc::driver::result::memset_d8_async(at, 0, len, stream.cu_stream()) }
                    .map_err(|e| GpuError::from_driver(e, "clearing knn candidates"))?;
            }
            let mut t0 = 0;
            while t0 < self.n {
                let fused = plan.fused && t0 > 0;
                let tn = if t0 == 0 { plan.first } else { plan.tile }.min(self.n - t0);
                let last = t0 + tn == self.n;
                let segs = tn.div_ceil(SEG);
                if fused {
                    // 2-3. Products and each segment's best k in one kernel.
                    self.fused_tile(
                        stream,
                        (t0, tn),
                        (qbuf, qnorm, m),
                        k,
                        thresh,
                        (buf_a, plan.a_stride),
                    )?;
                } else {
                    // 2. The tile's products.
                    self.gemm(prod, t0, tn, qbuf, m)?;
                    // 3. Each segment's best k, after the running list.
                    {
                        let (tn32, row0) = (tn as u32, t0 as u32);
                        let (a_stride, off) = (plan.a_stride as u64, k32);
                        let mut l = stream.launch_builder(&self.select_tile);
                        l.arg(&prod)
                            .arg(&tn32)
                            .arg(&row0)
                            .arg(&self.norms)
                            .arg(&qnorm)
                            .arg(&metric)
                            .arg(&k32)
                            .arg(&thresh)
                            .arg(&buf_a)
                            .arg(&a_stride)
                            .arg(&off);
                        // SAFETY: knn_select_tile(const float *prod, u32 t, u32 row0, const
                        // float *xnorm, const float *qnorm, int metric, u32 k, const u64 *thresh,
                        // u64 *out, u64 out_stride, u32 off): prod holds m rows of tn products;
                        // A's rows hold k + segs * k candidates (a_stride); thresh m values;
                        // norms are read for L2 only.
                        unsafe { l.launch(cfg((segs as u32, m32), THREADS)) }?;
                    }
                }
                // 4. Reduce running list + candidates to k.
                let mut len = k * (1 + segs);
                let (mut src, mut src_stride) = (buf_a, plan.a_stride as u64);
                let (mut dst, mut dst_stride) = (buf_b, plan.b_stride as u64);
                while len > SEG {
                    let blocks = len.div_ceil(SEG);
                    self.list(
                        stream,
                        (src, src_stride),
                        len,
                        k,
                        (dst, dst_stride),
                        blocks,
                        m,
                    )?;
                    std::mem::swap(&mut src, &mut dst);
                    std::mem::swap(&mut src_stride, &mut dst_stride);
                    len = blocks * k;
                }
                let (len32, in_stride) = (len as u32, src_stride);
                let (out, out_stride) = (buf_a, plan.a_stride as u64);
                let (rows, scores, bar) = if last {
                    (
                        rows_out + (c0 * k * 8) as u64,
                        scores_out + (c0 * k * 4) as u64,
                        zero,
                    )
                } else {
                    (zero, zero, thresh)
                };
                let mut l = stream.launch_builder(&self.select_list);
                l.arg(&src)
                    .arg(&in_stride)
                    .arg(&len32)
                    .arg(&k32)
                    .arg(&out)
                    .arg(&out_stride)
                    .arg(&metric)
                    .arg(&rows)
                    .arg(&scores)
                    .arg(&bar);
                // SAFETY: knn_select_list(const u64 *in, u64 in_stride, u32 m, u32 k, u64
                // *out, u64 out_stride, int metric, long long *rows, float *scores, u64
                // *thresh): one block per query (in place on A is allowed then); rows and
                // scores hold nq * k values from the chunk's first query on, thresh m.
                unsafe { l.launch(cfg((1, m32), THREADS)) }?;
                t0 += tn;
            }
        }
        Ok(())
    }

    /// The fused kernel over rows [t0, t0 + tn) for the chunk's m queries (float16 at
    /// qbuf, squared norms at qnorm for L2): each segment's best k better than the
    /// query's running threshold, at A[q][k + segment * k].
    fn fused_tile(
        &self,
        stream: &Arc<CudaStream>,
        (t0, tn): (usize, usize),
        (qbuf, qnorm, m): (u64, u64, usize),
        k: usize,
        thresh: u64,
        (buf_a, a_stride): (u64, usize),
    ) -> Result<(), GpuError> {
        let Some(kernels) = &self.fused else {
            return Err(GpuError::BadLaunch(
                "the fused knn kernels are not loaded".into(),
            ));
        };
        let shape = FUSED_SHAPES
            .iter()
            .position(|s| m <= s.1)
            .unwrap_or(FUSED_SHAPES.len() - 1);
        let (_, per_block, threads, smem) = FUSED_SHAPES[shape];
        let (end, row0, d, m32, k32) = (
            (t0 + tn) as u32,
            t0 as u32,
            self.d as u32,
            m as u32,
            k as u32,
        );
        let metric = self.metric_code();
        let a_stride = a_stride as u64;
        let mut l = stream.launch_builder(&kernels[shape]);
        l.arg(&self.rows)
            .arg(&end)
            .arg(&row0)
            .arg(&d)
            .arg(&qbuf)
            .arg(&m32)
            .arg(&self.norms)
            .arg(&qnorm)
            .arg(&metric)
            .arg(&k32)
            .arg(&thresh)
            .arg(&buf_a)
            .arg(&a_stride)
            .arg(&k32);
        let grid = (m.div_ceil(per_block) as u32, tn.div_ceil(SEG) as u32);
        let config = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: knn_fused_q16/q32/q64(const u16 *x, u32 end, u32 row0, u32 d, const u16 *q,
        // u32 m, const float *xnorm, const float *qnorm, int metric, u32 k, const u64
        // *thresh, u64 *out, u64 out_stride, u32 off): x holds the index's float16 rows
        // (end <= n), q m float16 queries of d, qnorm m floats and xnorm n (L2 only);
        // A's rows hold k + segs * k candidates (a_stride, Plan), thresh m values; the
        // dynamic shared memory is what the kernel's shape needs (it traps with less) and
        // was allowed at load (`load_fused`).
        unsafe { l.launch(config) }?;
        Ok(())
    }

    /// One reduction round: `blocks` segments of each query's `len` candidates at `src`, to
    /// k each at `dst`.
    #[allow(clippy::too_many_arguments)]
    fn list(
        &self,
        stream: &Arc<CudaStream>,
        (src, src_stride): (u64, u64),
        len: usize,
        k: usize,
        (dst, dst_stride): (u64, u64),
        blocks: usize,
        m: usize,
    ) -> Result<(), GpuError> {
        let (len32, k32, metric, none) = (len as u32, k as u32, 0i32, 0u64);
        let mut l = stream.launch_builder(&self.select_list);
        l.arg(&src)
            .arg(&src_stride)
            .arg(&len32)
            .arg(&k32)
            .arg(&dst)
            .arg(&dst_stride)
            .arg(&metric)
            .arg(&none)
            .arg(&none)
            .arg(&none);
        // SAFETY: as in search; src and dst are different buffers, dst's rows hold
        // blocks * k candidates.
        unsafe { l.launch(cfg((blocks as u32, m as u32), THREADS)) }?;
        Ok(())
    }

    /// `prod[q * tn + j] = row(t0 + j) . query(q)` for the chunk's m queries (column-major:
    /// C (tn x m) = X_tile^T (d x tn, transposed) * Q (d x m)).
    fn gemm(&self, prod: u64, t0: usize, tn: usize, qbuf: u64, m: usize) -> Result<(), GpuError> {
        use cublas::cublasComputeType_t::*;
        use cublas::cudaDataType_t::*;
        let (dtype, compute) = match self.precision {
            Precision::Fp32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F),
            Precision::Tf32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32),
            Precision::Fp16 => (CUDA_R_16F, CUBLAS_COMPUTE_32F),
        };
        let esize = if self.precision == Precision::Fp16 {
            2
        } else {
            4
        };
        let a = self.rows + (t0 * self.d * esize) as u64;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let d = self.d as i32;
        // SAFETY: A holds tn rows of d values from row t0, B m queries of d values (same
        // type), C room for tn * m floats; alpha and beta are host floats (pointer mode
        // host, the default), read during the call.
        unsafe {
            cublas::cublasGemmEx(
                self.handle.raw,
                cublas::cublasOperation_t::CUBLAS_OP_T,
                cublas::cublasOperation_t::CUBLAS_OP_N,
                tn as i32,
                m as i32,
                d,
                &alpha as *const f32 as *const _,
                a as *const _,
                dtype,
                d,
                qbuf as *const _,
                dtype,
                d,
                &beta as *const f32 as *const _,
                prod as *mut _,
                CUDA_R_32F,
                tn as i32,
                compute,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .map_err(|e| cublas_error(e, "running the knn product"))
    }
}

#[cfg(test)]
#[path = "gpu_tests.rs"]
mod tests;
