//! The embed model's loading checks, its tokenizer, and the CPU path: against a float64
//! reference written here on a generated model, and against sentence-transformers' own
//! output for the real all-MiniLM-L6-v2 (`t/embed/golden.json`, made by `t/embed/golden.py`).

use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;
use crate::testing::Rng;

#[path = "../../../t/embed/tiny.rs"]
pub mod tiny;
use tiny::Tiny;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ngx-gpu-embed-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tiny(name: &str) -> Tiny {
    Tiny::new(&scratch(name), 0x5eed)
}

fn load(t: &Tiny, params: &[&str]) -> Result<EmbedModel, String> {
    t.write();
    EmbedModel::load("m", &t.dir, params)
}

fn err(t: &Tiny, params: &[&str]) -> String {
    match load(t, params) {
        Ok(_) => panic!("loaded: {:?}", t.dir),
        Err(e) => e,
    }
}

/* loading */

#[test]
fn a_generated_model_loads_with_its_pipeline_defaults() {
    let t = tiny("defaults");
    let m = load(&t, &[]).unwrap();
    assert_eq!(m.dim(), 36);
    assert_eq!(m.pooling, Pooling::Mean);
    assert!(m.normalize);
    assert_eq!(m.max_tokens, 40);
    assert_eq!(m.precision, Precision::Fp16);
    assert_eq!(m.arch.family, Family::Bert);
    let m = load(
        &t,
        &[
            "pooling=cls",
            "normalize=off",
            "max_tokens=7",
            "precision=bf16",
        ],
    )
    .unwrap();
    assert_eq!(
        (m.pooling, m.normalize, m.max_tokens, m.precision),
        (Pooling::Cls, false, 7, Precision::Bf16)
    );
}

#[test]
fn pooling_and_normalize_follow_sentence_transformers_files() {
    let mut t = tiny("pipeline");
    t.pooling.as_mut().unwrap()["pooling_mode_mean_tokens"] = json!(false);
    t.pooling.as_mut().unwrap()["pooling_mode_cls_token"] = json!(true);
    t.modules.as_mut().unwrap().as_array_mut().unwrap().pop();
    let m = load(&t, &[]).unwrap();
    assert_eq!((m.pooling, m.normalize), (Pooling::Cls, false));
    // Without sentence-transformers' files: mean pooling, normalized.
    t.modules = None;
    t.pooling = None;
    let m = load(&t, &[]).unwrap();
    assert_eq!((m.pooling, m.normalize), (Pooling::Mean, true));
}

