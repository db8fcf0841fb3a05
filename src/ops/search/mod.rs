//! `search`: semantic search in one request, `gpu_process search <embed-model> <knn-model>
//! [k=<n>];`: texts in, each text's nearest rows of the index out.
//!
//! Requests are decoded and tokenized on the GPU thread (`request.rs`); a batch is the texts
//! of several requests (at most the knn model's `batch_rows`). On the device the encoder
//! writes the batch's embeddings into scratch and the search reads them from there, both
//! queued on the slot's stream: nothing comes back to the host between the two. The batch is
//! searched with its largest k and cut back per request to its own k. The CPU path embeds
//! with `EmbedModel::cpu_embed` and searches with `knn::cpu::search`.

pub mod request;

#[cfg(test)]
mod gpu_tests;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};

use super::embed::{self, DeviceEncoder, EmbedModel, Encoded};
use super::knn::{self, gpu::DeviceIndex, KnnModel};
use super::model::{key_values, Model};
use super::{Declared, Decoded, Item, Layout, Op, OpOnDevice, Output, Params, Placed, Target};
use crate::engine::job::{Body, JobError};
use crate::gpu::{GpuError, Loader, Program};

/// `gpu_process search <embed> <knn> [k=<n>]`.
pub fn parse(args: &[&str]) -> Result<super::Configured, String> {
    let (embed, knn, rest) = match args {
        [e, k, rest @ ..] => (*e, *k, rest),
        _ => {
            return Err("op \"search\" needs an embed model and a knn model: \
                 gpu_process search <embed-model> <knn-model> [k=<n>]"
                .into())
        }
    };
    let kv = key_values(rest, &["k"])?;
    let k = match kv.first() {
        None => None,
        Some((_, v)) => Some(
            v.parse::<usize>()
                .ok()
                .filter(|k| (1..=knn::gpu::MAX_K).contains(k))
                .ok_or_else(|| {
                    format!("k=\"{v}\" is not a number from 1 to {}", knn::gpu::MAX_K)
                })?,
        ),
    };
    super::Configured::plain(Search {
        name: format!("search {embed} {knn}"),
        embed_name: embed.to_string(),
        knn_name: knn.to_string(),
        k,
        models: OnceLock::new(),
    })
}

/// The two models a search location names, once resolved.
#[derive(Clone)]
struct Models {
    embed: Arc<dyn Model>,
    knn: Arc<dyn Model>,
}

impl Models {
    fn embed(&self) -> &EmbedModel {
        self.embed
            .as_any()
            .downcast_ref()
            .expect("checked at resolve")
    }

    fn knn(&self) -> &KnnModel {
        self.knn
            .as_any()
            .downcast_ref()
            .expect("checked at resolve")
    }
}

/// The search op of one location.
pub struct Search {
    name: String,
    embed_name: String,
    knn_name: String,
    /// `k=`: the k of requests that give none (else the knn model's).
    k: Option<usize>,
    models: OnceLock<Models>,
}

/// A decoded request: its texts' tokens, its k (at most the index's rows), its tokens in all.
pub struct Request {
    pub texts: Vec<Encoded>,
    pub k: usize,
    pub tokens: usize,
}

impl Search {
    fn models(&self) -> &Models {
        self.models.get().expect("resolved at configuration")
    }

    fn request(decoded: Option<&Decoded>) -> &Request {
        decoded
            .and_then(|d| d.state.downcast_ref::<Request>())
            .expect("search requests are decoded")
    }

    /// Parses and tokenizes a body.
    fn decode_body(&self, body: &[u8]) -> Result<Request, JobError> {
        let m = self.models();
        let (embed, knn) = (m.embed(), m.knn());
        let asked = request::parse(body, knn.batch_rows, knn::gpu::MAX_K)?;
        let mut texts = Vec::with_capacity(asked.texts.len());
        for (i, t) in asked.texts.iter().enumerate() {
            texts.push(
                embed
                    .tokenize(t)
                    .map_err(|e| JobError::BadInput(format!("\"input\"[{i}]: {e}")))?,
            );
        }
        let tokens = texts.iter().map(|e| e.ids.len()).sum();
        let k = asked.k.or(self.k).unwrap_or(knn.default_k);
        Ok(Request {
            texts,
            k: knn::cpu::hits_k(&knn.index, k),
            tokens,
        })
    }

    /// The answer from a request's result bytes (`knn::result_bytes`' layout).
    fn encode(&self, req: &Request, result: &[u8]) -> Output {
        let m = self.models();
        let n = req.texts.len() * req.k;
        let (rows, scores) = result.split_at(8 * n);
        let ids: Vec<i64> = rows
            .chunks_exact(8)
            .map(|c| {
                m.knn()
                    .index
                    .id_of(i64::from_le_bytes(c.try_into().expect("8")))
            })
            .collect();
        let scores: Vec<f32> = scores
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        Output::new(
            Arc::from("application/json"),
            request::answer(m.embed.name(), req.k, &ids, &scores, req.tokens),
        )
    }
}

