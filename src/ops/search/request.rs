//! The search op's wire format: `{"input": string | [strings], "k": n}` in, and
//! `{"object": "list", "data": [{"index": i, "ids": [...], "scores": [...]}], "model": ...,
//! "usage": {...}}` out (the shape of the OpenAI embeddings answer, hits for embeddings).

use serde_json::{json, Map, Value};

use crate::engine::job::JobError;

/// What a request asks, before its texts are tokenized.
#[derive(Debug, PartialEq)]
pub struct Asked {
    pub texts: Vec<String>,
    /// The `k` it gave, or `None` (the location's default then).
    pub k: Option<usize>,
}

/// Reads a request body. `max_inputs`: texts one request may hold (more: 413); `max_k`:
/// the largest `k` (larger, 0, or not an integer: 400).
pub fn parse(body: &[u8], max_inputs: usize, max_k: usize) -> Result<Asked, JobError> {
    let bad = |m: String| JobError::BadInput(m);
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(bad("the body is not a JSON object".into()));
    };
    let texts = match obj.get("input") {
        None => return Err(bad("the request has no \"input\"".into())),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => {
            if list.is_empty() {
                return Err(bad("\"input\" is an empty array".into()));
            }
            if list.len() > max_inputs {
                return Err(JobError::TooLarge(format!(
                    "\"input\" holds {} texts: at most {max_inputs} per request",
                    list.len()
                )));
            }
            list.iter()
                .enumerate()
                .map(|(i, t)| match t {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(bad(format!(
                        "\"input\"[{i}] is {}: expected a string",
                        kind(other)
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(other) => {
            return Err(bad(format!(
                "\"input\" is {}: expected a string or an array of strings",
                kind(other)
            )))
        }
    };
    let k = match obj.get("k") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|k| (1..=max_k as u64).contains(k))
                .ok_or_else(|| {
                    bad(format!(
                        "\"k\" is {v}: expected an integer from 1 to {max_k}"
                    ))
                })? as usize,
        ),
    };
    Ok(Asked { texts, k })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The answer: text `i`'s `k` hits at `ids[i*k..]` and `scores[i*k..]`, best first.
pub fn answer(model: &str, k: usize, ids: &[i64], scores: &[f32], tokens: usize) -> Vec<u8> {
    let data: Vec<Value> = ids
        .chunks(k.max(1))
        .zip(scores.chunks(k.max(1)))
        .enumerate()
        .map(|(i, (ids, scores))| {
            let mut m = Map::new();
            m.insert("index".into(), json!(i));
            m.insert("ids".into(), json!(ids));
            m.insert("scores".into(), json!(scores));
            Value::Object(m)
        })
        .collect();
    let mut out = serde_json::to_vec(&json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .expect("JSON of plain values");
    out.push(b'\n');
    out
}
