//! The search op on the CPU and the test device, against an exact float64 search written
//! here over the CPU embeddings of a generated corpus; its configuration checks, request
//! decoding and error answers.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::engine::job::{Batching, Device as Ran, Fallback, Job, Segment};
use crate::engine::thread::{Config, GpuThread, Kernels};
use crate::ops::knn::index::{Index, Metric, Precision};
use crate::testing::{collect, log_lines, wait_done, Rng};

// The embed tests include it too, in a module private to ops::embed.
#[allow(clippy::duplicate_mod)]
#[path = "../../../t/embed/tiny.rs"]
pub mod tiny;

/// A generated encoder, an index made of its CPU embeddings of a corpus, and the op over
/// both (resolved).
pub struct Fixture {
    pub op: Arc<dyn Op>,
    pub embed: Arc<EmbedModel>,
    pub corpus: Vec<String>,
    /// The corpus's embeddings as the CPU path gives them (the index's rows before any
    /// normalization), one per text.
    pub vectors: Vec<Vec<f32>>,
    pub ids: Vec<i64>,
    pub metric: Metric,
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ngx-gpu-search-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `count` distinct texts of 1 to 6 words over the tiny vocabulary.
pub fn corpus(rng: &mut Rng, count: usize) -> Vec<String> {
    let vocab = tiny::vocab();
    let mut out: Vec<String> = Vec::new();
    while out.len() < count {
        let n = 1 + rng.below(6);
        let t = (0..n)
            .map(|_| {
                vocab[4 + rng.below(vocab.len() as u64 - 4) as usize]
                    .trim_start_matches("##")
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(" ");
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// The fixture: `n` texts, an index of `metric` (float32) with ids `1000 + 3 * row`,
/// `params` for the encoder (`precision=fp32` ...), and the op's `gpu_process` arguments
/// after the two model names.
pub fn fixture(
    name: &str,
    rng: &mut Rng,
    n: usize,
    metric: Metric,
    params: &[&str],
    args: &[&str],
) -> Fixture {
    let dir = scratch(name);
    let t = tiny::Tiny::new(&dir, 0xfeed);
    t.write();
    let embed = Arc::new(EmbedModel::load("tiny", &dir, params).unwrap());
    let corpus = corpus(rng, n);
    let encoded: Vec<Encoded> = corpus.iter().map(|s| embed.tokenize(s).unwrap()).collect();
    let vectors = embed.cpu_embed(&encoded.iter().collect::<Vec<_>>());
    let d = embed.dim();
    let mut rows: Vec<f32> = vectors.iter().flatten().copied().collect();
    if metric == Metric::Cosine {
        for r in rows.chunks_exact_mut(d) {
            knn::index::normalize(r);
        }
    }
    let ids: Vec<i64> = (0..n as i64).map(|i| 1000 + 3 * i).collect();
    let index = Index {
        n,
        d,
        rows,
        metric,
        precision: Precision::Fp32,
        ids: Some(ids.clone()),
    };
    let knn: Arc<dyn Model> = Arc::new(KnnModel::for_tests("docs", index, 4, 8));
    let mut all = vec!["search", "tiny", "docs"];
    all.extend_from_slice(args);
    let op = crate::ops::parse(&all).unwrap().op;
    let declared = Declared {
        models: vec![embed.clone() as Arc<dyn Model>, knn],
        ..Default::default()
    };
    op.resolve(&declared).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Fixture {
        op,
        embed,
        corpus,
        vectors,
        ids,
        metric,
    }
}

impl Fixture {
    /// The exact answer for `text`, written apart from the op: its embedding (CPU path)
    /// against every corpus embedding in float64, all rows, best first, ties by lower row.
    pub fn reference(&self, text: &str) -> Vec<(f64, i64)> {
        let q = &self.embed.cpu_embed(&[&self.embed.tokenize(text).unwrap()])[0];
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut all: Vec<(f64, i64)> = self
            .vectors
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let dot: f64 = q.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let s = match self.metric {
                    Metric::Ip => dot,
                    Metric::Cosine => dot / (norm(q) * norm(x)),
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
            let o = if self.metric == Metric::L2 {
                a.0.total_cmp(&b.0)
            } else {
                b.0.total_cmp(&a.0)
            };
            o.then(a.1.cmp(&b.1))
        });
        all
    }

    /// Checks one text's hits (external ids) against the reference: scores within `tol`,
    /// ids equal except where the reference's scores tie within `tol`.
    pub fn check(&self, text: &str, ids: &[i64], scores: &[f64], tol: f64, what: &str) {
        let want = self.reference(text);
        assert!(ids.len() <= want.len(), "{what}: {} hits", ids.len());
        for (j, (&id, &s)) in ids.iter().zip(scores).enumerate() {
            let row = self.ids.iter().position(|&x| x == id);
            let row = row.unwrap_or_else(|| panic!("{what}: id {id} is not the index's"));
            let (ws, wrow) = want[j];
            assert!(
                (s - ws).abs() <= tol,
                "{what} {text:?}: hit {j} score {s}, want {ws}"
            );
            if row as i64 != wrow {
                let mine = want.iter().find(|w| w.1 == row as i64).unwrap().0;
                assert!(
                    (mine - ws).abs() <= tol,
                    "{what} {text:?}: hit {j} is row {row} ({mine}), want row {wrow} ({ws})"
                );
            }
        }
        let mut seen = ids.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), ids.len(), "{what}: an id twice in {ids:?}");
    }
}

/// Each text's hits: external ids and scores, best first.
pub type TextHits = Vec<(Vec<i64>, Vec<f64>)>;

/// (ids, scores) per text, the usage's token count and the model's name, from an answer.
pub fn parse_answer(out: &Output) -> (TextHits, u64, String) {
    assert_eq!(&*out.content_type, "application/json");
    let v: Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let hits = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], json!(i));
            let ids = d["ids"].as_array().unwrap();
            let scores = d["scores"].as_array().unwrap();
            assert_eq!(ids.len(), scores.len());
            (
                ids.iter().map(|x| x.as_i64().unwrap()).collect(),
                scores.iter().map(|x| x.as_f64().unwrap()).collect(),
            )
        })
        .collect();
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(tokens));
    (hits, tokens, v["model"].as_str().unwrap().to_string())
}

