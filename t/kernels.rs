//! Your own CUDA kernel as an endpoint (`gpu_kernel`, `gpu_process kernel`), through a real
//! nginx. Without a GPU (CI, with NVRTC from its wheel): compile errors with the kernel's
//! file and line, wrong entry points and signatures, argument counts and types at
//! configuration and per request, body limits, 503 where there is no GPU, the compile
//! cache across reloads, and per-location queue bounds. On the GPU machine
//! (NGX_GPU_REQUIRE=1): every example kernel against a CPU reference on fresh random inputs
//! of awkward sizes, mixed with other endpoints; rejected inputs and refused outputs; and a
//! faulting and a hanging kernel survived under load.

mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::*;

/// A kernel that copies its input (the smallest useful one), for the configuration tests.
const COPY: &str = r#"#include "ngx_gpu_kernel.h"

extern "C" __global__ void copy(ngx_gpu_batch b)
{
    NGX_GPU_FOR_EACH_BYTE(b, r, j) {
        ngx_gpu_out(b, r)[j] = ngx_gpu_in(b, r)[j];
    }
}
"#;

fn emerg_with(http: &str, files: &[(&str, &str)]) -> String {
    let out = nginx_t_with(&config(http), files);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "nginx -t accepted: {http}\n{stderr}");
    stderr
}

fn server(loc: &str) -> String {
    format!("server {{ listen 127.0.0.1:{{PORT}}; location /x {{ {loc} }} }}")
}

#[test]
fn a_kernel_that_does_not_compile_stops_nginx_with_its_file_and_line() {
    if !nvrtc() {
        return;
    }
    let broken = "#include \"ngx_gpu_kernel.h\"\n\nextern \"C\" __global__ void k(ngx_gpu_batch b)\n{\n    undeclared_thing(b);\n}\n";
    let e = emerg_with(
        &format!("gpu_kernel k t/k.cu; {}", server("gpu_process kernel k;")),
        &[("t/k.cu", broken)],
    );
    assert!(e.contains("[emerg] gpu: "), "{e}");
    assert!(e.contains("/conf/t/k.cu does not compile"), "{e}");
    assert!(
        e.contains("/conf/t/k.cu(5): error: identifier \"undeclared_thing\" is undefined"),
        "{e}"
    );
    // Declared but used nowhere: still compiled, still an error.
    let e = emerg_with("gpu_kernel k t/k.cu;", &[("t/k.cu", broken)]);
    assert!(e.contains("k.cu(5): error"), "{e}");
}

