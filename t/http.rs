//! End-to-end: a real nginx with the module, real HTTP, answers checked against
//! independent references (the `blake3` crate, the input itself).

mod harness;

use harness::*;

fn example() -> Nginx {
    Nginx::example("nginx.conf")
}

#[test]
fn both_ops_answer_correctly_for_every_awkward_size() {
    let ngx = example();
    let addr = ngx.addr();
    let mut rng = Rng::fresh();
    let mut sizes = vec![
        0,
        1,
        2,
        63,
        64,
        65,
        1023,
        1024,
        1025,
        2048,
        3073,
        8191,
        16385,
        MIB - 1,
        MIB,
        MIB + 1,
    ];
    sizes.extend((0..6).map(|_| (rng.next() % (3 * MIB as u64)) as usize));
    for n in sizes {
        let data = rng.bytes(n);
        let r = post(&addr, "/blake3", &data);
        assert_eq!(r.status, 200, "blake3 {n}: {}", r.text());
        assert_eq!(r.text(), b3(&data), "blake3 of {n} bytes");
        assert_eq!(r.header("Content-Type"), Some("text/plain"));

        let r = post(&addr, "/echo", &data);
        assert_eq!(r.status, 200, "echo {n}");
        assert_eq!(r.body.len(), n);
        assert!(r.body == data, "echo of {n} bytes came back changed");
        assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
    }
    ngx.assert_healthy();
}

#[test]
fn a_64_mib_body_spilled_to_a_temp_file() {
    let ngx = example();
    let data = Rng::fresh().bytes(64 * MIB);
    let r = post(&ngx.addr(), "/blake3", &data);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), b3(&data));
    let r = post(&ngx.addr(), "/echo", &data);
    assert!(r.status == 200 && r.body == data, "echo of 64 MiB");
    ngx.assert_healthy();
}

#[test]
fn chunked_bodies_in_odd_pieces() {
    let ngx = example();
    let mut rng = Rng::fresh();
    for (n, pieces) in [
        (0usize, &[1usize][..]),
        (1, &[1]),
        (5000, &[1, 7, 1000]),
        (MIB + 3, &[65536, 3, 100_001]),
    ] {
        let data = rng.bytes(n);
        let r = request(&ngx.addr(), "POST", "/blake3", Send::Chunked(&data, pieces));
        assert_eq!(
            (r.status, r.text()),
            (200, b3(&data)),
            "chunked blake3 of {n}"
        );
        let r = request(&ngx.addr(), "PUT", "/echo", Send::Chunked(&data, pieces));
        assert!(r.status == 200 && r.body == data, "chunked echo of {n}");
    }
}

#[test]
fn empty_bodies() {
    let ngx = example();
    let r = request(&ngx.addr(), "POST", "/blake3", Send::None);
    assert_eq!((r.status, r.text()), (200, b3(b"")));
    let r = post(&ngx.addr(), "/blake3", b"");
    assert_eq!((r.status, r.text()), (200, b3(b"")));
    let r = post(&ngx.addr(), "/echo", b"");
    assert_eq!((r.status, r.body.len()), (200, 0));
}

#[test]
fn methods_other_than_post_and_put_get_405_with_allow() {
    let ngx = example();
    for m in ["GET", "HEAD", "DELETE", "OPTIONS", "PATCH"] {
        let r = request(&ngx.addr(), m, "/echo", Send::None);
        assert_eq!(r.status, 405, "{m}");
        assert_eq!(r.header("Allow"), Some("POST, PUT"), "{m}");
        assert_eq!(r.header("Content-Type"), Some("application/json"), "{m}");
        if m != "HEAD" {
            assert!(r.text().starts_with("{\"error\": \""), "{m}: {}", r.text());
        }
    }
    // The worker keeps serving.
    assert_eq!(post(&ngx.addr(), "/blake3", b"abc").text(), b3(b"abc"));
}

#[test]
fn bodies_over_client_max_body_size_get_nginx_413() {
    let ngx = Nginx::start(&config(
        "client_max_body_size 1k; server { listen 127.0.0.1:{PORT}; location /h { gpu_process blake3; } }",
    ));
    let data = vec![7u8; 1025];
    assert_eq!(post(&ngx.addr(), "/h", &data).status, 413);
    let r = request(&ngx.addr(), "POST", "/h", Send::Chunked(&data, &[100]));
    assert_eq!(r.status, 413);
    // Exactly at the limit is fine.
    assert_eq!(
        post(&ngx.addr(), "/h", &data[..1024]).text(),
        b3(&data[..1024])
    );
}

