//! `gpu_process embeddings` (the OpenAI embeddings API) and embed models under
//! `gpu_process kserve;` against a real nginx: a generated model (every error, both formats,
//! HTTP/2, concurrent requests sharing batches) and, where it was fetched, the real
//! all-MiniLM-L6-v2 against sentence-transformers' golden vectors (t/embed/golden.json).

mod harness;

use std::path::{Path, PathBuf};

use harness::*;
use serde_json::{json, Value};

#[path = "embed/tiny.rs"]
mod tiny;

/// The generated model (hidden 36, 40 positions), written once per test.
fn tiny_dir(name: &str) -> PathBuf {
    let dir = data_dir(&format!("embed-{name}"));
    tiny::Tiny::new(&dir, 0x7e57).write();
    dir
}

/// The real all-MiniLM-L6-v2, where `t/embed/fetch-model.sh` (make check) fetched it.
fn minilm() -> Option<PathBuf> {
    let dir = std::env::var_os("NGX_GPU_EMBED_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/embed-model/all-MiniLM-L6-v2")
        });
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("NGX_GPU_REQUIRE_EMBED_MODEL").as_deref() != Ok("1"),
        "NGX_GPU_REQUIRE_EMBED_MODEL=1 but all-MiniLM-L6-v2 is missing"
    );
    eprintln!("skipped: all-MiniLM-L6-v2 is missing (sh t/embed/fetch-model.sh fetches it)");
    None
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

fn embed(a: &str, path: &str, body: Value) -> Response {
    post(a, path, &serde_json::to_vec(&body).unwrap())
}

/// Decodes standard padded base64, written here for the check.
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    assert_eq!(s.len() % 4, 0, "unpadded base64");
    let mut out = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = q[..4 - pad]
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, &c)| a | val(c) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    out
}

/// The embeddings and the prompt tokens of an OpenAI answer, its shape checked.
fn vectors(r: &Response, model: &str) -> (Vec<Vec<f32>>, u64) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let v = json_of(r);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], model);
    let mut out = Vec::new();
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        out.push(match &d["embedding"] {
            Value::String(s) => unbase64(s)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            other => panic!("embedding {other}"),
        });
    }
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"], tokens);
    (out, tokens)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// An error in OpenAI's shape with `status`, a message holding `text`, and `param`.
fn openai_error(r: &Response, status: u16, text: &str, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let e = &json_of(r)["error"];
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(text), "{status} {text}: {msg}");
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    assert_eq!(e["type"], kind, "{e}");
    assert_eq!(e["param"], json!(param), "{e}");
    let code = if status == 404 {
        json!("model_not_found")
    } else {
        Value::Null
    };
    assert_eq!(e["code"], code, "{e}");
}

fn tiny_server(dir: &Path, extra: &str) -> Nginx {
    Nginx::start(&config(&format!(
        "gpu_model tiny embed {dir} precision=fp32;\n\
         gpu_batch_bytes 64k;\n\
         client_max_body_size 1m;\n\
         server {{\n\
             listen 127.0.0.1:{{PORT}};\n\
             http2 on;\n\
             location = /v1/embeddings {{ gpu_process embeddings tiny; }}\n\
             location = /strict {{ gpu_process embeddings tiny max_inputs=3 truncate=off; }}\n\
             location = /batched {{\n\
                 gpu_process embeddings tiny;\n\
                 gpu_batch_delay 200ms; gpu_batch_size 64; gpu_batch_tokens 4096;\n\
             }}\n\
             location = /nogpu {{ gpu_process embeddings tiny; gpu_fallback off; }}\n\
             location /v2 {{ gpu_process kserve; }}\n\
             location = /metrics {{ gpu_metrics; }}\n\
             {extra}\n\
         }}\n",
        dir = dir.display()
    )))
}

