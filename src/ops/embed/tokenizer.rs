//! Texts to token ids with the model's own `tokenizer.json` (the `tokenizers` crate, the
//! same code as Python's `tokenizers`), special tokens added, truncated at `max_tokens`,
//! never padded (batches pad on the device, and only as far as their longest text).

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// One text, tokenized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Whether the text had more tokens than `max_tokens` (the rest was cut off).
    pub truncated: bool,
}

pub struct Texts {
    inner: Tokenizer,
}

impl Texts {
    /// Loads `<dir>/tokenizer.json`, truncating at `max_tokens` (special tokens included).
    /// `vocab`: the embedding table's rows, which every id must address.
    pub fn load(dir: &Path, max_tokens: usize, vocab: usize) -> Result<Texts, String> {
        let path = dir.join("tokenizer.json");
        let p = path.display();
        if !path.exists() {
            return Err(format!("{p}: no such file"));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| format!("{p}: {e}"))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| format!("{p}: {e}"))?;
        let size = inner.get_vocab_size(true);
        if size > vocab {
            return Err(format!(
                "{p}: {size} tokens, more than the {vocab} of config.json's vocab_size"
            ));
        }
        let t = Texts { inner };
        // The special tokens alone must fit (a text of no tokens still has them).
        let empty = t.encode("")?;
        if empty.truncated || empty.ids.len() >= max_tokens {
            return Err(format!(
                "{p}: max_tokens {max_tokens} leaves no room for a text after the {} special \
                 tokens",
                empty.ids.len()
            ));
        }
        Ok(t)
    }

    pub fn encode(&self, text: &str) -> Result<Encoded, String> {
        let e = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| format!("tokenizing failed: {e}"))?;
        Ok(Encoded {
            ids: e.get_ids().to_vec(),
            type_ids: e.get_type_ids().to_vec(),
            truncated: !e.get_overflowing().is_empty(),
        })
    }
}
