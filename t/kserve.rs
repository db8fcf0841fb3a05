//! `gpu_process kserve;` against a real nginx: the KServe v2 routes, knn models searched
//! on the CPU path (or the device where there is one), answers checked against an exact
//! float64 reference computed here, and the protocol's errors.

mod harness;

use std::path::Path;

use harness::*;
use serde_json::{json, Value};

#[path = "embed/tiny.rs"]
mod tiny;

const D: usize = 9;
const N: usize = 301;

struct Data {
    rows: Vec<f32>,
    ids: Vec<i64>,
}

fn rand_f32(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next() % 2_000_001) as f64 / 1_000_000.0 - 1.0) as f32)
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An ip index with ids (fp32), and the same rows as an l2 index (fp16, exactly
/// representable values: multiples of 1/64 in [-1, 1]).
fn write_models(dir: &Path, rng: &mut Rng) -> (Data, Vec<f32>) {
    let rows = rand_f32(rng, N * D);
    let ids: Vec<i64> = (0..N as i64).map(|i| 5_000_000_000 + 3 * i).collect();
    write_npy(
        &dir.join("ip.npy"),
        "<f4",
        false,
        &[N, D],
        &f32_bytes(&rows),
    );
    let id_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_npy(&dir.join("ids.npy"), "<i8", false, &[N], &id_bytes);
    let halves: Vec<f32> = rows.iter().map(|x| (x * 64.0).round() / 64.0).collect();
    let h: Vec<u8> = halves
        .iter()
        .flat_map(|&x| half_bits(x).to_le_bytes())
        .collect();
    write_npy(&dir.join("l2.npy"), "<f2", false, &[N, D], &h);
    (Data { rows, ids }, halves)
}

/// IEEE half bits of a value that a half holds exactly (|x| <= 1, multiple of 1/64).
fn half_bits(x: f32) -> u16 {
    if x == 0.0 {
        return 0;
    }
    let sign = if x < 0.0 { 0x8000u16 } else { 0 };
    let a = x.abs();
    let e = a.log2().floor() as i32;
    let man = ((a / 2f32.powi(e) - 1.0) * 1024.0).round() as u16;
    sign | (((e + 15) as u16) << 10) | man
}

fn conf(dir: &Path) -> String {
    conf_delay(dir, "2ms")
}

/// With `gpu_batch_delay` `delay`, and each request's batch size in logs/batch.log.
fn conf_delay(dir: &Path, delay: &str) -> String {
    let d = dir.display();
    config(&format!(
        "gpu_model vectors knn {d}/ip.npy metric=ip ids={d}/ids.npy k=5;\n\
         gpu_model near knn {d}/l2.npy metric=l2 batch_rows=64;\n\
         log_format batch '$gpu_batch_size';\n\
         server {{ listen 127.0.0.1:{{PORT}}; access_log logs/batch.log batch;\n\
           add_header X-Device $gpu_device;\n\
           location /v2 {{ gpu_process kserve; gpu_batch_size 32; gpu_batch_delay {delay}; }}\n\
         }}"
    ))
}

/// Exact best-first (score, row) of `q` over `rows`.
fn reference(rows: &[f32], q: &[f32], l2: bool) -> Vec<(f64, usize)> {
    let mut all: Vec<(f64, usize)> = rows
        .chunks_exact(D)
        .enumerate()
        .map(|(i, x)| {
            let s: f64 = if l2 {
                q.iter()
                    .zip(x)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum()
            } else {
                q.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
            };
            (s, i)
        })
        .collect();
    all.sort_by(|a, b| {
        let o = if l2 {
            a.0.total_cmp(&b.0)
        } else {
            b.0.total_cmp(&a.0)
        };
        o.then(a.1.cmp(&b.1))
    });
    all
}

/// Checks one query's hits: scores within `tol(score)` of the exact ones, rows equal unless
/// their exact scores tie within it.
fn check(
    rows_hit: &[usize],
    scores: &[f32],
    want: &[(f64, usize)],
    tol: impl Fn(f64) -> f64,
    what: &str,
) {
    for (j, (&r, &s)) in rows_hit.iter().zip(scores).enumerate() {
        let (ws, wr) = want[j];
        assert!(
            (s as f64 - ws).abs() <= tol(ws),
            "{what}: hit {j}: {s} vs {ws}"
        );
        if r != wr {
            let theirs = want.iter().find(|w| w.1 == r).unwrap().0;
            assert!(
                (theirs - ws).abs() <= 2.0 * tol(ws),
                "{what}: hit {j}: row {r} vs {wr}"
            );
        }
    }
}

/// The tolerance of a score: the CPU path and the device's fp32 product are exact to 1e-5;
/// a float16 index on a device multiplies in float16 (queries rounded to it) with float32
/// sums, stated to 2e-3 x (|q| + max|x|)^2 for L2 (the README's knn accuracy).
fn tolerance(device_fp16: bool, q: &[f32], rows: &[f32]) -> impl Fn(f64) -> f64 {
    let qn = q.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let xmax = rows
        .chunks_exact(D)
        .map(|x| x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
        .fold(0.0, f64::max);
    move |ws: f64| {
        if device_fp16 {
            2e-3 * (qn + xmax).powi(2)
        } else {
            1e-5 * ws.abs().max(1.0)
        }
    }
}

/// (IDS, SCORES, shape) of an infer answer, JSON or binary.
fn outputs(r: &Response) -> (Vec<i64>, Vec<f32>, Vec<u64>) {
    let (json_part, mut bin) = match r.header("Inference-Header-Content-Length") {
        Some(n) => r.body.split_at(n.parse().unwrap()),
        None => (&r.body[..], &[][..]),
    };
    let doc: Value = serde_json::from_slice(json_part).unwrap();
    let (mut ids, mut scores, mut shape) = (Vec::new(), Vec::new(), Vec::new());
    for o in doc["outputs"].as_array().unwrap() {
        shape = o["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let size = o["parameters"]["binary_data_size"].as_u64();
        let name = o["name"].as_str().unwrap();
        match size {
            Some(s) => {
                let (mine, rest) = bin.split_at(s as usize);
                bin = rest;
                if name == "IDS" {
                    ids = mine
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                } else {
                    scores = mine
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                }
            }
            None if name == "IDS" => {
                ids = o["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect()
            }
            None => {
                scores = o["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            }
        }
    }
    (ids, scores, shape)
}

fn infer(addr: &str, model: &str, q: &[f32], rows: usize, binary: bool, extra: Value) -> Response {
    let mut input = json!({"name": "QUERY", "datatype": "FP32", "shape": [rows, D]});
    let mut req = extra;
    if binary {
        input["parameters"] = json!({"binary_data_size": q.len() * 4});
        req["inputs"] = json!([input]);
        let mut body = serde_json::to_vec(&req).unwrap();
        let n = body.len().to_string();
        body.extend_from_slice(&f32_bytes(q));
        request_with(
            addr,
            "POST",
            &format!("/v2/models/{model}/infer"),
            &[("Inference-Header-Content-Length", &n)],
            &body,
        )
    } else {
        input["data"] = json!(q);
        req["inputs"] = json!([input]);
        post(
            addr,
            &format!("/v2/models/{model}/infer"),
            &serde_json::to_vec(&req).unwrap(),
        )
    }
}

fn get(addr: &str, path: &str) -> Response {
    request(addr, "GET", path, Send::None)
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

#[test]
fn metadata_health_and_readiness() {
    let mut rng = Rng::fresh();
    let dir = data_dir("kserve-meta");
    write_models(&dir, &mut rng);
    let ngx = Nginx::start(&conf(&dir));
    let a = ngx.addr();
    let r = get(&a, "/v2");
    assert_eq!(r.status, 200);
    let m = json_of(&r);
    assert_eq!(m["name"], "ngx_http_gpu_module");
    assert!(m["version"].is_string());
    assert!(m["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("binary_tensor_data")));
    assert_eq!(get(&a, "/v2/health/live").status, 200);
    assert_eq!(get(&a, "/v2/health/ready").status, 200);
    for path in ["/v2/models/vectors", "/v2/models/vectors/versions/1"] {
        let r = get(&a, path);
        assert_eq!(r.status, 200, "{path}");
        let m = json_of(&r);
        assert_eq!(m["name"], "vectors");
        assert_eq!(m["versions"], json!(["1"]));
        assert_eq!(
            m["inputs"],
            json!([{"name": "QUERY", "datatype": "FP32", "shape": [-1, D]}])
        );
        assert_eq!(
            m["outputs"][0],
            json!({"name": "IDS", "datatype": "INT64", "shape": [-1, -1]})
        );
        assert_eq!(
            m["outputs"][1],
            json!({"name": "SCORES", "datatype": "FP32", "shape": [-1, -1]})
        );
    }
    assert_eq!(get(&a, "/v2/models/near/ready").status, 200);
    let c = json_of(&get(&a, "/v2/models/near/config"));
    assert_eq!(c["input"][0]["data_type"], "TYPE_FP32");
    // Unknown model, version, route; wrong methods.
    for path in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/vectors/versions/2",
        "/v2/models/vectors/explain",
        "/v2/x",
    ] {
        let r = get(&a, path);
        assert_eq!(r.status, 404, "{path}");
        assert!(json_of(&r)["error"].is_string(), "{path}");
    }
    let r = post(&a, "/v2/models/nope/infer", b"{}");
    assert_eq!(r.status, 404);
    assert!(json_of(&r)["error"]
        .as_str()
        .unwrap()
        .contains("unknown model \"nope\""));
    let r = get(&a, "/v2/models/vectors/infer");
    assert_eq!((r.status, r.header("Allow")), (405, Some("POST")));
    let r = post(&a, "/v2/models/vectors", b"");
    assert_eq!((r.status, r.header("Allow")), (405, Some("GET, HEAD")));
    ngx.assert_healthy();
}

/// Triton's repository and statistics extensions (tritonclient checks them too): bodies
/// read whole (also from a temp file), methods, limits, and counts that follow requests.
#[test]
fn repository_and_statistics_extensions() {
    let mut rng = Rng::fresh();
    let dir = data_dir("kserve-ext");
    let (_, ip) = write_models(&dir, &mut rng);
    let d = dir.display();
    let ngx = Nginx::start(&config(&format!(
        "gpu_model vectors knn {d}/ip.npy metric=ip ids={d}/ids.npy k=5;\n\
         gpu_model near knn {d}/l2.npy metric=l2;\n\
         server {{ listen 127.0.0.1:{{PORT}};\n\
           location /v2 {{ gpu_process kserve; }}\n\
           location /file/ {{ rewrite ^/file(/.*)$ $1 break; gpu_process kserve;\n\
             client_body_in_file_only on; }}\n\
         }}"
    )));
    let a = ngx.addr();
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    for (path, body) in [
        ("/v2/repository/index", &b""[..]),
        ("/v2/repository/index", b"{\"ready\": true}"),
        ("/file/v2/repository/index", b"{\"ready\": false}"),
    ] {
        let r = post(&a, path, body);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let v = json_of(&r);
        assert_eq!(names(&v), ["near", "vectors"], "{path}");
        assert_eq!(v[0]["state"], "READY");
    }
    let r = post(&a, "/v2/repository/index", b"{\"ready\": \"yes\"}");
    assert_eq!(r.status, 400);
    assert!(json_of(&r)["error"].as_str().unwrap().contains("boolean"));
    let r = post(&a, "/v2/repository/index", &vec![b' '; 70 * 1024]);
    assert_eq!(r.status, 413, "{}", r.text());
    let r = get(&a, "/v2/repository/index");
    assert_eq!((r.status, r.header("Allow")), (405, Some("POST")));
    assert_eq!(
        post(&a, "/v2/repository/models/near/load", b"{}").status,
        200
    );
    assert_eq!(
        post(&a, "/file/v2/repository/models/near/load", b"").status,
        200
    );
    for (path, body, want) in [
        (
            "/v2/repository/models/nope/load",
            &b"{}"[..],
            "failed to load 'nope'",
        ),
        (
            "/v2/repository/models/near/load",
            b"{\"parameters\": {\"config\": \"{}\"}}",
            "\"config\" is not supported",
        ),
        (
            "/v2/repository/models/near/unload",
            b"{}",
            "failed to unload 'near'",
        ),
    ] {
        let r = post(&a, path, body);
        assert_eq!(r.status, 400, "{path}");
        let msg = json_of(&r)["error"].as_str().unwrap().to_string();
        assert!(msg.contains(want), "{path}: {msg}");
    }
    // Statistics: three good requests and one bad one of "vectors", none of "near".
    for rows in [1, 2, 3] {
        let q = rand_f32(&mut rng, rows * D);
        assert_eq!(infer(&a, "vectors", &q, rows, true, json!({})).status, 200);
    }
    let bad = infer(&a, "vectors", &ip[..D + 1], 1, false, json!({}));
    assert_eq!(bad.status, 400);
    let s = json_of(&get(&a, "/v2/models/vectors/stats"));
    let m = &s["model_stats"][0];
    assert_eq!(m["name"], "vectors");
    assert_eq!(m["inference_stats"]["success"]["count"], 3);
    assert_eq!(m["inference_stats"]["fail"]["count"], 1);
    assert_eq!(m["inference_count"], 3);
    assert!(m["inference_stats"]["success"]["ns"].as_u64().unwrap() > 0);
    let all = json_of(&get(&a, "/v2/models/stats"));
    let near = &all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "near")
        .unwrap()["inference_stats"];
    assert_eq!(near["success"]["count"], 0);
    assert_eq!(
        json_of(&get(&a, "/v2/models/vectors/versions/1/stats"))["model_stats"][0]["name"],
        "vectors"
    );
    assert_eq!(get(&a, "/v2/models/nope/stats").status, 404);
    ngx.assert_healthy();
}

#[test]
fn infer_answers_match_an_exact_reference() {
    let mut rng = Rng::fresh();
    let dir = data_dir("kserve-infer");
    let (data, halves) = write_models(&dir, &mut rng);
    // A delay long enough that concurrent requests of a model share batches.
    let ngx = Nginx::start(&conf_delay(&dir, "30ms"));
    let a = ngx.addr();
    // Concurrent clients so that requests batch; 1 to 3 rows each; JSON and binary; the
    // model's default k, k = 1, k = N and k > N (cut to N).
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let a = a.clone();
            let data = &data;
            let halves = &halves;
            s.spawn(move || {
                let mut rng = Rng(0x1234 + t);
                for i in 0..15 {
                    let rows = 1 + (rng.next() % 3) as usize;
                    let q = rand_f32(&mut rng, rows * D);
                    let l2 = i % 3 == 2;
                    let k =
                        [None, Some(1), Some(N), Some(N + 7), Some(17)][(rng.next() % 5) as usize];
                    let extra = match k {
                        Some(k) => json!({"parameters": {"k": k}, "id": format!("t{t}-{i}")}),
                        None => json!({"id": format!("t{t}-{i}")}),
                    };
                    let model = if l2 { "near" } else { "vectors" };
                    let r = infer(&a, model, &q, rows, i % 2 == 0, extra);
                    assert_eq!(r.status, 200, "{}", r.text());
                    let want_k = k.unwrap_or(if l2 { 10 } else { 5 }).min(N);
                    let (ids, scores, shape) = outputs(&r);
                    assert_eq!(shape, [rows as u64, want_k as u64]);
                    let index = if l2 { halves } else { &data.rows };
                    // "near" is a float16 index: a device computes it in float16.
                    let on_gpu = r.header("X-Device").is_some_and(is_gpu);
                    for (qi, qv) in q.chunks_exact(D).enumerate() {
                        let want = reference(index, qv, l2);
                        let hit_rows: Vec<usize> = ids[qi * want_k..(qi + 1) * want_k]
                            .iter()
                            .map(|&id| {
                                if l2 {
                                    id as usize
                                } else {
                                    data.ids.iter().position(|&x| x == id).expect("a known id")
                                }
                            })
                            .collect();
                        check(
                            &hit_rows,
                            &scores[qi * want_k..(qi + 1) * want_k],
                            &want,
                            tolerance(l2 && on_gpu, qv, index),
                            &format!("{model} {t}/{i}"),
                        );
                    }
                }
            });
        }
    });
    // Requests of a model were batched together (several requests in one batch).
    let sizes = ngx.wait_log_lines("batch.log", 6 * 15);
    assert!(
        sizes
            .iter()
            .any(|l| l.trim().parse::<usize>().unwrap_or(0) > 1),
        "no batch of more than one request: {sizes:?}"
    );
    ngx.assert_healthy();
}

#[test]
fn outputs_by_name_binary_or_json_and_the_id_echoed() {
    let mut rng = Rng::fresh();
    let dir = data_dir("kserve-outputs");
    write_models(&dir, &mut rng);
    let ngx = Nginx::start(&conf(&dir));
    let a = ngx.addr();
    let q = rand_f32(&mut rng, D);
    // Only SCORES, in binary; IDS absent.
    let r = infer(
        &a,
        "vectors",
        &q,
        1,
        true,
        json!({"id": "abc", "outputs": [{"name": "SCORES", "parameters": {"binary_data": true}}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let n: usize = r
        .header("Inference-Header-Content-Length")
        .unwrap()
        .parse()
        .unwrap();
    let doc: Value = serde_json::from_slice(&r.body[..n]).unwrap();
    assert_eq!(doc["id"], "abc");
    assert_eq!(doc["model_name"], "vectors");
    assert_eq!(doc["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(doc["outputs"][0]["name"], "SCORES");
    assert_eq!(r.body.len() - n, 5 * 4);
    // No outputs named, binary_data_output: both, binary.
    let r = infer(
        &a,
        "vectors",
        &q,
        1,
        false,
        json!({"parameters": {"binary_data_output": true}}),
    );
    let (ids, scores, _) = outputs(&r);
    assert_eq!((ids.len(), scores.len()), (5, 5));
    assert!(r.header("Inference-Header-Content-Length").is_some());
    // Nothing said: JSON only, no length header.
    let r = infer(&a, "vectors", &q, 1, true, json!({}));
    assert!(r.header("Inference-Header-Content-Length").is_none());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let (ids2, scores2, _) = outputs(&r);
    assert_eq!((ids2, scores2), (ids, scores));
    ngx.assert_healthy();
}

#[test]
fn malformed_requests_get_400_with_a_json_error() {
    let mut rng = Rng::fresh();
    let dir = data_dir("kserve-errors");
    write_models(&dir, &mut rng);
    let ngx = Nginx::start(&conf(&dir));
    let a = ngx.addr();
    let q = rand_f32(&mut rng, 2 * D);
    let bad = |r: Response, want: &str| {
        assert_eq!(r.status, 400, "{want}: {}", r.text());
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let e = json_of(&r)["error"].as_str().unwrap().to_string();
        assert!(e.contains(want), "{want}: {e}");
    };
    bad(
        post(&a, "/v2/models/vectors/infer", b"{not json"),
        "not valid JSON",
    );
    bad(post(&a, "/v2/models/vectors/infer", b""), "not valid JSON");
    bad(infer(&a, "vectors", &q, 3, false, json!({})), "needs 27");
    bad(
        infer(&a, "vectors", &q, 2, false, json!({"parameters": {"k": 0}})),
        "parameter \"k\"",
    );
    bad(
        infer(
            &a,
            "vectors",
            &q,
            2,
            false,
            json!({"parameters": {"k": 5000}}),
        ),
        "parameter \"k\"",
    );
    let body = serde_json::to_vec(&json!({"inputs": [{"name": "QUERY", "datatype": "FP64", "shape": [1, D], "data": vec![0.0; D]}]})).unwrap();
    bad(post(&a, "/v2/models/vectors/infer", &body), "datatype FP64");
    // Binary data shorter than binary_data_size, and a header length past the body.
    let mut req = json!({"inputs": [{"name": "QUERY", "datatype": "FP32", "shape": [2, D], "parameters": {"binary_data_size": 2 * D * 4}}]});
    let mut body = serde_json::to_vec(&req).unwrap();
    let n = body.len().to_string();
    body.extend_from_slice(&f32_bytes(&q)[..10]);
    bad(
        request_with(
            &a,
            "POST",
            "/v2/models/vectors/infer",
            &[("Inference-Header-Content-Length", &n)],
            &body,
        ),
        "binary_data_size",
    );
    bad(
        request_with(
            &a,
            "POST",
            "/v2/models/vectors/infer",
            &[("Inference-Header-Content-Length", "99999")],
            &body,
        ),
        "larger than the body",
    );
    bad(
        request_with(
            &a,
            "POST",
            "/v2/models/vectors/infer",
            &[("Inference-Header-Content-Length", "x")],
            &body,
        ),
        "is not a length",
    );
    req["inputs"][0]["shape"] = json!([2, D + 1]);
    bad(
        post(
            &a,
            "/v2/models/vectors/infer",
            &serde_json::to_vec(&req).unwrap(),
        ),
        "binary_data_size",
    );
    // The worker still serves.
    let r = infer(&a, "vectors", &q, 2, true, json!({}));
    assert_eq!(r.status, 200);
    ngx.assert_healthy();
}

#[test]
fn the_example_config_serves_its_model() {
    let ngx = Nginx::example("kserve.conf");
    let a = ngx.addr();
    let m = json_of(&get(&a, "/v2/models/example"));
    let d = m["inputs"][0]["shape"][1].as_u64().unwrap() as usize;
    let body = serde_json::to_vec(&json!({"inputs": [{"name": "QUERY", "datatype": "FP32", "shape": [1, d], "data": vec![0.5; d]}]})).unwrap();
    let r = post(&a, "/v2/models/example/infer", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // Each served model is counted under its own name, with the kserve location's label:
    // the 200 above, and one 400 (a request without its input).
    let r = post(&a, "/v2/models/example/infer", br#"{"inputs": []}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let m = get(&a, "/metrics").text();
    // Each value summed over the devices (`device` label) the workers count under.
    let series = |name: &str, more: &str| -> Option<u64> {
        let prefix = format!("{name}{{model=\"example\",location=\"/v2\",device=");
        let values: Vec<u64> = m
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(more))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    assert_eq!(series("nv_inference_request_success", ""), Some(1), "{m}");
    assert_eq!(
        series("nv_inference_request_failure", "reason=\"bad_request\""),
        Some(1),
        "{m}"
    );
    assert_eq!(series("nv_inference_exec_count", ""), Some(1), "{m}");
    ngx.assert_healthy();
}

/// Triton's client, unmodified (t/tritonclient/client.py), with the python of the venv
/// t/tritonclient/test.sh makes; skipped, saying so, without it.
#[test]
fn tritonclient() {
    let Ok(python) = std::env::var("NGX_GPU_TRITON_PYTHON") else {
        eprintln!("SKIPPED: tritonclient: run t/tritonclient/test.sh (make check does)");
        return;
    };
    let mut rng = Rng::fresh();
    let dir = data_dir("kserve-triton");
    write_models(&dir, &mut rng);
    // A generated embed model beside the knn models (TEXT BYTES in, EMBEDDING FP32 out).
    tiny::Tiny::new(&dir.join("tiny"), 0x7c11).write();
    let ngx = Nginx::start(&conf(&dir).replace(
        "gpu_model near",
        &format!(
            "gpu_model tiny embed {} precision=fp32;\n gpu_model near",
            dir.join("tiny").display()
        ),
    ));
    let script = source_path("t/tritonclient/client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(ngx.addr())
        .arg(&dir)
        .arg("tiny")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
    eprintln!("{stdout}");
    ngx.assert_healthy();
}
