//! `knn`: exact nearest-neighbour search over an index declared with
//! `gpu_model <name> knn <index.npy> [...]`, served over KServe v2 (`gpu_process kserve;`).
//!
//! - `index.rs`: the index as loaded (rows, metric, precision, external ids);
//! - `cpu.rs`: the exact search on the CPU (fallback and the tests' reference);
//! - `gpu.rs` + `topk.cu`: the search on the device (one matrix product per tile of the
//!   index, a top-k selection within each tile, a merge of the tiles' candidates).
//!
//! Requests are decoded on the GPU thread into query rows; a batch is the rows of several
//! requests (at most `batch_rows`), searched with the batch's largest k and cut back per
//! request to its own k.

pub mod cpu;
pub mod gpu;
pub mod index;

use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

use self::index::{Index, Metric, Precision};
use super::model::{key_values, Model, Signature, TensorSpec};
use super::{Decoded, Item, Layout, Op, OpOnDevice, Output, Params, Placed, Target, Value};
use crate::engine::job::{Body, JobError};
use crate::gpu::{GpuError, Loader, Program};
use crate::http::kserve::decode;
use crate::http::kserve::encode::{Answer, Elements, Tensor};

/// The default `k=` of a model, and the default `batch_rows=`.
pub const DEFAULT_K: usize = 10;
pub const DEFAULT_BATCH_ROWS: usize = 256;
/// The most `batch_rows=` may be.
pub const MAX_BATCH_ROWS: usize = 65536;
/// The default `in_flight=`: searches of one model a worker's device runs at once.
pub const DEFAULT_IN_FLIGHT: usize = 2;
/// Output names, in the order they are sent when none are requested.
const OUTPUTS: [&str; 2] = ["IDS", "SCORES"];

/// A knn model: the index, and how it is served.
pub struct KnnModel {
    name: Arc<str>,
    pub index: Index,
    /// `k=`: the k of requests that do not give one.
    pub default_k: usize,
    /// `batch_rows=`: the most query rows in one batch (and in one request).
    pub batch_rows: usize,
    /// `in_flight=`: the most searches of this model in flight on a worker's device (each
    /// streams the whole index; requests that come meanwhile join the next one).
    pub in_flight: usize,
    /// The digest of the index's rows, taken once at configuration time (in the master):
    /// workers share one device copy per content (`gpu::shared`).
    pub digest: [u8; 32],
}

/// `gpu_model <name> knn <index.npy> [metric=] [precision=] [ids=] [k=] [batch_rows=]
/// [in_flight=]`.
pub fn load(name: &str, path: &str, params: &[&str]) -> Result<Arc<dyn Model>, String> {
    let kv = key_values(
        params,
        &["metric", "precision", "ids", "k", "batch_rows", "in_flight"],
    )?;
    let get = |key: &str| kv.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let metric = match get("metric") {
        None => Metric::Ip,
        Some(v) => Metric::parse(v)
            .ok_or_else(|| format!("metric \"{v}\" is not one of ip, cosine, l2"))?,
    };
    let precision = match get("precision") {
        None => None,
        Some(v) => Some(
            Precision::parse(v)
                .ok_or_else(|| format!("precision \"{v}\" is not one of fp32, tf32, fp16"))?,
        ),
    };
    let number = |key: &str, default: usize, max: usize| -> Result<usize, String> {
        match get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("{key}=\"{v}\" is not a number from 1 to {max}")),
        }
    };
    let default_k = number("k", DEFAULT_K, gpu::MAX_K)?;
    let batch_rows = number("batch_rows", DEFAULT_BATCH_ROWS, MAX_BATCH_ROWS)?;
    let in_flight = number("in_flight", DEFAULT_IN_FLIGHT, crate::gpu::SLOTS)?;
    // The ids path is taken as given, or relative to the index's directory.
    let ids = get("ids").map(|p| {
        if p.starts_with('/') {
            p.to_string()
        } else {
            let dir = std::path::Path::new(path)
                .parent()
                .unwrap_or(std::path::Path::new("/"));
            dir.join(p).to_string_lossy().into_owned()
        }
    });
    let index = Index::load(path, metric, precision, ids.as_deref())?;
    let digest = gpu::index_digest(&index.rows);
    Ok(Arc::new(KnnModel {
        name: Arc::from(name),
        index,
        default_k,
        batch_rows,
        in_flight,
        digest,
    }))
}