/// Finds model `name` of `kind` among the declared ones.
fn find(declared: &Declared, name: &str, kind: &str) -> Result<Arc<dyn Model>, String> {
    match declared.models.iter().find(|m| m.name() == name) {
        Some(m) if m.kind() == kind => Ok(m.clone()),
        Some(m) => Err(format!(
            "model \"{name}\" is a {} model, not {kind}",
            m.kind()
        )),
        None => {
            let known: Vec<&str> = declared.models.iter().map(|m| m.name()).collect();
            Err(format!(
                "no model \"{name}\" (declare it with gpu_model {name} {kind} ... in the http \
                 block{})",
                if known.is_empty() {
                    String::new()
                } else {
                    format!("; declared: {}", known.join(", "))
                }
            ))
        }
    }
}

/// Embeds and searches texts on the CPU: row numbers and scores, `k` per text.
fn cpu_search(m: &Models, texts: &[&Encoded], k: usize) -> knn::index::Hits {
    let embeddings = m.embed().cpu_embed(texts);
    let flat: Vec<f32> = embeddings.into_iter().flatten().collect();
    knn::cpu::search(&m.knn().index, &flat, k)
}

impl Op for Search {
    fn name(&self) -> &str {
        &self.name
    }

    /// It embeds on the CPU path too (tens of milliseconds a text): wait for the device.
    fn cpu_while_opening(&self) -> bool {
        false
    }

    /// Errors in OpenAI's shape, as the embeddings op answers them (the same clients).
    fn error_body(&self, status: u16, message: &str) -> Option<Vec<u8>> {
        Some(super::embed::openai::error(status, message))
    }

    fn post_only(&self) -> bool {
        true
    }

    /// Both models declared, of the right kinds, the embeddings as wide as the index rows.
    fn resolve(&self, declared: &Declared) -> Result<(), String> {
        let both = format!(
            "search with embed model \"{}\" and knn model \"{}\"",
            self.embed_name, self.knn_name
        );
        let embed =
            find(declared, &self.embed_name, "embed").map_err(|e| format!("{both}: {e}"))?;
        let knn = find(declared, &self.knn_name, "knn").map_err(|e| format!("{both}: {e}"))?;
        let models = Models { embed, knn };
        let (dim, d) = (models.embed().dim(), models.knn().index.d);
        if dim != d {
            return Err(format!(
                "{both}: the embed model gives {dim} dimensions, the knn index has {d}"
            ));
        }
        let _ = self.models.set(models);
        Ok(())
    }

    fn programs(&self) -> Vec<Arc<Program>> {
        vec![
            embed::program(),
            knn::gpu::program(),
            knn::gpu::fused_program(),
        ]
    }

    /// Token ids, types and positions (12 bytes a token) and two u32 per text in the staged
    /// input (the test device's own layout is smaller); hits (12 bytes each) in the output.
    fn worst_case(&self, _n: usize, _bytes: usize) -> (usize, usize) {
        let Some(m) = self.models.get() else {
            return (0, 0);
        };
        let rows = m.knn().batch_rows;
        let tokens = rows * m.embed().max_tokens;
        let k = knn::gpu::MAX_K.min(m.knn().index.n);
        (
            embed::gpu::padded_rows(tokens) * 12 + rows * 8 + 5 * 256,
            rows * k * 12,
        )
    }

    fn decode(&self, body: &Body, _params: &Params) -> Result<Option<Decoded>, JobError> {
        let bytes = body
            .to_vec()
            .map_err(|e| JobError::Internal(format!("reading the request body: {e}")))?;
        let req = self.decode_body(&bytes)?;
        Ok(Some(Decoded {
            rows: req.texts.len(),
            state: Box::new(req),
        }))
    }

    fn max_rows(&self) -> usize {
        self.models().knn().batch_rows
    }

    /// A request not decoded yet (one answered after a panic of the GPU thread) is decoded
    /// here from its body.
    fn run_cpu(
        &self,
        body: Vec<u8>,
        _params: &Params,
        decoded: Option<&Decoded>,
    ) -> Result<Output, JobError> {
        let fresh;
        let req = match decoded {
            Some(d) => Self::request(Some(d)),
            None => {
                fresh = self.decode_body(&body)?;
                &fresh
            }
        };
        let texts: Vec<&Encoded> = req.texts.iter().collect();
        let hits = cpu_search(self.models(), &texts, req.k);
        Ok(self.encode(
            req,
            &knn::result_bytes(&hits.rows, &hits.scores, hits.k, req.k),
        ))
    }

    fn finish(&self, result: &[u8], decoded: Option<&Decoded>) -> Output {
        self.encode(Self::request(decoded), result)
    }

