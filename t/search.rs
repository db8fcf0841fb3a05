//! `gpu_process search <embed> <knn>;` against a real nginx: a generated encoder, an index
//! made here from its CPU embeddings of a small corpus, answers checked against an exact
//! float64 search computed here; errors in OpenAI's shape; concurrent clients; the
//! configuration checks; and the example configuration (nginx-conf/search.conf) over the real
//! all-MiniLM-L6-v2 where the tests fetched it.

mod harness;

#[path = "embed/tiny.rs"]
mod tiny;

use std::path::{Path, PathBuf};

use harness::*;
use serde_json::{json, Value};

/// Embeds texts with the module's own CPU path, through nginx: a search op over the
/// identity index (d rows of d values, inner product) answers, for k = d, each text's
/// embedding value by value (row j's score is the text's j-th value, exactly).
/// `CUDA_VISIBLE_DEVICES` is empty, so it runs the CPU path wherever the tests run.
struct Embedder {
    ngx: Nginx,
    d: usize,
}

impl Embedder {
    fn start(model_dir: &Path, params: &str, work: &Path) -> Embedder {
        let config_json: Value =
            serde_json::from_slice(&std::fs::read(model_dir.join("config.json")).unwrap()).unwrap();
        let d = config_json["hidden_size"].as_u64().unwrap() as usize;
        let mut eye = vec![0f32; d * d];
        for i in 0..d {
            eye[i * d + i] = 1.0;
        }
        let bytes: Vec<u8> = eye.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::create_dir_all(work).unwrap();
        write_npy(&work.join("eye.npy"), "<f4", false, &[d, d], &bytes);
        let conf = config(&format!(
            "gpu_model e embed {} {params};\n\
             gpu_model eye knn {}/eye.npy metric=ip batch_rows=64;\n\
             server {{ listen 127.0.0.1:{{PORT}}; add_header X-Device $gpu_device;\n\
               location /embed {{ gpu_process search e eye k={d}; }} }}",
            model_dir.display(),
            work.display()
        ));
        let ngx = Nginx::start_with_env(&conf, &[("CUDA_VISIBLE_DEVICES", "")]);
        Embedder { ngx, d }
    }

    fn embed(&self, texts: &[String]) -> Vec<Vec<f32>> {
        let mut out = Vec::with_capacity(texts.len());
        for part in texts.chunks(64) {
            let body = serde_json::to_vec(&json!({ "input": part })).unwrap();
            let r = post(&self.ngx.addr(), "/embed", &body);
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("X-Device"), Some("cpu"));
            let v = json_of(&r);
            for hit in v["data"].as_array().unwrap() {
                let mut e = vec![f32::NAN; self.d];
                let ids = hit["ids"].as_array().unwrap();
                assert_eq!(ids.len(), self.d);
                for (id, s) in ids.iter().zip(hit["scores"].as_array().unwrap()) {
                    e[id.as_u64().unwrap() as usize] = s.as_f64().unwrap() as f32;
                }
                assert!(e.iter().all(|x| x.is_finite()), "{hit}");
                out.push(e);
            }
        }
        out
    }
}

/// The encoder's directory, the corpus, its CPU embeddings (one row per text), and what
/// embeds more texts the same way.
struct Corpus {
    dir: PathBuf,
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
    embedder: Embedder,
    tokenizer: tokenizers::Tokenizer,
}

impl Corpus {
    fn embed_one(&self, text: &str) -> Vec<f32> {
        self.embedder.embed(&[text.to_string()]).remove(0)
    }

    /// Tokens of a text as the model's own tokenizer counts them (special tokens
    /// included; the tests' texts are far shorter than max_tokens).
    fn tokens(&self, text: &str) -> usize {
        self.tokenizer.encode(text, true).unwrap().get_ids().len()
    }
}

fn id_of(row: usize) -> i64 {
    7_000_000_000 + 11 * row as i64
}