#[test]
fn a_wrong_entry_point_or_signature_is_a_configuration_error() {
    if !nvrtc() {
        return;
    }
    let e = emerg_with(
        &format!(
            "gpu_kernel k t/k.cu entry=nope; {}",
            server("gpu_process kernel k;")
        ),
        &[("t/k.cu", COPY)],
    );
    assert!(
        e.contains("[emerg] \"gpu_kernel\" directive: kernel \"k\": no kernel function \"nope\" in ")
            && e.contains("/conf/t/k.cu (found: copy); a kernel is extern \"C\" __global__, or name it with entry="),
        "{e}"
    );
    let two = "extern \"C\" __global__ void k(int a, float *b) { if (a) *b = 1.0f; }\n";
    let e = emerg_with(
        &format!("gpu_kernel k t/k.cu; {}", server("gpu_process kernel k;")),
        &[("t/k.cu", two)],
    );
    assert!(
        e.contains("must take one ngx_gpu_batch by value (88 bytes), it takes 2 parameters of [4, 8] bytes"),
        "{e}"
    );
    // The entry defaults to the kernel's name; a right one tests clean.
    let out = nginx_t_with(
        &config(&format!(
            "gpu_kernel copy t/copy.cu; {}",
            server("gpu_process kernel copy;")
        )),
        &[("t/copy.cu", COPY)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn arguments_are_checked_against_the_declaration() {
    let decl = "gpu_kernel k t/k.cu entry=copy \"args=width:u32,height:u32,gain:f32\";";
    let files = [("t/k.cu", COPY)];
    let e = emerg_with(
        &format!("{decl} {}", server("gpu_process kernel k $arg_w;")),
        &files,
    );
    assert!(
        e.contains("[emerg] \"gpu_process\" directive: kernel \"k\" takes 3 arguments (width:u32 height:u32 gain:f32), got 1: \"height\" is missing in ")
            && e.contains("/conf/nginx.conf:"),
        "{e}"
    );
    let e = emerg_with(
        &format!("{decl} {}", server("gpu_process kernel k 1 2 3 4;")),
        &files,
    );
    assert!(e.contains("got 4: \"4\" is one too many"), "{e}");
    let e = emerg_with(
        &format!("{decl} {}", server("gpu_process kernel k -3 $arg_h 1;")),
        &files,
    );
    assert!(
        e.contains(
            "argument \"width\" (u32) of kernel \"k\": \"-3\" is not an unsigned integer in range"
        ),
        "{e}"
    );
    let e = emerg_with(&server("gpu_process kernel nope;"), &files);
    assert!(
        e.contains("[emerg] \"gpu_process\" directive: unknown kernel \"nope\" (declare it with gpu_kernel in the http block)"),
        "{e}"
    );
    let e = emerg_with(
        &format!("gpu_kernel k t/k.cu \"args=w:u32 w:i32\"; {}", server("")),
        &files,
    );
    assert!(
        e.contains("argument name \"w\" is empty or used twice"),
        "{e}"
    );
    let e = emerg_with(
        &format!("gpu_kernel k t/k.cu block=4096; {}", server("")),
        &files,
    );
    assert!(
        e.contains("invalid block \"4096\": threads per block, from 1 to 1024"),
        "{e}"
    );
    let e = emerg_with("gpu_kernel k t/missing.cu;", &files);
    assert!(
        e.contains("\"gpu_kernel\" directive: cannot read \"")
            && e.contains("missing.cu\": No such file"),
        "{e}"
    );
    let e = emerg_with("gpu_kernel k t/k.cu; gpu_kernel k t/k.cu;", &files);
    assert!(e.contains("kernel \"k\" is already declared"), "{e}");
    let e = emerg_with(&server("gpu_process kernel;"), &files);
    assert!(
        e.contains("op \"kernel\" needs the name of a kernel declared with gpu_kernel"),
        "{e}"
    );
    // Declared after the location that uses it: fine.
    let out = nginx_t_with(
        &config(&format!(
            "{} gpu_kernel k t/k.cu entry=copy \"args=w:u32\";",
            server("gpu_process kernel k $arg_w;")
        )),
        &files,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn request_values_are_typed_and_bodies_bounded_before_anything_is_queued() {
    let ngx = Nginx::start_with_files(
        &config(
            "gpu_batch_bytes 64k; gpu_kernel k t/k.cu entry=copy \"args=width:u32,gain:f32\";\n\
             server { listen 127.0.0.1:{PORT};\n\
               location /k { gpu_process kernel k $arg_width $http_x_gain; } }",
        ),
        &[("t/k.cu", COPY)],
    );
    let addr = ngx.addr();
    let get = |path: &str, gain: &str, body: &[u8]| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        use std::io::{Read, Write};
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Gain: {gain}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    };
    let r = get("/k?width=12x", "1.5", b"abc");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("{\"error\": \"argument \\\"width\\\" (u32): \\\"12x\\\" is not an unsigned integer in range\"}"), "{r}");
    let r = get("/k?width=12", "hot", b"abc");
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("argument \\\"gain\\\" (f32)"),
        "{r}"
    );
    let r = get("/k", "1", b"abc");
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("\\\"\\\" is not an unsigned integer"),
        "{r}"
    );
    let r = get("/k?width=4", "1", &vec![0u8; 64 * 1024 + 1]);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(
        r.contains(
            "kernel \\\"k\\\" takes bodies of up to 65536 bytes (gpu_batch_bytes), got 65537"
        ),
        "{r}"
    );
    // Valid values: the GPU answers, or without one, a clear 503.
    let r = post(&addr, "/k?width=4", b"abc");
    assert_eq!(r.status, 400, "X-Gain missing: the second value is empty");
    let ok = get("/k?width=4", "0.5", b"hello");
    if gpu_required() {
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("hello"),
            "{ok}"
        );
    } else {
        assert!(ok.starts_with("HTTP/1.1 503"), "{ok}");
        assert!(ok.contains("Retry-After: 1"), "{ok}");
        assert!(
            ok.contains("kernel \\\"k\\\" runs on a GPU only, and this worker has none"),
            "{ok}"
        );
    }
    ngx.assert_healthy();
}

