//! The encoder's weights from `model.safetensors` (float32, float16 or bfloat16), checked
//! against `config.json`'s shapes and held as float32 (the CPU path's precision; the
//! device takes its copy from here). Query, key and value are fused into one matrix.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::files::Arch;

/// `y = x W^T + b`, `W` row-major `[out, inp]` as PyTorch keeps it.
pub struct Linear {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub out: usize,
    pub inp: usize,
}

/// A layer norm's scale and shift.
pub struct Norm {
    pub g: Vec<f32>,
    pub b: Vec<f32>,
}

pub struct Layer {
    /// Query, key and value in one: `[3 * hidden, hidden]`, in that order.
    pub qkv: Linear,
    pub attn_out: Linear,
    pub attn_norm: Norm,
    pub ffn_in: Linear,
    pub ffn_out: Linear,
    pub ffn_norm: Norm,
}

pub struct Weights {
    /// `[vocab, hidden]`, `[max_positions, hidden]`, `[type_vocab, hidden]`.
    pub word: Vec<f32>,
    pub position: Vec<f32>,
    pub token_type: Vec<f32>,
    pub emb_norm: Norm,
    pub layers: Vec<Layer>,
}

impl Weights {
    /// Parameters in all.
    pub fn count(&self) -> usize {
        let lin = |l: &Linear| l.w.len() + l.b.len();
        let norm = |n: &Norm| n.g.len() + n.b.len();
        self.word.len()
            + self.position.len()
            + self.token_type.len()
            + norm(&self.emb_norm)
            + self
                .layers
                .iter()
                .map(|l| {
                    lin(&l.qkv)
                        + lin(&l.attn_out)
                        + norm(&l.attn_norm)
                        + lin(&l.ffn_in)
                        + lin(&l.ffn_out)
                        + norm(&l.ffn_norm)
                })
                .sum::<usize>()
    }
}

struct Reader<'a> {
    st: SafeTensors<'a>,
    prefix: &'static str,
    path: String,
}

impl Reader<'_> {
    /// Tensor `name` as float32, with exactly `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .st
            .tensor(&full)
            .map_err(|_| format!("{}: tensor \"{full}\" is missing", self.path))?;
        if t.shape() != shape {
            return Err(format!(
                "{}: tensor \"{full}\" has shape {:?}, config.json makes it {:?}",
                self.path,
                t.shape(),
                shape
            ));
        }
        let d = t.data();
        let v: Vec<f32> = match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(format!(
                    "{}: tensor \"{full}\" is {other:?} (F32, F16 and BF16 load)",
                    self.path
                ))
            }
        };
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(format!(
                "{}: tensor \"{full}\" holds a value that is not finite (element {i})",
                self.path
            ));
        }
        Ok(v)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear, String> {
        Ok(Linear {
            w: self.get(&format!("{name}.weight"), &[out, inp])?,
            b: self.get(&format!("{name}.bias"), &[out])?,
            out,
            inp,
        })
    }

    fn norm(&self, name: &str, n: usize) -> Result<Norm, String> {
        Ok(Norm {
            g: self.get(&format!("{name}.weight"), &[n])?,
            b: self.get(&format!("{name}.bias"), &[n])?,
        })
    }
}

/// Reads `<dir>/model.safetensors` for an encoder shaped as `arch`.
pub fn load(dir: &Path, arch: &Arch) -> Result<Weights, String> {
    let path = dir.join("model.safetensors");
    let p = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|e| format!("{p}: {e}"))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{p}: not a safetensors file: {e}"))?;
    // save_pretrained of a task model nests the encoder under its family's name.
    let prefix = ["", "bert.", "roberta.", "model."]
        .into_iter()
        .find(|pre| {
            st.tensor(&format!("{pre}embeddings.word_embeddings.weight"))
                .is_ok()
        })
        .ok_or_else(|| format!("{p}: tensor \"embeddings.word_embeddings.weight\" is missing"))?;
    let r = Reader {
        st,
        prefix,
        path: p,
    };
    let (h, i) = (arch.hidden, arch.intermediate);
    let mut layers = Vec::with_capacity(arch.layers);
    for l in 0..arch.layers {
        let at = |s: &str| format!("encoder.layer.{l}.{s}");
        let q = r.linear(&at("attention.self.query"), h, h)?;
        let k = r.linear(&at("attention.self.key"), h, h)?;
        let v = r.linear(&at("attention.self.value"), h, h)?;
        let qkv = Linear {
            w: [q.w, k.w, v.w].concat(),
            b: [q.b, k.b, v.b].concat(),
            out: 3 * h,
            inp: h,
        };
        layers.push(Layer {
            qkv,
            attn_out: r.linear(&at("attention.output.dense"), h, h)?,
            attn_norm: r.norm(&at("attention.output.LayerNorm"), h)?,
            ffn_in: r.linear(&at("intermediate.dense"), i, h)?,
            ffn_out: r.linear(&at("output.dense"), h, i)?,
            ffn_norm: r.norm(&at("output.LayerNorm"), h)?,
        });
    }
    let extra = format!("encoder.layer.{}.attention.self.query.weight", arch.layers);
    if r.st.tensor(&format!("{prefix}{extra}")).is_ok() {
        return Err(format!(
            "{}: holds more layers than num_hidden_layers {} in config.json",
            r.path, arch.layers
        ));
    }
    Ok(Weights {
        word: r.get("embeddings.word_embeddings.weight", &[arch.vocab, h])?,
        position: r.get(
            "embeddings.position_embeddings.weight",
            &[arch.max_positions, h],
        )?,
        token_type: r.get(
            "embeddings.token_type_embeddings.weight",
            &[arch.type_vocab, h],
        )?,
        emb_norm: r.norm("embeddings.LayerNorm", h)?,
        layers,
    })
}