#[test]
fn broken_files_are_refused_naming_the_file_and_the_problem() {
    let mut t = tiny("broken");
    let st = t.dir.join("model.safetensors").display().to_string();
    let cfg = t.dir.join("config.json").display().to_string();

    t.tensors
        .retain(|x| x.0 != "encoder.layer.1.attention.self.key.bias");
    assert_eq!(
        err(&t, &[]),
        format!("{st}: tensor \"encoder.layer.1.attention.self.key.bias\" is missing")
    );

    let mut t = tiny("broken");
    t.tensor("encoder.layer.0.intermediate.dense.weight").1 = vec![36, 70];
    assert_eq!(
        err(&t, &[]),
        format!(
            "{st}: tensor \"encoder.layer.0.intermediate.dense.weight\" has shape [36, 70], \
             config.json makes it [70, 36]"
        )
    );

    let mut t = tiny("broken");
    t.config["hidden_size"] = json!(40);
    let e = err(&t, &[]);
    assert!(e.starts_with(&format!("{st}: tensor ")), "{e}");
    assert!(e.contains("config.json makes it"), "{e}");

    let mut t = tiny("broken");
    t.config["num_hidden_layers"] = json!(1);
    assert!(err(&t, &[]).contains("holds more layers than num_hidden_layers 1"));

    let mut t = tiny("broken");
    t.config["hidden_act"] = json!("swish");
    assert_eq!(
        err(&t, &[]),
        format!(
            "{cfg}: hidden_act \"swish\" is not supported (gelu, gelu_new, gelu_pytorch_tanh, \
             relu)"
        )
    );

    let mut t = tiny("broken");
    t.config["num_attention_heads"] = json!(5);
    assert_eq!(
        err(&t, &[]),
        format!("{cfg}: hidden_size 36 is not a multiple of num_attention_heads 5")
    );

    let mut t = tiny("broken");
    t.config["hidden_size"] = json!(130);
    t.config["num_attention_heads"] = json!(2);
    assert!(err(&t, &[]).contains("hidden_size 130 in heads of 65 is not supported"));

    let mut t = tiny("broken");
    t.config["model_type"] = json!("gpt2");
    assert!(err(&t, &[]).starts_with(&format!("{cfg}: model_type \"gpt2\" is not supported")));

    let mut t = tiny("broken");
    t.config["position_embedding_type"] = json!("relative_key");
    assert!(err(&t, &[]).contains("position_embedding_type \"relative_key\""));

    let t = tiny("broken");
    assert_eq!(
        err(&t, &["max_tokens=41"]),
        format!(
            "max_tokens=41 is more than the model's 40 positions ({cfg}: \
             max_position_embeddings 40)"
        )
    );
    let e = err(&t, &["max_tokens=2"]);
    assert!(
        e.contains("leaves no room for a text after the 2 special tokens"),
        "{e}"
    );
    assert_eq!(
        err(&t, &["pooling=max"]),
        "pooling=\"max\" must be mean or cls"
    );
    assert_eq!(
        err(&t, &["precision=int8"]),
        "precision=\"int8\" must be fp16, bf16 or fp32"
    );
    assert_eq!(
        err(&t, &["normalize=yes"]),
        "normalize=\"yes\" must be \"on\" or \"off\""
    );

    let mut t = tiny("broken");
    t.pooling.as_mut().unwrap()["pooling_mode_max_tokens"] = json!(true);
    let e = err(&t, &[]);
    assert!(
        e.contains("1_Pooling/config.json: pooling pooling_mode_mean_tokens + pooling_mode_max_tokens is not supported"),
        "{e}"
    );

    let mut t = tiny("broken");
    t.modules.as_mut().unwrap().as_array_mut().unwrap().push(
        json!({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}),
    );
    assert!(err(&t, &[])
        .contains("modules.json: module \"sentence_transformers.models.Dense\" is not supported"));

    let mut t = tiny("broken");
    t.config["vocab_size"] = json!(20);
    t.tensor("embeddings.word_embeddings.weight").1 = vec![20, 36];
    let e = err(&t, &[]);
    assert!(
        e.contains("tokenizer.json: ")
            && e.contains("more than the 20 of config.json's vocab_size"),
        "{e}"
    );

    let t = tiny("broken");
    t.write();
    std::fs::remove_file(t.dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        EmbedModel::load("m", &t.dir, &[]).err().unwrap(),
        format!("{}: no such file", t.dir.join("tokenizer.json").display())
    );
    std::fs::write(t.dir.join("config.json"), "{").unwrap();
    assert!(EmbedModel::load("m", &t.dir, &[])
        .err()
        .unwrap()
        .starts_with(&format!("{cfg}: not valid JSON")));
    std::fs::remove_file(t.dir.join("config.json")).unwrap();
    assert!(EmbedModel::load("m", &t.dir, &[])
        .err()
        .unwrap()
        .starts_with(&format!("{cfg}: ")));
    std::fs::write(t.dir.join("model.safetensors"), b"garbage").unwrap();
    let _ = std::fs::remove_dir_all(&t.dir);
    assert!(EmbedModel::load("m", &t.dir, &[])
        .err()
        .unwrap()
        .ends_with("not a directory"));
}

#[test]
fn a_truncated_weights_file_is_refused() {
    let t = tiny("short-file");
    t.write();
    let p = t.dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
    let e = EmbedModel::load("m", &t.dir, &[]).err().unwrap();
    assert!(
        e.starts_with(&format!("{}: not a safetensors file", p.display())),
        "{e}"
    );
}