#[test]
fn kernel_endpoints_without_a_gpu_answer_503_and_other_ops_still_serve() {
    let ngx = Nginx::start_with_env(
        &config(
            "gpu_kernel hex kernels/hex.cu output=x2 type=text/plain;\n\
             server { listen 127.0.0.1:{PORT};\n\
               location /hex { gpu_process kernel hex; }\n\
               location /b { gpu_process blake3; } }",
        ),
        &[("CUDA_VISIBLE_DEVICES", "")],
    );
    let r = post(&ngx.addr(), "/hex", b"abc");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert!(r.text().contains("runs on a GPU only"), "{}", r.text());
    assert_eq!(post(&ngx.addr(), "/b", b"abc").text(), b3(b"abc"));
    ngx.assert_healthy();
}

#[test]
fn a_reload_compiles_only_what_changed_and_a_broken_kernel_keeps_the_old_configuration() {
    if !nvrtc() {
        return;
    }
    let conf = config(
        "gpu_kernel copy t/copy.cu; gpu_kernel hex kernels/hex.cu output=x2;\n\
         server { listen 127.0.0.1:{PORT};\n\
           location /copy { gpu_process kernel copy; }\n\
           location /b { gpu_process blake3; } }",
    );
    let ngx = Nginx::start_with_files(&conf, &[("t/copy.cu", COPY)]);
    // Nothing changed: nothing compiled (three programs: copy, hex and blake3's).
    ngx.reload_with(&conf);
    assert!(
        ngx.error_log()
            .contains("3 kernel programs ready, 0 compiled and 3 from earlier loads"),
        "{}",
        ngx.error_log()
    );
    // One kernel changed: that one compiled.
    ngx.write_conf_file(
        "t/copy.cu",
        &format!("{COPY}\n// a comment changes the source\n"),
    );
    ngx.reload_with(&conf);
    assert!(
        ngx.error_log()
            .contains("3 kernel programs ready, 1 compiled and 2 from earlier loads"),
        "{}",
        ngx.error_log()
    );
    // A kernel that no longer compiles: the reload fails with its line, the running
    // configuration keeps serving.
    ngx.write_conf_file(
        "t/copy.cu",
        &COPY.replace("ngx_gpu_in(b, r)[j]", "ngx_gpu_in(b, r)[j] +"),
    );
    ngx.reload_with(&conf);
    let log = ngx.error_log();
    assert!(log.contains("copy.cu(6): error"), "{log}");
    assert_eq!(post(&ngx.addr(), "/b", b"still").text(), b3(b"still"));
}

#[test]
fn a_location_queue_bound_keeps_one_endpoint_from_filling_the_worker() {
    let ngx = Nginx::start(
        &config(
            "gpu_queue_size 100;\n\
             server { listen 127.0.0.1:{PORT};\n\
               location /slow { gpu_process echo; gpu_queue_size 2; gpu_batch_size 50; gpu_batch_delay 1500ms; }\n\
               location /fast { gpu_process echo; } }",
        )
        .replace("worker_processes 2;", "worker_processes 1;"),
    );
    let addr = ngx.addr();
    let held: Vec<_> = (0..2u8)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || post(&addr, "/slow", &[i; 10]))
        })
        .collect();
    thread::sleep(Duration::from_millis(400));
    let r = post(&addr, "/slow", b"third");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text()
            .contains("GPU queue of this location is full (2 requests waiting)"),
        "{}",
        r.text()
    );
    // Another location of the same worker is not held up.
    let t = Instant::now();
    assert_eq!(post(&addr, "/fast", b"fast").body, b"fast");
    assert!(t.elapsed() < Duration::from_millis(500));
    for (i, h) in held.into_iter().enumerate() {
        assert_eq!(h.join().unwrap().body, vec![i as u8; 10]);
    }
    ngx.assert_healthy();
}

/* On the GPU machine */

/// What rgba_blur.cu computes, on the CPU.
fn blur(px: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = vec![0u8; px.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..4 {
                let (mut sum, mut n) = (0u32, 0u32);
                for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                    for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                        sum += px[(ny * w + nx) * 4 + c] as u32;
                        n += 1;
                    }
                }
                out[(y * w + x) * 4 + c] = ((sum + n / 2) / n) as u8;
            }
        }
    }
    out
}

