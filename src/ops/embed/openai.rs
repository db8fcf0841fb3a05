//! The OpenAI embeddings API's JSON: the request (`input`, `model`, `encoding_format`,
//! `dimensions`, `user`), the answer (float arrays or base64 of little-endian float32) and
//! its error shape (`{"error":{"message","type","param","code"}}`).

use serde_json::{json, Value};

/// How the answer carries each embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Float,
    Base64,
}

/// A request as the API reads it, before tokenizing.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub texts: Vec<String>,
    pub format: Format,
}

/// Why a request is refused: the HTTP status and the message (which names the field it is
/// about in quotes, where there is one: see `param_of`).
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

fn bad(message: String) -> Refusal {
    Refusal {
        status: 400,
        message,
    }
}

/// The request fields, as errors' `param` names them.
const FIELDS: [&str; 5] = ["input", "model", "encoding_format", "dimensions", "user"];

/// The field an error message is about: the first field it names in quotes.
pub fn param_of(message: &str) -> Option<&'static str> {
    FIELDS
        .iter()
        .filter_map(|f| message.find(&format!("\"{f}\"")).map(|at| (at, *f)))
        .min()
        .map(|(_, f)| f)
}

/// What the location serves: its model's name and dimension, and its limits.
pub struct Limits<'a> {
    pub model: &'a str,
    pub dim: usize,
    pub max_inputs: usize,
}

/// Reads a request body. `model` must name the location's model (404 otherwise, as
/// OpenAI answers an unknown model); `dimensions` must equal the model's dimension.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Request, Refusal> {
    let root: Value = serde_json::from_slice(body).map_err(|e| Refusal {
        status: 400,
        message: format!("the request is not valid JSON: {e}"),
    })?;
    let Value::Object(mut root) = root else {
        return Err(Refusal {
            status: 400,
            message: "the request is not a JSON object".into(),
        });
    };
    match root.remove("model") {
        None => return Err(bad("the request has no \"model\"".into())),
        Some(Value::String(m)) if m == limits.model => {}
        Some(Value::String(m)) => {
            return Err(Refusal {
                status: 404,
                message: format!(
                    "the model `{m}` does not exist here (this location serves `{}`)",
                    limits.model
                ),
            })
        }
        Some(_) => return Err(bad("\"model\" is not a string".into())),
    }
    let format = match root.remove("encoding_format") {
        None | Some(Value::Null) => Format::Float,
        Some(Value::String(f)) if f == "float" => Format::Float,
        Some(Value::String(f)) if f == "base64" => Format::Base64,
        Some(v) => {
            return Err(bad(format!(
                "\"encoding_format\" is {v}: expected \"float\" or \"base64\""
            )))
        }
    };
    match root.remove("dimensions") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(limits.dim as u64) => {}
        Some(v) => {
            return Err(bad(format!(
                "\"dimensions\" is {v}: this model's embeddings have {} dimensions, and \
                     only that value is accepted",
                limits.dim
            )))
        }
    }
    match root.remove("user") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(_) => return Err(bad("\"user\" is not a string".into())),
    }
    let texts = match root.remove("input") {
        None => return Err(bad("the request has no \"input\"".into())),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(bad("\"input\" is an empty array".into()));
            }
            if items.len() > limits.max_inputs {
                return Err(bad(format!(
                    "\"input\" has {} items: at most {} per request",
                    items.len(),
                    limits.max_inputs
                )));
            }
            let mut texts = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(s) => texts.push(s),
                    Value::Number(_) | Value::Array(_) => return Err(bad(
                        "\"input\" holds token arrays, which are not supported here: send texts"
                            .into(),
                    )),
                    _ => return Err(bad(format!("\"input\"[{i}] is not a string"))),
                }
            }
            texts
        }
        Some(_) => {
            return Err(bad(
                "\"input\" is not a string or an array of strings".into()
            ))
        }
    };
    Ok(Request { texts, format })
}

