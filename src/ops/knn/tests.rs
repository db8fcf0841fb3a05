//! knn on the CPU against an exact float64 reference written here, `.npy` loading and its
//! errors, the KServe request decoding of knn, and batches of many requests through the
//! GPU thread on the test device.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::index::{f16_to_f32, Index, Metric, Precision};
use super::*;
use crate::engine::job::{Batching, Body, Device as Ran, Fallback, Job, Segment};
use crate::engine::thread::{Config, GpuThread, Kernels};
use crate::testing::{collect, log_lines, wait_done, Rng};

#[path = "../../../t/npy.rs"]
mod npy;
pub use npy::write_npy;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ngx-gpu-knn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// f32 to IEEE half, round to nearest even (independent of the module's widening).
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let man = b & 0x7f_ffff;
    if exp >= 31 {
        return sign | 0x7c00;
    }
    if exp <= 0 {
        if exp < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - exp) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let mid = 1 << (shift - 1);
        let r = if rem > mid || (rem == mid && half & 1 == 1) {
            half + 1
        } else {
            half
        };
        return sign | r as u16;
    }
    let half = ((exp as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let r = if rem > 0x1000 || (rem == 0x1000 && half & 1 == 1) {
        half + 1
    } else {
        half
    };
    sign | r as u16
}

fn random_rows(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(2_000_001) as f64 / 1_000_000.0 - 1.0) as f32)
        .collect()
}

fn index(rows: Vec<f32>, n: usize, d: usize, metric: Metric, ids: Option<Vec<i64>>) -> Index {
    let mut rows = rows;
    if metric == Metric::Cosine {
        for r in rows.chunks_exact_mut(d) {
            index::normalize(r);
        }
    }
    Index {
        n,
        d,
        rows,
        metric,
        precision: Precision::Fp32,
        ids,
    }
}

/// The exact answer, written apart from `cpu.rs`: every score in f64 from the original
/// (unnormalized) rows, all rows sorted.
fn reference(raw: &[f32], d: usize, q: &[f32], metric: Metric) -> Vec<(f64, i64)> {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let mut all: Vec<(f64, i64)> = raw
        .chunks_exact(d)
        .enumerate()
        .map(|(i, x)| {
            let dot: f64 = q.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let s = match metric {
                Metric::Ip => dot,
                Metric::Cosine => {
                    let n = norm(q) * norm(x);
                    if n == 0.0 {
                        0.0
                    } else {
                        dot / n
                    }
                }
                Metric::L2 => q
                    .iter()
                    .zip(x)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum(),
            };
            (s, i as i64)
        })
        .collect();
    all.sort_by(|a, b| {
        let o = if metric == Metric::L2 {
            a.0.total_cmp(&b.0)
        } else {
            b.0.total_cmp(&a.0)
        };
        o.then(a.1.cmp(&b.1))
    });
    all
}

/// Checks `hits` for query `q` against the reference: scores within `tol` (relative to
/// the largest magnitude), ids equal except where the reference's scores tie within `tol`.
fn check(hits_rows: &[i64], hits_scores: &[f32], want: &[(f64, i64)], tol: f64, what: &str) {
    assert_eq!(hits_rows.len(), hits_scores.len());
    let scale = want.iter().map(|w| w.0.abs()).fold(1.0, f64::max);
    for (j, (&row, &s)) in hits_rows.iter().zip(hits_scores).enumerate() {
        let (ws, wr) = want[j];
        assert!(
            (s as f64 - ws).abs() <= tol * scale,
            "{what}: hit {j} score {s} vs {ws}"
        );
        if row != wr {
            // A different row is right only if its exact score ties the expected one.
            let theirs = want
                .iter()
                .find(|w| w.1 == row)
                .expect("a row of the index")
                .0;
            assert!(
                (theirs - ws).abs() <= tol * scale,
                "{what}: hit {j} row {row} (score {theirs}) where {wr} (score {ws})"
            );
        }
    }
}