/* tokenizer */

#[test]
fn texts_tokenize_with_special_tokens_and_are_truncated_at_max_tokens() {
    let t = tiny("tokenize");
    let m = load(&t, &["max_tokens=6"]).unwrap();
    let vocab = tiny::vocab();
    let id = |s: &str| vocab.iter().position(|v| v == s).unwrap() as u32;
    let e = m.tokenize("The cats").unwrap();
    assert_eq!(
        e.ids,
        [id("[CLS]"), id("the"), id("cat"), id("##s"), id("[SEP]")]
    );
    assert_eq!(e.type_ids, [0; 5]);
    assert!(!e.truncated);
    let e = m.tokenize("").unwrap();
    assert_eq!(e.ids, [id("[CLS]"), id("[SEP]")]);
    let e = m.tokenize("the cat sat on the mat").unwrap();
    assert_eq!(
        e.ids,
        [
            id("[CLS]"),
            id("the"),
            id("cat"),
            id("sat"),
            id("on"),
            id("[SEP]")
        ]
    );
    assert!(e.truncated);
    // Unknown characters are [UNK], not errors.
    assert_eq!(m.tokenize("€").unwrap().ids[1], id("[UNK]"));
}

/* the CPU path against float64 */

/// The encoder written plainly in float64, from the weights as loaded.
fn reference(m: &EmbedModel, e: &Encoded) -> Vec<f64> {
    let (a, w) = (&m.arch, &m.weights);
    let (h, n, dh) = (a.hidden, e.ids.len(), a.hidden / a.heads);
    let norm = |x: &mut Vec<f64>, g: &[f32], b: &[f32]| {
        for r in x.chunks_mut(h) {
            let mean = r.iter().sum::<f64>() / h as f64;
            let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / h as f64;
            for i in 0..h {
                r[i] = (r[i] - mean) / (var + a.eps as f64).sqrt() * g[i] as f64 + b[i] as f64;
            }
        }
    };
    let lin = |x: &[f64], l: &weights::Linear| -> Vec<f64> {
        let mut y = vec![0.0; n * l.out];
        for r in 0..n {
            for o in 0..l.out {
                let mut s = l.b[o] as f64;
                for i in 0..l.inp {
                    s += x[r * l.inp + i] * l.w[o * l.inp + i] as f64;
                }
                y[r * l.out + o] = s;
            }
        }
        y
    };
    let mut x = vec![0.0; n * h];
    for t in 0..n {
        for i in 0..h {
            x[t * h + i] = w.word[e.ids[t] as usize * h + i] as f64
                + w.position[(t + a.position_offset) * h + i] as f64
                + w.token_type[e.type_ids[t] as usize * h + i] as f64;
        }
    }
    norm(&mut x, &w.emb_norm.g, &w.emb_norm.b);
    for l in &w.layers {
        let qkv = lin(&x, &l.qkv);
        let mut ctx = vec![0.0; n * h];
        for hd in 0..a.heads {
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..dh)
                            .map(|d| {
                                qkv[i * 3 * h + hd * dh + d] * qkv[j * 3 * h + h + hd * dh + d]
                            })
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
                for d in 0..dh {
                    ctx[i * h + hd * dh + d] = (0..n)
                        .map(|j| (s[j] - max).exp() / z * qkv[j * 3 * h + 2 * h + hd * dh + d])
                        .sum();
                }
            }
        }
        let mut y = lin(&ctx, &l.attn_out);
        y.iter_mut().zip(&x).for_each(|(y, x)| *y += x);
        norm(&mut y, &l.attn_norm.g, &l.attn_norm.b);
        x = y;
        let f: Vec<f64> = lin(&x, &l.ffn_in)
            .iter()
            .map(|&v| activate(a.act, v as f32) as f64)
            .collect();
        let mut y = {
            let mut y = vec![0.0; n * h];
            for r in 0..n {
                for o in 0..h {
                    y[r * h + o] = l.ffn_out.b[o] as f64
                        + (0..a.intermediate)
                            .map(|i| {
                                f[r * a.intermediate + i]
                                    * l.ffn_out.w[o * a.intermediate + i] as f64
                            })
                            .sum::<f64>();
                }
            }
            y
        };
        y.iter_mut().zip(&x).for_each(|(y, x)| *y += x);
        norm(&mut y, &l.ffn_norm.g, &l.ffn_norm.b);
        x = y;
    }
    let mut out: Vec<f64> = match m.pooling {
        Pooling::Cls => x[..h].to_vec(),
        Pooling::Mean => (0..h)
            .map(|i| (0..n).map(|t| x[t * h + i]).sum::<f64>() / n as f64)
            .collect(),
    };
    if m.normalize {
        let len = out.iter().map(|v| v * v).sum::<f64>().sqrt();
        out.iter_mut().for_each(|v| *v /= len);
    }
    out
}

