//! `embed`: sentence embeddings from BERT-family encoders, declared with
//! `gpu_model <name> embed <dir> [precision=fp16|bf16|fp32] [pooling=mean|cls]
//! [normalize=on|off] [max_tokens=<n>]` over the directory sentence-transformers writes.
//!
//! - `files.rs`: `config.json` and sentence-transformers' files (architecture, pooling);
//! - `tokenizer.rs`: texts to token ids (`tokenizer.json`);
//! - `weights.rs`: `model.safetensors`, checked against the architecture;
//! - `cpu.rs`: the forward pass in float32 on the CPU (fallback and reference);
//! - `gpu.rs` + `embed.cu`: the forward pass on the device (cuBLAS GEMMs, NVRTC kernels);
//! - `op.rs`: the ops that serve it (`gpu_process embeddings`, KServe), batched by tokens;
//! - `host_tokens.rs`: their (and `search`'s) staged tokens on the test device;
//! - `openai.rs`: the OpenAI embeddings API's request, answer and error JSON.

pub mod cpu;
pub mod files;
pub mod gpu;
#[cfg(test)]
mod gpu_tests;
pub mod host_tokens;
pub mod op;
#[cfg(test)]
mod op_tests;
pub mod openai;
#[cfg(test)]
mod tests;
pub mod tokenizer;
pub mod weights;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use files::{Activation, Arch, Family, Pooling};
pub use gpu::{program, DeviceEncoder, Plan};
pub use tokenizer::Encoded;

use super::model::{key_values, Model, Signature, TensorSpec};
use super::Op;

/// What the device computes in: the GEMMs' inputs (weights and activations), with float32
/// accumulation and float32 layer norms, softmax and pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

/// A loaded encoder: shared read-only by every worker (loaded once, in the master).
pub struct EmbedModel {
    name: String,
    pub dir: PathBuf,
    pub arch: Arch,
    pub precision: Precision,
    pub pooling: Pooling,
    pub normalize: bool,
    /// The most tokens of a text, special tokens included; longer texts are truncated.
    pub max_tokens: usize,
    texts: tokenizer::Texts,
    pub weights: weights::Weights,
}

impl Model for EmbedModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "embed"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Texts in (`TEXT`, BYTES), one embedding each out (`EMBEDDING`, FP32 [n, dim]).
    fn signature(&self) -> Signature {
        Signature {
            platform: "ngx_gpu_embed",
            inputs: vec![TensorSpec {
                name: "TEXT",
                datatypes: &["BYTES"],
                shape: vec![-1],
            }],
            outputs: vec![TensorSpec {
                name: "EMBEDDING",
                datatypes: &["FP32"],
                shape: vec![-1, self.dim() as i64],
            }],
        }
    }

    /// The embed op over KServe (`op.rs`): TEXT in, EMBEDDING out.
    fn serve(self: Arc<Self>) -> Option<Arc<dyn Op>> {
        Some(Arc::new(op::serving(self)))
    }
}

/// `MODEL_KINDS`' loader for `embed`.
pub fn load(name: &str, path: &str, params: &[&str]) -> Result<Arc<dyn Model>, String> {
    Ok(Arc::new(EmbedModel::load(name, Path::new(path), params)?))
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{key}=\"{v}\" must be \"on\" or \"off\"")),
    }
}

impl EmbedModel {
    /// Loads and checks a model directory; `params` are `gpu_model`'s `key=value`s.
    pub fn load(name: &str, dir: &Path, params: &[&str]) -> Result<EmbedModel, String> {
        let kv = key_values(params, &["precision", "pooling", "normalize", "max_tokens"])?;
        let mut precision = Precision::Fp16;
        let (mut pooling, mut normalize, mut max_tokens) = (None, None, None);
        for (k, v) in kv {
            match k {
                "precision" => {
                    precision = match v {
                        "fp16" => Precision::Fp16,
                        "bf16" => Precision::Bf16,
                        "fp32" => Precision::Fp32,
                        _ => return Err(format!("precision=\"{v}\" must be fp16, bf16 or fp32")),
                    }
                }
                "pooling" => {
                    pooling = Some(match v {
                        "mean" => Pooling::Mean,
                        "cls" => Pooling::Cls,
                        _ => return Err(format!("pooling=\"{v}\" must be mean or cls")),
                    })
                }
                "normalize" => normalize = Some(on_off(k, v)?),
                _ => {
                    max_tokens =
                        Some(v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                            format!("max_tokens=\"{v}\" is not a positive number")
                        })?)
                }
            }
        }
        if !dir.is_dir() {
            return Err(format!("{}: not a directory", dir.display()));
        }
        let arch = files::arch(dir)?;
        let pipeline = files::pipeline(dir)?;
        let limit = arch.max_tokens();
        let max_tokens = match max_tokens {
            Some(n) if n > limit => {
                return Err(format!(
                    "max_tokens={n} is more than the model's {limit} positions \
                     ({}: max_position_embeddings {}{})",
                    dir.join("config.json").display(),
                    arch.max_positions,
                    if arch.position_offset > 0 {
                        format!(", offset {}", arch.position_offset)
                    } else {
                        String::new()
                    }
                ))
            }
            Some(n) => n,
            // sentence-transformers truncates at max_seq_length where it says one.
            None => pipeline.max_seq_length.unwrap_or(limit).min(limit),
        };
        let texts = tokenizer::Texts::load(dir, max_tokens, arch.vocab)?;
        let weights = weights::load(dir, &arch)?;
        Ok(EmbedModel {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            precision,
            pooling: pooling.or(pipeline.pooling).unwrap_or(Pooling::Mean),
            normalize: normalize.or(pipeline.normalize).unwrap_or(true),
            max_tokens,
            texts,
            weights,
            arch,
        })
    }

    /// One text's tokens, with the special tokens, truncated at `max_tokens`.
    pub fn tokenize(&self, text: &str) -> Result<Encoded, String> {
        self.texts.encode(text)
    }

    /// The embeddings' dimension.
    pub fn dim(&self) -> usize {
        self.arch.hidden
    }

    /// The embeddings of a batch of texts, pooled (and normalized where configured), on the
    /// CPU in float32.
    pub fn cpu_embed(&self, batch: &[&Encoded]) -> Vec<Vec<f32>> {
        batch.iter().map(|e| cpu::embed(self, e)).collect()
    }
}
