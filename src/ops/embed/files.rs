//! The model directory's JSON files: `config.json` (the architecture), and what
//! sentence-transformers adds (`modules.json`, the pooling folder's `config.json`,
//! `sentence_bert_config.json`), checked and turned into the encoder's configuration.

use std::path::Path;

use serde_json::Value;

/// The encoder families that load. They share BERT's layout and differ in positions and
/// token types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// BERT and what keeps its layout (BGE, E5, MiniLM): positions from 0, token types.
    Bert,
    /// RoBERTa and XLM-RoBERTa: positions start after `pad_token_id` (offset
    /// `pad_token_id + 1`), a single token type.
    Roberta,
}

/// The feed-forward activation (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact GELU, `x * Phi(x)` with erf.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

/// How a text's token vectors become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the text's tokens (special tokens included, padding not).
    Mean,
    /// The first token's vector (`[CLS]`, `<s>`).
    Cls,
}

/// The encoder's shape, from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Arch {
    pub family: Family,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
    pub act: Activation,
    /// Where positions start (0 for BERT, `pad_token_id + 1` for RoBERTa).
    pub position_offset: usize,
}

impl Arch {
    /// The most tokens a text can have, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_positions - self.position_offset
    }
}

/// What sentence-transformers' files say: pooling, normalization and the length
/// sentence-transformers truncates at. `None` where the files are absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pipeline {
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    pub max_seq_length: Option<usize>,
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))
}

/// A positive integer field.
fn count(v: &Value, key: &str, path: &Path) -> Result<usize, String> {
    match v.get(key) {
        Some(n) => n
            .as_u64()
            .filter(|&n| n > 0 && n <= 1 << 31)
            .map(|n| n as usize)
            .ok_or_else(|| {
                format!(
                    "{}: \"{key}\" is {n}, not a positive integer",
                    path.display()
                )
            }),
        None => Err(format!("{}: \"{key}\" is missing", path.display())),
    }
}

/// Reads and checks `<dir>/config.json`.
pub fn arch(dir: &Path) -> Result<Arch, String> {
    let path = dir.join("config.json");
    let v = read_json(&path)?;
    let p = path.display();
    let kind = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let family = match kind {
        "bert" => Family::Bert,
        "roberta" | "xlm-roberta" | "camembert" => Family::Roberta,
        "" => return Err(format!("{p}: \"model_type\" is missing")),
        other => {
            return Err(format!(
                "{p}: model_type \"{other}\" is not supported (bert, roberta, xlm-roberta, \
                 camembert load)"
            ))
        }
    };
    match v.get("position_embedding_type").and_then(Value::as_str) {
        None | Some("absolute") => {}
        Some(other) => {
            return Err(format!(
                "{p}: position_embedding_type \"{other}\" is not supported (only absolute)"
            ))
        }
    }
    let act = match v.get("hidden_act").and_then(Value::as_str) {
        Some("gelu") => Activation::Gelu,
        Some("gelu_new") | Some("gelu_pytorch_tanh") => Activation::GeluTanh,
        Some("relu") => Activation::Relu,
        Some(other) => {
            return Err(format!(
                "{p}: hidden_act \"{other}\" is not supported (gelu, gelu_new, \
                 gelu_pytorch_tanh, relu)"
            ))
        }
        None => return Err(format!("{p}: \"hidden_act\" is missing")),
    };
    let eps = match v.get("layer_norm_eps") {
        None => 1e-12,
        Some(e) => match e.as_f64() {
            Some(e) if e > 0.0 && e < 1.0 => e as f32,
            _ => return Err(format!("{p}: \"layer_norm_eps\" is {e}, not in (0, 1)")),
        },
    };
    let hidden = count(&v, "hidden_size", &path)?;
    let heads = count(&v, "num_attention_heads", &path)?;
    if hidden % heads != 0 {
        return Err(format!(
            "{p}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        ));
    }
    if hidden / heads > 64 || hidden > 8192 {
        return Err(format!(
            "{p}: hidden_size {hidden} in heads of {} is not supported (at most 8192, in \
             heads of at most 64)",
            hidden / heads
        ));
    }
    let max_positions = count(&v, "max_position_embeddings", &path)?;
    let position_offset = match family {
        Family::Bert => 0,
        Family::Roberta => match v.get("pad_token_id").and_then(Value::as_u64) {
            Some(pad) => pad as usize + 1,
            None => return Err(format!("{p}: \"pad_token_id\" is missing")),
        },
    };
    if position_offset + 2 > max_positions {
        return Err(format!(
            "{p}: max_position_embeddings {max_positions} leaves no room for a text after the \
             position offset {position_offset}"
        ));
    }
    Ok(Arch {
        family,
        vocab: count(&v, "vocab_size", &path)?,
        hidden,
        layers: count(&v, "num_hidden_layers", &path)?,
        heads,
        intermediate: count(&v, "intermediate_size", &path)?,
        max_positions,
        type_vocab: match v.get("type_vocab_size") {
            None => 1,
            Some(_) => count(&v, "type_vocab_size", &path)?,
        },
        eps,
        act,
        position_offset,
    })
}

/// Reads sentence-transformers' files where present: `modules.json` (which modules follow
/// the transformer), the pooling module's `config.json`, `sentence_bert_config.json`.
pub fn pipeline(dir: &Path) -> Result<Pipeline, String> {
    let mut out = Pipeline::default();
    let sbert = dir.join("sentence_bert_config.json");
    if sbert.exists() {
        let v = read_json(&sbert)?;
        if v.get("max_seq_length").is_some() {
            out.max_seq_length = Some(count(&v, "max_seq_length", &sbert)?);
        }
    }
    let modules = dir.join("modules.json");
    let mut pooling_dir = None;
    if modules.exists() {
        let v = read_json(&modules)?;
        let list = v
            .as_array()
            .ok_or_else(|| format!("{}: not a list of modules", modules.display()))?;
        out.normalize = Some(false);
        for m in list {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
            let short = kind.rsplit('.').next().unwrap_or(kind);
            match short {
                "Transformer" => {}
                "Pooling" => {
                    let sub = m.get("path").and_then(Value::as_str).unwrap_or("1_Pooling");
                    pooling_dir = Some(dir.join(sub));
                }
                "Normalize" => out.normalize = Some(true),
                _ => {
                    return Err(format!(
                        "{}: module \"{kind}\" is not supported (Transformer, Pooling and \
                         Normalize are)",
                        modules.display()
                    ))
                }
            }
        }
    }
    let pooling_dir = pooling_dir.unwrap_or_else(|| dir.join("1_Pooling"));
    let pooling = pooling_dir.join("config.json");
    if pooling.exists() {
        let v = read_json(&pooling)?;
        let on = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let modes: Vec<&str> = [
            "pooling_mode_cls_token",
            "pooling_mode_mean_tokens",
            "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
            "pooling_mode_lasttoken",
        ]
        .into_iter()
        .filter(|k| on(k))
        .collect();
        out.pooling = Some(match modes.as_slice() {
            ["pooling_mode_cls_token"] => Pooling::Cls,
            ["pooling_mode_mean_tokens"] => Pooling::Mean,
            [] => return Err(format!("{}: no pooling mode is on", pooling.display())),
            other => {
                return Err(format!(
                    "{}: pooling {} is not supported (one of pooling_mode_cls_token, \
                     pooling_mode_mean_tokens)",
                    pooling.display(),
                    other.join(" + ")
                ))
            }
        });
    }
    Ok(out)
}
