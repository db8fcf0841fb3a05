//! Encoding KServe v2 answers: infer responses (JSON, or JSON then binary tensor data with
//! `Inference-Header-Content-Length`), and the metadata documents of server and models.

use std::sync::Arc;

use serde_json::{json, Value};

use super::decode::InferRequest;
use crate::ops::model::Signature;
use crate::ops::Output;

/// The header that gives the JSON part's length when binary data follows it.
pub const HEADER_LENGTH: &str = "Inference-Header-Content-Length";

/// One output tensor's elements.
pub enum Elements {
    I64(Vec<i64>),
    F32(Vec<f32>),
}

impl Elements {
    fn datatype(&self) -> &'static str {
        match self {
            Elements::I64(_) => "INT64",
            Elements::F32(_) => "FP32",
        }
    }

    /// The elements as a JSON array; float32 values widened to float64 first, as a
    /// serde_json document holds them (a NaN or infinity is `null`).
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Elements::I64(v) => serde_json::to_writer(out, v),
            Elements::F32(v) => {
                let wide: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
                serde_json::to_writer(out, &wide)
            }
        }
        .expect("numbers always serialize");
    }

    fn bytes(&self, out: &mut Vec<u8>) {
        match self {
            Elements::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Elements::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
}

/// An output tensor an op produced.
pub struct Tensor {
    pub name: &'static str,
    pub shape: Vec<u64>,
    pub data: Elements,
}

/// Which outputs to send and how: the requested ones (with their `binary_data`), or all
/// of them, each binary if the request's `binary_data_output` says so. Checked against
/// the op's output names when the request is decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub model: Arc<str>,
    pub id: Option<String>,
    /// (output name, binary) in the order to send them.
    pub outputs: Vec<(&'static str, bool)>,
}

impl Answer {
    /// The answer settings of `req`, for a model with outputs `names`.
    pub fn of(
        model: Arc<str>,
        req: &InferRequest,
        names: &[&'static str],
    ) -> Result<Answer, String> {
        let default = req.binary_output();
        let outputs = match &req.outputs {
            None => names.iter().map(|&n| (n, default)).collect(),
            Some(wanted) => wanted
                .iter()
                .map(|o| {
                    let name = names.iter().find(|&&n| n == o.name).ok_or_else(|| {
                        format!(
                            "unknown output \"{}\" (outputs: {})",
                            o.name,
                            names.join(", ")
                        )
                    })?;
                    Ok((*name, o.binary.unwrap_or(default)))
                })
                .collect::<Result<Vec<_>, String>>()?,
        };
        Ok(Answer {
            model,
            id: req.id.clone(),
            outputs,
        })
    }

    /// The response to send: the tensors the answer asks for, in its order. The JSON is
    /// written directly (no document tree: this runs for every request on the GPU thread),
    /// with its keys in the order serde_json gives them.
    pub fn encode(&self, tensors: &[Tensor]) -> Output {
        let mut head = Vec::with_capacity(160 + 64 * self.outputs.len());
        let mut binary = Vec::new();
        head.push(b'{');
        if let Some(id) = &self.id {
            head.extend_from_slice(b"\"id\":");
            json_string(&mut head, id);
            head.push(b',');
        }
        head.extend_from_slice(b"\"model_name\":");
        json_string(&mut head, &self.model);
        head.extend_from_slice(b",\"model_version\":\"1\",\"outputs\":[");
        let mut first = true;
        for &(name, as_binary) in &self.outputs {
            let Some(t) = tensors.iter().find(|t| t.name == name) else {
                continue;
            };
            if !first {
                head.push(b',');
            }
            first = false;
            head.push(b'{');
            if !as_binary {
                head.extend_from_slice(b"\"data\":");
                t.data.write_json(&mut head);
                head.push(b',');
            }
            head.extend_from_slice(b"\"datatype\":");
            json_string(&mut head, t.data.datatype());
            head.extend_from_slice(b",\"name\":");
            json_string(&mut head, t.name);
            if as_binary {
                let start = binary.len();
                t.data.bytes(&mut binary);
                let size = binary.len() - start;
                head.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
                head.extend_from_slice(size.to_string().as_bytes());
                head.push(b'}');
            }
            head.extend_from_slice(b",\"shape\":[");
            for (i, dim) in t.shape.iter().enumerate() {
                if i > 0 {
                    head.push(b',');
                }
                head.extend_from_slice(dim.to_string().as_bytes());
            }
            head.extend_from_slice(b"]}");
        }
        head.extend_from_slice(b"]}");
        if binary.is_empty() {
            return Output::new(Arc::from("application/json"), head);
        }
        let header_len = head.len();
        head.extend_from_slice(&binary);
        Output {
            content_type: Arc::from("application/octet-stream"),
            body: head,
            headers: vec![(HEADER_LENGTH, header_len.to_string())],
        }
    }
}

/// `s` as a JSON string (quoted and escaped as serde_json does).
fn json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a string always serializes");
}

/// `GET /v2`.
pub fn server_metadata() -> Value {
    json!({
        "name": "ngx_http_gpu_module",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [
            "binary_tensor_data",
            "model_configuration",
            "model_repository",
            "statistics"
        ],
    })
}

/// `GET /v2/models/<name>`.
pub fn model_metadata(name: &str, sig: &Signature) -> Value {
    let tensors = |ts: &[crate::ops::model::TensorSpec]| -> Vec<Value> {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatypes[0], "shape": t.shape}))
            .collect()
    };
    json!({
        "name": name,
        "versions": ["1"],
        "platform": sig.platform,
        "inputs": tensors(&sig.inputs),
        "outputs": tensors(&sig.outputs),
    })
}