use super::cpu::activate;

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Random texts over the tiny vocabulary (and some unknown words), of 0 to `words` words.
pub fn random_texts(rng: &mut Rng, count: usize, words: u64) -> Vec<String> {
    let vocab = tiny::vocab();
    (0..count)
        .map(|_| {
            let n = rng.below(words + 1);
            (0..n)
                .map(|_| match rng.below(10) {
                    0 => "zzqx".to_string(),
                    _ => vocab[4 + rng.below(vocab.len() as u64 - 4) as usize]
                        .trim_start_matches("##")
                        .to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn the_cpu_path_matches_a_float64_reference() {
    let mut rng = Rng::fresh();
    let t = tiny("cpu");
    for params in [
        &[][..],
        &["pooling=cls", "normalize=off"][..],
        &["normalize=off"][..],
    ] {
        let m = load(&t, params).unwrap();
        let mut texts = random_texts(&mut rng, 24, 50);
        texts.push(String::new());
        texts.push("a".into());
        let enc: Vec<Encoded> = texts.iter().map(|s| m.tokenize(s).unwrap()).collect();
        assert!(enc.iter().any(|e| e.truncated) && enc.iter().any(|e| e.ids.len() == 2));
        let refs: Vec<&Encoded> = enc.iter().collect();
        let got = m.cpu_embed(&refs);
        assert_eq!(got.len(), texts.len());
        for (i, e) in enc.iter().enumerate() {
            let want = reference(&m, e);
            let d = max_diff(&got[i], &want);
            assert!(
                d < 2e-5,
                "{params:?} text {:?}: max difference {d}",
                texts[i]
            );
        }
    }
    let m = load(&t, &[]).unwrap();
    assert!(m.cpu_embed(&[]).is_empty());
    // A hand-made text over max_tokens is cut there; one of no tokens pools to zeros.
    let long = Encoded {
        ids: (0..50).map(|i| 4 + i % 40).collect(),
        type_ids: vec![0; 50],
        truncated: false,
    };
    let cut = Encoded {
        ids: long.ids[..40].to_vec(),
        type_ids: vec![0; 40],
        truncated: true,
    };
    assert_eq!(m.cpu_embed(&[&long]), m.cpu_embed(&[&cut]));
    assert_eq!(m.cpu_embed(&[&Encoded::default()]), vec![vec![0.0; 36]]);
}

#[test]
fn roberta_positions_start_after_the_padding_index() {
    let mut rng = Rng::fresh();
    let mut t = tiny("roberta");
    t.config["model_type"] = json!("roberta");
    t.config["pad_token_id"] = json!(1);
    t.config["type_vocab_size"] = json!(1);
    t.tensor("embeddings.token_type_embeddings.weight").1 = vec![1, 36];
    t.tensor("embeddings.token_type_embeddings.weight")
        .2
        .truncate(36);
    let m = load(&t, &[]).unwrap();
    assert_eq!(
        (m.arch.family, m.arch.position_offset),
        (Family::Roberta, 2)
    );
    assert_eq!(m.max_tokens, 38);
    let e = err(&t, &["max_tokens=39"]);
    assert!(e.contains("more than the model's 38 positions"), "{e}");
    for text in random_texts(&mut rng, 8, 60) {
        let e = m.tokenize(&text).unwrap();
        let d = max_diff(&m.cpu_embed(&[&e])[0], &reference(&m, &e));
        assert!(d < 2e-5, "{text:?}: {d}");
    }
}

/* the real model against sentence-transformers */

/// all-MiniLM-L6-v2: `$NGX_GPU_EMBED_MODEL`, or `.gpu-embed/all-MiniLM-L6-v2` in the
/// directory the tests run in (its float16 copy, `t/embed/gpu-bundle.sh`, on the GPU
/// machine), or the float32 original that `t/embed/fetch-model.sh` unpacks under target/.
pub fn minilm() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("NGX_GPU_EMBED_MODEL").map(PathBuf::from),
        Some(PathBuf::from(".gpu-embed/all-MiniLM-L6-v2")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/embed-model/all-MiniLM-L6-v2")),
    ];
    if let Some(dir) = candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("model.safetensors").exists())
    {
        eprintln!("model: {}", dir.display());
        return Some(dir);
    }
    assert!(
        std::env::var("NGX_GPU_REQUIRE_EMBED_MODEL").as_deref() != Ok("1"),
        "NGX_GPU_REQUIRE_EMBED_MODEL=1 but all-MiniLM-L6-v2 is missing (sh t/embed/fetch-model.sh)"
    );
    eprintln!("skipped: all-MiniLM-L6-v2 is missing (sh t/embed/fetch-model.sh fetches it)");
    None
}

pub struct Golden {
    pub texts: Vec<String>,
    pub ids: Vec<Vec<u32>>,
    pub embeddings: Vec<Vec<f32>>,
    /// Each text's tokens before truncation.
    pub full_lengths: Vec<usize>,
}

pub fn golden() -> Golden {
    // Built into the test binary: it runs on the GPU machine without this checkout.
    let v: serde_json::Value =
        serde_json::from_str(include_str!("../../../t/embed/golden.json")).unwrap();
    let list = |k: &str| v[k].as_array().unwrap().clone();
    Golden {
        texts: list("texts")
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect(),
        ids: list("ids")
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect(),
        embeddings: list("embeddings")
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
        full_lengths: list("full_lengths")
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect(),
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_tokens_equal_the_reference_tokenizers() {
    let Some(dir) = minilm() else { return };
    let m = EmbedModel::load("minilm", &dir, &[]).unwrap();
    assert_eq!(
        m.max_tokens, 256,
        "sentence_bert_config.json's max_seq_length"
    );
    let g = golden();
    assert!(g.texts.len() >= 20);
    for (i, text) in g.texts.iter().enumerate() {
        let e = m.tokenize(text).unwrap();
        assert_eq!(e.ids, g.ids[i], "{text:?}");
        assert_eq!(e.type_ids, vec![0; e.ids.len()], "{text:?}");
        assert_eq!(e.truncated, g.full_lengths[i] > 256, "{text:?}");
    }
    assert!(g.full_lengths.contains(&256) && g.full_lengths.contains(&257));
}

#[test]
fn minilm_on_the_cpu_matches_sentence_transformers() {
    let Some(dir) = minilm() else { return };
    let m = EmbedModel::load("minilm", &dir, &["precision=fp32"]).unwrap();
    let g = golden();
    let enc: Vec<Encoded> = g.texts.iter().map(|t| m.tokenize(t).unwrap()).collect();
    let refs: Vec<&Encoded> = enc.iter().collect();
    let got = m.cpu_embed(&refs);
    let mut worst = 1.0f64;
    for (i, want) in g.embeddings.iter().enumerate() {
        assert_eq!(got[i].len(), 384);
        let c = cosine(&got[i], want);
        worst = worst.min(c);
        assert!(c >= 0.9999, "text {i} {:?}: cosine {c}", g.texts[i]);
        let len: f64 = got[i]
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((len - 1.0).abs() < 1e-5, "normalized: {len}");
    }
    eprintln!("{} texts, lowest cosine {worst:.7}", g.texts.len());
}