#[test]
fn cpu_search_matches_an_exact_reference() {
    let mut rng = Rng::fresh();
    // n = 1, odd d, sizes not a multiple of any tile, k = 1 and k = N and more than N.
    for &(n, d) in &[
        (1, 1),
        (1, 7),
        (5, 3),
        (33, 17),
        (257, 31),
        (1000, 64),
        (1025, 129),
    ] {
        for metric in [Metric::Ip, Metric::Cosine, Metric::L2] {
            let raw = random_rows(&mut rng, n * d);
            let idx = index(raw.clone(), n, d, metric, None);
            let nq = 1 + rng.below(3) as usize;
            let queries = random_rows(&mut rng, nq * d);
            for k in [1, 2, n, n + 3, 10] {
                let hits = cpu::search(&idx, &queries, k);
                assert_eq!(hits.k, k.min(n));
                assert_eq!(hits.rows.len(), nq * hits.k);
                for (qi, q) in queries.chunks_exact(d).enumerate() {
                    let want = reference(&raw, d, q, metric);
                    let r = qi * hits.k..(qi + 1) * hits.k;
                    check(
                        &hits.rows[r.clone()],
                        &hits.scores[r],
                        &want,
                        1e-6,
                        &format!("n {n} d {d} {metric:?} k {k} query {qi}"),
                    );
                }
            }
        }
    }
}

#[test]
fn ties_go_to_the_lower_row() {
    // Rows 1, 3 and 4 are equal: the same score, listed in row order.
    let d = 2;
    let raw = vec![0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0];
    for metric in [Metric::Ip, Metric::L2] {
        let idx = index(raw.clone(), 5, d, metric, None);
        let hits = cpu::search(&idx, &[1.0, 1.0], 3);
        assert_eq!(hits.rows, [1, 3, 4], "{metric:?}");
    }
}

#[test]
fn npy_files_load_and_fp16_widens_exactly() {
    let mut rng = Rng::fresh();
    let (n, d) = (37, 5);
    let raw = random_rows(&mut rng, n * d);
    let p = tmp("rows32.npy");
    write_npy(&p, "<f4", false, &[n, d], &f32_bytes(&raw));
    let idx = Index::load(p.to_str().unwrap(), Metric::Ip, None, None).unwrap();
    assert_eq!((idx.n, idx.d, idx.precision), (n, d, Precision::Fp32));
    assert_eq!(idx.rows, raw);
    assert_eq!(idx.id_of(7), 7);

    let halves: Vec<u16> = raw.iter().map(|&x| f32_to_f16(x)).collect();
    let p16 = tmp("rows16.npy");
    let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    write_npy(&p16, "<f2", false, &[n, d], &bytes);
    let ids: Vec<i64> = (0..n as i64).map(|i| 1000 - 3 * i).collect();
    let pids = tmp("ids.npy");
    write_npy(
        &pids,
        "<i8",
        false,
        &[n],
        &ids.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(),
    );
    let idx = Index::load(
        p16.to_str().unwrap(),
        Metric::L2,
        None,
        Some(pids.to_str().unwrap()),
    )
    .unwrap();
    assert_eq!(idx.precision, Precision::Fp16);
    for (got, x) in idx.rows.iter().zip(&raw) {
        // Widening is exact, and a half holds the value within 2^-11 relative.
        assert!((*got as f64 - *x as f64).abs() <= (*x as f64).abs() / 2048.0 + 1e-7);
    }
    assert_eq!(idx.id_of(2), 994);

    // fp16 index searched against the reference over the widened values.
    let queries = random_rows(&mut rng, 3 * d);
    let hits = cpu::search(&idx, &queries, n);
    for (qi, q) in queries.chunks_exact(d).enumerate() {
        let want = reference(&idx.rows, d, q, Metric::L2);
        let r = qi * n..(qi + 1) * n;
        check(&hits.rows[r.clone()], &hits.scores[r], &want, 1e-6, "fp16");
    }
}

#[test]
fn f16_widening_of_known_values() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x3800), 0.5);
    assert_eq!(f16_to_f32(0x7bff), 65504.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
    assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    for h in 0..=0xffffu16 {
        let x = f16_to_f32(h);
        if x.is_finite() {
            assert_eq!(f32_to_f16(x), h, "{h:#x}");
        }
    }
}