#[test]
fn embeddings_in_both_formats_from_strings_and_lists() {
    let dir = tiny_dir("formats");
    let ngx = tiny_server(&dir, "");
    let a = ngx.addr();
    // Awkward texts: empty, one character, non-ASCII, emoji, longer than the 40 positions.
    let long = "the cat sat on the mat ".repeat(20);
    let texts = [
        "",
        "a",
        "héllo wörld",
        "日本語",
        "🍕!",
        &long,
        "the dog ran .",
    ];
    let (float, tokens) = vectors(
        &embed(
            &a,
            "/v1/embeddings",
            json!({"input": texts, "model": "tiny"}),
        ),
        "tiny",
    );
    let (b64, tokens64) = vectors(
        &embed(
            &a,
            "/v1/embeddings",
            json!({"input": texts, "model": "tiny", "encoding_format": "base64",
                   "dimensions": 36, "user": "someone"}),
        ),
        "tiny",
    );
    assert_eq!(float.len(), texts.len());
    assert_eq!(tokens, tokens64);
    // [CLS] and [SEP] around every text, the long one cut at 40: at least 2 a text.
    assert!(tokens >= 2 * texts.len() as u64 + 38, "{tokens}");
    for i in 0..texts.len() {
        assert_eq!(float[i].len(), 36);
        // JSON floats print float32 exactly (shortest round trip).
        assert_eq!(float[i], b64[i], "text {i}");
        // Normalized (the generated model has no pipeline files: normalize defaults on).
        assert!(
            (norm(&float[i]) - 1.0).abs() < 1e-5,
            "text {i}: {}",
            norm(&float[i])
        );
    }
    // Each text alone: the same vector as in the list, and its own token count.
    let mut sum = 0;
    for (i, t) in texts.iter().enumerate() {
        let (one, n) = vectors(
            &embed(&a, "/v1/embeddings", json!({"input": t, "model": "tiny"})),
            "tiny",
        );
        assert!(cosine(&one[0], &float[i]) >= 0.999_999, "text {i}");
        sum += n;
    }
    assert_eq!(sum, tokens);
    // The long text was truncated to the model's 40 tokens: it equals its first 38 words.
    let words: Vec<&str> = long.split_whitespace().collect();
    let (cut, n) = vectors(
        &embed(
            &a,
            "/v1/embeddings",
            json!({"input": words[..38].join(" "), "model": "tiny"}),
        ),
        "tiny",
    );
    assert_eq!(n, 40);
    assert!(cosine(&cut[0], &float[5]) >= 0.999_999);
    // Different texts give different vectors.
    assert!(cosine(&float[1], &float[6]) < 0.9999);
    // The official client's bearer token is ignored.
    let r = request_with(
        &a,
        "POST",
        "/v1/embeddings",
        &[
            ("Authorization", "Bearer sk-anything"),
            ("Content-Type", "application/json"),
        ],
        br#"{"input":"a","model":"tiny"}"#,
    );
    // The same text in another batch: equal on the CPU path; on the device, other batch
    // shapes pick other GEMM tilings, so within float rounding.
    assert!(cosine(&vectors(&r, "tiny").0[0], &float[1]) >= 0.999_999);
    ngx.assert_healthy();
}