fn body(input: Value, k: Option<usize>) -> Vec<u8> {
    let mut v = json!({ "input": input });
    if let Some(k) = k {
        v["k"] = json!(k);
    }
    serde_json::to_vec(&v).unwrap()
}

/* configuration */

#[test]
fn gpu_process_search_takes_two_models_and_a_k() {
    let c = crate::ops::parse(&["search", "e", "i", "k=7"]).unwrap();
    assert_eq!(c.op.name(), "search e i");
    assert!(c.op.post_only());
    for (args, want) in [
        (&["search"][..], "needs an embed model and a knn model"),
        (&["search", "e"][..], "needs an embed model and a knn model"),
        (
            &["search", "e", "i", "k=0"][..],
            "k=\"0\" is not a number from 1 to 2048",
        ),
        (&["search", "e", "i", "k=2049"][..], "from 1 to 2048"),
        (&["search", "e", "i", "j=1"][..], "unknown parameter \"j\""),
        (&["search", "e", "i", "extra"][..], "is not key=value"),
    ] {
        let e = crate::ops::parse(args).err().unwrap();
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

#[test]
fn models_resolve_by_name_and_kind_and_their_widths_must_agree() {
    let mut rng = Rng::fresh();
    let f = fixture("resolve", &mut rng, 5, Metric::Ip, &[], &[]);
    let dim = f.embed.dim();
    let knn = |d: usize| -> Arc<dyn Model> {
        let index = Index {
            n: 2,
            d,
            rows: vec![0.5; 2 * d],
            metric: Metric::Ip,
            precision: Precision::Fp32,
            ids: None,
        };
        Arc::new(KnnModel::for_tests("docs", index, 4, 8))
    };
    let embed = f.embed.clone() as Arc<dyn Model>;
    let declared = |models: Vec<Arc<dyn Model>>| Declared {
        models,
        ..Default::default()
    };
    let resolve = |args: &[&str], d: &Declared| {
        let op = crate::ops::parse(args).unwrap().op;
        op.resolve(d)
    };
    let both = "search with embed model \"tiny\" and knn model \"docs\": ";
    assert!(resolve(
        &["search", "tiny", "docs"],
        &declared(vec![embed.clone(), knn(dim)])
    )
    .is_ok());
    let e = resolve(&["search", "tiny", "docs"], &declared(vec![knn(dim)])).unwrap_err();
    assert_eq!(
        e,
        format!("{both}no model \"tiny\" (declare it with gpu_model tiny embed ... in the http block; declared: docs)")
    );
    let e = resolve(&["search", "tiny", "docs"], &declared(vec![embed.clone()])).unwrap_err();
    assert!(
        e.starts_with(both) && e.contains("no model \"docs\""),
        "{e}"
    );
    let e = resolve(
        &["search", "docs", "tiny"],
        &declared(vec![embed.clone(), knn(dim)]),
    )
    .unwrap_err();
    assert!(
        e.contains("and knn model \"tiny\": model \"docs\" is a knn model, not embed"),
        "{e}"
    );
    let e = resolve(
        &["search", "tiny", "docs"],
        &declared(vec![embed, knn(dim + 1)]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        format!(
            "{both}the embed model gives {dim} dimensions, the knn index has {}",
            dim + 1
        )
    );
}

/* requests */

#[test]
fn requests_parse_or_are_refused_with_a_reason() {
    let ok = request::parse(br#"{"input": "a b", "k": 3}"#, 4, 2048).unwrap();
    assert_eq!(ok.texts, ["a b"]);
    assert_eq!(ok.k, Some(3));
    let ok = request::parse(br#"{"input": ["", "x"], "model": "m"}"#, 4, 2048).unwrap();
    assert_eq!(ok.texts, ["", "x"]);
    assert_eq!(ok.k, None);
    let bad = |body: &[u8], want: &str| match request::parse(body, 4, 2048) {
        Err(JobError::BadInput(m)) => assert!(m.contains(want), "{m}"),
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(body)),
    };
    bad(b"{", "not valid JSON");
    bad(b"", "not valid JSON");
    bad(b"[1]", "not a JSON object");
    bad(br#"{"inputs": "x"}"#, "no \"input\"");
    bad(br#"{"input": []}"#, "empty array");
    bad(br#"{"input": 3}"#, "\"input\" is a number");
    bad(br#"{"input": ["a", 2]}"#, "\"input\"[1] is a number");
    bad(
        br#"{"input": "a", "k": 0}"#,
        "\"k\" is 0: expected an integer from 1 to 2048",
    );
    bad(br#"{"input": "a", "k": 2049}"#, "\"k\" is 2049");
    bad(br#"{"input": "a", "k": "3"}"#, "\"k\" is \"3\"");
    bad(br#"{"input": "a", "k": 1.5}"#, "\"k\" is 1.5");
    match request::parse(br#"{"input": ["a", "b", "c", "d", "e"]}"#, 4, 2048) {
        Err(JobError::TooLarge(m)) => {
            assert_eq!(m, "\"input\" holds 5 texts: at most 4 per request")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn errors_take_the_openai_shape() {
    let op = crate::ops::parse(&["search", "e", "i"]).unwrap().op;
    let body = |status, msg| -> Value {
        serde_json::from_slice(&op.error_body(status, msg).unwrap()).unwrap()
    };
    let v = body(400, "\"input\" is empty\n");
    assert_eq!(v["error"]["message"], "\"input\" is empty\n");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "input");
    assert_eq!(body(503, "busy")["error"]["type"], "server_error");
}

/* the CPU path */

#[test]
fn the_cpu_path_answers_like_an_exact_search() {
    let mut rng = Rng::fresh();
    for metric in [Metric::Cosine, Metric::Ip, Metric::L2] {
        let f = fixture("cpu", &mut rng, 37, metric, &["precision=fp32"], &[]);
        // Corpus texts (each one's own row first), new texts, the empty text; k from the
        // model (4), given, larger than the index.
        let texts: Vec<String> = vec![
            f.corpus[0].clone(),
            f.corpus[36].clone(),
            "hello world".into(),
            String::new(),
            "zzqx nginx".into(),
        ];
        for (k, want_k) in [
            (None, 4),
            (Some(1), 1),
            (Some(9), 9),
            (Some(37), 37),
            (Some(50), 37),
        ] {
            let out =
                f.op.run_cpu(body(json!(texts), k), &Params::default(), None)
                    .unwrap();
            let (hits, tokens, model) = parse_answer(&out);
            assert_eq!(model, "tiny");
            assert_eq!(hits.len(), texts.len());
            let want_tokens: usize = texts
                .iter()
                .map(|t| f.embed.tokenize(t).unwrap().ids.len())
                .sum();
            assert_eq!(tokens as usize, want_tokens);
            for (t, (ids, scores)) in texts.iter().zip(&hits) {
                assert_eq!(ids.len(), want_k);
                f.check(t, ids, scores, 1e-5, &format!("{metric:?} k {k:?}"));
            }
            if metric == Metric::Cosine {
                assert_eq!(hits[0].0[0], f.ids[0]);
                assert!((hits[0].1[0] - 1.0).abs() < 1e-5, "{:?}", hits[0].1);
                assert_eq!(hits[1].0[0], f.ids[36]);
            }
        }
        // A single string is one text.
        let out =
            f.op.run_cpu(body(json!(f.corpus[5]), Some(2)), &Params::default(), None)
                .unwrap();
        let (hits, _, _) = parse_answer(&out);
        assert_eq!(hits.len(), 1);
        f.check(&f.corpus[5], &hits[0].0, &hits[0].1, 1e-5, "single");
    }
}

#[test]
fn the_location_k_is_the_default_and_bad_bodies_are_refused() {
    let mut rng = Rng::fresh();
    let f = fixture("k", &mut rng, 12, Metric::Cosine, &[], &["k=6"]);
    let out =
        f.op.run_cpu(body(json!("cat"), None), &Params::default(), None)
            .unwrap();
    assert_eq!(parse_answer(&out).0[0].0.len(), 6);
    let e =
        f.op.run_cpu(b"{".to_vec(), &Params::default(), None)
            .unwrap_err();
    assert!(matches!(e, JobError::BadInput(m) if m.contains("not valid JSON")));
    // More texts than the knn model's batch_rows (8).
    let e =
        f.op.run_cpu(body(json!(vec!["a"; 9]), None), &Params::default(), None)
            .unwrap_err();
    assert!(matches!(e, JobError::TooLarge(_)), "{e:?}");
}

/* through the GPU thread */

fn job(id: u64, op: &Arc<dyn Op>, body: Vec<u8>) -> Job {
    let mut b = Body::default();
    let cut = body.len() / 3;
    b.push(Segment::Memory(body[..cut].to_vec()));
    b.push(Segment::Memory(body[cut..].to_vec()));
    Job {
        id,
        op: op.clone(),
        op_key: 0,
        params: Params::default(),
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

/// Many requests of 1 to 3 texts through a GPU thread: batched by texts (at most 8), each
/// batch searched with its largest k, each answer cut to its own k and checked against the
/// exact search. `kernels` picks the device; `ran` is where the batches must run.
pub fn through_the_thread(f: &Fixture, kernels: Kernels, ran: Ran, tol: f64) {
    let mut rng = Rng::fresh();
    let config = Config::new(vec![f.op.clone()], 1 << 20, Duration::ZERO, 1 << 30);
    let t = GpuThread::spawn(config, kernels).unwrap();
    // The opening's log (why an op takes the CPU path, if one does), for the asserts.
    let mut log: Vec<String> = Vec::new();
    if ran != Ran::Cpu {
        let opened =
            |e: &[crate::engine::job::Event]| log_lines(e).iter().any(|m| m.contains("gpu: using"));
        let events = collect(&t, Duration::from_secs(30), opened);
        log = log_lines(&events).iter().map(|l| l.to_string()).collect();
        assert!(opened(&events), "{log:?}");
    }
    let n = f.ids.len();
    let total = 60;
    let mut want = Vec::new();
    for id in 0..total {
        let count = 1 + rng.below(3) as usize;
        let texts: Vec<String> = (0..count)
            .map(|_| match rng.below(3) {
                0 => corpus(&mut rng, 1).remove(0),
                _ => f.corpus[rng.below(n as u64) as usize].clone(),
            })
            .collect();
        // Every row, and more than the index has; both within what a request may ask
        // (an index of more than MAX_K rows gets MAX_K, and MAX_K + 1 elsewhere is refused).
        let max_k = crate::ops::knn::gpu::MAX_K;
        let k = [
            None,
            Some(1),
            Some(3),
            Some(n.min(max_k)),
            Some((n + 5).min(max_k)),
        ][rng.below(5) as usize];
        t.submit(job(id, &f.op, body(json!(texts), k))).unwrap();
        want.push((texts, k.unwrap_or(4).min(n)));
    }
    // One request refused while decoding, in the middle of the others.
    t.submit(job(total, &f.op, br#"{"input": [1]}"#.to_vec()))
        .unwrap();
    let done = wait_done(&t, total as usize + 1, Duration::from_secs(60));
    assert_eq!(done.len(), total as usize + 1);
    assert!(done.iter().any(|c| c.batch_size > 1), "no batch formed");
    for c in &done {
        if c.id == total {
            assert!(
                matches!(&c.result, Err(JobError::BadInput(_))),
                "{:?}",
                c.result
            );
            continue;
        }
        assert_eq!(c.device, ran, "job {}: {log:?}", c.id);
        let (texts, k) = &want[c.id as usize];
        let (hits, _, _) = parse_answer(c.result.as_ref().unwrap());
        assert_eq!(hits.len(), texts.len());
        for (text, (ids, scores)) in texts.iter().zip(&hits) {
            assert_eq!(ids.len(), *k);
            f.check(text, ids, scores, tol, &format!("job {}", c.id));
        }
    }
}

#[test]
fn batches_on_the_test_device_answer_like_the_exact_search() {
    let mut rng = Rng::fresh();
    for metric in [Metric::Cosine, Metric::L2] {
        let f = fixture("thread", &mut rng, 29, metric, &["precision=fp32"], &[]);
        through_the_thread(&f, Kernels::Fake, Ran::Gpu(0), 1e-5);
    }
}

#[test]
fn the_cpu_fallback_answers_like_the_exact_search() {
    let mut rng = Rng::fresh();
    let f = fixture("fallback", &mut rng, 17, Metric::Ip, &[], &[]);
    through_the_thread(&f, Kernels::Unavailable("test".into()), Ran::Cpu, 1e-5);
}
