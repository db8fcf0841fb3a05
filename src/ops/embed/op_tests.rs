//! The embed ops (OpenAI and KServe) on a generated model: requests decoded, tokenized and
//! counted, batched by tokens through the GPU thread on the test device, on the CPU path,
//! and (with NGX_GPU_REQUIRE=1 on the GPU machine) on the device, every answer checked
//! against the CPU forward pass of the same texts.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value as Json};

use super::op;
use super::tests::{cosine, random_texts, tiny};
use super::*;
use crate::engine::job::{Batching, Body, Device as Ran, Fallback, Job, JobError, Segment};
use crate::engine::thread::{Config, GpuThread, Kernels};
use crate::ops::model::Model;
use crate::ops::{Declared, Op, Params, Value};
use crate::testing::{collect, log_lines, wait_done, Rng};

fn model(name: &str, params: &[&str]) -> Arc<EmbedModel> {
    let dir = std::env::temp_dir().join(format!("ngx-gpu-embed-op-{}-{name}", std::process::id()));
    let t = tiny::Tiny::new(&dir, 0x0e11);
    t.write();
    Arc::new(EmbedModel::load(name, &dir, params).unwrap())
}

/// `gpu_process embeddings <name> [args]`, resolved against `models`.
fn openai_op(name: &str, args: &[&str], models: &[Arc<EmbedModel>]) -> Result<Arc<dyn Op>, String> {
    let mut all = vec![name];
    all.extend_from_slice(args);
    let c = op::parse(&all)?;
    let declared = Declared {
        models: models.iter().map(|m| m.clone() as Arc<dyn Model>).collect(),
        max_body: 1 << 20,
        ..Default::default()
    };
    c.op.resolve(&declared)?;
    Ok(c.op)
}

fn body(v: Json) -> Body {
    let bytes = serde_json::to_vec(&v).unwrap();
    let mut b = Body::default();
    let cut = bytes.len() / 2;
    b.push(Segment::Memory(bytes[..cut].to_vec()));
    b.push(Segment::Memory(bytes[cut..].to_vec()));
    b
}

fn job(id: u64, op: &Arc<dyn Op>, b: Body, params: Params) -> Job {
    Job {
        id,
        op: op.clone(),
        op_key: 0,
        params,
        fallback: Fallback::Cpu,
        batching: Batching {
            size: 64,
            delay: Duration::from_millis(5),
        },
        body: b,
        decoded: None,
        timeout: Duration::from_secs(60),
        cancelled: Default::default(),
        queued_at: std::time::Instant::now(),
    }
}

/// Decodes base64 (standard, padded), written here for the check.
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

/// The embeddings of an OpenAI answer, whichever its format.
fn embeddings(out: &crate::ops::Output) -> (Vec<Vec<f32>>, u64) {
    assert_eq!(&*out.content_type, "application/json");
    let v: Json = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let mut rows = Vec::new();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        rows.push(match &d["embedding"] {
            Json::String(s) => unbase64(s)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Json::Array(a) => a.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            other => panic!("embedding {other}"),
        });
    }
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"], tokens);
    (rows, tokens)
}

fn close(got: &[f32], want: &[f32], floor: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    if want.iter().all(|&x| x == 0.0) {
        assert!(got.iter().all(|&x| x == 0.0), "{what}: {got:?}");
        return;
    }
    let c = cosine(got, want);
    assert!(c >= floor, "{what}: cosine {c}");
}