#[test]
fn bad_files_are_refused_with_the_file_and_the_problem() {
    let load = |p: &std::path::Path, ids: Option<&std::path::Path>| {
        Index::load(
            p.to_str().unwrap(),
            Metric::Ip,
            None,
            ids.map(|i| i.to_str().unwrap()),
        )
        .err()
        .expect("refused")
    };
    let good = tmp("good.npy");
    write_npy(&good, "<f4", false, &[3, 2], &f32_bytes(&[1.0; 6]));
    let cases: Vec<BadFile> = vec![
        (
            "f64.npy",
            "<f8",
            false,
            vec![3, 2],
            vec![0; 48],
            "holds float64",
        ),
        (
            "rank3.npy",
            "<f4",
            false,
            vec![3, 2, 1],
            vec![0; 24],
            "is 2-D",
        ),
        ("rank1.npy", "<f4", false, vec![6], vec![0; 24], "is 2-D"),
        (
            "fortran.npy",
            "<f4",
            true,
            vec![3, 2],
            vec![0; 24],
            "Fortran order",
        ),
        (
            "short.npy",
            "<f4",
            false,
            vec![3, 2],
            vec![0; 23],
            "is truncated",
        ),
        (
            "long.npy",
            "<f4",
            false,
            vec![3, 2],
            vec![0; 25],
            "bytes after the data",
        ),
        ("empty.npy", "<f4", false, vec![0, 2], vec![], "is empty"),
        (
            "big.npy",
            ">f4",
            false,
            vec![3, 2],
            vec![0; 24],
            "big-endian",
        ),
    ];
    for (name, descr, fortran, shape, data, want) in cases {
        let p = tmp(name);
        write_npy(&p, descr, fortran, &shape, &data);
        let e = load(&p, None);
        assert!(e.contains(p.to_str().unwrap()), "{name}: {e}");
        assert!(e.contains(want), "{name}: {e}");
    }
    let nan = tmp("nan.npy");
    write_npy(
        &nan,
        "<f4",
        false,
        &[3, 2],
        &f32_bytes(&[0.0, 0.0, 1.0, f32::NAN, 0.0, 0.0]),
    );
    assert!(load(&nan, None).contains("NaN or infinite value in row 1"));
    let missing = tmp("missing.npy");
    let e = load(&missing, None);
    assert!(
        e.contains("cannot open") && e.contains("missing.npy"),
        "{e}"
    );
    let junk = tmp("junk.npy");
    std::fs::write(&junk, b"not numpy at all").unwrap();
    assert!(load(&junk, None).contains("not a valid .npy file"));
    let cut = tmp("cut.npy");
    std::fs::write(&cut, b"\x93NUMPY\x01\x00\x40\x00{'descr'").unwrap();
    assert!(load(&cut, None).contains("truncated header"));
    // ids: wrong length, wrong dtype.
    let ids = tmp("ids4.npy");
    write_npy(&ids, "<i8", false, &[4], &[0; 32]);
    let e = load(&good, Some(&ids));
    assert!(e.contains("ids4.npy") && e.contains("expected (3,)"), "{e}");
    let ids = tmp("ids32.npy");
    write_npy(&ids, "<i4", false, &[3], &[0; 12]);
    let e = load(&good, Some(&ids));
    assert!(e.contains("ids32.npy") && e.contains("int32"), "{e}");
}

#[test]
fn model_parameters_are_checked() {
    let good = tmp("params.npy");
    write_npy(&good, "<f4", false, &[3, 2], &f32_bytes(&[1.0; 6]));
    let p = good.to_str().unwrap();
    assert!(load("m", p, &["metric=cosine", "k=3", "precision=tf32"]).is_ok());
    assert!(load("m", p, &["in_flight=1"]).is_ok());
    for (params, want) in [
        (&["metric=dot"][..], "metric \"dot\""),
        (&["precision=int8"][..], "precision \"int8\""),
        (&["k=0"][..], "k=\"0\" is not a number from 1 to 2048"),
        (&["k=2049"][..], "k=\"2049\""),
        (&["batch_rows=0"][..], "batch_rows=\"0\""),
        (
            &["in_flight=0"][..],
            "in_flight=\"0\" is not a number from 1 to 2",
        ),
        (&["in_flight=3"][..], "in_flight=\"3\""),
        (&["nprobe=3"][..], "unknown parameter \"nprobe\""),
    ] {
        let e = load("m", p, params).err().unwrap();
        assert!(e.contains(want), "{params:?}: {e}");
    }
}

