//! Configuration errors: nginx refuses to start with a clear `[emerg]`.

mod harness;

use harness::*;

fn emerg(http: &str) -> String {
    let out = nginx_t(&config(http));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "nginx -t accepted: {http}\n{stderr}");
    stderr
}

fn server(loc: &str) -> String {
    format!("server {{ listen 127.0.0.1:{{PORT}}; location /x {{ {loc} }} }}")
}

#[test]
fn the_example_config_tests_clean() {
    let text = std::fs::read_to_string(conf_dir().join("nginx.conf")).unwrap();
    let out = nginx_t(&text.replace("127.0.0.1:8080", "127.0.0.1:{PORT}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("test is successful"), "{stderr}");
}

#[test]
fn unknown_op() {
    let e = emerg(&server("gpu_process sha1;"));
    assert!(
        e.contains(
            "[emerg] \"gpu_process\" directive: unknown op \"sha1\" (known ops: echo, blake3, kernel, embeddings, search, kserve)"
        ),
        "{e}"
    );
}

#[test]
fn op_with_arguments_it_does_not_take() {
    let e = emerg(&server("gpu_process echo extra;"));
    assert!(
        e.contains(
            "[emerg] \"gpu_process\" directive: op \"echo\" takes no arguments, got \"extra\""
        ),
        "{e}"
    );
}

#[test]
fn gpu_process_without_an_op() {
    let e = emerg(&server("gpu_process;"));
    assert!(
        e.contains("[emerg] invalid number of arguments in \"gpu_process\" directive"),
        "{e}"
    );
}

#[test]
fn duplicate_gpu_process() {
    let e = emerg(&server("gpu_process echo; gpu_process blake3;"));
    assert!(
        e.contains("[emerg] \"gpu_process\" directive is duplicate"),
        "{e}"
    );
}

#[test]
fn gpu_process_outside_a_location() {
    let e = emerg("gpu_process echo; server { listen 127.0.0.1:{PORT}; }");
    assert!(
        e.contains("[emerg] \"gpu_process\" directive is not allowed here"),
        "{e}"
    );
}

#[test]
fn bad_fallback_value() {
    let e = emerg(&server("gpu_process echo; gpu_fallback gpu;"));
    assert!(
        e.contains("[emerg] invalid value \"gpu\" in \"gpu_fallback\" directive, it must be \"cpu\" or \"off\""),
        "{e}"
    );
}

#[test]
fn bad_timeout_and_queue_size() {
    let e = emerg(&server("gpu_process echo; gpu_timeout soon;"));
    assert!(
        e.contains("[emerg] \"gpu_timeout\" directive invalid value"),
        "{e}"
    );
    let e = emerg(&format!(
        "gpu_queue_size 0; {}",
        server("gpu_process echo;")
    ));
    assert!(
        e.contains("[emerg] invalid value \"0\" in \"gpu_queue_size\" directive"),
        "{e}"
    );
    let e = emerg(&server(
        "gpu_process echo; gpu_queue_size 5; gpu_queue_size 6;",
    ));
    assert!(
        e.contains("[emerg] \"gpu_queue_size\" directive is duplicate"),
        "{e}"
    );
    let e = emerg(&server("gpu_process echo; gpu_queue_size 16777217;"));
    assert!(
        e.contains("[emerg] invalid value \"16777217\" in \"gpu_queue_size\" directive"),
        "{e}"
    );
}

#[test]
fn bad_batch_settings() {
    for v in ["0", "65537", "-1", "lots"] {
        let e = emerg(&server(&format!("gpu_process echo; gpu_batch_size {v};")));
        let want = format!("[emerg] invalid value \"{v}\" in \"gpu_batch_size\" directive, it must be a number from 1 to 65536");
        assert!(e.contains(&want), "{e}");
    }
    let e = emerg(&server("gpu_process echo; gpu_batch_delay later;"));
    assert!(
        e.contains("[emerg] \"gpu_batch_delay\" directive invalid value"),
        "{e}"
    );
    let e = emerg(&server(
        "gpu_process echo; gpu_batch_size 4; gpu_batch_size 8;",
    ));
    assert!(
        e.contains("[emerg] \"gpu_batch_size\" directive is duplicate"),
        "{e}"
    );
    for v in ["1k", "63k", "2g", "huge"] {
        let e = emerg(&format!(
            "gpu_batch_bytes {v}; {}",
            server("gpu_process echo;")
        ));
        let want = format!("[emerg] invalid value \"{v}\" in \"gpu_batch_bytes\" directive, it must be a size from 64k to 1g");
        assert!(e.contains(&want), "{e}");
    }
    for v in ["5", "20ms", "1s", "-1us"] {
        let e = emerg(&format!("gpu_poll {v}; {}", server("gpu_process echo;")));
        let want = format!("[emerg] invalid value \"{v}\" in \"gpu_poll\" directive, it must be 0 or a time in us or ms up to 10ms");
        assert!(e.contains(&want), "{e}");
    }
    let e = emerg(&server("gpu_process echo; gpu_batch_bytes 1m;"));
    assert!(
        e.contains("[emerg] \"gpu_batch_bytes\" directive is not allowed here"),
        "{e}"
    );
}

#[test]
fn valid_settings_at_every_level_test_clean() {
    let out = nginx_t(&config(
        "gpu_fallback off; gpu_timeout 5s; gpu_queue_size 64; gpu_batch_size 16; gpu_batch_delay 2ms;\n\
         gpu_batch_bytes 4m; gpu_poll 150us; gpu_pinned_limit 64m; gpu_client_eof cancel;\n\
         server { listen 127.0.0.1:{PORT}; gpu_fallback cpu; gpu_batch_size 1; gpu_client_eof answer;\n\
           location /a { gpu_process echo; gpu_timeout 100ms; gpu_batch_delay 0; gpu_batch_size 65536; }\n\
           location /b { gpu_process blake3; gpu_fallback off; } }",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The largest batch bound, with the pinned memory it needs (4 x 1 GiB and a little).
    let out = nginx_t(&config(
        "gpu_batch_bytes 1g; gpu_pinned_limit 5g;\n\
         server { listen 127.0.0.1:{PORT}; location /a { gpu_process echo; } }",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn gpu_timeout_must_be_more_than_zero() {
    for v in ["0", "0s", "0ms"] {
        let e = emerg(&server(&format!("gpu_process echo; gpu_timeout {v};")));
        let want = format!(
            "[emerg] invalid value \"{v}\" in \"gpu_timeout\" directive, it must be more than 0"
        );
        assert!(e.contains(&want), "{e}");
    }
}

#[test]
fn batches_that_would_pass_the_pinned_limit_are_refused_at_start() {
    // echo: 2 slots x (16 MiB in + 16 MiB out) = 64 MiB at the default 16m; blake3's
    // descriptors add a MiB to each input (counted only where blake3 is configured).
    let e = emerg(&format!(
        "gpu_pinned_limit 63m; {}",
        server("gpu_process echo;")
    ));
    assert!(
        e.contains(
            "[emerg] gpu: \"gpu_batch_bytes\" 16384k with \"gpu_batch_size\" up to 128 needs up to 64 MiB of pinned memory per worker, more than \"gpu_pinned_limit\" 63 MiB"
        ),
        "{e}"
    );
    let e = emerg(
        "gpu_pinned_limit 65m; server { listen 127.0.0.1:{PORT};\n\
           location /e { gpu_process echo; } location /b { gpu_process blake3; } }",
    );
    assert!(
        e.contains("needs up to 66 MiB of pinned memory per worker"),
        "{e}"
    );
    let e = emerg(&format!(
        "gpu_batch_bytes 1g; {}",
        server("gpu_process echo;")
    ));
    assert!(
        e.contains("needs up to 4096 MiB of pinned memory per worker"),
        "{e}"
    );
    for v in ["1m", "65g", "lots"] {
        let e = emerg(&format!(
            "gpu_pinned_limit {v}; {}",
            server("gpu_process echo;")
        ));
        let want = format!("[emerg] invalid value \"{v}\" in \"gpu_pinned_limit\" directive, it must be a size from 4m to 64g");
        assert!(e.contains(&want), "{e}");
    }
    let e = emerg(&server("gpu_process echo; gpu_pinned_limit 1g;"));
    assert!(
        e.contains("\"gpu_pinned_limit\" directive is not allowed here"),
        "{e}"
    );
}

#[test]
fn bad_client_eof_value() {
    let e = emerg(&server("gpu_process echo; gpu_client_eof ignore;"));
    assert!(
        e.contains("[emerg] invalid value \"ignore\" in \"gpu_client_eof\" directive, it must be \"answer\" or \"cancel\""),
        "{e}"
    );
}

/// `nginx -s reload` reads the configuration too, but starts no worker: it must not fork
/// the kernel compiler (where NVRTC is missing that printed a warning on every signal).
#[test]
fn signalling_nginx_does_not_compile_kernels() {
    let ngx = Nginx::start(&config(
        "server { listen 127.0.0.1:{PORT}; location /x { gpu_process echo; } }",
    ));
    let out = ngx.signal("reopen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("gpu:"), "nginx -s printed: {stderr}");
}

#[test]
fn gpu_model_of_an_unknown_kind_or_without_a_path() {
    let e = emerg(&format!(
        "gpu_model m resnet /dev/null; {}",
        server("gpu_process echo;")
    ));
    assert!(
        e.contains("[emerg] \"gpu_model\" directive: unknown model kind \"resnet\""),
        "{e}"
    );
    let e = emerg(&format!("gpu_model m knn; {}", server("gpu_process echo;")));
    assert!(
        e.contains("[emerg] \"gpu_model\" directive: needs a name, a kind and a path"),
        "{e}"
    );
    let e = emerg(&server("gpu_process echo; gpu_model m knn /dev/null;"));
    assert!(
        e.contains("[emerg] \"gpu_model\" directive is not allowed here"),
        "{e}"
    );
}

#[test]
fn gpu_devices_syntax_duplicates_and_place() {
    for v in ["gpu0", "0,", ",1", "0,,1", "-1", "all,0", "0x1", "\"\""] {
        let e = emerg(&format!("gpu_devices {v}; {}", server("gpu_process echo;")));
        let shown = v.trim_matches('"');
        let want = format!(
            "[emerg] invalid value \"{shown}\" in \"gpu_devices\" directive, it must be \"all\" or device numbers separated by commas (\"0,1\")"
        );
        assert!(e.contains(&want), "{v}: {e}");
        assert!(e.contains("nginx.conf:"), "names the file and line: {e}");
    }
    let e = emerg(&format!(
        "gpu_devices 0,1,0; {}",
        server("gpu_process echo;")
    ));
    assert!(
        e.contains("[emerg] device 0 is listed twice in \"gpu_devices\" directive \"0,1,0\""),
        "{e}"
    );
    let e = emerg(&format!(
        "gpu_devices 3,256; {}",
        server("gpu_process echo;")
    ));
    assert!(
        e.contains("[emerg] invalid device \"256\" in \"gpu_devices\" directive, it must be a number from 0 to 255"),
        "{e}"
    );
    let e = emerg(&format!(
        "gpu_devices all; gpu_devices 0; {}",
        server("gpu_process echo;")
    ));
    assert!(
        e.contains("[emerg] \"gpu_devices\" directive is duplicate"),
        "{e}"
    );
    let e = emerg(&server("gpu_process echo; gpu_devices 0;"));
    assert!(
        e.contains("[emerg] \"gpu_devices\" directive is not allowed here"),
        "{e}"
    );
    let e = emerg(&format!("gpu_devices 0 1; {}", server("gpu_process echo;")));
    assert!(
        e.contains("[emerg] invalid number of arguments in \"gpu_devices\" directive"),
        "{e}"
    );
    // Ids that may not exist here are for the workers to find out: the master does not
    // touch CUDA, so a valid list tests clean on any machine.
    for v in ["all", "0", "7,3,0", "255"] {
        let out = nginx_t(&config(&format!(
            "gpu_devices {v}; {}",
            server("gpu_process echo;")
        )));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{v}: {stderr}");
    }
}
/// `gpu_model m knn <file>` with a file made here (good or broken) refuses to start with an
/// `[emerg]` naming the file and the problem.
#[test]
fn gpu_model_knn_bad_files() {
    let dir = data_dir("config-knn");
    let f32s = |n: usize| vec![0u8; 4 * n];
    let cases: Vec<BadFile> = vec![
        (
            "f64.npy",
            "<f8",
            false,
            vec![4, 3],
            vec![0; 96],
            "holds float64: a knn index is float32 or float16",
        ),
        (
            "rank3.npy",
            "<f4",
            false,
            vec![2, 2, 3],
            f32s(12),
            "has shape [2, 2, 3]: a knn index is 2-D",
        ),
        (
            "fortran.npy",
            "<f4",
            true,
            vec![4, 3],
            f32s(12),
            "is in Fortran order",
        ),
        (
            "short.npy",
            "<f4",
            false,
            vec![4, 3],
            f32s(11),
            "is truncated: 44 bytes of data",
        ),
        (
            "empty.npy",
            "<f4",
            false,
            vec![0, 3],
            vec![],
            "is empty (shape (0, 3))",
        ),
    ];
    for (name, descr, fortran, shape, data, want) in cases {
        let p = dir.join(name);
        write_npy(&p, descr, fortran, &shape, &data);
        let e = emerg(&format!(
            "gpu_model m knn {}; {}",
            p.display(),
            server("gpu_process kserve;")
        ));
        assert!(
            e.contains("[emerg] \"gpu_model\" directive: "),
            "{name}: {e}"
        );
        assert!(e.contains(&format!("\"{}\"", p.display())), "{name}: {e}");
        assert!(e.contains(want), "{name}: {e}");
    }
    let missing = dir.join("missing.npy");
    let e = emerg(&format!(
        "gpu_model m knn {}; {}",
        missing.display(),
        server("gpu_process kserve;")
    ));
    assert!(
        e.contains(&format!("cannot open \"{}\"", missing.display())),
        "{e}"
    );
    // ids of the wrong length, and of the wrong dtype.
    let good = dir.join("good.npy");
    write_npy(&good, "<f4", false, &[4, 3], &f32s(12));
    write_npy(&dir.join("ids3.npy"), "<i8", false, &[3], &[0; 24]);
    write_npy(&dir.join("idsf.npy"), "<f4", false, &[4], &[0; 16]);
    for (ids, want) in [
        ("ids3.npy", "have shape [3]: expected (4,)"),
        ("idsf.npy", "hold float32: ids are int64"),
    ] {
        let e = emerg(&format!(
            "gpu_model m knn {} ids={ids}; {}",
            good.display(),
            server("gpu_process kserve;")
        ));
        assert!(e.contains(ids) && e.contains(want), "{ids}: {e}");
    }
    let e = emerg(&format!(
        "gpu_model m knn {} metric=dot; {}",
        good.display(),
        server("gpu_process kserve;")
    ));
    assert!(
        e.contains("metric \"dot\" is not one of ip, cosine, l2"),
        "{e}"
    );
    let e = emerg(&server("gpu_process kserve extra;"));
    assert!(
        e.contains("kserve takes no arguments, got \"extra\""),
        "{e}"
    );
    // The good file with its ids passes.
    write_npy(&dir.join("ids4.npy"), "<i8", false, &[4], &[0; 32]);
    let out = nginx_t(&config(&format!(
        "gpu_model m knn {} ids=ids4.npy metric=l2 precision=fp16 k=3; {}",
        good.display(),
        server("gpu_process kserve;")
    )));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

#[path = "embed/tiny.rs"]
mod tiny;

/// A generated embed model directory, edited by `edit` before it is written.
fn tiny_model(name: &str, edit: impl FnOnce(&mut tiny::Tiny)) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ngx-gpu-t-embed-{}-{name}", std::process::id()));
    let mut t = tiny::Tiny::new(&dir, 7);
    edit(&mut t);
    t.write();
    dir
}

#[test]
fn gpu_model_embed_loads_a_model_directory() {
    let dir = tiny_model("good", |_| {});
    let out = nginx_t(&config(&format!(
        "gpu_model minilm embed {} precision=fp32 max_tokens=32; {}",
        dir.display(),
        server("gpu_process echo;")
    )));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gpu_model_embed_with_broken_files_names_the_file() {
    type Edit = Box<dyn FnOnce(&mut tiny::Tiny)>;
    let cases: Vec<(&str, Edit, String, &str)> = vec![
        (
            "missing",
            Box::new(|t| t.tensors.retain(|x| x.0 != "encoder.layer.0.output.dense.bias")),
            "model.safetensors: tensor \"encoder.layer.0.output.dense.bias\" is missing".into(),
            "",
        ),
        (
            "shape",
            Box::new(|t| t.config["intermediate_size"] = serde_json::json!(64)),
            "model.safetensors: tensor \"encoder.layer.0.intermediate.dense.weight\" has shape [70, 36], config.json makes it [64, 36]".into(),
            "",
        ),
        (
            "act",
            Box::new(|t| t.config["hidden_act"] = serde_json::json!("silu")),
            "config.json: hidden_act \"silu\" is not supported".into(),
            "",
        ),
        (
            "positions",
            Box::new(|_| {}),
            "max_tokens=41 is more than the model's 40 positions".into(),
            "max_tokens=41",
        ),
    ];
    for (name, edit, want, params) in cases {
        let dir = tiny_model(name, edit);
        let e = emerg(&format!(
            "gpu_model m embed {} {params}; {}",
            dir.display(),
            server("gpu_process echo;")
        ));
        assert!(
            e.contains("[emerg] \"gpu_model\" directive: "),
            "{name}: {e}"
        );
        assert!(e.contains(&want), "{name}: {e}");
        if want.starts_with("model") || want.starts_with("config") {
            assert!(
                e.contains(&format!("{}/{want}", dir.display())),
                "{name}: the path: {e}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    let e = emerg(&format!(
        "gpu_model m embed /nonexistent/model; {}",
        server("gpu_process echo;")
    ));
    assert!(e.contains("/nonexistent/model: not a directory"), "{e}");
}
