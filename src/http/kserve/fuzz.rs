//! Property/fuzz harness of the infer decoder (`decode.rs`, knn's use of it, and BYTES
//! tensors as the embed models take them): random bytes, mutated valid requests (JSON and
//! binary) and random JSON documents never panic, and what decodes is consistent. `NGX_GPU_FUZZ_CASES` sets the number of inputs of each
//! kind (default 3000 in `cargo test`); the count run is printed.

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;

use super::decode;
use crate::ops::knn::index::{Index, Metric, Precision};
use crate::ops::knn::{decode_request, KnnModel};

fn cases() -> u32 {
    std::env::var("NGX_GPU_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn model(n: usize, d: usize) -> KnnModel {
    KnnModel::for_tests(
        "m",
        Index {
            n,
            d,
            rows: vec![0.5; n * d],
            metric: Metric::Ip,
            precision: Precision::Fp32,
            ids: None,
        },
        4,
        16,
    )
}

static RUN: AtomicU64 = AtomicU64::new(0);
/// Inputs the fast decoder took (each checked against the general one).
static FAST: AtomicU64 = AtomicU64::new(0);

/// Decodes `body`; whatever comes back must be consistent (a panic fails the property).
fn decodes_sanely(m: &KnnModel, body: &[u8], header_len: Option<u64>) -> Result<(), TestCaseError> {
    RUN.fetch_add(1, Ordering::Relaxed);
    // What the fast decoder takes, the general one decodes to the same request.
    if let Some(fast) = decode::decode_fast(body, header_len) {
        FAST.fetch_add(1, Ordering::Relaxed);
        prop_assert_eq!(Ok(fast), decode::decode_general(body, header_len));
    }
    if let Ok(r) = decode_request(m, body, header_len) {
        prop_assert!(r.rows >= 1 && r.rows <= 16);
        prop_assert_eq!(r.queries.len(), r.rows * m.index.d);
        prop_assert!(r.k >= 1 && r.k <= m.index.n);
        prop_assert!(r.queries.iter().all(|v| v.is_finite()));
        prop_assert!(!r.answer.outputs.is_empty());
    }
    // Every input read as BYTES too: whatever decodes has the shape's count.
    if let Ok(req) = decode::decode(body, header_len) {
        for input in &req.inputs {
            if let Ok(v) = input.to_bytes() {
                prop_assert_eq!(v.len() as u64, input.shape.iter().product::<u64>());
            }
        }
    }
    Ok(())
}

/// A valid BYTES request of `texts`: JSON strings, or binary elements (4-byte
/// little-endian length, then the bytes).
fn valid_bytes(texts: &[String], binary: bool) -> (Vec<u8>, Option<u64>) {
    let mut input = json!({"name": "TEXT", "datatype": "BYTES", "shape": [texts.len()]});
    if binary {
        let mut data = Vec::new();
        for t in texts {
            data.extend_from_slice(&(t.len() as u32).to_le_bytes());
            data.extend_from_slice(t.as_bytes());
        }
        input["parameters"] = json!({"binary_data_size": data.len()});
        let mut body = serde_json::to_vec(&json!({"inputs": [input]})).unwrap();
        let n = body.len() as u64;
        body.extend_from_slice(&data);
        (body, Some(n))
    } else {
        input["data"] = json!(texts);
        (
            serde_json::to_vec(&json!({"inputs": [input]})).unwrap(),
            None,
        )
    }
}

#[test]
fn mutated_bytes_requests_never_panic() {
    let m = model(5, 3);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec(".{0,12}", 1..5),
        any::<bool>(),
        prop::collection::vec(mutation(), 0..6),
    );
    runner
        .run(&strategy, |(texts, binary, muts)| {
            let (mut body, mut hl) = valid_bytes(&texts, binary);
            if muts.is_empty() {
                // Unmutated: the texts come back as sent.
                let req = decode::decode(&body, hl).map_err(TestCaseError::fail)?;
                let got = req.inputs[0].to_bytes().map_err(TestCaseError::fail)?;
                let want: Vec<Vec<u8>> = texts.iter().map(|t| t.as_bytes().to_vec()).collect();
                prop_assert_eq!(got, want);
            }
            for mu in &muts {
                apply(&mut body, &mut hl, mu);
            }
            decodes_sanely(&m, &body, hl)
        })
        .unwrap();
    eprintln!(
        "fuzz: {} inputs decoded so far ({} also by the fast decoder)",
        RUN.load(Ordering::Relaxed),
        FAST.load(Ordering::Relaxed)
    );
}