#[test]
fn the_model_is_resolved_by_name_and_must_be_an_embed_model() {
    let m = model("resolve", &[]);
    let e = openai_op("other", &[], std::slice::from_ref(&m))
        .err()
        .unwrap();
    assert!(e.contains("no model \"other\" is declared"), "{e}");
    assert!(openai_op("resolve", &[], std::slice::from_ref(&m)).is_ok());
    let c = crate::ops::parse(&["embeddings", "resolve"]).unwrap();
    assert_eq!(c.op.name(), "resolve");
    for (args, want) in [
        (&["max_inputs=0"][..], "max_inputs=\"0\" is not a number"),
        (&["max_inputs=x"][..], "max_inputs=\"x\""),
        (&["truncate=maybe"][..], "truncate=\"maybe\""),
        (&["k=3"][..], "unknown parameter \"k\""),
    ] {
        let e = openai_op("resolve", args, std::slice::from_ref(&m))
            .err()
            .unwrap();
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(crate::ops::parse(&["embeddings"]).is_err());
    // A knn model of that name is refused by kind.
    let knn = crate::ops::knn::KnnModel::for_tests(
        "vectors",
        crate::ops::knn::index::Index {
            n: 2,
            d: 2,
            rows: vec![0.5; 4],
            metric: crate::ops::knn::index::Metric::Ip,
            precision: crate::ops::knn::index::Precision::Fp32,
            ids: None,
        },
        1,
        8,
    );
    let declared = Declared {
        models: vec![Arc::new(knn) as Arc<dyn Model>],
        ..Default::default()
    };
    let c = op::parse(&["vectors"]).unwrap();
    let e = c.op.resolve(&declared).err().unwrap();
    assert!(e.contains("is a knn model"), "{e}");
}

#[test]
fn requests_answer_with_the_cpu_forward_pass_and_the_tokenizers_count() {
    let m = model("mini", &[]);
    let op = openai_op("mini", &[], std::slice::from_ref(&m)).unwrap();
    // Texts from empty to non-ASCII (words the tiny vocabulary lacks).
    let texts = ["the cat sat", "", "x", "héllo wörld", "the dog ran ."];
    for format in ["float", "base64"] {
        let b = body(json!({"input": texts, "model": "mini", "encoding_format": format}));
        let d = op.decode(&b, &Params::default()).unwrap().unwrap();
        let out = op
            .run_cpu(Vec::new(), &Params::default(), Some(&d))
            .unwrap();
        let (rows, tokens) = embeddings(&out);
        let enc: Vec<Encoded> = texts.iter().map(|t| m.tokenize(t).unwrap()).collect();
        let want = m.cpu_embed(&enc.iter().collect::<Vec<_>>());
        assert_eq!(rows.len(), texts.len());
        for i in 0..texts.len() {
            // Both formats carry float32 exactly.
            assert_eq!(rows[i], want[i], "{format} text {i}");
        }
        assert_eq!(tokens, enc.iter().map(|e| e.ids.len() as u64).sum::<u64>());
        // The batch's rows are its tokens.
        assert_eq!(d.rows as u64, tokens);
    }
    // "the cat sat": [CLS] the cat sat [SEP].
    let b = body(json!({"input": "the cat sat", "model": "mini"}));
    let out = op.run_cpu(
        Vec::new(),
        &Params::default(),
        op.decode(&b, &Params::default()).unwrap().as_ref(),
    );
    assert_eq!(embeddings(&out.unwrap()).1, 5);
}

#[test]
fn bad_requests_get_the_fitting_error() {
    let m = model("errs", &[]);
    let op = openai_op(
        "errs",
        &["max_inputs=3", "truncate=off"],
        std::slice::from_ref(&m),
    )
    .unwrap();
    let long = "the cat ".repeat(40);
    let cases: Vec<(Json, &str)> = vec![
        (json!({"input": "x", "model": "gpt-4"}), "404"),
        (
            json!({"input": ["a", "b", "c", "d"], "model": "errs"}),
            "at most 3",
        ),
        (json!({"input": long, "model": "errs"}), "does not truncate"),
        (json!({"input": [[1, 2]], "model": "errs"}), "token arrays"),
        (
            json!({"input": "x", "model": "errs", "dimensions": 7}),
            "36 dimensions",
        ),
    ];
    for (req, want) in cases {
        let e = op
            .decode(&body(req.clone()), &Params::default())
            .err()
            .unwrap();
        match e {
            JobError::NotFound(m) => assert_eq!(want, "404", "{req}: {m}"),
            JobError::BadInput(m) => assert!(m.contains(want), "{req}: {m}"),
            other => panic!("{req}: {other:?}"),
        }
    }
    let e = op
        .decode(&Body::default(), &Params::default())
        .err()
        .unwrap();
    assert!(matches!(e, JobError::BadInput(m) if m.contains("not valid JSON")));
    // Non-UTF-8 JSON never reaches the tokenizer.
    let mut raw = Body::default();
    raw.push(Segment::Memory(
        b"{\"input\":\"\xff\",\"model\":\"errs\"}".to_vec(),
    ));
    assert!(matches!(
        op.decode(&raw, &Params::default()),
        Err(JobError::BadInput(_))
    ));
    // A body over gpu_batch_bytes is refused before it is queued.
    assert!(matches!(op.admit(2 << 20, &[]), Err(JobError::TooLarge(_))));
    assert!(op.admit(100, &[]).is_ok());
    // Its errors are OpenAI's, POST only.
    assert!(op.post_only());
    let e: Json = serde_json::from_slice(&op.error_body(404, "gone").unwrap()).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    // With truncation (the default), a long text is cut at max_tokens (40 here).
    let op = openai_op("errs", &[], std::slice::from_ref(&m)).unwrap();
    let d = op.decode(
        &body(json!({"input": long, "model": "errs"})),
        &Params::default(),
    );
    assert_eq!(d.unwrap().unwrap().rows, m.max_tokens);
}

/// Requests of 1 to 5 texts from many clients through the GPU thread, batched by tokens
/// (`gpu_batch_tokens` 60), every answer against the CPU forward pass of its own texts.
fn through_the_thread(kernels: Kernels, ran: Ran, floor: f64, params: &[&str]) {
    let mut rng = Rng::fresh();
    let m = model("thread", params);
    let op = openai_op("thread", &[], std::slice::from_ref(&m)).unwrap();
    op.set_batch_tokens(60);
    assert_eq!(op.max_rows(), 60);
    let kserve = (m.clone() as Arc<dyn Model>)
        .serve()
        .expect("embed models are served");
    kserve.set_batch_tokens(60);
    let config = Config::new(
        vec![op.clone(), kserve.clone()],
        1 << 20,
        Duration::ZERO,
        1 << 30,
    );
    let t = GpuThread::spawn(config, kernels).unwrap();
    // Requests that arrive while the device opens take the CPU path (gpu_fallback cpu):
    // wait for it, so that every batch runs where this test expects.
    // The opening's log (why an op takes the CPU path, if one does), for the asserts.
    let mut log: Vec<String> = Vec::new();
    if ran != Ran::Cpu {
        let opened =
            |e: &[crate::engine::job::Event]| log_lines(e).iter().any(|m| m.contains("gpu: using"));
        let events = collect(&t, Duration::from_secs(30), opened);
        log = log_lines(&events).iter().map(|l| l.to_string()).collect();
        assert!(opened(&events), "{log:?}");
    }
    let total = 48u64;
    let mut want = Vec::new();
    for id in 0..total {
        let n = 1 + rng.below(5) as usize;
        let texts = random_texts(&mut rng, n, 25);
        let j = if id % 3 == 2 {
            let b = body(json!({"inputs": [{"name": "TEXT", "datatype": "BYTES",
                "shape": [n], "data": texts}]}));
            let mut j = job(id, &kserve, b, Params(vec![Value::I64(-1)]));
            j.op_key = 1;
            j
        } else {
            let format = if id % 2 == 0 { "base64" } else { "float" };
            job(
                id,
                &op,
                body(json!({"input": texts, "model": "thread", "encoding_format": format})),
                Params::default(),
            )
        };
        t.submit(j).unwrap();
        want.push(texts);
    }
    let done = wait_done(&t, total as usize, Duration::from_secs(60));
    assert_eq!(done.len(), total as usize);
    assert!(done.iter().any(|c| c.batch_size > 1), "no batch formed");
    for c in &done {
        assert_eq!(c.device, ran, "job {}: {log:?}", c.id);
        let texts = &want[c.id as usize];
        let enc: Vec<Encoded> = texts.iter().map(|s| m.tokenize(s).unwrap()).collect();
        let reference = m.cpu_embed(&enc.iter().collect::<Vec<_>>());
        let out = c.result.as_ref().unwrap();
        let rows = if c.id % 3 == 2 {
            let v: Json = serde_json::from_slice(&out.body).unwrap();
            let o = &v["outputs"][0];
            assert_eq!(o["name"], "EMBEDDING");
            assert_eq!(o["datatype"], "FP32");
            assert_eq!(o["shape"], json!([texts.len(), m.dim()]));
            let flat: Vec<f32> = o["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            flat.chunks(m.dim()).map(<[f32]>::to_vec).collect()
        } else {
            let (rows, tokens) = embeddings(out);
            assert_eq!(tokens, enc.iter().map(|e| e.ids.len() as u64).sum::<u64>());
            rows
        };
        assert_eq!(rows.len(), texts.len(), "job {}", c.id);
        for i in 0..texts.len() {
            close(
                &rows[i],
                &reference[i],
                floor,
                &format!("job {} text {i}", c.id),
            );
        }
    }
}

/// A device that takes 400 ms to open: embeddings requests that arrive meanwhile wait for
/// it (their CPU path is a slow forward pass) and run on the device, while echo's take the
/// CPU path at once; a device that never opens sends the held requests to the CPU path.
#[test]
fn requests_wait_for_an_opening_device_rather_than_a_slow_cpu_path() {
    let m = model("opening", &[]);
    let op = openai_op("opening", &[], std::slice::from_ref(&m)).unwrap();
    assert!(!op.cpu_while_opening());
    let echo = crate::ops::parse(&["echo"]).unwrap().op;
    assert!(echo.cpu_while_opening());
    for (kernels, faults, want) in [
        (Kernels::Fake, "open-slow:400", Ran::Gpu(0)),
        (Kernels::Unavailable("test".into()), "", Ran::Cpu),
    ] {
        let mut config = Config::new(
            vec![op.clone(), echo.clone()],
            1 << 20,
            Duration::ZERO,
            1 << 30,
        );
        config.faults = crate::faults::Plan::parse(faults).unwrap();
        let t = GpuThread::spawn(config, kernels).unwrap();
        let texts = ["a b", "c"];
        t.submit(job(
            0,
            &op,
            body(json!({"input": texts, "model": "opening"})),
            Params::default(),
        ))
        .unwrap();
        let mut e = job(1, &op, body(json!("unused")), Params::default());
        e.op = echo.clone();
        e.op_key = 1;
        e.body = Body::default();
        e.body.push(Segment::Memory(b"echoed".to_vec()));
        t.submit(e).unwrap();
        let done = wait_done(&t, 2, Duration::from_secs(30));
        assert_eq!(done.len(), 2);
        for c in &done {
            let out = c.result.as_ref().unwrap();
            if c.id == 1 {
                assert_eq!(c.device, Ran::Cpu, "echo while the device opens");
                assert_eq!(out.body, b"echoed");
                continue;
            }
            assert_eq!(c.device, want, "embeddings ({faults})");
            let v: Json = serde_json::from_slice(&out.body).unwrap();
            let enc: Vec<Encoded> = texts.iter().map(|s| m.tokenize(s).unwrap()).collect();
            let reference = m.cpu_embed(&enc.iter().collect::<Vec<_>>());
            for (i, r) in reference.iter().enumerate() {
                let got: Vec<f32> = v["data"][i]["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                assert!(cosine(&got, r) >= 0.999_999, "text {i}");
            }
        }
        if want != Ran::Cpu {
            // Echo was answered first: it did not wait for the device.
            let order: Vec<u64> = done.iter().map(|c| c.id).collect();
            assert_eq!(order, [1, 0]);
        }
    }
}

#[test]
fn batches_on_the_test_device_answer_like_the_cpu_forward_pass() {
    through_the_thread(Kernels::Fake, Ran::Gpu(0), 0.999_999, &[]);
}

#[test]
fn the_cpu_path_answers_like_the_cpu_forward_pass() {
    through_the_thread(
        Kernels::Unavailable("test".into()),
        Ran::Cpu,
        0.999_999,
        &[],
    );
}

/// On the GPU machine: the same requests through the op's device path (`OnDevice` with a
/// `DeviceEncoder`: plan, pack, embed, cut per request), in fp32.
#[test]
fn batches_on_the_device_answer_like_the_cpu_forward_pass() {
    let Some((_gpu, compiled)) = super::gpu_tests::device() else {
        return;
    };
    drop(_gpu);
    through_the_thread(
        Kernels::Ptx(Arc::new(compiled)),
        Ran::Gpu(0),
        0.9999,
        &["precision=fp32"],
    );
}

#[test]
fn kserve_requests_take_bytes_in_json_and_binary() {
    let m = model("ks", &[]);
    let op = (m.clone() as Arc<dyn Model>).serve().unwrap();
    op.resolve(&Declared::default()).unwrap();
    assert!(!op.post_only());
    assert!(op.error_body(400, "x").is_none());
    let texts = ["the cat", "", "héllo"];
    // Binary: each element a 4-byte little-endian length, then its bytes.
    let mut bin = Vec::new();
    for t in texts {
        bin.extend_from_slice(&(t.len() as u32).to_le_bytes());
        bin.extend_from_slice(t.as_bytes());
    }
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3],
                    "parameters": {"binary_data_size": bin.len()}}],
        "outputs": [{"name": "EMBEDDING", "parameters": {"binary_data": true}}]
    }))
    .unwrap();
    let mut b = header.clone();
    b.extend_from_slice(&bin);
    let params = Params(vec![Value::I64(header.len() as i64)]);
    let out = op.run_cpu(b, &params, None).unwrap();
    assert_eq!(&*out.content_type, "application/octet-stream");
    let hl: usize = out.headers[0].1.parse().unwrap();
    let v: Json = serde_json::from_slice(&out.body[..hl]).unwrap();
    assert_eq!(v["outputs"][0]["shape"], json!([3, m.dim()]));
    let got: Vec<f32> = out.body[hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let enc: Vec<Encoded> = texts.iter().map(|t| m.tokenize(t).unwrap()).collect();
    let want: Vec<f32> = m.cpu_embed(&enc.iter().collect::<Vec<_>>()).concat();
    assert_eq!(got, want);
    // Refusals.
    for (req, bin, want) in [
        (
            json!({"inputs": [{"name": "Q", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
            None,
            "unknown input",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
            None,
            "expected BYTES",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]}),
            None,
            "expected [n]",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [0], "data": []}]}),
            None,
            "expected [n]",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [5]}]}),
            None,
            "non-string",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 7}}]}),
            Some(vec![1u8, 0, 0, 0, b'a', 9, 0]),
            "ends inside",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]}),
            Some(vec![9u8, 0, 0, 0, b'a']),
            "says 9 bytes",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10}}]}),
            Some(vec![1u8, 0, 0, 0, b'a', 1, 0, 0, 0, b'b']),
            "more than the shape's 1",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 5}}]}),
            Some(vec![1u8, 0, 0, 0, b'a']),
            "1 elements where shape [2]",
        ),
        (
            json!({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]}),
            Some(vec![1u8, 0, 0, 0, 0xff]),
            "not valid UTF-8",
        ),
    ] {
        let mut b = serde_json::to_vec(&req).unwrap();
        let params = match &bin {
            Some(x) => {
                let p = Params(vec![Value::I64(b.len() as i64)]);
                b.extend_from_slice(x);
                p
            }
            None => Params(vec![Value::I64(-1)]),
        };
        let e = op.run_cpu(b, &params, None).err().unwrap();
        assert!(
            matches!(&e, JobError::BadInput(m) if m.contains(want)),
            "{req}: {e:?}"
        );
    }
}
