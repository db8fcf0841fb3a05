//! Decoding a KServe v2 infer request body (JSON, with the binary tensor data extension)
//! into typed tensors. Runs on the GPU thread; any byte sequence gives a tensor set or a
//! message for a 400, never a panic (see `fuzz.rs`).

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

/// The most elements one input tensor may have (bounds what a shape can make us allocate
/// before the data is checked against it).
pub const MAX_ELEMENTS: u64 = 1 << 31;

/// A decoded infer request.
#[derive(Debug, Default, PartialEq)]
pub struct InferRequest {
    /// The request's `id`, echoed in the answer.
    pub id: Option<String>,
    /// Request-level `parameters` (`k`, `binary_data_output`, and whatever else came).
    pub parameters: Map<String, Value>,
    pub inputs: Vec<Input>,
    /// Requested outputs; `None`: every output.
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, PartialEq)]
pub struct Input {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<u64>,
    pub data: Data,
}

/// A tensor's elements: raw little-endian bytes (binary extension) or JSON values,
/// flattened in row-major order.
#[derive(Debug, PartialEq)]
pub enum Data {
    Binary(Vec<u8>),
    Json(Vec<Value>),
}

#[derive(Debug, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    /// `parameters.binary_data`, if given.
    pub binary: Option<bool>,
}

