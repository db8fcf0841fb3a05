//! nginx's request body stays nginx's: whatever else reads it in the same request
//! (`$request_body`, `mirror` subrequests, proxying the body, HTTP/2, single-buffer and
//! file-only bodies) sees exactly what the client sent, and the module's answer is right.

mod harness;

use std::time::{Duration, Instant};

use harness::*;

/// nginx with `http` at http level and `locations` in its one server; `UPSTREAM` in either
/// stands for the test upstream's port.
fn server(locations: &str, http: &str, up: Option<&Upstream>) -> Nginx {
    let text = config(&format!(
        "client_max_body_size 64m; {http}\nserver {{ listen 127.0.0.1:{{PORT}}; {locations} }}"
    ));
    let port = up.map_or(0, |u| u.port);
    Nginx::start(&text.replace("UPSTREAM", &port.to_string()))
}

/// With `$request_body` in the access log and a body that arrives in several reads into
/// one body buffer, the log shows the whole body and the worker survives (a body buffer
/// handed to the GPU thread used to be freed while later buffers of nginx's chain still
/// pointed into it: signal 11).
#[test]
fn request_body_in_the_access_log_after_a_body_read_in_several_parts() {
    let ngx = server(
        "location /echo { gpu_process echo; access_log logs/body.log body; }\n\
         location /blake3 { gpu_process blake3; access_log logs/body.log body; }",
        "client_body_buffer_size 1m; log_format body escape=none '$request_body';",
        None,
    );
    let mut rng = Rng::fresh();
    let mut sent = Vec::new();
    for (i, n) in [500_000usize, 300_001, 70_000, 999_999]
        .into_iter()
        .enumerate()
    {
        let data = letters(&mut rng, n);
        let path = if i % 2 == 0 { "/echo" } else { "/blake3" };
        let r = post_slowly(&ngx.addr(), path, &data, 7, Duration::from_millis(15));
        assert_eq!(r.status, 200, "{path} {n}: {}", r.text());
        if path == "/echo" {
            assert!(r.body == data, "echo of {n} bytes came back changed");
        } else {
            assert_eq!(r.text(), b3(&data), "blake3 of {n} bytes");
        }
        sent.push(data);
    }
    let lines = ngx.wait_log_lines("body.log", sent.len());
    assert_eq!(lines.len(), sent.len(), "one log line per request");
    for (i, (line, data)) in lines.iter().zip(&sent).enumerate() {
        assert!(
            line.as_bytes() == &data[..],
            "request {i}: $request_body logged {} bytes of {}, first difference at {:?}",
            line.len(),
            data.len(),
            line.bytes().zip(data.iter()).position(|(a, b)| a != *b)
        );
    }
    ngx.assert_healthy();
}

/// The main request proxies its body upstream while a `mirror` subrequest hands the same
/// body to the GPU: the upstream gets exactly the client's bytes, the client the
/// upstream's answer, and the mirror its own right answer.
#[test]
fn a_mirror_to_a_gpu_location_while_the_main_request_proxies_the_body() {
    let up = Upstream::start();
    let ngx = server(
        "location /main { mirror /gpu; proxy_pass http://127.0.0.1:UPSTREAM; }\n\
         location = /gpu { internal; gpu_process blake3; access_log logs/mirror.log m; }",
        "client_body_buffer_size 1m; log_subrequest on;\n\
         log_format m '$uri $status $gpu_device $request_length';",
        Some(&up),
    );
    let mut rng = Rng::fresh();
    let mut sent = Vec::new();
    for round in 0..3 {
        for n in [0usize, 1, 1000, 65537, 400_000, 900_000, 3 * MIB + 7] {
            let data = rng.bytes(n);
            let r = if round == 1 {
                post_slowly(&ngx.addr(), "/main", &data, 5, Duration::from_millis(5))
            } else {
                post(&ngx.addr(), "/main", &data)
            };
            assert_eq!(r.status, 200, "main request, {n} bytes: {}", r.text());
            assert_eq!(
                r.text(),
                b3(&data),
                "the upstream saw other bytes ({n} sent)"
            );
            sent.push(data);
        }
    }
    let got = up.wait_for(sent.len());
    assert_eq!(got.len(), sent.len());
    for (i, ((_, body), data)) in got.iter().zip(&sent).enumerate() {
        assert!(
            body == data,
            "upstream request {i}: {} bytes, sent {}",
            body.len(),
            data.len()
        );
    }
    let mirrored = ngx.wait_log_lines("mirror.log", sent.len());
    assert_eq!(mirrored.len(), sent.len(), "{mirrored:?}");
    for line in &mirrored {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(&f[..2], &["/gpu", "200"], "{line}");
        assert!(is_expected_device(Some(f[2])), "{line}");
    }
    assert!(!ngx.error_log().contains("writev() failed"));
    ngx.assert_healthy();
}