impl KnnModel {
    /// A model made in tests (no file).
    #[cfg(test)]
    pub fn for_tests(name: &str, index: Index, default_k: usize, batch_rows: usize) -> KnnModel {
        let digest = gpu::index_digest(&index.rows);
        KnnModel {
            name: Arc::from(name),
            index,
            default_k,
            batch_rows,
            in_flight: DEFAULT_IN_FLIGHT,
            digest,
        }
    }
}

impl Model for KnnModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "knn"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn signature(&self) -> Signature {
        Signature {
            platform: "ngx_gpu_knn",
            inputs: vec![TensorSpec {
                name: "QUERY",
                datatypes: &["FP32", "FP16"],
                shape: vec![-1, self.index.d as i64],
            }],
            outputs: vec![
                TensorSpec {
                    name: "IDS",
                    datatypes: &["INT64"],
                    shape: vec![-1, -1],
                },
                TensorSpec {
                    name: "SCORES",
                    datatypes: &["FP32"],
                    shape: vec![-1, -1],
                },
            ],
        }
    }

    fn serve(self: Arc<Self>) -> Option<Arc<dyn Op>> {
        Some(Arc::new(Knn { model: self }))
    }
}

/// A decoded knn request.
pub struct Request {
    /// `rows * d` query values (not normalized).
    pub queries: Vec<f32>,
    pub rows: usize,
    /// Hits per query (the request's k, at most the index's rows).
    pub k: usize,
    pub answer: Answer,
}

/// Reads a knn request from a KServe v2 infer body. `header_len`: the
/// `Inference-Header-Content-Length` value, if the request had one.
pub fn decode_request(
    model: &KnnModel,
    body: &[u8],
    header_len: Option<u64>,
) -> Result<Request, String> {
    let req = decode::decode(body, header_len)?;
    let d = model.index.d;
    let mut query = None;
    for input in &req.inputs {
        if input.name != "QUERY" {
            return Err(format!("unknown input \"{}\" (inputs: QUERY)", input.name));
        }
        query = Some(input);
    }
    let query = query.ok_or("the request has no input \"QUERY\"")?;
    if query.datatype != "FP32" && query.datatype != "FP16" {
        return Err(format!(
            "input \"QUERY\" has datatype {}: expected FP32 or FP16",
            query.datatype
        ));
    }
    let rows = match query.shape[..] {
        [n, dim] if n >= 1 && dim == d as u64 => n as usize,
        _ => {
            return Err(format!(
                "input \"QUERY\" has shape {:?}: expected [n, {d}] with n >= 1",
                query.shape
            ))
        }
    };
    if rows > model.batch_rows {
        return Err(format!(
            "input \"QUERY\" has {rows} rows: at most {} per request",
            model.batch_rows
        ));
    }
    let k = match req.parameters.get("k") {
        None => model.default_k,
        Some(v) => v
            .as_u64()
            .filter(|k| (1..=gpu::MAX_K as u64).contains(k))
            .ok_or_else(|| format!("parameter \"k\" is {v}: expected 1 to {}", gpu::MAX_K))?
            as usize,
    };
    let queries = query.to_f32()?;
    if let Some(at) = queries.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "input \"QUERY\" holds a NaN or infinite value in row {}",
            at / d
        ));
    }
    let answer = Answer::of(model.name.clone(), &req, &OUTPUTS)?;
    Ok(Request {
        queries,
        rows,
        k: cpu::hits_k(&model.index, k),
        answer,
    })
}

/// The knn op over one model.
pub struct Knn {
    model: Arc<KnnModel>,
}

impl Knn {
    fn request(decoded: Option<&Decoded>) -> &Request {
        decoded
            .and_then(|d| d.state.downcast_ref::<Request>())
            .expect("knn requests are decoded")
    }

    /// The answer from a request's hits (`result_bytes`' layout).
    fn encode(&self, req: &Request, result: &[u8]) -> Output {
        let n = req.rows * req.k;
        let (rows, scores) = result.split_at(8 * n);
        let ids: Vec<i64> = rows
            .chunks_exact(8)
            .map(|c| {
                self.model
                    .index
                    .id_of(i64::from_le_bytes(c.try_into().expect("8")))
            })
            .collect();
        let scores: Vec<f32> = scores
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        let shape = vec![req.rows as u64, req.k as u64];
        req.answer.encode(&[
            Tensor {
                name: "IDS",
                shape: shape.clone(),
                data: Elements::I64(ids),
            },
            Tensor {
                name: "SCORES",
                shape,
                data: Elements::F32(scores),
            },
        ])
    }
}