/// `count` distinct texts of 1 to 5 words over the tiny vocabulary.
fn random_texts(rng: &mut Rng, count: usize) -> Vec<String> {
    let vocab = tiny::vocab();
    let mut out: Vec<String> = Vec::new();
    while out.len() < count {
        let n = 1 + rng.next() % 5;
        let t = (0..n)
            .map(|_| {
                vocab[4 + (rng.next() % (vocab.len() as u64 - 4)) as usize]
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

/// Writes the encoder, the corpus's index (`metric=cosine` rows as the CPU embeds them:
/// the module normalizes them as it loads) and its ids.
fn make_corpus(name: &str, rng: &mut Rng, count: usize) -> Corpus {
    let dir = std::env::temp_dir().join(format!("ngx-gpu-t-search-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = tiny::Tiny::new(&dir.join("model"), 0x5ea4c4);
    t.write();
    let embedder = Embedder::start(&dir.join("model"), "precision=fp32", &dir.join("eye"));
    let texts = random_texts(rng, count);
    let vectors = embedder.embed(&texts);
    write_index(&dir, &vectors);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("model/tokenizer.json")).unwrap();
    Corpus {
        dir,
        texts,
        vectors,
        embedder,
        tokenizer,
    }
}

/// `dir/index.npy`: `vectors` as a float32 [n, d] array.
fn write_rows(dir: &Path, vectors: &[Vec<f32>]) {
    let rows: Vec<u8> = vectors
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write_npy(
        &dir.join("index.npy"),
        "<f4",
        false,
        &[vectors.len(), vectors[0].len()],
        &rows,
    );
}

fn write_index(dir: &Path, vectors: &[Vec<f32>]) {
    write_rows(dir, vectors);
    let ids: Vec<u8> = (0..vectors.len())
        .flat_map(|r| id_of(r).to_le_bytes())
        .collect();
    write_npy(&dir.join("ids.npy"), "<i8", false, &[vectors.len()], &ids);
}

fn conf(c: &Corpus) -> String {
    let d = c.dir.display();
    config(&format!(
        "gpu_model tiny embed {d}/model precision=fp32;\n\
         gpu_model docs knn {d}/index.npy metric=cosine ids=ids.npy k=3 batch_rows=16;\n\
         server {{ listen 127.0.0.1:{{PORT}};\n\
           add_header X-Device $gpu_device;\n\
           location /search {{ gpu_process search tiny docs; gpu_batch_size 32; gpu_batch_delay 2ms; }}\n\
           location /search5 {{ gpu_process search tiny docs k=5; }}\n\
         }}"
    ))
}

/// The exact search for `query`'s embedding (given), every row in float64, best first.
fn reference(vectors: &[Vec<f32>], q: &[f32]) -> Vec<(f64, usize)> {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let mut all: Vec<(f64, usize)> = vectors
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let dot: f64 = q.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
            (dot / (norm(q) * norm(x)), i)
        })
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    all
}

/// Checks one text's answer: `k` hits, scores within `tol` of the reference's, ids equal
/// except where the reference's scores tie within `tol`.
fn check(c: &Corpus, text: &str, hit: &Value, k: usize, tol: f64) {
    let q = c.embed_one(text);
    let want = reference(&c.vectors, &q);
    let ids = hit["ids"].as_array().unwrap();
    let scores = hit["scores"].as_array().unwrap();
    assert_eq!(ids.len(), k, "{hit}");
    assert_eq!(scores.len(), k, "{hit}");
    for j in 0..k {
        let id = ids[j].as_i64().unwrap();
        let s = scores[j].as_f64().unwrap();
        let (ws, wrow) = want[j];
        assert!(
            (s - ws).abs() <= tol,
            "{text:?} hit {j}: score {s}, want {ws}"
        );
        if id != id_of(wrow) {
            let row = ((id - id_of(0)) / 11) as usize;
            assert_eq!(id, id_of(row), "{text:?}: id {id} is not the index's");
            let mine = want.iter().find(|w| w.1 == row).unwrap().0;
            assert!(
                (mine - ws).abs() <= tol,
                "{text:?} hit {j}: row {row} ({mine}), want row {wrow} ({ws})"
            );
        }
    }
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// Scores within this of the exact ones: float32 embeddings on either path.
const TOL: f64 = 2e-4;

#[test]
fn search_answers_like_an_exact_search_and_each_text_finds_itself() {
    let mut rng = Rng::fresh();
    let c = make_corpus("exact", &mut rng, 203);
    let ngx = Nginx::start(&conf(&c));
    let a = ngx.addr();
    // Every corpus text alone: its own row first, score ~1; k from the model (3).
    for (row, text) in c.texts.iter().enumerate().step_by(7) {
        let r = post(
            &a,
            "/search",
            &serde_json::to_vec(&json!({ "input": text })).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert!(
            is_expected_device(r.header("X-Device")),
            "{:?}",
            r.header("X-Device")
        );
        let v = json_of(&r);
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "tiny");
        let hit = &v["data"][0];
        assert_eq!(hit["index"], 0);
        check(&c, text, hit, 3, TOL);
        assert!(
            (hit["scores"][0].as_f64().unwrap() - 1.0).abs() < 1e-4,
            "{hit}"
        );
        let first = hit["ids"][0].as_i64().unwrap();
        // Its own row, or one whose text embeds the same (a tie at score 1).
        if first != id_of(row) {
            let other = ((first - id_of(0)) / 11) as usize;
            assert_eq!(c.vectors[other], c.vectors[row], "{text:?}");
        }
    }
    // Several texts, new ones and the empty one, with k given; the usage counts tokens
    // as the tokenizer does (special tokens included).
    let texts = vec![
        c.texts[3].clone(),
        "gpu nginx fast".into(),
        String::new(),
        "zzqx".into(),
    ];
    for k in [1usize, 7, 203, 500] {
        let body = serde_json::to_vec(&json!({"input": texts, "k": k})).unwrap();
        let r = post(&a, "/search", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = json_of(&r);
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), texts.len());
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(data[i]["index"], i);
            check(&c, t, &data[i], k.min(203), TOL);
        }
        let tokens: usize = texts.iter().map(|t| c.tokens(t)).sum();
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": tokens, "total_tokens": tokens})
        );
    }
    // The location's k= is the default there.
    let r = post(&a, "/search5", br#"{"input": "the cat"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    check(&c, "the cat", &json_of(&r)["data"][0], 5, TOL);
    ngx.assert_healthy();
}

#[test]
fn bad_requests_get_openai_shaped_errors_and_the_worker_keeps_serving() {
    let mut rng = Rng::fresh();
    let c = make_corpus("errors", &mut rng, 40);
    let ngx = Nginx::start(&conf(&c));
    let a = ngx.addr();
    let error = |r: &Response, status: u16, kind: &str, has: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let v = json_of(r);
        assert_eq!(v["error"]["type"], kind, "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(has), "{m}");
    };
    let bad = "invalid_request_error";
    error(&post(&a, "/search", b"{"), 400, bad, "not valid JSON");
    error(&post(&a, "/search", b""), 400, bad, "not valid JSON");
    error(
        &post(&a, "/search", br#"{"input": []}"#),
        400,
        bad,
        "empty array",
    );
    error(
        &post(&a, "/search", br#"{"input": [1]}"#),
        400,
        bad,
        "\"input\"[0] is a number",
    );
    error(
        &post(&a, "/search", br#"{"text": "a"}"#),
        400,
        bad,
        "no \"input\"",
    );
    error(
        &post(&a, "/search", br#"{"input": "a", "k": 0}"#),
        400,
        bad,
        "\"k\" is 0",
    );
    error(
        &post(&a, "/search", br#"{"input": "a", "k": 2049}"#),
        400,
        bad,
        "1 to 2048",
    );
    // More texts than the knn model's batch_rows (16).
    let many = serde_json::to_vec(&json!({ "input": vec!["cat"; 17] })).unwrap();
    error(
        &post(&a, "/search", &many),
        413,
        bad,
        "at most 16 per request",
    );
    let r = request(&a, "GET", "/search", Send::None);
    error(&r, 405, bad, "method not allowed");
    assert_eq!(r.header("Allow"), Some("POST"));
    // Still serving, with the largest request it takes.
    let full = serde_json::to_vec(&json!({ "input": c.texts[..16] })).unwrap();
    let r = post(&a, "/search", &full);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of(&r);
    for (i, t) in c.texts[..16].iter().enumerate() {
        check(&c, t, &v["data"][i], 3, TOL);
    }
    ngx.assert_healthy();
}

#[test]
fn concurrent_clients_are_batched_and_each_gets_its_own_answer() {
    let mut rng = Rng::fresh();
    let c = std::sync::Arc::new(make_corpus("concurrent", &mut rng, 120));
    let ngx = Nginx::start(&conf(&c));
    let a = ngx.addr();
    let seed = rng.next();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (c, a) = (c.clone(), a.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                for _ in 0..25 {
                    let n = 1 + (rng.next() % 4) as usize;
                    let texts: Vec<String> = (0..n)
                        .map(|_| match rng.next() % 3 {
                            0 => random_texts(&mut rng, 1).remove(0),
                            _ => c.texts[(rng.next() % 120) as usize].clone(),
                        })
                        .collect();
                    let k = 1 + (rng.next() % 12) as usize;
                    let body = serde_json::to_vec(&json!({"input": texts, "k": k})).unwrap();
                    let r = post(&a, "/search", &body);
                    assert_eq!(r.status, 200, "{}", r.text());
                    let v = json_of(&r);
                    for (i, t) in texts.iter().enumerate() {
                        check(&c, t, &v["data"][i], k, TOL);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    ngx.assert_healthy();
}

#[test]
fn missing_models_wrong_kinds_and_widths_fail_the_test_naming_both() {
    let mut rng = Rng::fresh();
    let c = make_corpus("conf", &mut rng, 10);
    let d = c.dir.display();
    // An index one column narrower than the encoder's embeddings.
    let narrow: Vec<Vec<f32>> = c.vectors.iter().map(|v| v[1..].to_vec()).collect();
    let nd = c.dir.join("narrow");
    std::fs::create_dir_all(&nd).unwrap();
    write_index(&nd, &narrow);
    let models = format!(
        "gpu_model tiny embed {d}/model; gpu_model docs knn {d}/index.npy; \
         gpu_model narrow knn {d}/narrow/index.npy;"
    );
    let dim = c.vectors[0].len();
    for (args, want) in [
        (
            "tiny nothing",
            "search with embed model \"tiny\" and knn model \"nothing\": no model \"nothing\"",
        ),
        (
            "docs tiny",
            "search with embed model \"docs\" and knn model \"tiny\": model \"docs\" is a knn model, not embed",
        ),
        (
            "tiny narrow",
            &format!(
                "search with embed model \"tiny\" and knn model \"narrow\": the embed model gives \
                 {dim} dimensions, the knn index has {}",
                dim - 1
            ),
        ),
        ("tiny", "needs an embed model and a knn model"),
        ("tiny docs k=0", "k=\"0\" is not a number from 1 to 2048"),
    ] {
        let text = config(&format!(
            "{models} server {{ listen 127.0.0.1:{{PORT}}; location /s {{ gpu_process search {args}; }} }}"
        ));
        let out = nginx_t(&text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args}: {err}");
        assert!(err.contains("[emerg]") && err.contains(want), "{args}: {err}");
    }
    let ok = config(&format!(
        "{models} server {{ listen 127.0.0.1:{{PORT}}; location /s {{ gpu_process search tiny docs k=9; }} }}"
    ));
    let out = nginx_t(&ok);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The real all-MiniLM-L6-v2 where the embed tests find it: `NGX_GPU_EMBED_MODEL`, the GPU
/// bundle's copy, or where `make check` fetched it (t/embed/fetch-model.sh).
fn minilm() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("NGX_GPU_EMBED_MODEL").map(PathBuf::from),
        Some(PathBuf::from(".gpu-embed/all-MiniLM-L6-v2")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/embed-model/all-MiniLM-L6-v2")),
    ];
    if let Some(dir) = candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("model.safetensors").exists())
    {
        return Some(std::fs::canonicalize(dir).unwrap());
    }
    assert!(
        std::env::var("NGX_GPU_REQUIRE_EMBED_MODEL").as_deref() != Ok("1"),
        "NGX_GPU_REQUIRE_EMBED_MODEL=1 but all-MiniLM-L6-v2 is missing"
    );
    eprintln!("skipped: all-MiniLM-L6-v2 not fetched (t/embed/fetch-model.sh)");
    None
}

#[test]
fn the_example_config_serves_search_over_its_corpus() {
    let Some(model_dir) = minilm() else { return };
    let conf_text = std::fs::read_to_string(conf_dir().join("search.conf")).unwrap();
    let corpus: Vec<String> = std::fs::read_to_string(conf_dir().join("search/corpus.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(corpus.len() >= 200, "{} lines", corpus.len());
    let mut seen = corpus.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), corpus.len(), "corpus.txt has a line twice");
    // The index the build script would make, made here on the CPU path: the example's
    // files in a directory of their own, the configuration pointed at it.
    let dir = std::env::temp_dir().join(format!("ngx-gpu-t-search-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let embedder = Embedder::start(&model_dir, "precision=fp32", &dir.join("eye"));
    let vectors = embedder.embed(&corpus);
    drop(embedder);
    write_rows(&dir, &vectors);
    // ids.npy as the script writes it: the line numbers, from 1.
    let ids: Vec<u8> = (1..=vectors.len() as i64)
        .flat_map(|i| i.to_le_bytes())
        .collect();
    write_npy(&dir.join("ids.npy"), "<i8", false, &[vectors.len()], &ids);
    for from in ["search/all-MiniLM-L6-v2", "search/index.npy"] {
        assert!(conf_text.contains(from), "search.conf names {from}");
    }
    assert!(conf_text.contains("listen 127.0.0.1:8080;"));
    let text = conf_text
        .replace("search/all-MiniLM-L6-v2", &model_dir.display().to_string())
        .replace(
            "search/index.npy",
            &dir.join("index.npy").display().to_string(),
        )
        .replace("listen 127.0.0.1:8080;", "listen 127.0.0.1:{PORT};")
        .replace("pid logs/nginx.pid;", "");
    let out = nginx_t(&text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ngx = Nginx::start(&text);
    let a = ngx.addr();
    for line in [0usize, 41, corpus.len() - 1] {
        let body = serde_json::to_vec(&json!({"input": corpus[line], "k": 3})).unwrap();
        let r = post(&a, "/search", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = json_of(&r);
        assert_eq!(v["model"], "minilm");
        let hit = &v["data"][0];
        // The line itself first (ids are line numbers from 1), score ~1, against the exact
        // search over the same embeddings.
        assert_eq!(hit["ids"][0], json!(line as i64 + 1), "{v}");
        let s = hit["scores"][0].as_f64().unwrap();
        assert!((s - 1.0).abs() < 2e-3, "{s}");
        let want = reference(&vectors, &vectors[line]);
        let got2 = hit["ids"][1].as_i64().unwrap() as usize - 1;
        let mine = want.iter().find(|w| w.1 == got2).unwrap().0;
        assert!(
            (mine - want[1].0).abs() < 2e-3,
            "second hit {got2}: {mine} vs {:?}",
            want[1]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/* the example's index-building script */

/// Runs nginx-conf/search/build-index.py on `corpus` against `url`; the files it wrote.
fn build_index(url: &str, model: &str, corpus: &[String], out: &Path) -> (Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(out).unwrap();
    let file = out.join("corpus.txt");
    std::fs::write(&file, corpus.join("\n") + "\n").unwrap();
    let script = conf_dir().join("search/build-index.py");
    let run = std::process::Command::new("python3")
        .arg(script)
        .args(["--url", url, "--model", model, "--batch", "7"])
        .arg("--corpus")
        .arg(&file)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "build-index.py: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    (
        std::fs::read(out.join("index.npy")).unwrap(),
        std::fs::read(out.join("ids.npy")).unwrap(),
    )
}

/// The float32 rows of a C-order 2-D `.npy` written by the script, read here.
fn npy_rows(file: &[u8], d: usize) -> Vec<Vec<f32>> {
    assert_eq!(&file[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([file[8], file[9]]) as usize;
    let header = std::str::from_utf8(&file[10..10 + hl]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    assert_eq!((10 + hl) % 64, 0, "{header:?}");
    file[10 + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect::<Vec<_>>()
        .chunks(d)
        .map(<[f32]>::to_vec)
        .collect()
}

/// A stand-in for `gpu_process embeddings` until it is in this tree: answers the OpenAI
/// embeddings API (float or base64) with the CPU embeddings of `c`'s encoder, one
/// connection at a time. Its address.
fn stub_embeddings(c: &std::sync::Arc<Corpus>) -> String {
    // Weak: the corpus (and its embedder's nginx) goes with the test, not with this thread.
    let c = std::sync::Arc::downgrade(c);
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, len) = loop {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "the client closed early");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..at]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse::<usize>().unwrap())
                        .unwrap();
                    break (at + 4, len);
                }
            };
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            let req: Value = serde_json::from_slice(&buf[head_end..]).unwrap();
            let texts: Vec<String> = req["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            let Some(c) = c.upgrade() else { return };
            let vecs = c.embedder.embed(&texts);
            let b64 = req["encoding_format"] == "base64";
            let data: Vec<Value> = vecs
                .iter()
                .enumerate()
                .rev()
                .map(|(i, v)| {
                    let e = if b64 {
                        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64(&raw))
                    } else {
                        json!(v)
                    };
                    json!({"object": "embedding", "index": i, "embedding": e})
                })
                .collect();
            let body = serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&body).unwrap();
        }
    });
    addr
}

/// Standard padded base64.
fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn the_build_script_writes_an_index_the_search_op_serves() {
    let mut rng = Rng::fresh();
    let c = std::sync::Arc::new(make_corpus("script", &mut rng, 45));
    let url = format!("http://{}/v1/embeddings", stub_embeddings(&c));
    let out = c.dir.join("built");
    let (index, ids) = build_index(&url, "tiny", &c.texts, &out);
    let d = c.vectors[0].len();
    assert_eq!(npy_rows(&index, d), c.vectors);
    let want_ids: Vec<u8> = (1..=45i64).flat_map(|i| i.to_le_bytes()).collect();
    assert!(ids.ends_with(&want_ids) && ids.len() % 64 == want_ids.len() % 64);
    // The module loads what it wrote, and each line finds itself (ids are line numbers).
    let od = out.display();
    let ngx = Nginx::start(&config(&format!(
        "gpu_model tiny embed {}/model precision=fp32;\n\
         gpu_model docs knn {od}/index.npy metric=cosine ids=ids.npy;\n\
         server {{ listen 127.0.0.1:{{PORT}}; location /search {{ gpu_process search tiny docs k=1; }} }}",
        c.dir.display()
    )));
    for (line, text) in c.texts.iter().enumerate() {
        let r = post(
            &ngx.addr(),
            "/search",
            &serde_json::to_vec(&json!({ "input": text })).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let first = json_of(&r)["data"][0]["ids"][0].as_i64().unwrap() as usize;
        assert!(
            first == line + 1 || c.vectors[first - 1] == c.vectors[line],
            "{text:?}: line {first}"
        );
    }
}

#[test]
fn the_build_script_works_against_the_module_s_own_embeddings_endpoint() {
    let mut rng = Rng::fresh();
    let c = make_corpus("script-module", &mut rng, 30);
    let text = config(&format!(
        "gpu_model tiny embed {}/model precision=fp32;\n\
         server {{ listen 127.0.0.1:{{PORT}}; location /v1/embeddings {{ gpu_process embeddings tiny; }} }}",
        c.dir.display()
    ));
    let t = nginx_t(&text);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let ngx = Nginx::start(&text);
    let url = format!("http://{}/v1/embeddings", ngx.addr());
    let (index, _) = build_index(&url, "tiny", &c.texts, &c.dir.join("built"));
    let got = npy_rows(&index, c.vectors[0].len());
    assert_eq!(got.len(), c.vectors.len());
    for (g, w) in got.iter().zip(&c.vectors) {
        let dot: f64 = g.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(dot / (n(g) * n(w)) >= 0.9999, "{g:?} vs {w:?}");
    }
}

#[test]
fn the_example_config_tests_clean_with_stand_in_files() {
    // Wherever the real model is missing too: a generated encoder and an index of its
    // width where search.conf expects all-MiniLM-L6-v2 and the built index.
    let dir =
        std::env::temp_dir().join(format!("ngx-gpu-t-search-stand-in-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = tiny::Tiny::new(&dir.join("model"), 3);
    t.write();
    let d = t.config["hidden_size"].as_u64().unwrap() as usize;
    let mut rng = Rng::fresh();
    let rows: Vec<Vec<f32>> = (0..10)
        .map(|_| {
            (0..d)
                .map(|_| (rng.next() % 1000) as f32 / 1000.0 - 0.5)
                .collect()
        })
        .collect();
    write_index(&dir, &rows);
    let text = std::fs::read_to_string(conf_dir().join("search.conf"))
        .unwrap()
        .replace(
            "search/all-MiniLM-L6-v2",
            &dir.join("model").display().to_string(),
        )
        .replace(
            "search/index.npy",
            &dir.join("index.npy").display().to_string(),
        )
        .replace("listen 127.0.0.1:8080;", "listen 127.0.0.1:{PORT};");
    let out = nginx_t(&text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the index's width is checked against the encoder's.
    write_index(&dir, &[vec![0.5; d + 2]]);
    let out = nginx_t(&text);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the knn index has"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