/// A `gpu_process` location mirrors its body to a proxy: the proxy gets the whole body at
/// once (no "zero size buf", no mirror waiting out a timeout) and the client its answer.
#[test]
fn a_gpu_location_that_mirrors_its_body_to_a_proxy() {
    let up = Upstream::start();
    let ngx = server(
        "location /hash { mirror /copy; gpu_process blake3; }\n\
         location /echo { mirror /copy; gpu_process echo; }\n\
         location = /copy { internal; proxy_pass http://127.0.0.1:UPSTREAM; }",
        "client_body_buffer_size 1m;",
        Some(&up),
    );
    let mut rng = Rng::fresh();
    let mut sent = Vec::new();
    for n in [0usize, 5, 70_000, 600_000, 2 * MIB + 1] {
        for path in ["/hash", "/echo"] {
            let data = rng.bytes(n);
            let t = Instant::now();
            let r = post_slowly(&ngx.addr(), path, &data, 3, Duration::from_millis(5));
            assert_eq!(r.status, 200, "{path} {n}");
            if path == "/hash" {
                assert_eq!(r.text(), b3(&data));
            } else {
                assert!(r.body == data, "echo of {n} bytes");
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{path} {n}: {:?}, the mirror held the connection",
                t.elapsed()
            );
            sent.push(data);
        }
    }
    let got = up.wait_for(sent.len());
    assert_eq!(got.len(), sent.len());
    for (i, ((_, body), data)) in got.iter().zip(&sent).enumerate() {
        assert!(
            body == data,
            "mirror {i}: {} bytes reached the proxy, sent {}",
            body.len(),
            data.len()
        );
    }
    assert!(
        !ngx.error_log().contains("zero size buf"),
        "{}",
        ngx.error_log()
    );
    ngx.assert_healthy();
}

/// Bodies kept in one buffer, and bodies nginx writes to a file only (kept or removed after
/// the request), come out right, and `$request_body` still shows in-memory ones.
#[test]
fn single_buffer_and_file_only_bodies() {
    let mut rng = Rng::fresh();
    for (directive, logged) in [
        (
            "client_body_in_single_buffer on; client_body_buffer_size 2m;",
            true,
        ),
        ("client_body_in_file_only on;", false),
        ("client_body_in_file_only clean;", false),
    ] {
        let ngx = server(
            "location /echo { gpu_process echo; access_log logs/body.log body; }\n\
             location /blake3 { gpu_process blake3; access_log logs/body.log body; }",
            &format!("{directive} log_format body escape=none '$request_body';"),
            None,
        );
        let mut sent = Vec::new();
        for n in [0usize, 1, 4097, 100_000, MIB + 1] {
            let data = letters(&mut rng, n);
            let r = post_slowly(&ngx.addr(), "/echo", &data, 4, Duration::from_millis(3));
            assert!(r.status == 200 && r.body == data, "{directive} echo {n}");
            let r = request(
                &ngx.addr(),
                "POST",
                "/blake3",
                Send::Chunked(&data, &[4096, 1, 65536]),
            );
            assert_eq!(
                (r.status, r.text()),
                (200, b3(&data)),
                "{directive} blake3 {n}"
            );
            sent.push(data.clone());
            sent.push(data);
        }
        if logged {
            let lines = ngx.wait_log_lines("body.log", sent.len());
            for (line, data) in lines.iter().zip(&sent) {
                assert!(
                    line.as_bytes() == &data[..],
                    "{directive}: $request_body changed"
                );
            }
        }
        ngx.assert_healthy();
    }
}

/// HTTP/2 (h2c with prior knowledge) bodies of awkward sizes, straight and mirrored.
#[test]
fn http2_bodies() {
    let up = Upstream::start();
    let ngx = server(
        "http2 on;\n\
         location /echo { gpu_process echo; }\n\
         location /blake3 { gpu_process blake3; }\n\
         location /mirrored { mirror /copy; gpu_process blake3; }\n\
         location = /copy { internal; proxy_pass http://127.0.0.1:UPSTREAM; }",
        "client_body_buffer_size 256k;",
        Some(&up),
    );
    let mut rng = Rng::fresh();
    let mut mirrored = Vec::new();
    for n in [
        0usize,
        1,
        16383,
        16384,
        16385,
        65535,
        65536,
        65537,
        300_001,
        3 * MIB + 5,
    ] {
        let data = rng.bytes(n);
        let (status, body) = post_h2(&ngx.addr(), "/echo", &data);
        assert!(status == 200 && body == data, "h2 echo {n}: {status}");
        let (status, body) = post_h2(&ngx.addr(), "/blake3", &data);
        assert_eq!(
            (status, String::from_utf8_lossy(&body).into_owned()),
            (200, b3(&data))
        );
        let (status, body) = post_h2(&ngx.addr(), "/mirrored", &data);
        assert_eq!(
            (status, String::from_utf8_lossy(&body).into_owned()),
            (200, b3(&data))
        );
        mirrored.push(data);
    }
    let got = up.wait_for(mirrored.len());
    assert_eq!(got.len(), mirrored.len());
    for ((_, body), data) in got.iter().zip(&mirrored) {
        assert!(
            body == data,
            "h2 mirror: {} bytes reached the proxy, sent {}",
            body.len(),
            data.len()
        );
    }
    ngx.assert_healthy();
}