#[test]
fn hundreds_of_parallel_clients_each_get_their_own_answer() {
    let ngx = example();
    let addr = ngx.addr();
    let threads: Vec<_> = (0..300)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x5eed + i as u64 * 7919);
                let n = (rng.next() % 70_000) as usize;
                let data = rng.bytes(n);
                let (path, want) = if i % 2 == 0 {
                    ("/blake3", b3(&data).into_bytes())
                } else {
                    ("/echo", data.clone())
                };
                let r = post(&addr, path, &data);
                assert_eq!(r.status, 200, "client {i}");
                assert!(
                    r.body == want,
                    "client {i} ({path}, {n} bytes) got someone else's answer"
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    ngx.assert_healthy();
}

#[test]
fn clients_that_abort_leave_the_worker_serving() {
    use std::io::Write;
    use std::net::TcpStream;
    let ngx = example();
    let data = Rng::fresh().bytes(4 * MIB);
    for i in 0..20 {
        let mut s = TcpStream::connect(ngx.addr()).unwrap();
        let head = format!(
            "POST /blake3 HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            data.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // Half the clients leave mid-body, the others right after sending it all
        // (their job is queued or running when they go).
        let sent = if i % 2 == 0 {
            data.len() / 3
        } else {
            data.len()
        };
        let _ = s.write_all(&data[..sent]);
        drop(s);
    }
    let r = post(&ngx.addr(), "/blake3", &data);
    assert_eq!(r.text(), b3(&data));
    std::thread::sleep(std::time::Duration::from_millis(300));
    ngx.assert_healthy();
}

#[test]
fn without_a_gpu_fallback_cpu_answers_and_fallback_off_gives_503() {
    // An empty CUDA_VISIBLE_DEVICES hides every device, so this runs the no-GPU path
    // on the GPU machine too.
    let conf = config(
        "server { listen 127.0.0.1:{PORT};\n\
           add_header X-Gpu-Device $gpu_device;\n\
           location /cpu { gpu_process blake3; gpu_fallback cpu; }\n\
           location /off { gpu_process echo; gpu_fallback off; } }",
    );
    let ngx = Nginx::start_with_env(&conf, &[("CUDA_VISIBLE_DEVICES", "")]);
    let log = ngx.wait_log("gpu: no usable GPU in this worker");
    assert!(log.contains("gpu: no usable GPU in this worker: "), "{log}");

    let r = post(&ngx.addr(), "/cpu", b"hello");
    assert_eq!((r.status, r.text()), (200, b3(b"hello")));
    assert_eq!(r.header("X-Gpu-Device"), Some("cpu"));

    let r = post(&ngx.addr(), "/off", b"hello");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert!(
        r.text().contains("\"error\": \"no GPU available\""),
        "{}",
        r.text()
    );
    ngx.assert_healthy();
}

#[test]
fn the_gpu_path_serves_when_a_gpu_is_present() {
    let conf = config(
        "client_max_body_size 16m;\n\
         server { listen 127.0.0.1:{PORT};\n\
           add_header X-Gpu-Device $gpu_device;\n\
           location /b { gpu_process blake3; gpu_fallback off; }\n\
           location /e { gpu_process echo; gpu_fallback off; } }",
    );
    let ngx = Nginx::start(&conf);
    let log = ngx.error_log();
    // CUDA stays out of the master: it forks the workers.
    let maps = ngx.master_maps();
    assert!(
        !maps.contains("libcuda") && !maps.contains("libnvrtc"),
        "CUDA library in the master:\n{maps}"
    );
    let data = Rng::fresh().bytes(3 * MIB + 17);
    let b = post(&ngx.addr(), "/b", &data);
    let e = post(&ngx.addr(), "/e", &data);
    if !gpu_required() {
        // No GPU here: the worker said why, and `off` refuses rather than falling back.
        assert!(log.contains("gpu: no usable GPU in this worker: "), "{log}");
        assert_eq!((b.status, e.status), (503, 503));
        return;
    }
    assert!(log.contains("gpu: using gpu0 \""), "device line: {log}");
    assert_eq!((b.status, b.text()), (200, b3(&data)));
    assert!(is_gpu(b.header("X-Gpu-Device").unwrap_or("")));
    assert!(e.status == 200 && e.body == data);
    assert!(is_gpu(e.header("X-Gpu-Device").unwrap_or("")));
    ngx.assert_healthy();
}

#[test]
fn over_gpu_timeout_the_request_gets_504_and_the_worker_goes_on() {
    let ngx = Nginx::start(&config(
        "client_max_body_size 512m; client_body_buffer_size 1m;\n\
         server { listen 127.0.0.1:{PORT};\n\
           location /slow { gpu_process blake3; gpu_timeout 1ms; }\n\
           location /h { gpu_process blake3; } }",
    ));
    // Hashing 128 MiB and reading it from the temp file takes far longer than 1 ms on
    // either path.
    let data = Rng::fresh().bytes(128 * MIB);
    let r = post(&ngx.addr(), "/slow", &data);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    // The late result is dropped safely and the worker keeps serving.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(post(&ngx.addr(), "/h", b"after").text(), b3(b"after"));
    assert!(ngx
        .error_log()
        .contains("gpu: timed out waiting for the GPU thread"));
    ngx.assert_healthy();
}

#[test]
fn variables_describe_where_the_job_ran() {
    let ngx = Nginx::start(&config(
        "server { listen 127.0.0.1:{PORT};\n\
           add_header X-Dev $gpu_device; add_header X-Q $gpu_queue_time; add_header X-E $gpu_exec_time;\n\
           add_header X-B $gpu_batch_size;\n\
           location /h { gpu_process blake3; } }",
    ));
    let r = post(&ngx.addr(), "/h", b"x");
    assert!(
        is_expected_device(r.header("X-Dev")),
        "{:?}",
        r.header("X-Dev")
    );
    for h in ["X-Q", "X-E"] {
        let v = r.header(h).unwrap_or_else(|| panic!("{h} missing"));
        let (ms, us) = v.split_once('.').unwrap_or_else(|| panic!("{h}={v}"));
        assert!(
            ms.parse::<u64>().is_ok() && us.len() == 3 && us.parse::<u64>().is_ok(),
            "{h}={v}"
        );
    }
    assert_eq!(r.header("X-B"), Some("1"));
}

/// Where the location has an `error_page` for the module's own 405, 503 or 504, nginx
/// answers with that page, as for its own errors; without one the answer is the JSON error.
#[test]
fn error_page_applies_to_the_modules_own_errors() {
    let ngx = Nginx::start(
        &config(
            "gpu_queue_size 1;\n\
             server { listen 127.0.0.1:{PORT};\n\
               error_page 405 /custom-405; error_page 503 /custom-503; error_page 504 /custom-504;\n\
               location = /custom-405 { internal; return 405 \"custom 405\\n\"; }\n\
               location = /custom-503 { internal; return 503 \"custom 503\\n\"; }\n\
               location = /custom-504 { internal; return 504 \"custom 504\\n\"; }\n\
               location /h { gpu_process echo; gpu_batch_size 10; gpu_batch_delay 1500ms; }\n\
               location /slow { gpu_process echo; gpu_timeout 100ms; gpu_batch_size 10;\n\
                                gpu_batch_delay 1000ms; }\n\
               location /plain { gpu_process echo; error_page 404 /nowhere; } }",
        )
        .replace("worker_processes 2;", "worker_processes 1;"),
    );
    let addr = ngx.addr();
    let r = request(&addr, "GET", "/h", Send::None);
    assert_eq!((r.status, r.text().as_str()), (405, "custom 405\n"));
    let held = {
        let addr = addr.clone();
        std::thread::spawn(move || post(&addr, "/h", b"held"))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = post(&addr, "/h", b"one too many");
    assert_eq!((r.status, r.text().as_str()), (503, "custom 503\n"));
    assert_eq!(held.join().unwrap().body, b"held");
    let r = post(&addr, "/slow", b"late");
    assert_eq!((r.status, r.text().as_str()), (504, "custom 504\n"));
    // A location whose error pages do not cover the status: the JSON error.
    let r = request(&addr, "GET", "/plain", Send::None);
    assert_eq!(r.status, 405);
    assert!(r.text().starts_with("{\"error\": "), "{}", r.text());
    ngx.assert_healthy();
}

/// The bound of the queue is counted, not allocated: the largest `gpu_queue_size` costs
/// a worker nothing up front (a channel of that capacity took 1.6 GiB before).
#[test]
fn the_largest_queue_size_allocates_nothing_up_front() {
    let ngx = Nginx::start(&config(
        "gpu_queue_size 16777216;\n\
         server { listen 127.0.0.1:{PORT}; location /h { gpu_process blake3; } }",
    ));
    assert_eq!(post(&ngx.addr(), "/h", b"abc").text(), b3(b"abc"));
    for pid in ngx.worker_pids() {
        let rss = rss_kib(pid);
        assert!(rss < 200 * 1024, "worker {pid} holds {rss} KiB");
    }
}