/// `GET /v2/models/<name>/config`, in the shape of Triton's model configuration.
pub fn model_config(name: &str, sig: &Signature) -> Value {
    let tensors = |ts: &[crate::ops::model::TensorSpec]| -> Vec<Value> {
        ts.iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "data_type": format!("TYPE_{}", t.datatypes[0]),
                    "dims": t.shape,
                })
            })
            .collect()
    };
    json!({
        "name": name,
        "platform": sig.platform,
        "backend": sig.platform,
        "max_batch_size": 0,
        "input": tensors(&sig.inputs),
        "output": tensors(&sig.outputs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// The answer as a serde_json document would have it: the reference for `encode`.
    fn by_document(a: &Answer, tensors: &[Tensor]) -> (Value, Vec<u8>) {
        let mut outs = Vec::new();
        let mut binary = Vec::new();
        for &(name, as_binary) in &a.outputs {
            let Some(t) = tensors.iter().find(|t| t.name == name) else {
                continue;
            };
            let mut o = json!({"name": t.name, "datatype": t.data.datatype(), "shape": t.shape});
            let start = binary.len();
            match (&t.data, as_binary) {
                (Elements::I64(v), false) => o["data"] = json!(v),
                (Elements::F32(v), false) => o["data"] = json!(v),
                (Elements::I64(v), true) => v
                    .iter()
                    .for_each(|x| binary.extend_from_slice(&x.to_le_bytes())),
                (Elements::F32(v), true) => v
                    .iter()
                    .for_each(|x| binary.extend_from_slice(&x.to_le_bytes())),
            }
            if as_binary {
                o["parameters"] = json!({"binary_data_size": binary.len() - start});
            }
            outs.push(o);
        }
        let mut doc = json!({"model_name": &*a.model, "model_version": "1", "outputs": outs});
        if let Some(id) = &a.id {
            doc["id"] = json!(id);
        }
        (doc, binary)
    }

    #[test]
    fn answers_are_the_documents_serde_json_would_write() {
        let mut rng = Rng::fresh();
        let ids = [None, Some(""), Some("x"), Some("q\"u\\o\nte\u{1}é€😀")];
        let specials = [0.0f32, -0.0, 0.1, 1e-45, 3.4e38, f32::NAN, f32::INFINITY];
        for case in 0..400 {
            let rows = rng.below(4) as usize;
            let k = rng.below(5) as usize;
            let n = rows * k;
            let ints: Vec<i64> = (0..n).map(|_| rng.next() as i64).collect();
            let floats: Vec<f32> = (0..n)
                .map(|i| match rng.below(3) {
                    0 => specials[i % specials.len()],
                    _ => f32::from_bits(rng.next() as u32),
                })
                .collect();
            let shape = vec![rows as u64, k as u64];
            let tensors = [
                Tensor {
                    name: "IDS",
                    shape: shape.clone(),
                    data: Elements::I64(ints),
                },
                Tensor {
                    name: "SCORES",
                    shape,
                    data: Elements::F32(floats),
                },
            ];
            let mut outputs = Vec::new();
            for name in ["SCORES", "IDS", "MISSING"] {
                if rng.below(4) > 0 {
                    outputs.push((name, rng.below(2) == 1));
                }
            }
            let answer = Answer {
                model: Arc::from(if case % 2 == 0 { "m" } else { "mod\"el/é" }),
                id: ids[case % ids.len()].map(String::from),
                outputs,
            };
            let out = answer.encode(&tensors);
            let (doc, binary) = by_document(&answer, &tensors);
            let want = serde_json::to_vec(&doc).unwrap();
            match out.headers.iter().find(|(h, _)| *h == HEADER_LENGTH) {
                None => {
                    assert!(binary.is_empty(), "case {case}");
                    assert_eq!(&*out.content_type, "application/json");
                    assert_eq!(
                        String::from_utf8_lossy(&out.body),
                        String::from_utf8_lossy(&want),
                        "case {case}"
                    );
                }
                Some((_, len)) => {
                    let len: usize = len.parse().unwrap();
                    assert_eq!(&*out.content_type, "application/octet-stream");
                    assert_eq!(
                        String::from_utf8_lossy(&out.body[..len]),
                        String::from_utf8_lossy(&want),
                        "case {case}"
                    );
                    assert_eq!(&out.body[len..], &binary[..], "case {case}");
                }
            }
        }
    }
}