#[test]
fn every_error_has_openais_shape_and_the_worker_keeps_serving() {
    let dir = tiny_dir("errors");
    let ngx = tiny_server(&dir, "");
    let a = ngx.addr();
    let p = "/v1/embeddings";
    openai_error(&post(&a, p, b"{\"input\":"), 400, "not valid JSON", None);
    openai_error(&post(&a, p, b"[]"), 400, "not a JSON object", None);
    openai_error(
        &post(&a, p, br#"{"input":"x"}"#),
        400,
        "no \"model\"",
        Some("model"),
    );
    openai_error(
        &post(&a, p, br#"{"input":"x","model":"text-embedding-3-small"}"#),
        404,
        "text-embedding-3-small",
        Some("model"),
    );
    openai_error(
        &post(&a, p, br#"{"model":"tiny"}"#),
        400,
        "no \"input\"",
        Some("input"),
    );
    openai_error(
        &post(&a, p, br#"{"input":[],"model":"tiny"}"#),
        400,
        "empty",
        Some("input"),
    );
    openai_error(
        &post(&a, p, br#"{"input":[[1,2]],"model":"tiny"}"#),
        400,
        "token arrays",
        Some("input"),
    );
    openai_error(
        &post(&a, p, br#"{"input":[1,2],"model":"tiny"}"#),
        400,
        "token arrays",
        Some("input"),
    );
    openai_error(
        &post(
            &a,
            p,
            br#"{"input":"x","model":"tiny","encoding_format":"int8"}"#,
        ),
        400,
        "int8",
        Some("encoding_format"),
    );
    openai_error(
        &post(&a, p, br#"{"input":"x","model":"tiny","dimensions":8}"#),
        400,
        "36 dimensions",
        Some("dimensions"),
    );
    // Not UTF-8 inside a JSON string.
    openai_error(
        &post(&a, p, b"{\"input\":\"\xff\",\"model\":\"tiny\"}"),
        400,
        "JSON",
        None,
    );
    // POST only.
    let r = request(&a, "GET", p, Send::None);
    openai_error(&r, 405, "use POST", None);
    assert_eq!(r.header("Allow"), Some("POST"));
    let r = request(
        &a,
        "PUT",
        p,
        Send::Length(br#"{"input":"x","model":"tiny"}"#),
    );
    openai_error(&r, 405, "use POST", None);
    // Over gpu_batch_bytes (64k), under client_max_body_size: 413 from the op.
    let big = json!({"input": "a ".repeat(40_000), "model": "tiny"});
    openai_error(&embed(&a, p, big), 413, "gpu_batch_bytes", None);
    // The limits of /strict: 3 inputs, no truncation.
    openai_error(
        &embed(
            &a,
            "/strict",
            json!({"input": ["a", "b", "c", "d"], "model": "tiny"}),
        ),
        400,
        "at most 3",
        Some("input"),
    );
    openai_error(
        &embed(
            &a,
            "/strict",
            json!({"input": ["a", "the cat ".repeat(30)], "model": "tiny"}),
        ),
        400,
        "does not truncate",
        Some("input"),
    );
    let (v, n) = vectors(
        &embed(
            &a,
            "/strict",
            json!({"input": ["a", "b", "c"], "model": "tiny"}),
        ),
        "tiny",
    );
    assert_eq!((v.len(), n), (3, 9));
    // Without a GPU and with gpu_fallback off: 503 in the same shape.
    let r = embed(&a, "/nogpu", json!({"input": "a", "model": "tiny"}));
    if r.status == 503 {
        openai_error(&r, 503, "GPU", None);
        assert_eq!(r.header("Retry-After"), Some("1"));
    } else {
        assert!(gpu_required(), "{}", r.text());
        vectors(&r, "tiny");
    }
    // The worker still serves.
    vectors(
        &embed(&a, p, json!({"input": "a", "model": "tiny"})),
        "tiny",
    );
    ngx.assert_healthy();
}

#[test]
fn a_missing_or_wrong_model_fails_nginx_t() {
    let out = nginx_t(&config(
        "server { listen 127.0.0.1:1; location / { gpu_process embeddings nothere; } }",
    ));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("no model \"nothere\" is declared"), "{e}");
    let out = nginx_t(&config(
        "server { listen 127.0.0.1:1; location / { gpu_process embeddings; } }",
    ));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("needs a model name"), "{e}");
    let out = nginx_t(&config(
        "gpu_batch_tokens 0; server { listen 127.0.0.1:1; location / { gpu_process echo; } }",
    ));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("invalid value \"0\" in \"gpu_batch_tokens\""),
        "{e}"
    );
}

#[test]
fn concurrent_requests_share_batches_over_http1_and_http2() {
    let dir = tiny_dir("batches");
    let ngx = tiny_server(&dir, "");
    let a = ngx.addr();
    // One reference vector per text, each alone.
    let texts: Vec<String> = (0..24)
        .map(|i| format!("the cat {} sat on {} mats", "a ".repeat(i % 5), i))
        .collect();
    let want: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            vectors(
                &embed(&a, "/v1/embeddings", json!({"input": t, "model": "tiny"})),
                "tiny",
            )
            .0
            .remove(0)
        })
        .collect();
    // 24 clients at once on /batched (gpu_batch_delay 200ms): requests of 1 or 2 texts,
    // every third over HTTP/2 (http2 is on for this port).
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let a = a.clone();
            let texts = texts.clone();
            std::thread::spawn(move || {
                let mine: Vec<usize> = if i % 2 == 0 {
                    vec![i]
                } else {
                    vec![i, (i + 7) % 24]
                };
                let input: Vec<&str> = mine.iter().map(|&k| texts[k].as_str()).collect();
                let body = serde_json::to_vec(&json!({"input": input, "model": "tiny",
                    "encoding_format": "base64"}))
                .unwrap();
                let r = if i % 3 == 0 {
                    let (status, body) = post_h2(&a, "/batched", &body);
                    Response {
                        status,
                        headers: vec![("Content-Type".into(), "application/json".into())],
                        body,
                    }
                } else {
                    post(&a, "/batched", &body)
                };
                (mine, vectors(&r, "tiny").0)
            })
        })
        .collect();
    for t in threads {
        let (mine, got) = t.join().unwrap();
        assert_eq!(got.len(), mine.len());
        for (k, v) in mine.iter().zip(&got) {
            assert!(cosine(v, &want[*k]) >= 0.999_999, "text {k}");
        }
    }
    // The counters of /batched: 24 requests in fewer batches.
    let m = get_text(&a, "/metrics");
    // Summed over the devices (`device` label) the workers count under.
    let series = |name: &str| -> u64 {
        let values: Vec<u64> = m
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("location=\"/batched\""))
            .filter_map(|l| l.rsplit(' ').next())
            .map(|v| v.parse::<f64>().unwrap() as u64)
            .collect();
        assert!(!values.is_empty(), "{name} missing:\n{m}");
        values.iter().sum()
    };
    let (requests, batches) = (
        series("nv_inference_count"),
        series("nv_inference_exec_count"),
    );
    assert_eq!(requests, 24, "{m}");
    assert!(
        batches < requests,
        "{batches} batches for {requests} requests:\n{m}"
    );
    ngx.assert_healthy();
}