fn test_model(n: usize, d: usize, metric: Metric, rng: &mut Rng) -> (Arc<KnnModel>, Vec<f32>) {
    let raw = random_rows(rng, n * d);
    let ids = Some((0..n as i64).map(|i| i * 10 + 7).collect());
    let model = Arc::new(KnnModel::for_tests(
        "vectors",
        index(raw.clone(), n, d, metric, ids),
        4,
        8,
    ));
    (model, raw)
}

/// A KServe infer body for `rows` queries: JSON data, or binary with the header length.
pub fn infer_body(
    queries: &[f32],
    rows: usize,
    d: usize,
    binary: bool,
    extra: serde_json::Value,
) -> (Vec<u8>, Option<u64>) {
    let mut input = json!({"name": "QUERY", "datatype": "FP32", "shape": [rows, d]});
    let mut req = json!({"inputs": []});
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            req[k] = v;
        }
    }
    if binary {
        input["parameters"] = json!({"binary_data_size": queries.len() * 4});
        req["inputs"] = json!([input]);
        let mut body = serde_json::to_vec(&req).unwrap();
        let n = body.len() as u64;
        body.extend_from_slice(&f32_bytes(queries));
        (body, Some(n))
    } else {
        input["data"] = json!(queries);
        req["inputs"] = json!([input]);
        (serde_json::to_vec(&req).unwrap(), None)
    }
}