/// `params[0]`: the `Inference-Header-Content-Length`, or -1 where there was none.
fn header_len(params: &Params) -> Option<u64> {
    match params.0.first() {
        Some(Value::I64(n)) if *n >= 0 => Some(*n as u64),
        _ => None,
    }
}

/// One request's hits as result bytes: `rows * k` row numbers (i64), then their scores
/// (f32), cut from a batch searched with `batch_k >= k` hits per row.
pub fn result_bytes(rows: &[i64], scores: &[f32], batch_k: usize, k: usize) -> Vec<u8> {
    let n = rows.len() / batch_k;
    let mut out = Vec::with_capacity(n * k * 12);
    for r in 0..n {
        for &x in &rows[r * batch_k..r * batch_k + k] {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    for r in 0..n {
        for &x in &scores[r * batch_k..r * batch_k + k] {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Writes a batch's hits (`nq` queries, `hits.k` each) in the device search's output
/// layout: every row number (i64), then every score (f32). For the test device.
pub fn write_batch_hits(out: &mut [u8], hits: &index::Hits) {
    let n = hits.rows.len();
    let (rows, scores) = out[..n * 12].split_at_mut(n * 8);
    for (dst, v) in rows.chunks_exact_mut(8).zip(&hits.rows) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    for (dst, v) in scores.chunks_exact_mut(4).zip(&hits.scores) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
}

/// One request's result bytes (`result_bytes`' layout, `p.out_cap` hits per row) from a
/// batch's output of `nq` queries and `k` hits each in the device search's layout; the
/// request's rows start at row `p.out_off`, `p.len` of them. A row number outside the
/// index (`index_rows`) is the device's error.
pub fn cut_batch_hits(
    out: &[u8],
    nq: usize,
    k: usize,
    p: &Placed,
    index_rows: usize,
) -> Result<Vec<u8>, JobError> {
    let (r0, rows, want) = (p.out_off as usize, p.len as usize, p.out_cap as usize);
    let ids: Vec<i64> = out[r0 * k * 8..(r0 + rows) * k * 8]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
        .collect();
    let at = nq * k * 8;
    let scores: Vec<f32> = out[at + r0 * k * 4..at + (r0 + rows) * k * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    if ids.iter().any(|&r| r < 0 || r as usize >= index_rows) {
        return Err(JobError::Internal(
            "the device search returned a row number out of range".into(),
        ));
    }
    Ok(result_bytes(&ids, &scores, k, want))
}

impl Op for Knn {
    fn name(&self) -> &str {
        &self.model.name
    }

    /// An index of 4M values or more (16 MiB of float32: milliseconds a query on a core)
    /// waits for the device; a small one is served on the CPU meanwhile.
    fn cpu_while_opening(&self) -> bool {
        self.model.index.rows.len() < 1 << 22
    }

    fn programs(&self) -> Vec<Arc<Program>> {
        vec![gpu::program(), gpu::fused_program()]
    }

    /// Query rows in the staged input, hits (12 bytes each) in the output.
    fn worst_case(&self, _n: usize, _bytes: usize) -> (usize, usize) {
        let rows = self.model.batch_rows;
        let k = gpu::MAX_K.min(self.model.index.n);
        (rows * self.model.index.d * 4, rows * k * 12)
    }

    fn decode(&self, body: &Body, params: &Params) -> Result<Option<Decoded>, JobError> {
        let header_len = header_len(params);
        let bytes = body
            .to_vec()
            .map_err(|e| JobError::Internal(format!("reading the request body: {e}")))?;
        let req = decode_request(&self.model, &bytes, header_len).map_err(JobError::BadInput)?;
        Ok(Some(Decoded {
            rows: req.rows,
            state: Box::new(req),
        }))
    }

    fn max_rows(&self) -> usize {
        self.model.batch_rows
    }

    /// A request not decoded yet (one answered after a panic of the GPU thread) is decoded
    /// here from its body.
    fn run_cpu(
        &self,
        body: Vec<u8>,
        params: &Params,
        decoded: Option<&Decoded>,
    ) -> Result<Output, JobError> {
        let fresh;
        let req = match decoded {
            Some(d) => Self::request(Some(d)),
            None => {
                fresh = decode_request(&self.model, &body, header_len(params))
                    .map_err(JobError::BadInput)?;
                &fresh
            }
        };
        let hits = cpu::search(&self.model.index, &req.queries, req.k);
        Ok(self.encode(req, &result_bytes(&hits.rows, &hits.scores, hits.k, req.k)))
    }

    fn finish(&self, result: &[u8], decoded: Option<&Decoded>) -> Output {
        self.encode(Self::request(decoded), result)
    }

    fn load(&self, loader: &mut Loader) -> Result<Option<Box<dyn OpOnDevice>>, GpuError> {
        let device = match loader {
            Loader::Host => None,
            // Unavailable (no cuBLAS): the thread says so, and the CPU path serves.
            Loader::Device(d) => Some(gpu::DeviceIndex::load(
                d,
                &self.model.index,
                Some((&self.model.name, &self.model.digest)),
            )?),
        };
        Ok(Some(Box::new(OnDevice {
            model: self.model.clone(),
            device,
        })))
    }
}

/// The knn op on a worker's device (or the test device: `device` is `None`).
struct OnDevice {
    model: Arc<KnnModel>,
    device: Option<gpu::DeviceIndex>,
}

/// A batch's layout: item `i`'s queries at `data_off` (`len` = its rows), its hits from
/// row `out_off` of the batch (`out_cap` = its k); `desc_len` is unused, the batch's k is
/// the largest item's.
fn batch_k(layout: &Layout) -> usize {
    layout
        .items
        .iter()
        .map(|p| p.out_cap as usize)
        .max()
        .unwrap_or(1)
}

fn batch_rows(layout: &Layout) -> usize {
    layout.items.iter().map(|p| p.len as usize).sum()
}

/// The queries the batch is searched as: its rows, and on a device the padding after them.
fn searched_rows(layout: &Layout, d: usize) -> usize {
    layout.data_len / (d * 4)
}

impl OpOnDevice for OnDevice {
    fn max_in_flight(&self) -> usize {
        self.model.in_flight
    }

    fn layout(&self, items: &[Item]) -> Layout {
        let d = self.model.index.d;
        let mut l = Layout::default();
        let mut row = 0usize;
        for it in items {
            let req = Knn::request(it.decoded);
            l.items.push(Placed {
                data_off: (row * d * 4) as u64,
                len: req.rows as u64,
                out_off: row as u64,
                out_cap: req.k as u64,
            });
            row += req.rows;
        }
        let k = batch_k(&l);
        // On a device the batch is searched as `graph_rows` queries (zeros past the real
        // ones) so that its search replays a captured graph; the host searches the rows.
        let rows = match &self.device {
            Some(_) => gpu::graph_rows(row),
            None => row,
        };
        l.data_len = rows * d * 4;
        l.out_len = rows * k * 12;
        if let Some(dev) = &self.device {
            l.scratch = vec![dev.scratch_bytes(rows, k)];
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
        for (it, p) in items.iter().zip(&layout.items) {
            let req = Knn::request(it.decoded);
            let at = p.data_off as usize;
            for (dst, v) in data[at..at + req.queries.len() * 4]
                .chunks_exact_mut(4)
                .zip(&req.queries)
            {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
        // The padding queries (see `layout`): zeros, whatever the staging held before.
        let used = batch_rows(layout) * self.model.index.d * 4;
        data[used..layout.data_len].fill(0);
        Vec::new()
    }

    fn launch(&self, layout: &Layout, target: Target) -> Result<(), GpuError> {
        let (nq, k) = (searched_rows(layout, self.model.index.d), batch_k(layout));
        match target {
            Target::Device(l) => {
                let dev = self.device.as_ref().expect("loaded on a device");
                let scratch = l.scratch.first().copied().unwrap_or(0);
                dev.search(
                    l.stream,
                    gpu::SearchArgs {
                        queries: l.data,
                        nq,
                        k,
                        scratch,
                        rows_out: l.out,
                        scores_out: l.out + (nq * k * 8) as u64,
                    },
                )
            }
            Target::Host { data, out, .. } => {
                let queries: Vec<f32> = data[..layout.data_len]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                    .collect();
                write_batch_hits(out, &cpu::search(&self.model.index, &queries, k));
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
        let (nq, k) = (searched_rows(layout, self.model.index.d), batch_k(layout));
        cut_batch_hits(out, nq, k, &layout.items[i], self.model.index.n).map(Cow::Owned)
    }
}

#[cfg(test)]
mod tests;
