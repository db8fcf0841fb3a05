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

    fn json(&self) -> Value {
        match self {
            Elements::I64(v) => json!(v),
            Elements::F32(v) => json!(v),
        }
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

    /// The response to send: the tensors the answer asks for, in its order.
    pub fn encode(&self, tensors: &[Tensor]) -> Output {
        let mut outs = Vec::with_capacity(self.outputs.len());
        let mut binary = Vec::new();
        for &(name, as_binary) in &self.outputs {
            let Some(t) = tensors.iter().find(|t| t.name == name) else {
                continue;
            };
            let mut o = json!({
                "name": t.name,
                "datatype": t.data.datatype(),
                "shape": t.shape,
            });
            if as_binary {
                let start = binary.len();
                t.data.bytes(&mut binary);
                o["parameters"] = json!({ "binary_data_size": binary.len() - start });
            } else {
                o["data"] = t.data.json();
            }
            outs.push(o);
        }
        let mut doc = json!({
            "model_name": &*self.model,
            "model_version": "1",
            "outputs": outs,
        });
        if let Some(id) = &self.id {
            doc["id"] = json!(id);
        }
        let mut body = serde_json::to_vec(&doc).expect("JSON of plain values");
        if binary.is_empty() {
            return Output::new(Arc::from("application/json"), body);
        }
        let header_len = body.len();
        body.extend_from_slice(&binary);
        Output {
            content_type: Arc::from("application/octet-stream"),
            body,
            headers: vec![(HEADER_LENGTH, header_len.to_string())],
        }
    }
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
