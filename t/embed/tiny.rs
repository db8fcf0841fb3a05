//! A small generated model directory for the embed tests (`src/ops/embed/tests.rs`,
//! `t/config.rs`): a BERT of random weights with a WordPiece tokenizer, in the files
//! sentence-transformers writes, each part editable before `write` to make it broken.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub struct Tiny {
    pub dir: PathBuf,
    pub config: Value,
    /// (name, shape, values): written as float32.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub tokenizer: Value,
    pub modules: Option<Value>,
    pub pooling: Option<Value>,
}

/// The tokenizer's words (after the four special tokens and the letters).
const WORDS: &[&str] = &[
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "and", "##ing", "hello", "world", "gpu",
    "nginx", "fast", ".", ",", "!", "?",
];

pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for c in 'a'..='z' {
        v.push(c.to_string());
        v.push(format!("##{c}"));
    }
    v.extend(WORDS.iter().map(|s| s.to_string()));
    v
}

/// splitmix64 for the weights: values in [-scale, scale).
fn values(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = *seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

impl Tiny {
    /// hidden 36 in 4 heads of 9, intermediate 70, 2 layers, 40 positions: widths that are
    /// no multiple of the CPU path's 8 lanes or the device's tiles.
    pub fn new(dir: &Path, seed: u64) -> Tiny {
        let (h, inter, layers, pos, types) = (36usize, 70usize, 2usize, 40usize, 2usize);
        let vocab = vocab();
        let config = json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "hidden_act": "gelu",
            "hidden_size": h,
            "intermediate_size": inter,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": pos,
            "num_attention_heads": 4,
            "num_hidden_layers": layers,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "type_vocab_size": types,
            "vocab_size": vocab.len(),
        });
        let mut s = seed;
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let v = values(&mut s, n, scale)
                .iter()
                .map(|x| x + offset)
                .collect();
            tensors.push((name, shape, v));
        };
        add(
            "embeddings.word_embeddings.weight".into(),
            vec![vocab.len(), h],
            1.0,
            0.0,
        );
        add(
            "embeddings.position_embeddings.weight".into(),
            vec![pos, h],
            0.5,
            0.0,
        );
        add(
            "embeddings.token_type_embeddings.weight".into(),
            vec![types, h],
            0.5,
            0.0,
        );
        add("embeddings.LayerNorm.weight".into(), vec![h], 0.2, 1.0);
        add("embeddings.LayerNorm.bias".into(), vec![h], 0.1, 0.0);
        for l in 0..layers {
            let at = |s: &str| format!("encoder.layer.{l}.{s}");
            for m in ["query", "key", "value"] {
                add(
                    at(&format!("attention.self.{m}.weight")),
                    vec![h, h],
                    0.3,
                    0.0,
                );
                add(at(&format!("attention.self.{m}.bias")), vec![h], 0.1, 0.0);
            }
            add(at("attention.output.dense.weight"), vec![h, h], 0.3, 0.0);
            add(at("attention.output.dense.bias"), vec![h], 0.1, 0.0);
            add(at("attention.output.LayerNorm.weight"), vec![h], 0.2, 1.0);
            add(at("attention.output.LayerNorm.bias"), vec![h], 0.1, 0.0);
            add(at("intermediate.dense.weight"), vec![inter, h], 0.3, 0.0);
            add(at("intermediate.dense.bias"), vec![inter], 0.1, 0.0);
            add(at("output.dense.weight"), vec![h, inter], 0.2, 0.0);
            add(at("output.dense.bias"), vec![h], 0.1, 0.0);
            add(at("output.LayerNorm.weight"), vec![h], 0.2, 1.0);
            add(at("output.LayerNorm.bias"), vec![h], 0.1, 0.0);
        }
        let special: Vec<Value> = vocab[..4]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let ids: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": special,
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                           "handle_chinese_chars": true, "strip_accents": null,
                           "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3],
                               "cls": ["[CLS]", 2]},
            "decoder": null,
            "model": {"type": "WordPiece", "unk_token": "[UNK]",
                      "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                      "vocab": ids},
        });
        Tiny {
            dir: dir.to_path_buf(),
            config,
            tensors,
            tokenizer,
            modules: Some(json!([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ])),
            pooling: Some(json!({
                "word_embedding_dimension": h,
                "pooling_mode_cls_token": false,
                "pooling_mode_mean_tokens": true,
                "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false,
            })),
        }
    }

    pub fn tensor(&mut self, name: &str) -> &mut (String, Vec<usize>, Vec<f32>) {
        self.tensors
            .iter_mut()
            .find(|t| t.0 == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    pub fn write(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(self.dir.join("1_Pooling")).unwrap();
        let put = |name: &str, v: &Value| {
            std::fs::write(self.dir.join(name), serde_json::to_vec_pretty(v).unwrap()).unwrap()
        };
        put("config.json", &self.config);
        put("tokenizer.json", &self.tokenizer);
        if let Some(m) = &self.modules {
            put("modules.json", m);
        }
        if let Some(p) = &self.pooling {
            put("1_Pooling/config.json", p);
        }
        // safetensors: a little-endian u64 header length, the JSON header (padded with
        // spaces to 8 bytes), then the tensors' bytes.
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, v) in &self.tensors {
            let start = data.len();
            for x in v {
                data.extend_from_slice(&x.to_le_bytes());
            }
            header.insert(
                name.clone(),
                json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut file = (h.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&h);
        file.extend_from_slice(&data);
        std::fs::write(self.dir.join("model.safetensors"), file).unwrap();
    }
}