/// The softmax in float64.
fn softmax(x: &[f32], t: f64) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = x.iter().map(|&v| ((v as f64 - m) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_example_kernel_equals_its_cpu_reference_in_mixed_batches() {
    if !gpu_required() {
        eprintln!("skipped: no usable GPU (the example kernels run on the GPU machine)");
        return;
    }
    let ngx = Nginx::example("nginx.conf");
    let addr = ngx.addr();
    let seed = Rng::fresh().next();
    let clients: Vec<_> = (0..12u64)
        .map(|c| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut rng = Rng(seed ^ (c + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut checked = 0;
                for i in 0..40u64 {
                    match (c + i) % 5 {
                        0 => {
                            let (w, h) = (
                                1 + (rng.next() % 97) as usize,
                                1 + (rng.next() % 61) as usize,
                            );
                            let px = rng.bytes(w * h * 4);
                            let r = post(&addr, &format!("/blur?width={w}&height={h}"), &px);
                            assert_eq!(r.status, 200, "blur {w}x{h}: {}", r.text());
                            assert_eq!(r.header("Content-Type"), Some("image/x-rgba"));
                            assert!(r.body == blur(&px, w, h), "blur {w}x{h} differs");
                        }
                        1 => {
                            let n = [0usize, 1, 2, 255, 256, 257, 1000, 4097]
                                [(rng.next() % 8) as usize];
                            let x: Vec<f32> = (0..n)
                                .map(|_| ((rng.next() % 20001) as f32 - 10000.0) / 997.0)
                                .collect();
                            let t = [0.5f64, 1.0, 3.0][(rng.next() % 3) as usize];
                            let body: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
                            let r = post(&addr, &format!("/softmax?t={t}"), &body);
                            assert_eq!(r.status, 200, "softmax of {n}: {}", r.text());
                            let got: Vec<f32> = r
                                .body
                                .chunks(4)
                                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                                .collect();
                            let want = softmax(&x, t);
                            assert_eq!(got.len(), n);
                            for (g, w) in got.iter().zip(&want) {
                                let err = (*g as f64 - w).abs();
                                assert!(
                                    err <= 1e-6 + 1e-5 * w.abs(),
                                    "softmax: {g} vs {w} (n {n}, t {t})"
                                );
                            }
                        }
                        2 => {
                            let n =
                                [0usize, 1, 63, 64, 65, 4095, 100_001][(rng.next() % 7) as usize];
                            let data = rng.bytes(n);
                            let r = post(&addr, "/hex", &data);
                            assert_eq!((r.status, r.text()), (200, hex(&data)), "hex of {n}");
                        }
                        3 => {
                            let data = {
                                let n = (rng.next() % 70_000) as usize;
                                rng.bytes(n)
                            };
                            assert_eq!(post(&addr, "/blake3", &data).text(), b3(&data));
                        }
                        _ => {
                            let data = {
                                let n = (rng.next() % 70_000) as usize;
                                rng.bytes(n)
                            };
                            assert!(post(&addr, "/echo", &data).body == data);
                        }
                    }
                    checked += 1;
                }
                checked
            })
        })
        .collect();
    let checked: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    eprintln!("example kernels: {checked} answers checked against the CPU references");
    // Bad input is refused by the kernel, request by request.
    let r = post(&addr, "/blur?width=3&height=3", &[0u8; 35]);
    assert_eq!(r.status, 400);
    assert!(
        r.text()
            .contains("kernel \\\"rgba_blur\\\" rejected the request (code 1)"),
        "{}",
        r.text()
    );
    let r = post(&addr, "/softmax?t=0", &[0u8; 8]);
    assert!(
        r.status == 400 && r.text().contains("(code 2)"),
        "{}",
        r.text()
    );
    ngx.assert_healthy();
}

/// Test kernels: one that claims more output than its capacity, one that touches an
/// illegal address, one that never ends.
const OVERFLOW: &str = r#"#include "ngx_gpu_kernel.h"
extern "C" __global__ void overflow(ngx_gpu_batch b)
{
    NGX_GPU_FOR_EACH_REQUEST(b, r) {
        if (threadIdx.x == 0) {
            b.out_len[r] = b.out_cap[r] + 1;
        }
    }
}
"#;
const FAULT: &str = r#"#include "ngx_gpu_kernel.h"
extern "C" __global__ void fault(ngx_gpu_batch b)
{
    NGX_GPU_FOR_EACH_REQUEST(b, r) {
        if (b.in_len[r] > 0 && ngx_gpu_in(b, r)[0] == 'X') {
            *(volatile int *) 0x10ull = 1;
        }
        if (threadIdx.x == 0) {
            for (ngx_gpu_u64 j = 0; j < b.in_len[r]; j++) {
                ngx_gpu_out(b, r)[j] = ngx_gpu_in(b, r)[j];
            }
        }
    }
}
"#;
const HANG: &str = r#"#include "ngx_gpu_kernel.h"
extern "C" __global__ void hang(ngx_gpu_batch b)
{
    NGX_GPU_FOR_EACH_REQUEST(b, r) {
        if (b.in_len[r] > 0 && ngx_gpu_in(b, r)[0] == 'H') {
            while (*(volatile const ngx_gpu_u8 *) ngx_gpu_in(b, r) == 'H') {
            }
        }
        if (threadIdx.x == 0) {
            for (ngx_gpu_u64 j = 0; j < b.in_len[r]; j++) {
                ngx_gpu_out(b, r)[j] = ngx_gpu_in(b, r)[j];
            }
        }
    }
}
"#;

#[test]
fn an_output_past_its_capacity_is_refused_never_sent() {
    if !gpu_required() {
        eprintln!("skipped: no usable GPU");
        return;
    }
    let ngx = Nginx::start_with_files(
        &config(
            "gpu_kernel overflow t/overflow.cu output=16;\n\
             server { listen 127.0.0.1:{PORT}; location /o { gpu_process kernel overflow; } }",
        ),
        &[("t/overflow.cu", OVERFLOW)],
    );
    let r = post(&ngx.addr(), "/o", b"abc");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(ngx
        .wait_log("reported 17 bytes of output for a request whose capacity is 16")
        .contains("kernel \"overflow\""));
}

/// A kernel that faults (or hangs) on some inputs: under concurrent load on it and on other
/// endpoints, only its own batch fails (500, or 504 for the hang's), the worker is replaced,
/// and every other request is answered right.
fn survive(kernel: &str, source: &str, poison: u8, extra: &str) {
    let ngx = Nginx::start_with_files(
        &config(&format!(
            "gpu_kernel {kernel} t/{kernel}.cu; {extra}\n\
             server {{ listen 127.0.0.1:{{PORT}};\n\
               location /k {{ gpu_process kernel {kernel}; }}\n\
               location /hex {{ gpu_process kernel hex2; }}\n\
               location /b {{ gpu_process blake3; }} }}\n\
             gpu_kernel hex2 kernels/hex.cu entry=hex output=x2;"
        )),
        &[(&format!("t/{kernel}.cu"), source)],
    );
    let addr = ngx.addr();
    let seed = Rng::fresh().next();
    let clients: Vec<_> = (0..8u64)
        .map(|c| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut rng = Rng(seed ^ ((c + 1) * 7919));
                let (mut bad, mut fine) = (0, 0);
                for i in 0..30u64 {
                    let data = {
                        let mut d = {
                            let n = 1 + (rng.next() % 5000) as usize;
                            rng.bytes(n)
                        };
                        if d[0] == poison {
                            d[0] = 0;
                        }
                        d
                    };
                    match (c + i) % 3 {
                        0 => {
                            let r = post(&addr, "/k", &data);
                            if r.status == 200 {
                                assert!(r.body == data, "/k answered wrong");
                                fine += 1;
                            } else {
                                // Its batch mate poisoned the batch, or this worker had lost
                                // its GPU: never a wrong answer.
                                assert!(matches!(r.status, 500 | 503 | 504), "{}", r.status);
                                bad += 1;
                            }
                        }
                        1 => {
                            let r = post(&addr, "/hex", &data);
                            if r.status == 200 {
                                assert_eq!(r.text(), hex(&data));
                            } else {
                                // A kernel shares its worker's GPU: 500 in the lost batch, 503
                                // until the worker is replaced.
                                assert!(matches!(r.status, 500 | 503 | 504), "{}", r.status);
                            }
                        }
                        _ => assert_eq!(post(&addr, "/b", &data).text(), b3(&data)),
                    }
                    if c == 0 && i == 10 {
                        let mut p = data.clone();
                        p[0] = poison;
                        let r = post(&addr, "/k", &p);
                        assert!(
                            matches!(r.status, 500 | 504),
                            "the poisoned request: {}",
                            r.status
                        );
                    }
                }
                (bad, fine)
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let log = ngx.wait_log("the master starts a fresh one");
    // The alert names the failure and the ops of every batch that was in flight.
    let alert = log
        .lines()
        .find(|l| {
            // Whichever worker (and so device) took the poisoned batch.
            l.contains("[alert]")
                && l.split(" failed")
                    .next()
                    .and_then(|h| h.rsplit(' ').next())
                    .is_some_and(is_gpu)
        })
        .unwrap_or_else(|| panic!("no alert: {log}"));
    assert!(alert.contains(&format!("kernel {kernel}")), "{alert}");
    if kernel == "fault" {
        assert!(alert.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{alert}");
    } else {
        assert!(alert.contains("has not finished"), "{alert}");
    }
    // After the respawn, the endpoint serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = post(&addr, "/k", b"again");
        if r.status == 200 {
            assert_eq!(r.body, b"again");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel endpoint did not come back"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!ngx.error_log().contains("exited on signal"));
}

#[test]
fn a_faulting_kernel_fails_only_its_batch_and_the_worker_is_replaced() {
    if !gpu_required() {
        eprintln!("skipped: no usable GPU");
        return;
    }
    survive("fault", FAULT, b'X', "");
}

#[test]
fn a_hanging_kernel_is_caught_by_its_deadline_and_the_worker_is_replaced() {
    if !gpu_required() {
        eprintln!("skipped: no usable GPU");
        return;
    }
    survive("hang", HANG, b'H', "gpu_timeout 500ms;");
}

/// The kernels are kept with each configuration: a reload that compiles a new kernel and
/// then fails (a port it cannot bind) leaves the running configuration's kernel for the
/// workers the master starts afterwards.
#[test]
fn a_failed_reload_leaves_the_running_kernels_for_respawned_workers() {
    if !gpu_required() {
        eprintln!("skipped: no usable GPU");
        return;
    }
    let v = |c: char| {
        COPY.replace(
            "ngx_gpu_out(b, r)[j] = ngx_gpu_in(b, r)[j];",
            &format!("ngx_gpu_out(b, r)[j] = '{c}';"),
        )
    };
    let conf = config(
        "gpu_kernel copy t/copy.cu;\n\
         server { listen 127.0.0.1:{PORT}; location /c { gpu_process kernel copy; } }",
    )
    .replace("worker_processes 2;", "worker_processes 1;");
    let ngx = Nginx::start_with_files(&conf, &[("t/copy.cu", &v('A'))]);
    assert_eq!(post(&ngx.addr(), "/c", b"xyz").body, b"AAA");
    // The new configuration compiles 'B', then cannot bind a port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    ngx.write_conf_file("t/copy.cu", &v('B'));
    ngx.reload_with(&conf.replace(
        "server {",
        &format!("server {{ listen 127.0.0.1:{port}; }} server {{"),
    ));
    assert!(
        ngx.error_log().contains("bind() to 127.0.0.1"),
        "{}",
        ngx.error_log()
    );
    let worker = ngx.worker_pids()[0];
    // SAFETY: kill(2) on a child of our nginx.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ngx.worker_pids().is_empty() || ngx.worker_pids().contains(&worker) {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = post(&ngx.addr(), "/c", b"xyz");
        if r.status == 200 {
            assert_eq!(
                r.body, b"AAA",
                "the respawned worker runs the failed reload's kernel"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.text());
        thread::sleep(Duration::from_millis(100));
    }
}

/// The README's walkthrough, as written there: its first kernel compiles and serves, and
/// the typo its step 3 shows is reported with the file and line it shows.
#[test]
fn the_readme_walkthrough_works_as_written() {
    if !nvrtc() {
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Your own kernel").expect("the section")..];
    let start = section.find("```cuda\n").expect("a cuda block") + "```cuda\n".len();
    let kernel: String = section[start..start + section[start..].find("```").unwrap()]
        .lines()
        .map(|l| l.strip_prefix("   ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(kernel.contains("void invert(ngx_gpu_batch b)"), "{kernel}");
    let conf = config(
        "gpu_kernel invert kernels/invert.cu;\n\
         server { listen 127.0.0.1:{PORT}; location = /invert { gpu_process kernel invert; } }",
    );
    // Outside conf/kernels (the examples): the test's own copy.
    let conf = conf.replace("kernels/invert.cu", "t/invert.cu");
    let out = nginx_t_with(&conf, &[("t/invert.cu", &kernel)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let typo = kernel.replace("ngx_gpu_in(b, r)[j]", "ngx_gpu_in(b, r)[j2]");
    let out = nginx_t_with(&conf, &[("t/invert.cu", &typo)]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("/conf/t/invert.cu(7): error: identifier \"j2\" is undefined"),
        "the README shows line 7: {e}"
    );
    let ngx = Nginx::start_with_files(&conf, &[("t/invert.cu", &kernel)]);
    let data = Rng::fresh().bytes(1000);
    let r = post(&ngx.addr(), "/invert", &data);
    if gpu_required() {
        let want: Vec<u8> = data.iter().map(|b| 255 - b).collect();
        assert!(r.status == 200 && r.body == want, "{}", r.status);
    } else {
        assert_eq!(r.status, 503);
    }
}