/// A valid request: rows x d queries, JSON or binary, FP32 or FP16, with some options.
fn valid(
    rows: usize,
    d: usize,
    binary: bool,
    fp16: bool,
    k: u64,
    outs: u8,
) -> (Vec<u8>, Option<u64>) {
    let dt = if fp16 { "FP16" } else { "FP32" };
    let vals: Vec<f32> = (0..rows * d).map(|i| (i as f32) * 0.25 - 1.0).collect();
    let mut input = json!({"name": "QUERY", "datatype": dt, "shape": [rows, d]});
    let mut req = json!({"id": "r1", "parameters": {"k": k, "binary_data_output": outs & 1 == 1}});
    if outs & 2 == 2 {
        req["outputs"] = json!([{"name": "SCORES", "parameters": {"binary_data": outs & 4 == 4}}, {"name": "IDS"}]);
    }
    if binary {
        let data: Vec<u8> = if fp16 {
            vals.iter().flat_map(|_| 0x3c00u16.to_le_bytes()).collect()
        } else {
            vals.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        input["parameters"] = json!({"binary_data_size": data.len()});
        req["inputs"] = json!([input]);
        let mut body = serde_json::to_vec(&req).unwrap();
        let n = body.len() as u64;
        body.extend_from_slice(&data);
        (body, Some(n))
    } else {
        input["data"] = json!(vals);
        req["inputs"] = json!([input]);
        (serde_json::to_vec(&req).unwrap(), None)
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    Header(i64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<usize>(),
            prop::sample::select(b"{}[],:\"0123456789.-eE \x00\xff".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        (-8i64..8).prop_map(Mutation::Header),
    ]
}

fn apply(body: &mut Vec<u8>, hl: &mut Option<u64>, m: &Mutation) {
    let len = body.len().max(1);
    match *m {
        Mutation::Flip(i, b) if !body.is_empty() => body[i % len] ^= b | 1,
        Mutation::Insert(i, b) => body.insert(i % (body.len() + 1), b),
        Mutation::Remove(i) if !body.is_empty() => {
            body.remove(i % len);
        }
        Mutation::Truncate(i) => body.truncate(i % len),
        Mutation::Header(delta) => {
            *hl = Some((hl.unwrap_or(body.len() as u64) as i64 + delta).max(0) as u64)
        }
        _ => {}
    }
}

#[test]
fn random_bytes_never_panic() {
    let m = model(5, 3);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..600),
        prop::option::of(0u64..700),
    );
    runner
        .run(&strategy, |(body, hl)| decodes_sanely(&m, &body, hl))
        .unwrap();
    eprintln!(
        "fuzz: {} inputs decoded so far ({} also by the fast decoder)",
        RUN.load(Ordering::Relaxed),
        FAST.load(Ordering::Relaxed)
    );
}

#[test]
fn mutated_valid_requests_never_panic() {
    let m = model(5, 3);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let strategy = (
        1usize..5,
        prop::sample::select(vec![1usize, 3, 4]),
        any::<bool>(),
        any::<bool>(),
        0u64..3000,
        any::<u8>(),
        prop::collection::vec(mutation(), 0..6),
    );
    runner
        .run(&strategy, |(rows, d, binary, fp16, k, outs, muts)| {
            let (mut body, mut hl) = valid(rows, d, binary, fp16, k, outs);
            if muts.is_empty() && d == 3 && (1..=2048).contains(&k) {
                // Unmutated and matching the model: it must decode.
                prop_assert!(decode_request(&m, &body, hl).is_ok());
            }
            if muts.is_empty() && binary {
                // A plain binary request is the fast decoder's.
                prop_assert!(decode::decode_fast(&body, hl).is_some());
            }
            for mu in &muts {
                apply(&mut body, &mut hl, mu);
            }
            decodes_sanely(&m, &body, hl)
        })
        .unwrap();
    eprintln!(
        "fuzz: {} inputs decoded so far ({} also by the fast decoder)",
        RUN.load(Ordering::Relaxed),
        FAST.load(Ordering::Relaxed)
    );
}

/// Random JSON documents in the request's shape: wrong types, shapes, sizes, nesting.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|i| json!(i)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "QUERY", "IDS", "SCORES", "FP32", "FP16", "INT64", "k", "", "TEXT", "BYTES"
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "name",
                        "datatype",
                        "shape",
                        "data",
                        "parameters",
                        "inputs",
                        "outputs",
                        "binary_data_size",
                        "binary_data",
                        "k",
                        "id",
                    ]),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| {
                serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

#[test]
fn random_json_documents_never_panic() {
    let m = model(5, 3);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let strategy = (
        json_value(),
        json_value(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    runner
        .run(&strategy, |(inputs, params, tail)| {
            let doc = json!({"inputs": [inputs], "parameters": params});
            let mut body = serde_json::to_vec(&doc).unwrap();
            let hl = body.len() as u64;
            body.extend_from_slice(&tail);
            decodes_sanely(&m, &body, Some(hl))?;
            decodes_sanely(&m, &body[..hl as usize], None)
        })
        .unwrap();
    eprintln!(
        "fuzz: {} inputs decoded so far ({} also by the fast decoder)",
        RUN.load(Ordering::Relaxed),
        FAST.load(Ordering::Relaxed)
    );
}

/// Requests one step from the usual shape, where serde's typed decoding is laxer than the
/// general decoder (arrays for objects, null for absent, unknown keys skipped unread):
/// the fast decoder leaves each to the general one, which refuses or takes it itself.
#[test]
fn the_fast_decoder_leaves_odd_requests_to_the_general_one() {
    let data = [0u8; 12];
    let input =
        r#"{"name":"QUERY","datatype":"FP32","shape":[1,3],"parameters":{"binary_data_size":12}}"#;
    let with = |json: &str| {
        let mut b = json.as_bytes().to_vec();
        let n = b.len() as u64;
        b.extend_from_slice(&data);
        (b, Some(n))
    };
    let usual = format!(
        r#"{{"id":"a","inputs":[{input}],"outputs":[{{"name":"IDS","parameters":{{"binary_data":true}}}}],"parameters":{{"k":3}}}}"#
    );
    let (b, hl) = with(&usual);
    assert!(decode::decode_fast(&b, hl).is_some(), "the usual request");
    let odd = [
        // Refused by the general decoder.
        format!(r#"[{input}]"#),
        r#"{"inputs":[["QUERY","FP32",[1,3],{"binary_data_size":12}]]}"#.to_string(),
        format!(r#"{{"id":null,"inputs":[{input}]}}"#),
        format!(r#"{{"parameters":null,"inputs":[{input}]}}"#),
        format!(r#"{{"parameters":[],"inputs":[{input}]}}"#),
        format!(r#"{{"outputs":null,"inputs":[{input}]}}"#),
        format!(r#"{{"outputs":[["IDS"]],"inputs":[{input}]}}"#),
        format!(r#"{{"outputs":[{{"name":"IDS","parameters":null}}],"inputs":[{input}]}}"#),
        format!(r#"{{"outputs":[{{"name":"IDS","parameters":{{"binary_data":null}}}}],"inputs":[{input}]}}"#),
        format!(r#"{{"outputs":[{{"name":"IDS","parameters":{{"classification":1}}}}],"inputs":[{input}]}}"#),
        format!(r#"{{"parameters":{{"binary_data_output":1}},"inputs":[{input}]}}"#),
        r#"{"inputs":[{"name":"QUERY","datatype":"FP32","shape":[1,3],"parameters":null}]}"#.to_string(),
        r#"{"inputs":[{"name":"QUERY","datatype":"FP32","shape":[1,3],"parameters":{"binary_data_size":12},"data":[1,2,3]}]}"#.to_string(),
        r#"{"inputs":[{"name":"QUERY","datatype":"FP32","shape":[1,-3],"parameters":{"binary_data_size":12}}]}"#.to_string(),
        r#"{"inputs":[{"name":"QUERY","datatype":"FP32","shape":[1,3.0],"parameters":{"binary_data_size":12}}]}"#.to_string(),
        r#"{"inputs":[{"name":"QUERY","datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":12}}]}"#.to_string(),
        format!(r#"{{"inputs":[{input},{input}]}}"#),
        // Taken by the general decoder (unknown keys ignored, duplicates: the last wins).
        format!(r#"{{"extra":1,"inputs":[{input}]}}"#),
        format!(r#"{{"id":"a","id":"b","inputs":[{input}]}}"#),
        format!(r#"{{"outputs":[{{"name":"IDS","x":1}}],"inputs":[{input}]}}"#),
        r#"{"inputs":[{"name":"QUERY","datatype":"FP32","shape":[1,3],"parameters":{"binary_data_size":12,"x":1}}]}"#.to_string(),
    ];
    for (i, json) in odd.iter().enumerate() {
        let (b, hl) = with(json);
        assert!(decode::decode_fast(&b, hl).is_none(), "case {i}: {json}");
        assert_eq!(
            decode::decode(&b, hl),
            decode::decode_general(&b, hl),
            "case {i}"
        );
        assert_eq!(
            decode::decode_general(&b, hl).is_ok(),
            i >= 17,
            "case {i}: {json}"
        );
    }
}
