//! Batching through a real nginx: answers go to the right request under concurrency with
//! mixed sizes, `gpu_queue_size` gives 503, `gpu_timeout` gives 504, and requests that go
//! away inside a batch harm no one else. `gpu_batch_delay` holds batches open so that
//! these situations are set up deterministically, on the CPU path here and on the GPU
//! path on the GPU machine.

mod harness;

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use harness::*;

fn one_worker(http: &str) -> String {
    config(http).replace("worker_processes 2;", "worker_processes 1;")
}

fn batch_of(r: &Response) -> usize {
    r.header("X-Batch")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no X-Batch in {:?}", r.headers))
}

#[test]
fn mixed_sizes_from_many_clients_each_get_their_own_answer_in_shared_batches() {
    // 64 KiB pieces and 16 KiB body buffers: many bodies come from temp files and are cut
    // into pieces that share batches with other requests' bodies.
    let ngx = Nginx::start(&config(
        "client_max_body_size 8m; client_body_buffer_size 16k; gpu_batch_bytes 64k; gpu_poll 100us;\n\
         server { listen 127.0.0.1:{PORT};\n\
           add_header X-Batch $gpu_batch_size; add_header X-Dev $gpu_device;\n\
           location /blake3 { gpu_process blake3; gpu_batch_size 32; gpu_batch_delay 3ms; }\n\
           location /echo { gpu_process echo; gpu_batch_size 32; gpu_batch_delay 3ms; } }",
    ));
    let addr = ngx.addr();
    let seed = Rng::fresh().next();
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut rng = Rng(seed ^ (i * 0x9E37_79B9));
                let n = match i % 5 {
                    0 => (rng.next() % 64) as usize,
                    1 => 65536 + (rng.next() % 3) as usize - 1,
                    _ => (rng.next() % 300_000) as usize,
                };
                let data = rng.bytes(n);
                let (path, want) = if i % 2 == 0 {
                    ("/blake3", b3(&data).into_bytes())
                } else {
                    ("/echo", data.clone())
                };
                let r = post(&addr, path, &data);
                assert_eq!(r.status, 200, "client {i}: {}", r.text());
                assert!(
                    r.body == want,
                    "client {i} ({path}, {n} bytes) got a wrong answer"
                );
                assert!(
                    is_expected_device(r.header("X-Dev")),
                    "ran on {:?}, expected {}",
                    r.header("X-Dev"),
                    expected_device()
                );
                batch_of(&r)
            })
        })
        .collect();
    let batches: Vec<usize> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        batches.iter().any(|&b| b > 1),
        "no batch over one request: {batches:?}"
    );
    assert!(
        batches.iter().all(|&b| (1..=32).contains(&b)),
        "{batches:?}"
    );
    ngx.assert_healthy();
}

#[test]
fn a_batch_waits_for_more_requests_up_to_gpu_batch_delay() {
    let ngx = Nginx::start(&one_worker(
        "server { listen 127.0.0.1:{PORT}; add_header X-Batch $gpu_batch_size;\n\
           add_header X-Queue $gpu_queue_time;\n\
           location /h { gpu_process blake3; gpu_batch_size 8; gpu_batch_delay 400ms; } }",
    ));
    let addr = ngx.addr();
    let start = Instant::now();
    let clients: Vec<_> = (0..3u8)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || post(&addr, "/h", &[i; 100]))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap();
        assert_eq!(r.text(), b3(&[i as u8; 100]));
        assert_eq!(batch_of(&r), 3, "all three went in one batch");
        let q: f64 = r.header("X-Queue").unwrap().parse().unwrap();
        assert!(q >= 200.0, "queue time {q} ms: the batch did not wait");
    }
    assert!(start.elapsed() >= Duration::from_millis(380));
}

#[test]
fn over_gpu_queue_size_requests_get_503_while_queued_ones_are_answered() {
    let ngx = Nginx::start(&one_worker(
        "gpu_queue_size 2;\n\
         server { listen 127.0.0.1:{PORT}; add_header X-Batch $gpu_batch_size;\n\
           location /h { gpu_process echo; gpu_batch_size 100; gpu_batch_delay 1500ms; } }",
    ));
    let addr = ngx.addr();
    let queued: Vec<_> = (0..2u8)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || (i, post(&addr, "/h", &[i; 1000])))
        })
        .collect();
    thread::sleep(Duration::from_millis(400));
    let t = Instant::now();
    let r = post(&addr, "/h", b"one too many");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "the 503 did not wait for the batch"
    );
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert!(
        r.text().contains("\"error\": \"GPU queue is full"),
        "{}",
        r.text()
    );
    for q in queued {
        let (i, r) = q.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == [i; 1000], "request {i}");
        assert_eq!(batch_of(&r), 2);
    }
    // Room again.
    assert_eq!(post(&addr, "/h", b"again").body, b"again");
    assert!(ngx.error_log().contains("GPU queue is full"));
    ngx.assert_healthy();
}