/// (ids, scores, shape) from an answer, JSON or binary.
pub fn parse_answer(out: &Output) -> (Vec<i64>, Vec<f32>, Vec<u64>) {
    let hl = out
        .headers
        .iter()
        .find(|(k, _)| *k == "Inference-Header-Content-Length")
        .map(|(_, v)| v.parse::<usize>().unwrap());
    let (json_part, mut bin) = match hl {
        Some(n) => out.body.split_at(n),
        None => (&out.body[..], &[][..]),
    };
    let doc: serde_json::Value = serde_json::from_slice(json_part).unwrap();
    let (mut ids, mut scores, mut shape) = (Vec::new(), Vec::new(), Vec::new());
    for o in doc["outputs"].as_array().unwrap() {
        shape = o["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let size = o["parameters"]["binary_data_size"].as_u64();
        match (o["name"].as_str().unwrap(), size) {
            ("IDS", Some(s)) => {
                ids = bin[..s as usize]
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                bin = &bin[s as usize..];
            }
            ("SCORES", Some(s)) => {
                scores = bin[..s as usize]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                bin = &bin[s as usize..];
            }
            ("IDS", None) => {
                ids = o["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect()
            }
            ("SCORES", None) => {
                scores = o["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            }
            (other, _) => panic!("unexpected output {other}"),
        }
    }
    (ids, scores, shape)
}

#[test]
fn requests_decode_or_are_refused_with_a_reason() {
    let mut rng = Rng::fresh();
    let (model, _) = test_model(20, 3, Metric::Ip, &mut rng);
    let q = random_rows(&mut rng, 6);
    for binary in [false, true] {
        let (body, hl) = infer_body(
            &q,
            2,
            3,
            binary,
            json!({"parameters": {"k": 25}, "id": "x"}),
        );
        let r = decode_request(&model, &body, hl).unwrap();
        assert_eq!((r.rows, r.k), (2, 20), "k is cut to the index's rows");
        assert_eq!(r.queries, q);
        assert_eq!(r.answer.id.as_deref(), Some("x"));
        assert_eq!(r.answer.outputs, [("IDS", false), ("SCORES", false)]);
    }
    let bad = |body: &[u8], hl: Option<u64>| decode_request(&model, body, hl).err().unwrap();
    let shape = |s: serde_json::Value| {
        serde_json::to_vec(&json!({"inputs": [{"name": "QUERY", "datatype": "FP32", "shape": s, "data": [1.0, 2.0, 3.0]}]})).unwrap()
    };
    assert!(bad(b"{", None).contains("not valid JSON"));
    assert!(bad(b"[]", None).contains("not a JSON object"));
    assert!(bad(b"{}", None).contains("no \"inputs\""));
    assert!(bad(&shape(json!([1, 4])), None).contains("has 3 elements where shape [1, 4] needs 4"));
    assert!(bad(&shape(json!([3, 1])), None).contains("expected [n, 3]"));
    assert!(bad(&shape(json!([3])), None).contains("expected [n, 3]"));
    let (body, hl) = infer_body(&q, 2, 3, true, json!({}));
    assert!(
        bad(&body[..body.len() - 1], hl).contains("binary_data_size 24 is more than the 23 bytes")
    );
    let mut longer = body.clone();
    longer.push(0);
    assert!(bad(&longer, hl).contains("1 bytes of binary data that no input claims"));
    assert!(bad(&body, Some(body.len() as u64 + 1)).contains("larger than the body"));
    let (body, hl) = infer_body(&q, 2, 3, false, json!({"parameters": {"k": 0}}));
    assert!(bad(&body, hl).contains("parameter \"k\" is 0: expected 1 to 2048"));
    let (body, hl) = infer_body(&q, 2, 3, false, json!({"parameters": {"k": 2049}}));
    assert!(bad(&body, hl).contains("parameter \"k\""));
    let (body, hl) = infer_body(&q, 2, 3, false, json!({"outputs": [{"name": "LABELS"}]}));
    assert!(bad(&body, hl).contains("unknown output \"LABELS\""));
    let int = serde_json::to_vec(&json!({"inputs": [{"name": "QUERY", "datatype": "INT32", "shape": [1, 3], "data": [1, 2, 3]}]})).unwrap();
    assert!(bad(&int, None).contains("datatype INT32"));
    let other = serde_json::to_vec(
        &json!({"inputs": [{"name": "Q", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}),
    )
    .unwrap();
    assert!(bad(&other, None).contains("unknown input \"Q\""));
    let rows = random_rows(&mut rng, 9 * 3);
    let (body, hl) = infer_body(&rows, 9, 3, true, json!({}));
    assert!(bad(&body, hl).contains("at most 8 per request"));
    let mut nan = q.clone();
    nan[4] = f32::NAN;
    let (body, hl) = infer_body(&nan, 2, 3, true, json!({}));
    assert!(bad(&body, hl).contains("NaN or infinite value in row 1"));
}

fn knn_job(id: u64, op: &Arc<dyn Op>, key: usize, body: Vec<u8>, hl: Option<u64>) -> Job {
    let mut b = Body::default();
    let cut = body.len() / 2;
    b.push(Segment::Memory(body[..cut].to_vec()));
    b.push(Segment::Memory(body[cut..].to_vec()));
    Job {
        id,
        op: op.clone(),
        op_key: key,
        params: Params(vec![Value::I64(hl.map_or(-1, |n| n as i64))]),
        fallback: Fallback::Cpu,
        batching: Batching {
            size: 64,
            delay: Duration::from_millis(3),
        },
        body: b,
        decoded: None,
        timeout: Duration::from_secs(60),
        cancelled: Default::default(),
        queued_at: std::time::Instant::now(),
    }
}

/// Many requests of 1 to 3 rows through the GPU thread: batched by rows (at most 8), the
/// batch searched with its largest k, each answer cut to its own k and checked.
fn through_the_thread(kernels: Kernels, ran: Ran) {
    let mut rng = Rng::fresh();
    for metric in [Metric::Ip, Metric::Cosine, Metric::L2] {
        let (n, d) = (53, 7);
        let (model, raw) = test_model(n, d, metric, &mut rng);
        let op = model.clone().serve().expect("knn is served");
        let config = Config::new(vec![op.clone()], 1 << 20, Duration::ZERO, 1 << 30);
        let t = GpuThread::spawn(config, kernels.clone_for_test()).unwrap();
        if ran != Ran::Cpu {
            let opened = |e: &[crate::engine::job::Event]| {
                log_lines(e).iter().any(|m| m.contains("gpu: using"))
            };
            assert!(opened(&collect(&t, Duration::from_secs(5), opened)));
        }
        let mut want = Vec::new();
        let total = 60;
        for id in 0..total {
            let rows = 1 + rng.below(3) as usize;
            let k = [1, 3, 4, 9, n, n + 5][rng.below(6) as usize];
            let q = random_rows(&mut rng, rows * d);
            let binary = id % 2 == 0;
            let extra = if k == 4 {
                json!({})
            } else {
                json!({"parameters": {"k": k}})
            };
            let (body, hl) = infer_body(&q, rows, d, binary, extra);
            t.submit(knn_job(id, &op, 0, body, hl)).unwrap();
            want.push((q, rows, k.min(n)));
        }
        let done = wait_done(&t, total as usize, Duration::from_secs(20));
        assert_eq!(done.len(), total as usize);
        assert!(done.iter().any(|c| c.batch_size > 1), "no batch formed");
        for c in &done {
            assert_eq!(c.device, ran);
            let (q, rows, k) = &want[c.id as usize];
            let out = c.result.as_ref().unwrap();
            let (ids, scores, shape) = parse_answer(out);
            assert_eq!(shape, [*rows as u64, *k as u64]);
            for (qi, qv) in q.chunks_exact(d).enumerate() {
                let reference = reference(&raw, d, qv, metric);
                let rows_of: Vec<i64> = ids[qi * k..(qi + 1) * k]
                    .iter()
                    .map(|id| (id - 7) / 10)
                    .collect();
                check(
                    &rows_of,
                    &scores[qi * k..(qi + 1) * k],
                    &reference,
                    1e-6,
                    &format!("{metric:?} job {}", c.id),
                );
            }
        }
    }
}

impl Kernels {
    fn clone_for_test(&self) -> Kernels {
        match self {
            Kernels::Fake => Kernels::Fake,
            Kernels::Unavailable(s) => Kernels::Unavailable(s.clone()),
            Kernels::Ptx(p) => Kernels::Ptx(p.clone()),
        }
    }
}

#[test]
fn batches_on_the_test_device_answer_like_the_reference() {
    through_the_thread(Kernels::Fake, Ran::Gpu(0));
}

#[test]
fn the_cpu_path_answers_like_the_reference() {
    through_the_thread(Kernels::Unavailable("test".into()), Ran::Cpu);
}

/// A file name, its header's dtype, order and shape, its data, and the error wanted.
type BadFile = (
    &'static str,
    &'static str,
    bool,
    Vec<usize>,
    Vec<u8>,
    &'static str,
);

#[test]
fn the_cpu_path_decodes_a_request_that_was_not_decoded_yet() {
    // After a panic of the GPU thread, requests held for the device are answered on the
    // CPU path before any decode ran.
    let mut rng = Rng::fresh();
    let (model, raw) = test_model(40, 5, Metric::L2, &mut rng);
    let op = model.clone().serve().expect("knn is served");
    let q = random_rows(&mut rng, 5);
    let (body, hl) = infer_body(&q, 1, 5, true, json!({"parameters": {"k": 3}}));
    let params = Params(vec![Value::I64(hl.unwrap() as i64)]);
    let out = op.run_cpu(body, &params, None).unwrap();
    let (ids, scores, shape) = parse_answer(&out);
    assert_eq!(shape, [1, 3]);
    let rows: Vec<i64> = ids.iter().map(|id| (id - 7) / 10).collect();
    check(
        &rows,
        &scores,
        &reference(&raw, 5, &q, Metric::L2),
        1e-6,
        "undecoded",
    );
    let e = op
        .run_cpu(b"{".to_vec(), &Params::default(), None)
        .err()
        .unwrap();
    assert!(matches!(e, JobError::BadInput(m) if m.contains("not valid JSON")));
}