    fn load(&self, loader: &mut Loader) -> Result<Option<Box<dyn OpOnDevice>>, GpuError> {
        let models = self.models().clone();
        let device = match loader {
            Loader::Host => None,
            Loader::Device(d) => {
                // Unavailable (no cuBLAS): the thread says so, and the CPU path serves.
                let encoder = DeviceEncoder::load(d, models.embed())?;
                let knn = models.knn();
                // The same index as the knn model's own op: one copy per GPU for both.
                let share = Some((crate::ops::model::Model::name(knn), &knn.digest));
                let index = DeviceIndex::load(d, &knn.index, share)?;
                Some(OnDev { encoder, index })
            }
        };
        Ok(Some(Box::new(OnDevice {
            models,
            device,
            plan: Mutex::new(None),
        })))
    }
}

/// The encoder and the index on a worker's device.
struct OnDev {
    encoder: DeviceEncoder,
    index: DeviceIndex,
}

/// The search op on a worker's device (or the test device: `device` is `None`).
///
/// A batch's layout: item `i` holds `len` texts from text `out_off` of the batch (its hits
/// from row `out_off` of the output, `out_cap` = its k); the batch's k is the largest
/// item's. On the device the staged data is the encoder's packed input (`embed::Plan`); on
/// the test device it is each text as its token count, ids and type ids (u32 each), with
/// the item's first text at `data_off`.
struct OnDevice {
    models: Models,
    device: Option<OnDev>,
    /// The encoder's plan of the batch `layout` made, for `pack` and `launch`: the engine
    /// runs the three back to back for one batch on the GPU thread (engine/thread.rs).
    plan: Mutex<Option<embed::Plan>>,
}

fn batch_k(layout: &Layout) -> usize {
    layout
        .items
        .iter()
        .map(|p| p.out_cap as usize)
        .max()
        .unwrap_or(1)
}

fn batch_texts(layout: &Layout) -> usize {
    layout.items.iter().map(|p| p.len as usize).sum()
}

fn texts_of<'a>(items: &'a [Item]) -> Vec<&'a Encoded> {
    items
        .iter()
        .flat_map(|it| Search::request(it.decoded).texts.iter())
        .collect()
}

impl OnDevice {
    fn plan(&self) -> std::sync::MutexGuard<'_, Option<embed::Plan>> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl OpOnDevice for OnDevice {
    fn layout(&self, items: &[Item]) -> Layout {
        let mut l = Layout::default();
        let (mut row, mut at) = (0usize, 0usize);
        let max = self.models.embed().max_tokens;
        for it in items {
            let req = Search::request(it.decoded);
            l.items.push(Placed {
                data_off: at as u64,
                len: req.texts.len() as u64,
                out_off: row as u64,
                out_cap: req.k as u64,
            });
            row += req.texts.len();
            let texts: Vec<&Encoded> = req.texts.iter().collect();
            at += embed::host_tokens::bytes(&texts, max);
        }
        let k = batch_k(&l);
        l.out_len = row * k * 12;
        match &self.device {
            Some(dev) => {
                let plan = dev.encoder.plan(&texts_of(items));
                l.data_len = plan.input_bytes;
                l.scratch = vec![
                    plan.scratch_bytes,
                    plan.out_bytes,
                    dev.index.scratch_bytes(row, k),
                ];
                *self.plan() = Some(plan);
            }
            None => l.data_len = at,
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
        match &self.device {
            Some(dev) => {
                if let Some(plan) = self.plan().as_ref() {
                    dev.encoder
                        .pack(plan, &texts_of(items), &mut data[..layout.data_len]);
                }
            }
            None => {
                embed::host_tokens::pack(&texts_of(items), self.models.embed().max_tokens, data)
            }
        }
        Vec::new()
    }

    fn launch(&self, layout: &Layout, target: Target) -> Result<(), GpuError> {
        let (n, k) = (batch_texts(layout), batch_k(layout));
        match target {
            Target::Device(l) => {
                let dev = self.device.as_ref().expect("loaded on a device");
                let plan = self.plan().take().filter(|p| p.n == n);
                let Some(plan) = plan else {
                    return Err(GpuError::BadLaunch(
                        "a search batch launched without its layout's plan".into(),
                    ));
                };
                let [embed_scratch, embeddings, search_scratch] = l.scratch[..] else {
                    return Err(GpuError::BadLaunch(
                        "a search batch without its three scratch buffers".into(),
                    ));
                };
                dev.encoder
                    .embed(l.stream, &plan, l.data, embed_scratch, embeddings)?;
                dev.index.search(
                    l.stream,
                    knn::gpu::SearchArgs {
                        queries: embeddings,
                        nq: n,
                        k,
                        scratch: search_scratch,
                        rows_out: l.out,
                        scores_out: l.out + (n * k * 8) as u64,
                    },
                )
            }
            Target::Host { data, out, .. } => {
                let texts = embed::host_tokens::unpack(data, n);
                let hits = cpu_search(&self.models, &texts.iter().collect::<Vec<_>>(), k);
                knn::write_batch_hits(out, &hits);
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
        let (n, k) = (batch_texts(layout), batch_k(layout));
        let index_rows = self.models.knn().index.n;
        knn::cut_batch_hits(out, n, k, &layout.items[i], index_rows).map(Cow::Owned)
    }
}