#[test]
fn a_request_over_gpu_timeout_gets_504_and_its_batch_mates_their_answers() {
    let ngx = Nginx::start(&one_worker(
        "server { listen 127.0.0.1:{PORT}; add_header X-Batch $gpu_batch_size;\n\
           location /impatient { gpu_process blake3; gpu_timeout 300ms; gpu_batch_size 10; gpu_batch_delay 1200ms; }\n\
           location /patient { gpu_process blake3; gpu_batch_size 10; gpu_batch_delay 1200ms; }\n\
           location /fast { gpu_process echo; } }",
    ));
    let addr = ngx.addr();
    let patient = {
        let addr = addr.clone();
        thread::spawn(move || post(&addr, "/patient", b"patient"))
    };
    thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let r = post(&addr, "/impatient", b"impatient");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t.elapsed() < Duration::from_millis(1000));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    // Another op is not held up by the waiting batch.
    assert_eq!(post(&addr, "/fast", b"fast").body, b"fast");
    let r = patient.join().unwrap();
    assert_eq!((r.status, r.text()), (200, b3(b"patient")));
    assert_eq!(batch_of(&r), 1, "the timed-out request left the batch");
    ngx.assert_healthy();
}

#[test]
fn clients_leaving_a_waiting_batch_harm_no_one_else() {
    let ngx = Nginx::start(&one_worker(
        "server { listen 127.0.0.1:{PORT}; add_header X-Batch $gpu_batch_size;\n\
           location /h { gpu_process echo; gpu_batch_size 64; gpu_batch_delay 600ms; } }",
    ));
    let addr = ngx.addr();
    let mut rng = Rng::fresh();
    let mut stay = Vec::new();
    for i in 0..12 {
        let data = rng.bytes(1000 + i * 3001);
        if i % 2 == 0 {
            let addr = addr.clone();
            stay.push(thread::spawn(move || (post(&addr, "/h", &data), data)));
        } else {
            // Sends the whole request, then aborts (a reset) while its job waits in the
            // batch.
            let mut s = TcpStream::connect(&addr).unwrap();
            let head = format!(
                "POST /h HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                data.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&data).unwrap();
            thread::sleep(Duration::from_millis(20));
            reset(s);
        }
    }
    for t in stay {
        let (r, data) = t.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == data, "a staying client got a wrong answer");
        assert_eq!(
            batch_of(&r),
            6,
            "only the staying clients were in the batch"
        );
    }
    assert!(ngx
        .error_log()
        .contains("client closed the connection while waiting"));
    ngx.assert_healthy();
}

/// A client that sends its whole request and then closes its sending side (as `nc -N`
/// does) still gets its answer; with `gpu_client_eof cancel` its end of input counts as
/// leaving (as does a plain close, which looks the same until the answer is written).
#[test]
fn half_closed_clients_get_their_answer_unless_told_otherwise() {
    let ngx = Nginx::start(&one_worker(
        "server { listen 127.0.0.1:{PORT}; add_header X-Batch $gpu_batch_size;\n\
           location /answer { gpu_process blake3; gpu_batch_size 64; gpu_batch_delay 300ms; }\n\
           location /cancel { gpu_process blake3; gpu_batch_size 64; gpu_batch_delay 300ms;\n\
                              gpu_client_eof cancel; } }",
    ));
    let addr = ngx.addr();
    let mut rng = Rng::fresh();
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let addr = addr.clone();
            let data = rng.bytes(1 + i * 977);
            thread::spawn(move || (post_then_half_close(&addr, "/answer", &data), data))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (r, data) = c.join().unwrap();
        let r = r.unwrap_or_else(|| panic!("half-closed client {i} got no answer"));
        assert_eq!((r.status, r.text()), (200, b3(&data)), "client {i}");
    }
    // With cancel, the half-closed clients are taken as gone: the one that stays is
    // alone in its batch.
    let stay = {
        let addr = addr.clone();
        thread::spawn(move || post(&addr, "/cancel", b"stays"))
    };
    let leavers: Vec<_> = (0..5)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || post_then_half_close(&addr, "/cancel", &[i as u8; 10]))
        })
        .collect();
    for l in leavers {
        assert!(
            l.join().unwrap().is_none(),
            "a cancelled client got an answer"
        );
    }
    let r = stay.join().unwrap();
    assert_eq!((r.status, r.text()), (200, b3(b"stays")));
    assert_eq!(
        batch_of(&r),
        1,
        "the half-closed clients were dropped from the batch"
    );
    ngx.assert_healthy();
}