fn get_text(a: &str, path: &str) -> String {
    request(a, "GET", path, Send::None).text()
}

#[test]
fn kserve_serves_embed_models_with_bytes_inputs() {
    let dir = tiny_dir("kserve");
    let ngx = tiny_server(&dir, "");
    let a = ngx.addr();
    let meta = json_of(&request(&a, "GET", "/v2/models/tiny", Send::None));
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "TEXT", "datatype": "BYTES", "shape": [-1]})
    );
    assert_eq!(
        meta["outputs"][0],
        json!({"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 36]})
    );
    let texts = ["hello world", "", "ça"];
    let (want, _) = vectors(
        &embed(
            &a,
            "/v1/embeddings",
            json!({"input": texts, "model": "tiny"}),
        ),
        "tiny",
    );
    // JSON in, JSON out.
    let r = embed(
        &a,
        "/v2/models/tiny/infer",
        json!({"id": "q1", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3], "data": texts}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of(&r);
    assert_eq!(v["id"], "q1");
    let o = &v["outputs"][0];
    assert_eq!(
        (o["name"].clone(), o["datatype"].clone()),
        (json!("EMBEDDING"), json!("FP32"))
    );
    assert_eq!(o["shape"], json!([3, 36]));
    let flat: Vec<f32> = o["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    for i in 0..3 {
        assert_eq!(&flat[i * 36..(i + 1) * 36], &want[i][..], "text {i}");
    }
    // Binary in (Triton's 4-byte lengths), binary out.
    let mut bin = Vec::new();
    for t in texts {
        bin.extend_from_slice(&(t.len() as u32).to_le_bytes());
        bin.extend_from_slice(t.as_bytes());
    }
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3],
                    "parameters": {"binary_data_size": bin.len()}}],
        "parameters": {"binary_data_output": true}
    }))
    .unwrap();
    let mut body = header.clone();
    body.extend_from_slice(&bin);
    let r = request_with(
        &a,
        "POST",
        "/v2/models/tiny/infer",
        &[("Inference-Header-Content-Length", &header.len().to_string())],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let hl: usize = r
        .header("Inference-Header-Content-Length")
        .unwrap()
        .parse()
        .unwrap();
    let got: Vec<f32> = r.body[hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, want.concat());
    // Refusals in KServe's own shape.
    let r = embed(
        &a,
        "/v2/models/tiny/infer",
        json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["a", 1]}]}),
    );
    assert_eq!(r.status, 400);
    assert!(
        json_of(&r)["error"]
            .as_str()
            .unwrap()
            .contains("non-string"),
        "{}",
        r.text()
    );
    ngx.assert_healthy();
}