/// Standard padded base64 of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if k <= c.len() {
                s.push(ABC[(n >> shift) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The answer: `embeddings` (each `dim` float32, in the request's order) and the tokens the
/// texts took. Written directly rather than through `serde_json::Value`: a float32 as its
/// shortest round-trip decimal (`0.12833302`, where a Value would widen it to f64 and
/// print `0.12833301723003387`), which halves the bytes and is most of the answer's cost.
pub fn answer(model: &str, format: Format, embeddings: &[&[f32]], tokens: usize) -> Vec<u8> {
    let per = match format {
        Format::Float => embeddings.first().map_or(0, |e| e.len() * 12),
        Format::Base64 => embeddings.first().map_or(0, |e| e.len() * 16 / 3),
    };
    let mut out = Vec::with_capacity(128 + model.len() + embeddings.len() * (64 + per));
    out.extend_from_slice(br#"{"object":"list","data":["#);
    for (i, e) in embeddings.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"object":"embedding","index":"#);
        out.extend_from_slice(i.to_string().as_bytes());
        out.extend_from_slice(br#","embedding":"#);
        match format {
            Format::Float => push_f32s(&mut out, e),
            Format::Base64 => {
                let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                out.push(b'"');
                out.extend_from_slice(base64(&bytes).as_bytes());
                out.push(b'"');
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"model":"#);
    serde_json::to_writer(&mut out, model).expect("a string to a Vec");
    out.extend_from_slice(
        format!(r#","usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}"#).as_bytes(),
    );
    out
}

/// `[x, ...]`: each float32 as the shortest decimal that reads back as the same float32;
/// NaN and infinities (which JSON cannot hold) as `null`, as serde_json writes them.
fn push_f32s(out: &mut Vec<u8>, v: &[f32]) {
    let mut buf = ryu::Buffer::new();
    out.push(b'[');
    for (j, x) in v.iter().enumerate() {
        if j > 0 {
            out.push(b',');
        }
        if x.is_finite() {
            out.extend_from_slice(buf.format_finite(*x).as_bytes());
        } else {
            out.extend_from_slice(b"null");
        }
    }
    out.push(b']');
}

/// An error in OpenAI's shape. 404 is the unknown-model error (`code: model_not_found`,
/// `param: model`); the others say `invalid_request_error` for 4xx, `server_error` for 5xx.
pub fn error(status: u16, message: &str) -> Vec<u8> {
    let (kind, code, param) = match status {
        404 => (
            "invalid_request_error",
            json!("model_not_found"),
            json!("model"),
        ),
        400..=499 => (
            "invalid_request_error",
            Value::Null,
            json!(param_of(message)),
        ),
        _ => ("server_error", Value::Null, Value::Null),
    };
    let doc = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    let mut v = serde_json::to_vec(&doc).expect("JSON of plain values");
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits<'static> {
        Limits {
            model: "mini",
            dim: 3,
            max_inputs: 4,
        }
    }

    fn refused(body: &str) -> Refusal {
        parse(body.as_bytes(), &limits()).unwrap_err()
    }

    #[test]
    fn strings_and_lists_are_read_with_their_format() {
        let r = parse(br#"{"input":"hi","model":"mini"}"#, &limits()).unwrap();
        assert_eq!(r.texts, ["hi"]);
        assert_eq!(r.format, Format::Float);
        let r = parse(
            br#"{"input":["a","","\u00e9t\u00e9"],"model":"mini","encoding_format":"base64",
                "dimensions":3,"user":"u1"}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.texts, ["a", "", "été"]);
        assert_eq!(r.format, Format::Base64);
        // Fields the API may add later are ignored, as OpenAI's own server does.
        assert!(parse(br#"{"input":"x","model":"mini","extra":1}"#, &limits()).is_ok());
    }

    #[test]
    fn bad_requests_are_refused_with_the_field_they_are_about() {
        let cases: &[(&str, u16, Option<&str>, &str)] = &[
            ("{", 400, None, "not valid JSON"),
            ("[1]", 400, None, "not a JSON object"),
            (r#"{"input":"x"}"#, 400, Some("model"), "no \"model\""),
            (
                r#"{"input":"x","model":"gpt"}"#,
                404,
                Some("model"),
                "`gpt` does not exist",
            ),
            (
                r#"{"input":"x","model":7}"#,
                400,
                Some("model"),
                "not a string",
            ),
            (r#"{"model":"mini"}"#, 400, Some("input"), "no \"input\""),
            (
                r#"{"input":[],"model":"mini"}"#,
                400,
                Some("input"),
                "empty array",
            ),
            (
                r#"{"input":["a","b","c","d","e"],"model":"mini"}"#,
                400,
                Some("input"),
                "5 items: at most 4",
            ),
            (
                r#"{"input":[1,2],"model":"mini"}"#,
                400,
                Some("input"),
                "token arrays",
            ),
            (
                r#"{"input":[[1,2]],"model":"mini"}"#,
                400,
                Some("input"),
                "token arrays",
            ),
            (
                r#"{"input":["a",null],"model":"mini"}"#,
                400,
                Some("input"),
                "\"input\"[1] is not",
            ),
            (
                r#"{"input":3.5,"model":"mini"}"#,
                400,
                Some("input"),
                "not a string or",
            ),
            (
                r#"{"input":"x","model":"mini","encoding_format":"int8"}"#,
                400,
                Some("encoding_format"),
                "\"int8\"",
            ),
            (
                r#"{"input":"x","model":"mini","dimensions":2}"#,
                400,
                Some("dimensions"),
                "have 3 dimensions",
            ),
            (
                r#"{"input":"x","model":"mini","dimensions":"3"}"#,
                400,
                Some("dimensions"),
                "only that value",
            ),
            (
                r#"{"input":"x","model":"mini","user":5}"#,
                400,
                Some("user"),
                "not a string",
            ),
        ];
        for (body, status, param, text) in cases {
            let r = refused(body);
            assert_eq!(r.status, *status, "{body}: {r:?}");
            let want = if *status == 404 { None } else { *param };
            assert_eq!(param_of(&r.message), want, "{body}: {r:?}");
            assert!(r.message.contains(text), "{body}: {r:?}");
        }
    }

    #[test]
    fn base64_matches_the_rfc_4648_test_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
        // 1.0f32 little-endian is 00 00 80 3f.
        assert_eq!(base64(&[0, 0, 0x80, 0x3f]), "AACAPw==");
    }

    /// Every float32 the answer holds reads back as the same float32 (random bit patterns:
    /// subnormals, huge and tiny exponents, negative zero); NaN and infinities as null; a
    /// model name that needs escaping stays valid JSON.
    #[test]
    fn float_answers_read_back_bit_for_bit() {
        let mut rng = crate::testing::Rng::fresh();
        for dim in [0usize, 1, 3, 384, 385] {
            let rows: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    (0..dim)
                        .map(|_| loop {
                            let x = f32::from_bits(rng.next() as u32);
                            if x.is_finite() {
                                break x;
                            }
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let a = answer("m\"ini\\", Format::Float, &refs, 5);
            let v: Value = serde_json::from_slice(&a).unwrap();
            assert_eq!(v["model"], "m\"ini\\");
            for (i, row) in rows.iter().enumerate() {
                let got: Vec<u32> = v["data"][i]["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| (x.as_f64().unwrap() as f32).to_bits())
                    .collect();
                let want: Vec<u32> = row.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "row {i} of {dim}");
            }
        }
        let a = answer(
            "m",
            Format::Float,
            &[&[f32::NAN, 1.5, f32::INFINITY][..]],
            1,
        );
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["data"][0]["embedding"], json!([null, 1.5, null]));
        let none: Value = serde_json::from_slice(&answer("m", Format::Float, &[], 0)).unwrap();
        assert_eq!(none["data"], json!([]));
    }

    #[test]
    fn answers_and_errors_have_openais_shape() {
        let a = answer(
            "mini",
            Format::Float,
            &[&[1.0, -0.5, 0.25][..], &[0.0; 3]],
            7,
        );
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "mini");
        assert_eq!(v["usage"], json!({"prompt_tokens": 7, "total_tokens": 7}));
        assert_eq!(
            v["data"][0],
            json!({"object":"embedding","index":0,"embedding":[1.0,-0.5,0.25]})
        );
        assert_eq!(v["data"][1]["index"], 1);
        let b = answer("mini", Format::Base64, &[&[1.0][..]], 1);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["data"][0]["embedding"], "AACAPw==");

        let e: Value = serde_json::from_slice(&error(404, "no such model")).unwrap();
        assert_eq!(
            e,
            json!({"error":{"message":"no such model","type":"invalid_request_error",
                   "param":"model","code":"model_not_found"}})
        );
        let e: Value = serde_json::from_slice(&error(400, "\"input\" is bad")).unwrap();
        assert_eq!(e["error"]["param"], "input");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        let e: Value = serde_json::from_slice(&error(503, "busy")).unwrap();
        assert_eq!(e["error"]["type"], "server_error");
        assert_eq!(e["error"]["code"], Value::Null);
    }
}