impl InferRequest {
    /// `parameters.binary_data_output`: the default for outputs that do not say.
    pub fn binary_output(&self) -> bool {
        self.parameters
            .get("binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// Bytes per element of a datatype with a fixed size.
pub fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "INT8" | "UINT8" => 1,
        "INT16" | "UINT16" | "FP16" | "BF16" => 2,
        "INT32" | "UINT32" | "FP32" => 4,
        "INT64" | "UINT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Decodes `body`; `header_len` is `Inference-Header-Content-Length` (the JSON's length,
/// binary tensor data after it), `None` when the whole body is JSON. The usual request
/// (binary inputs) goes through `decode_fast`; anything it does not take, and every
/// error, through `decode_general`.
pub fn decode(body: &[u8], header_len: Option<u64>) -> Result<InferRequest, String> {
    match decode_fast(body, header_len) {
        Some(req) => Ok(req),
        None => decode_general(body, header_len),
    }
}

/// The request's JSON and the binary data after it.
fn split(body: &[u8], header_len: Option<u64>) -> Result<(&[u8], &[u8]), String> {
    match header_len {
        None => Ok((body, &body[body.len()..])),
        Some(n) if n <= body.len() as u64 => Ok(body.split_at(n as usize)),
        Some(n) => Err(format!(
            "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
            body.len()
        )),
    }
}

/// A JSON object as `T` (serde's derived structs also take arrays, which the request's
/// objects must not be).
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A key that, where present, must hold a `T` (`null` is not "absent").
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The usual request, typed. No unknown keys anywhere (the general decoder ignores some,
/// but it checks their text, where serde skips it unread): inputs carry
/// `binary_data_size` and nothing else in their parameters, outputs at most
/// `binary_data`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastRequest {
    #[serde(default, deserialize_with = "present")]
    id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    parameters: Option<Object<Map<String, Value>>>,
    inputs: Vec<Object<FastInput>>,
    #[serde(default, deserialize_with = "present")]
    outputs: Option<Vec<Object<FastOutput>>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastInput {
    name: String,
    datatype: String,
    shape: Vec<u64>,
    parameters: Object<FastInputParameters>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastInputParameters {
    binary_data_size: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastOutput {
    name: String,
    #[serde(default, deserialize_with = "present")]
    parameters: Option<Object<FastOutputParameters>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FastOutputParameters {
    #[serde(default, deserialize_with = "present")]
    binary_data: Option<bool>,
}

/// The usual request without a JSON document tree (a third of the time on the GPU
/// thread): `Some` only where `decode_general` would decode it to the same request (the
/// fuzz harness checks that on every input it runs); `None` for anything else.
pub fn decode_fast(body: &[u8], header_len: Option<u64>) -> Option<InferRequest> {
    let (json, mut binary) = split(body, header_len).ok()?;
    let Object(r) = serde_json::from_slice::<Object<FastRequest>>(json).ok()?;
    let parameters = r.parameters.map(|p| p.0).unwrap_or_default();
    if parameters
        .get("binary_data_output")
        .is_some_and(|v| !v.is_boolean())
    {
        return None;
    }
    let mut inputs: Vec<Input> = Vec::with_capacity(r.inputs.len());
    for Object(i) in r.inputs {
        let count = i
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&c| c <= MAX_ELEMENTS)?;
        let size = i.parameters.0.binary_data_size;
        if size > binary.len() as u64 {
            return None;
        }
        if element_size(&i.datatype).is_some_and(|es| size != count * es as u64) {
            return None;
        }
        if inputs.iter().any(|x| x.name == i.name) {
            return None;
        }
        let (mine, rest) = binary.split_at(size as usize);
        binary = rest;
        inputs.push(Input {
            name: i.name,
            datatype: i.datatype,
            shape: i.shape,
            data: Data::Binary(mine.to_vec()),
        });
    }
    if !binary.is_empty() {
        return None;
    }
    let outputs = match r.outputs {
        None => None,
        Some(outs) => {
            let mut v: Vec<RequestedOutput> = Vec::with_capacity(outs.len());
            for Object(o) in outs {
                if v.iter().any(|x| x.name == o.name) {
                    return None;
                }
                v.push(RequestedOutput {
                    name: o.name,
                    binary: o.parameters.and_then(|p| p.0.binary_data),
                });
            }
            Some(v)
        }
    };
    Some(InferRequest {
        id: r.id,
        parameters,
        inputs,
        outputs,
    })
}

/// Decodes any request, and says what is wrong with one it cannot take.
pub fn decode_general(body: &[u8], header_len: Option<u64>) -> Result<InferRequest, String> {
    let (json, mut binary) = split(body, header_len)?;
    let root: Value =
        serde_json::from_slice(json).map_err(|e| format!("the request is not valid JSON: {e}"))?;
    let Value::Object(mut root) = root else {
        return Err("the request is not a JSON object".into());
    };
    let mut req = InferRequest {
        id: match root.remove("id") {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err("\"id\" is not a string".into()),
        },
        ..Default::default()
    };
    req.parameters = match root.remove("parameters") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("\"parameters\" is not an object".into()),
    };
    if let Some(v) = req.parameters.get("binary_data_output") {
        if !v.is_boolean() {
            return Err("parameter \"binary_data_output\" is not a boolean".into());
        }
    }
    let Some(Value::Array(inputs)) = root.remove("inputs") else {
        return Err("the request has no \"inputs\" array".into());
    };
    for (i, input) in inputs.into_iter().enumerate() {
        let input = decode_input(input, &mut binary).map_err(|e| format!("input {i}: {e}"))?;
        if req.inputs.iter().any(|x| x.name == input.name) {
            return Err(format!("input \"{}\" is given twice", input.name));
        }
        req.inputs.push(input);
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of binary data that no input claims (binary_data_size)",
            binary.len()
        ));
    }
    req.outputs = match root.remove("outputs") {
        None => None,
        Some(Value::Array(outs)) => {
            let mut v: Vec<RequestedOutput> = Vec::with_capacity(outs.len());
            for (i, o) in outs.into_iter().enumerate() {
                let o = decode_output(o).map_err(|e| format!("output {i}: {e}"))?;
                if v.iter().any(|x| x.name == o.name) {
                    return Err(format!("output \"{}\" is requested twice", o.name));
                }
                v.push(o);
            }
            Some(v)
        }
        Some(_) => return Err("\"outputs\" is not an array".into()),
    };
    Ok(req)
}

fn decode_input(v: Value, binary: &mut &[u8]) -> Result<Input, String> {
    let Value::Object(mut m) = v else {
        return Err("not a JSON object".into());
    };
    let name = match m.remove("name") {
        Some(Value::String(s)) => s,
        _ => return Err("no \"name\" string".into()),
    };
    let at = |e: String| format!("\"{name}\": {e}");
    let datatype = match m.remove("datatype") {
        Some(Value::String(s)) => s,
        _ => return Err(at("no \"datatype\" string".into())),
    };
    let shape = match m.remove("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| at("\"shape\" holds something other than sizes".into()))?,
        _ => return Err(at("no \"shape\" array".into())),
    };
    let count = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&c| c <= MAX_ELEMENTS)
        .ok_or_else(|| {
            at(format!(
                "shape {shape:?} has more than {MAX_ELEMENTS} elements"
            ))
        })?;
    let params = match m.remove("parameters") {
        None => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(at("\"parameters\" is not an object".into())),
    };
    let data = match params.get("binary_data_size") {
        Some(size) => {
            let size = size
                .as_u64()
                .ok_or_else(|| at("\"binary_data_size\" is not a size".into()))?;
            if m.contains_key("data") {
                return Err(at("has both \"data\" and \"binary_data_size\"".into()));
            }
            if size > binary.len() as u64 {
                return Err(at(format!(
                    "binary_data_size {size} is more than the {} bytes of binary data left",
                    binary.len()
                )));
            }
            if let Some(es) = element_size(&datatype) {
                if size != count * es as u64 {
                    return Err(at(format!(
                        "binary_data_size {size} does not match shape {shape:?} of {datatype} ({} bytes)",
                        count * es as u64
                    )));
                }
            }
            let (mine, rest) = binary.split_at(size as usize);
            *binary = rest;
            Data::Binary(mine.to_vec())
        }
        None => {
            let Some(data) = m.remove("data") else {
                return Err(at("no \"data\" and no \"binary_data_size\"".into()));
            };
            let mut flat = Vec::new();
            flatten(data, &mut flat, count as usize).map_err(at)?;
            if flat.len() as u64 != count {
                return Err(at(format!(
                    "\"data\" has {} elements where shape {shape:?} needs {count}",
                    flat.len()
                )));
            }
            Data::Json(flat)
        }
    };
    Ok(Input {
        name,
        datatype,
        shape,
        data,
    })
}