#[test]
fn minilm_answers_like_sentence_transformers() {
    let Some(model) = minilm() else { return };
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(source_path("t/embed/golden.json")).unwrap())
            .unwrap();
    let texts: Vec<&str> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let ids = golden["ids"].as_array().unwrap();
    let reference: Vec<Vec<f32>> = golden["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    // The example configuration, with the fetched model where it expects its link. fp32 on
    // the device too: the golden vectors' floor is fp32's.
    let text = std::fs::read_to_string(conf_dir().join("embeddings.conf")).unwrap();
    assert!(text.contains("embed models/all-MiniLM-L6-v2 precision=fp16;"));
    let text = text
        .replace(
            "embed models/all-MiniLM-L6-v2 precision=fp16;",
            &format!("embed {} precision=fp32;", model.display()),
        )
        .replace("listen 127.0.0.1:8080;", "listen 127.0.0.1:{PORT};")
        .replace("pid logs/nginx.pid;", "");
    let ngx = Nginx::start(&text);
    let a = ngx.addr();
    let name = "all-MiniLM-L6-v2";
    for format in ["float", "base64"] {
        let r = embed(
            &a,
            "/v1/embeddings",
            json!({"input": texts, "model": name, "encoding_format": format}),
        );
        let (got, tokens) = vectors(&r, name);
        assert_eq!(got.len(), texts.len());
        for i in 0..texts.len() {
            let c = cosine(&got[i], &reference[i]);
            assert!(c >= 0.9999, "{format} text {i} {:?}: cosine {c}", texts[i]);
        }
        let want: u64 = ids.iter().map(|x| x.as_array().unwrap().len() as u64).sum();
        assert_eq!(tokens, want, "usage against the reference tokenizer");
    }
    // Each text alone: the reference tokenizer's count, over HTTP/2 for some.
    for i in [0, 1, 6, 9, 16, 29, 31] {
        let body = serde_json::to_vec(&json!({"input": texts[i], "model": name})).unwrap();
        let r = post(&a, "/v1/embeddings", &body);
        let (got, tokens) = vectors(&r, name);
        assert_eq!(tokens, ids[i].as_array().unwrap().len() as u64, "text {i}");
        assert!(cosine(&got[0], &reference[i]) >= 0.9999, "text {i}");
    }
    // KServe on the same model.
    let r = embed(
        &a,
        "/v2/models/all-MiniLM-L6-v2/infer",
        json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": [texts[4], texts[5]]}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let o = &json_of(&r)["outputs"][0];
    assert_eq!(o["shape"], json!([2, 384]));
    let flat: Vec<f32> = o["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert!(cosine(&flat[..384], &reference[4]) >= 0.9999);
    assert!(cosine(&flat[384..], &reference[5]) >= 0.9999);
    ngx.assert_healthy();
}

/// The official `openai` client, unmodified (t/openai/client.py), with the python of the
/// venv t/openai/test.sh makes; skipped, saying so, without it. Against the real model and
/// golden.json where it was fetched, else the generated one.
#[test]
fn openai_client() {
    let Ok(python) = std::env::var("NGX_GPU_OPENAI_PYTHON") else {
        eprintln!("SKIPPED: openai client: run t/openai/test.sh (make check does)");
        return;
    };
    let (dir, name, golden) = match minilm() {
        Some(m) => (m, "all-MiniLM-L6-v2", source_path("t/embed/golden.json")),
        None => (tiny_dir("openai"), "tiny", PathBuf::from("-")),
    };
    let ngx = Nginx::start(&config(&format!(
        "gpu_model {name} embed {} precision=fp32;\n\
         server {{\n\
             listen 127.0.0.1:{{PORT}};\n\
             location = /v1/embeddings {{ gpu_process embeddings {name}; }}\n\
         }}\n",
        dir.display()
    )));
    let out = std::process::Command::new(python)
        .arg(source_path("t/openai/client.py"))
        .arg(ngx.addr())
        .arg(name)
        .arg(&golden)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
    eprintln!("{stdout}");
    ngx.assert_healthy();
}