/// Row-major elements of nested arrays, at most `max` of them.
fn flatten(v: Value, out: &mut Vec<Value>, max: usize) -> Result<(), String> {
    // An explicit stack: no recursion depth an attacker controls (serde_json also limits
    // nesting to 128 levels while parsing).
    let mut stack = vec![v];
    let mut pending: Vec<std::vec::IntoIter<Value>> = Vec::new();
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => pending.push(items.into_iter()),
            other => {
                if out.len() >= max {
                    return Err(format!("\"data\" has more than {max} elements"));
                }
                out.push(other);
            }
        }
        while let Some(it) = pending.last_mut() {
            match it.next() {
                Some(next) => {
                    stack.push(next);
                    break;
                }
                None => {
                    pending.pop();
                }
            }
        }
    }
    Ok(())
}

fn decode_output(v: Value) -> Result<RequestedOutput, String> {
    let Value::Object(mut m) = v else {
        return Err("not a JSON object".into());
    };
    let name = match m.remove("name") {
        Some(Value::String(s)) => s,
        _ => return Err("no \"name\" string".into()),
    };
    let binary = match m.remove("parameters") {
        None => None,
        Some(Value::Object(p)) => {
            if p.contains_key("classification") {
                return Err(format!(
                    "\"{name}\": the classification extension is not supported"
                ));
            }
            if p.contains_key("shared_memory_region") {
                return Err(format!(
                    "\"{name}\": the shared-memory extension is not supported"
                ));
            }
            match p.get("binary_data") {
                None => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return Err(format!("\"{name}\": \"binary_data\" is not a boolean")),
            }
        }
        Some(_) => return Err(format!("\"{name}\": \"parameters\" is not an object")),
    };
    Ok(RequestedOutput { name, binary })
}

impl Input {
    /// The elements of a BYTES tensor: JSON strings, or binary data in Triton's layout
    /// (each element a 4-byte little-endian length, then its bytes). Their count must be
    /// the shape's.
    pub fn to_bytes(&self) -> Result<Vec<Vec<u8>>, String> {
        if self.datatype != "BYTES" {
            return Err(format!(
                "\"{}\" has datatype {}: expected BYTES",
                self.name, self.datatype
            ));
        }
        let count = self.shape.iter().product::<u64>();
        let out = match &self.data {
            Data::Json(v) => v
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.as_bytes().to_vec()),
                    _ => Err(format!("\"{}\": \"data\" holds a non-string", self.name)),
                })
                .collect::<Result<Vec<_>, String>>()?,
            Data::Binary(data) => {
                let mut out = Vec::new();
                let mut b: &[u8] = data;
                while !b.is_empty() {
                    if out.len() as u64 >= count {
                        return Err(format!(
                            "\"{}\": binary data holds more than the shape's {count} elements",
                            self.name
                        ));
                    }
                    if b.len() < 4 {
                        return Err(format!(
                            "\"{}\": binary data ends inside an element's length",
                            self.name
                        ));
                    }
                    let (len, rest) = b.split_at(4);
                    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
                    if len > rest.len() {
                        return Err(format!(
                            "\"{}\": element {} says {len} bytes, {} are left",
                            self.name,
                            out.len(),
                            rest.len()
                        ));
                    }
                    let (elem, rest) = rest.split_at(len);
                    out.push(elem.to_vec());
                    b = rest;
                }
                out
            }
        };
        if out.len() as u64 != count {
            return Err(format!(
                "\"{}\" has {} elements where shape {:?} needs {count}",
                self.name,
                out.len(),
                self.shape
            ));
        }
        Ok(out)
    }

    /// The elements as f32, from FP32 or FP16 data (JSON numbers must fit the type).
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        match (&self.data, self.datatype.as_str()) {
            (Data::Binary(b), "FP32") => Ok(b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            (Data::Binary(b), "FP16") => Ok(b
                .chunks_exact(2)
                .map(|c| crate::ops::knn::index::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect()),
            (Data::Json(v), "FP32" | "FP16") => v
                .iter()
                .map(|x| {
                    x.as_f64()
                        .map(|f| f as f32)
                        .ok_or_else(|| format!("\"{}\": \"data\" holds a non-number", self.name))
                })
                .collect(),
            (_, dt) => Err(format!(
                "\"{}\" has datatype {dt}: expected FP32 or FP16",
                self.name
            )),
        }
    }
}
