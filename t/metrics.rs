//! Metrics, health and status through a real nginx (CPU path here): `/metrics` counters move
//! by exactly the requests sent, by outcome, summed over several workers, with consistent
//! histograms; readiness goes false while a worker cannot serve and true again; the status
//! page, rendered by headless Chromium, draws the load just sent.

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use harness::*;

/// `GET path` with extra header lines; (status, headers, body).
fn get(addr: &str, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: t\r\n{headers}\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn metrics(addr: &str) -> String {
    let (status, head, body) = get(addr, "/metrics", "");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body
}

/// The value of series `name` whose labels include every one of `labels`, summed over the
/// devices (`device` label) unless `labels` names one; None if absent. Panics if series
/// that differ in more than their device match (the text would be ambiguous).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found: Option<(String, f64)> = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, v) = line.rsplit_once(' ').unwrap();
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            let rest = without_device(l);
            let v = v.parse::<f64>().unwrap();
            found = Some(match found {
                None => (rest, v),
                Some((other, sum)) => {
                    assert_eq!(other, rest, "{name} {labels:?} matches twice");
                    (rest, sum + v)
                }
            });
        }
    }
    found.map(|(_, v)| v)
}

/// A series' labels without its `device` label.
fn without_device(labels: &str) -> String {
    labels
        .split(',')
        .filter(|kv| !kv.starts_with("device="))
        .collect::<Vec<_>>()
        .join(",")
}

fn v(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    value(text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}")) as u64
}

/// Checks a histogram of one location: per device, buckets cumulative and +Inf equal to
/// `_count`; summed over the devices, `_count` as expected.
fn check_histogram(text: &str, name: &str, location: &str, count: u64) {
    let mut last = std::collections::BTreeMap::<String, u64>::new();
    let mut buckets = 0;
    for line in text.lines() {
        if line.starts_with(&format!("{name}_bucket{{"))
            && line.contains(&format!("location=\"{location}\""))
        {
            let device = line
                .split("device=\"")
                .nth(1)
                .and_then(|d| d.split('"').next())
                .unwrap_or_else(|| panic!("no device label: {line}"))
                .to_string();
            let n: u64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
            let prev = last.entry(device.clone()).or_default();
            assert!(n >= *prev, "{name} buckets not cumulative at {line}");
            *prev = n;
            buckets += 1;
        }
    }
    assert!(buckets > 2, "{name} of {location} has {buckets} buckets");
    for (device, inf) in &last {
        let l = [("location", location), ("device", device.as_str())];
        assert_eq!(
            v(
                text,
                &format!("{name}_bucket"),
                &[("location", location), ("device", device), ("le", "+Inf")]
            ),
            *inf
        );
        assert_eq!(v(text, &format!("{name}_count"), &l), *inf, "{device}");
    }
    assert_eq!(
        v(text, &format!("{name}_count"), &[("location", location)]),
        count,
        "{name}_count of {location}"
    );
    assert_eq!(last.values().sum::<u64>(), count);
}

fn status_json(addr: &str) -> serde_json::Value {
    let (status, _, body) = get(addr, "/status", "Accept: application/json\r\n");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn ready(addr: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = get(addr, "/health/ready", "");
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

const ENDPOINTS: &str = "location = /metrics { gpu_metrics; }\n\
    location = /health/live { gpu_health live; }\n\
    location = /health/ready { gpu_health ready; }\n\
    location = /status { gpu_status; }\n";

/// Posts `bodies` to `path` from one thread each, at once; the statuses.
fn post_all(addr: &str, path: &str, bodies: Vec<Vec<u8>>) -> Vec<u16> {
    let threads: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (addr, path) = (addr.to_string(), path.to_string());
            thread::spawn(move || post(&addr, &path, &b).status)
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn counters_move_by_exactly_the_requests_sent_by_outcome_summed_over_workers() {
    // reuseport: the kernel spreads the connections over both workers.
    let ngx = Nginx::start(&config(&format!(
        "client_max_body_size 64k;\n\
         server {{ listen 127.0.0.1:{{PORT}} reuseport;\n\
           location /echo {{ gpu_process echo; }}\n\
           location /full {{ gpu_process echo; gpu_queue_size 1; gpu_batch_size 8;\n\
                             gpu_batch_delay 700ms; gpu_timeout 5s; }}\n\
           location /slow {{ gpu_process blake3; gpu_timeout 150ms; gpu_batch_size 8;\n\
                             gpu_batch_delay 2s; }}\n\
           {ENDPOINTS} }}"
    )));
    let addr = ngx.addr();
    let before = metrics(&addr);
    assert_eq!(
        v(
            &before,
            "nv_inference_request_success",
            &[("location", "/echo")]
        ),
        0
    );

    // Successes from many connections, of fresh random sizes (0, 1, odd, 64 KiB).
    let mut rng = Rng::fresh();
    let sizes: Vec<usize> = (0..120)
        .map(|i| match i % 4 {
            0 => 0,
            1 => 1,
            2 => 65536,
            _ => 1 + 2 * (rng.next() % 3000) as usize,
        })
        .collect();
    let bytes: u64 = sizes.iter().map(|&n| n as u64).sum();
    let bodies: Vec<Vec<u8>> = sizes.iter().map(|&n| rng.bytes(n)).collect();
    let statuses = post_all(&addr, "/echo", bodies);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    // 4xx: a method not allowed (the handler's), and a body over client_max_body_size
    // (nginx's own, before the handler: counted at the log phase).
    assert_eq!(request(&addr, "GET", "/echo", Send::None).status, 405);
    assert_eq!(post(&addr, "/echo", &vec![7u8; 65537]).status, 413);
    // 503 queue full: each worker holds one request of /full at most (held 700 ms for a
    // fuller batch); the others of 8 at once are refused.
    let full = post_all(&addr, "/full", vec![b"x".to_vec(); 8]);
    let full_ok = full.iter().filter(|&&s| s == 200).count() as u64;
    let full_503 = full.iter().filter(|&&s| s == 503).count() as u64;
    assert_eq!(full_ok + full_503, 8, "{full:?}");
    assert!((1..=2).contains(&full_ok), "{full:?}");
    // 504: a batch held open longer than the location's gpu_timeout.
    let slow = post_all(&addr, "/slow", vec![b"abc".to_vec(); 3]);
    assert!(slow.iter().all(|&s| s == 504), "{slow:?}");

    let m = metrics(&addr);
    let echo = [("model", "echo"), ("location", "/echo")];
    assert_eq!(v(&m, "nv_inference_request_success", &echo), 120);
    let failure = |loc: &str, reason: &str| {
        v(
            &m,
            "nv_inference_request_failure",
            &[("location", loc), ("reason", reason)],
        )
    };
    assert_eq!(failure("/echo", "bad_request"), 2);
    for r in ["queue_full", "unavailable", "timeout", "internal"] {
        assert_eq!(failure("/echo", r), 0, "{r}");
    }
    assert_eq!(
        v(&m, "nv_inference_request_success", &[("location", "/full")]),
        full_ok
    );
    assert_eq!(failure("/full", "queue_full"), full_503);
    assert_eq!(failure("/slow", "timeout"), 3);
    assert_eq!(
        v(&m, "nv_inference_request_success", &[("location", "/slow")]),
        0
    );
    // Requests run, batches, bytes.
    assert_eq!(v(&m, "nv_inference_count", &echo), 120);
    let batches = v(&m, "nv_inference_exec_count", &echo);
    assert!((1..=120).contains(&batches), "{batches} batches");
    assert_eq!(v(&m, "ngx_gpu_request_bytes_total", &echo), bytes);
    assert_eq!(v(&m, "ngx_gpu_response_bytes_total", &echo), bytes);
    // Histograms: every answered request has a request time, every run one a queue and a
    // compute time; batch sizes add up to the requests run.
    check_histogram(&m, "ngx_gpu_request_duration_seconds", "/echo", 122);
    check_histogram(&m, "ngx_gpu_queue_duration_seconds", "/echo", 120);
    check_histogram(&m, "ngx_gpu_compute_duration_seconds", "/echo", 120);
    check_histogram(&m, "ngx_gpu_batch_size", "/echo", batches);
    assert_eq!(v(&m, "ngx_gpu_batch_size_sum", &echo), 120);
    check_histogram(&m, "ngx_gpu_request_duration_seconds", "/full", 8);
    check_histogram(&m, "ngx_gpu_request_duration_seconds", "/slow", 3);
    // The 504s waited at least their gpu_timeout.
    assert!(
        value(
            &m,
            "ngx_gpu_request_duration_seconds_sum",
            &[("location", "/slow")]
        )
        .unwrap()
            >= 0.45
    );
    assert_eq!(
        v(&m, "nv_inference_request_duration_us", &echo),
        (value(&m, "ngx_gpu_request_duration_seconds_sum", &echo).unwrap() * 1e6).round() as u64
    );
    // Nothing pending now: the 504s' jobs were dropped by their workers.
    assert_eq!(v(&m, "nv_inference_pending_request_count", &echo), 0);
    // Summed over both workers: each served some, and the workers' counts add up.
    let s = status_json(&addr);
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let per: Vec<u64> = workers
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .collect();
    assert!(per.iter().all(|&n| n > 0), "{per:?}");
    assert_eq!(per.iter().sum::<u64>(), 122 + 8 + 3);
    assert_eq!(v(&m, "ngx_gpu_worker_ready", &[("worker", "0")]), 1);
    assert_eq!(v(&m, "ngx_gpu_worker_ready", &[("worker", "1")]), 1);
    // On the GPU machine worker 0 samples NVML: the device's memory is there.
    if gpu_required() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while value(
            &metrics(&addr),
            "nv_gpu_memory_total_bytes",
            &[("device", "gpu0")],
        )
        .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "no NVML samples: {}",
                status_json(&addr)
            );
            thread::sleep(Duration::from_millis(100));
        }
        let m = metrics(&addr);
        let total = value(&m, "nv_gpu_memory_total_bytes", &[("device", "gpu0")]).unwrap();
        let used = value(&m, "nv_gpu_memory_used_bytes", &[("device", "gpu0")]).unwrap();
        assert!(total > 1e9 && used > 0.0 && used <= total, "{m}");
        let util = value(&m, "nv_gpu_utilization", &[("device", "gpu0")]).unwrap();
        assert!((0.0..=1.0).contains(&util));
    }
    // No NVML on this machine: no device series, and the status says why.
    if !Path::new("/dev/nvidiactl").exists() {
        assert!(!m.contains("nv_gpu_"), "{m}");
        assert!(
            s["nvml"].as_str().unwrap().starts_with("unavailable"),
            "{s}"
        );
        assert!(s["devices"].as_array().unwrap().is_empty());
    }
    // The metric requests themselves count nowhere, and the second read equals the first
    // for the counters.
    assert_eq!(
        metrics(&addr)
            .lines()
            .filter(|l| l.starts_with("nv_inference_request_success"))
            .collect::<Vec<_>>(),
        m.lines()
            .filter(|l| l.starts_with("nv_inference_request_success"))
            .collect::<Vec<_>>()
    );
    ngx.assert_healthy();
}

#[test]
fn health_and_status_answer_get_only_and_status_serves_html_to_browsers() {
    let ngx = Nginx::start(&config(&format!(
        "server {{ listen 127.0.0.1:{{PORT}};\n\
           location /echo {{ gpu_process echo; }}\n\
           {ENDPOINTS} }}"
    )));
    let addr = ngx.addr();
    let (status, _, body) = get(&addr, "/health/live", "");
    assert_eq!((status, body.as_str()), (200, "{\"live\":true}\n"));
    // Each worker says what it serves just after its start line.
    let r = wait_ready(&addr, true, 10);
    assert_eq!(r["workers"], 2);
    assert_eq!(post(&addr, "/metrics", b"x").status, 405);
    let (_, head, body) = get(
        &addr,
        "/status",
        "Accept: text/html,application/xhtml+xml\r\n",
    );
    assert!(head.contains("Content-Type: text/html"), "{head}");
    assert!(body.starts_with("<!DOCTYPE html>") && body.contains("<canvas"));
    // Self-contained: no external scripts, styles or images.
    for needle in ["src=\"http", "href=\"http", "<link", "src=\"//"] {
        assert!(!body.contains(needle), "{needle}");
    }
    let (_, head, _) = get(&addr, "/status?html", "");
    assert!(head.contains("text/html"), "{head}");
    let s = status_json(&addr);
    assert_eq!(s["ready"], true);
    for w in s["workers"].as_array().unwrap() {
        assert_eq!(w["gpu_thread"], true, "{w}");
        assert_eq!(w["running"], true, "{w}");
        assert_eq!(w["ops"][0]["location"], "/echo");
        assert!(w["pid"].as_u64().unwrap() > 0);
    }
    // The same configuration without locations of gpu_process: ready, nothing to serve.
    ngx.reload_with(&config(&format!(
        "server {{ listen 127.0.0.1:{}; {ENDPOINTS} }}",
        ngx.port
    )));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status_json(&addr);
        if s["locations"].as_array().unwrap().is_empty() {
            assert_eq!(s["ready"], true, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        thread::sleep(Duration::from_millis(50));
    }
    ngx.assert_healthy();
}

#[test]
fn the_example_configuration_serves_metrics_health_and_status() {
    let ngx = Nginx::example("nginx.conf");
    let addr = ngx.addr();
    assert_eq!(post(&addr, "/echo", b"abc").body, b"abc");
    let m = metrics(&addr);
    assert_eq!(
        v(&m, "nv_inference_request_success", &[("location", "/echo")]),
        1
    );
    assert_eq!(
        v(
            &m,
            "nv_inference_request_success",
            &[("model", "kernel hex")]
        ),
        0
    );
    assert_eq!(get(&addr, "/health/live", "").0, 200);
    if gpu_required() {
        wait_ready(&addr, true, 10);
    } else {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (status, r) = loop {
            let (status, r) = ready(&addr);
            if !r.to_string().contains("unknown") || Instant::now() > deadline {
                break (status, r);
            }
            thread::sleep(Duration::from_millis(50));
        };
        // No GPU here: the example kernels cannot serve, and readiness says which.
        assert_eq!(status, 503, "{r}");
        let reasons = r["reasons"].to_string();
        for k in ["/blur", "/softmax", "/hex"] {
            assert!(reasons.contains(k), "{k}: {reasons}");
        }
        assert!(!reasons.contains("/echo"), "{reasons}");
    }
    assert_eq!(status_json(&addr)["workers"].as_array().unwrap().len(), 2);
    ngx.assert_healthy();
}

/// Polls readiness until it is `want`, within `secs`; the last answer.
fn wait_ready(addr: &str, want: bool, secs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, r) = ready(addr);
        assert_eq!(status == 200, r["ready"] == true, "{status} {r}");
        if r["ready"] == want {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never became {want}: {r}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn readiness_is_false_while_a_kernel_location_has_no_gpu_and_true_again_without_it() {
    if gpu_required() {
        eprintln!("skipped: a GPU serves the kernel there, so readiness never goes false");
        return;
    }
    let kernel =
        "#include \"ngx_gpu_kernel.h\"\nextern \"C\" __global__ void inv(ngx_gpu_batch b) {}\n";
    let with_kernel = |port: &str| {
        config(&format!(
            "gpu_kernel inv kernels/inv.cu;\n\
             server {{ listen 127.0.0.1:{port};\n\
               location /echo {{ gpu_process echo; }}\n\
               location /inv {{ gpu_process kernel inv; }}\n\
               {ENDPOINTS} }}"
        ))
    };
    let ngx = Nginx::start_with_files(&with_kernel("{PORT}"), &[("kernels/inv.cu", kernel)]);
    let addr = ngx.addr();
    // Once both workers have said what they serve (before that, their ops' state is
    // "unknown"), only /inv keeps them from being ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = wait_ready(&addr, false, 10);
        let n = r["reasons"].as_array().unwrap().len();
        if n == 2 && !r.to_string().contains("unknown") || Instant::now() > deadline {
            break r;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let reasons: Vec<&str> = r["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    for (w, reason) in reasons.iter().enumerate() {
        assert!(
            reason.starts_with(&format!("worker {w}: /inv (kernel inv) cannot serve")),
            "{reason}"
        );
    }
    let m = metrics(&addr);
    assert_eq!(v(&m, "ngx_gpu_worker_ready", &[("worker", "0")]), 0);
    // The location answers 503 meanwhile, counted as unavailable.
    assert_eq!(post(&addr, "/inv", b"abc").status, 503);
    assert_eq!(
        v(
            &metrics(&addr),
            "nv_inference_request_failure",
            &[("location", "/inv"), ("reason", "unavailable")]
        ),
        1
    );
    // Without the kernel location, ready again (a fresh zone for the new layout).
    ngx.reload_with(&config(&format!(
        "server {{ listen 127.0.0.1:{};\n location /echo {{ gpu_process echo; }}\n {ENDPOINTS} }}",
        ngx.port
    )));
    let r = wait_ready(&addr, true, 15);
    assert_eq!(r["reasons"].as_array().unwrap().len(), 0);
    // And back.
    ngx.reload_with(&with_kernel(&ngx.port.to_string()));
    wait_ready(&addr, false, 15);
    ngx.assert_healthy();
}

/// Waits until `gpu_status` shows exactly the running workers (by pid) and readiness.
fn wait_workers(ngx: &Nginx) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status_json(&ngx.addr());
        let mut pids: Vec<u64> = s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["pid"].as_u64().unwrap())
            .collect();
        pids.sort_unstable();
        let mut want: Vec<u64> = ngx.worker_pids().iter().map(|&p| p as u64).collect();
        want.sort_unstable();
        if pids == want && want.len() == 2 && s["ready"] == true {
            return s;
        }
        assert!(Instant::now() < deadline, "{s} vs {want:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reloads_and_a_killed_worker_keep_counters_and_slots_right() {
    let conf = |port: &str, more: &str| {
        config(&format!(
            "server {{ listen 127.0.0.1:{port};\n\
               location /echo {{ gpu_process echo; }}\n\
               location /held {{ gpu_process echo; gpu_batch_size 4; gpu_batch_delay 1500ms; }}\n\
               {more}\n{ENDPOINTS} }}"
        ))
    };
    let ngx = Nginx::start(&conf("{PORT}", ""));
    let addr = ngx.addr();
    let port = ngx.port.to_string();
    let success = |loc: &str| {
        v(
            &metrics(&addr),
            "nv_inference_request_success",
            &[("location", loc)],
        )
    };
    for i in 0..10u8 {
        assert_eq!(post(&addr, "/echo", &[i]).status, 200);
    }
    assert_eq!(success("/echo"), 10);
    let first = wait_workers(&ngx);
    // The same layout again: the zone is reused and the counters go on; the new workers
    // take the slots over.
    ngx.reload_with(&conf(&port, ""));
    let s = wait_workers(&ngx);
    assert!(
        s["generation"].as_u64().unwrap() > first["generation"].as_u64().unwrap(),
        "{s}"
    );
    for i in 0..5u8 {
        assert_eq!(post(&addr, "/echo", &[i]).status, 200);
    }
    assert_eq!(success("/echo"), 15);
    // A request held by a worker across a reload to another layout: the old worker
    // answers it and exits; the new ones count in a fresh zone.
    let held = {
        let addr = addr.clone();
        thread::spawn(move || post(&addr, "/held", b"kept"))
    };
    thread::sleep(Duration::from_millis(300));
    ngx.reload_with(&conf(&port, "location /other { gpu_process blake3; }"));
    let r = held.join().unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"kept"[..]));
    wait_workers(&ngx);
    let m = metrics(&addr);
    assert_eq!(
        v(&m, "nv_inference_request_success", &[("location", "/echo")]),
        0
    );
    assert_eq!(
        v(
            &m,
            "nv_inference_request_success",
            &[("location", "/other")]
        ),
        0
    );
    assert_eq!(post(&addr, "/other", b"abc").text(), b3(b"abc"));
    assert_eq!(success("/other"), 1);
    ngx.assert_healthy();
    // A worker killed: the master's fresh one takes its slot back.
    let victim = ngx.worker_pids()[0];
    // SAFETY: kill(2) on a child of our nginx.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ngx.worker_pids().contains(&victim) || ngx.worker_pids().len() < 2 {
        assert!(Instant::now() < deadline, "no fresh worker");
        thread::sleep(Duration::from_millis(50));
    }
    let s = wait_workers(&ngx);
    assert!(
        !s.to_string().contains(&format!("\"pid\":{victim},")),
        "{s}"
    );
    assert_eq!(success("/other"), 1);
}

/// The fault-injection module, one worker, `faults` planned on the test device.
fn start_faulty(faults: &str, locations: &str) -> Nginx {
    let conf = config(&format!(
        "server {{ listen 127.0.0.1:{{PORT}};\n{locations}\n{ENDPOINTS} }}"
    ))
    .replace("worker_processes 2;", "worker_processes 1;")
    .replace(
        "env CUDA_VISIBLE_DEVICES;",
        "env CUDA_VISIBLE_DEVICES; env NGX_GPU_FAULTS;",
    );
    let plan = if gpu_required() {
        faults.to_string()
    } else {
        format!("fake,{faults}")
    };
    Nginx::start_module(&conf, &[("NGX_GPU_FAULTS", &plan)], &fault_module_path())
}

#[test]
fn readiness_waits_for_a_device_that_fails_to_open_then_turns_true() {
    // Opening fails twice (retried after 1 s, then 2 s): /echo with gpu_fallback off
    // cannot serve until the device opens.
    let ngx = start_faulty(
        "open-fail:2",
        "location /echo { gpu_process echo; gpu_fallback off; gpu_timeout 20s; }",
    );
    let addr = ngx.addr();
    let started = Instant::now();
    let r = wait_ready(&addr, false, 1);
    assert!(
        r["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("worker 0: /echo (echo) cannot serve"),
        "{r}"
    );
    let s = status_json(&addr);
    let state = s["workers"][0]["device_state"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(["retrying", "opening"].contains(&state.as_str()), "{s}");
    assert!(
        s["workers"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{s}"
    );
    wait_ready(&addr, true, 20);
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    let s = status_json(&addr);
    assert_eq!(s["workers"][0]["device_state"], "open", "{s}");
    assert_eq!(post(&addr, "/echo", b"hi").status, 200);
    ngx.assert_healthy();
}

#[test]
fn a_panicking_batch_counts_as_internal_failures() {
    // The GPU thread panics while packing its first batch: that batch's requests get 500.
    // gpu_fallback off: the CPU path would answer them otherwise.
    let ngx = start_faulty(
        "panic@1",
        "location /echo { gpu_process echo; gpu_fallback off; }",
    );
    let addr = ngx.addr();
    let mut internal = 0;
    let mut ok = 0;
    for i in 0..6u8 {
        match post(&addr, "/echo", &[i; 10]).status {
            200 => ok += 1,
            500 => internal += 1,
            s => panic!("status {s}"),
        }
    }
    assert_eq!(internal, 1, "one batch of one request panicked");
    let m = metrics(&addr);
    let echo = [("location", "/echo")];
    assert_eq!(v(&m, "nv_inference_request_success", &echo), ok);
    assert_eq!(
        v(
            &m,
            "nv_inference_request_failure",
            &[("location", "/echo"), ("reason", "internal")]
        ),
        internal
    );
    check_histogram(&m, "ngx_gpu_request_duration_seconds", "/echo", 6);
    assert!(status_json(&addr)["workers"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("panicked"));
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        })
}

/// Runs headless Chromium on `url` with a fresh profile and `args`; its stdout.
fn headless(browser: &Path, url: &str, args: &[&str]) -> String {
    let profile = std::env::temp_dir().join(format!(
        "ngx-gpu-chromium-{}-{}",
        std::process::id(),
        Rng::fresh().next()
    ));
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=4000",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_in_headless_chromium_charts_the_load_just_sent() {
    let Some(browser) = chromium() else {
        // The GPU machine's bundle carries no browser; everywhere else t/deps.sh --tests
        // installs it.
        assert!(
            gpu_required(),
            "chromium is missing: sh t/deps.sh --tests installs it"
        );
        eprintln!("skipped: no chromium in the GPU machine's bundle");
        return;
    };
    let ngx = Nginx::start(&config(&format!(
        "server {{ listen 127.0.0.1:{{PORT}} reuseport;\n\
           location /echo {{ gpu_process echo; gpu_batch_delay 2ms; }}\n\
           location /blake3 {{ gpu_process blake3; }}\n\
           {ENDPOINTS} }}"
    )));
    let addr = ngx.addr();
    let mut rng = Rng::fresh();
    let echo = post_all(
        &addr,
        "/echo",
        (0..64).map(|i| rng.bytes(100 + i)).collect(),
    );
    let b3 = post_all(
        &addr,
        "/blake3",
        (0..24).map(|i| rng.bytes(3000 + i)).collect(),
    );
    assert!(echo.iter().chain(&b3).all(|&s| s == 200));

    let url = format!("http://{addr}/status?html&interval=300");
    let dom = headless(&browser, &url, &["--dump-dom"]);
    let start = dom
        .find("<pre id=\"gpu-points\" hidden=\"\">")
        .expect("points in the DOM");
    let json = &dom[start..];
    let json = &json[json.find('>').unwrap() + 1..json.find("</pre>").unwrap()];
    let json = json
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let points: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert!(points["samples"].as_u64().unwrap() >= 2, "{points}");
    for (key, requests) in [("echo /echo", 64.0), ("blake3 /blake3", 24.0)] {
        let s = &points["series"][key];
        // The first point: the means since the zone started, so the load just sent.
        let rps = s["rps"][0]["v"]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {points}"));
        assert!(rps > 0.0, "{key}: {points}");
        let batch = s["batch"][0]["v"].as_f64().unwrap();
        assert!(
            (1.0..=requests).contains(&batch),
            "{key}: mean batch {batch}"
        );
        assert!(s["queue"][0]["v"].as_f64().unwrap() >= 0.0);
        assert!(s["compute"][0]["v"].as_f64().unwrap() >= 0.0);
    }
    // The tables show the totals.
    assert!(
        dom.contains("<td class=\"l\">/echo</td><td>64</td><td>64</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("<span id=\"state\" class=\"ok\">ready</span>"),
        "{dom}"
    );
    // And per device: here every request was counted under "cpu" (no GPU where chromium is).
    assert!(
        dom.contains("<td class=\"l\">/echo</td><td>cpu</td><td>64</td><td>64</td>"),
        "{dom}"
    );

    let png = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let _ = std::fs::remove_file(&png);
    headless(
        &browser,
        &url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,1100",
            "--hide-scrollbars",
        ],
    );
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "screenshot {} is {size} bytes",
        png.display()
    );
    ngx.assert_healthy();
}

/// `nginx -t` on a server with one location holding `loc`; its stderr, and whether it passed.
fn conf_test(loc: &str) -> (bool, String) {
    let out = nginx_t(&config(&format!(
        "server {{ listen 127.0.0.1:{{PORT}}; location /x {{ {loc} }} }}"
    )));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn endpoint_directives_are_checked_at_configuration_time() {
    let (ok, err) = conf_test("gpu_health maybe;");
    assert!(!ok);
    assert!(
        err.contains(
            "[emerg] invalid value \"maybe\" in \"gpu_health\" directive, it must be \"live\" or \"ready\""
        ),
        "{err}"
    );
    for loc in [
        "gpu_metrics; gpu_status;",
        "gpu_process echo; gpu_metrics;",
        "gpu_health live; gpu_process echo;",
    ] {
        let (ok, err) = conf_test(loc);
        assert!(!ok, "{loc}");
        assert!(err.contains("directive is duplicate"), "{loc}: {err}");
    }
    let (ok, err) = conf_test("gpu_metrics x;");
    assert!(
        !ok && err.contains("invalid number of arguments in \"gpu_metrics\""),
        "{err}"
    );
    for loc in [
        "gpu_metrics;",
        "gpu_status;",
        "gpu_health ready;",
        "gpu_health live;",
    ] {
        let (ok, err) = conf_test(loc);
        assert!(ok, "{loc}: {err}");
    }
}

/// The series list the dashboard, the Kubernetes autoscaler and their checks hold their
/// queries against (`t/metric_names.py`) is what `gpu_metrics` really serves: every
/// per-location series with exactly its labels, and no series the list does not name. The
/// device series need NVML and are checked only where it is (none here).
#[test]
fn the_series_list_the_dashboard_uses_is_what_gpu_metrics_serves() {
    let ngx = Nginx::start(&config(&format!(
        "server {{ listen 127.0.0.1:{{PORT}};\n location /echo {{ gpu_process echo; }}\n {ENDPOINTS} }}"
    )));
    let addr = ngx.addr();
    assert_eq!(post(&addr, "/echo", b"abc").status, 200);
    let text = metrics(&addr);
    let dir = std::env::temp_dir().join(format!("ngx-gpu-series-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sample = dir.join("metrics.txt");
    std::fs::write(&sample, &text).unwrap();
    let check = r##"
import re, sys
sys.path.insert(0, sys.argv[1])
import metric_names as m
served = {}
for line in open(sys.argv[2]):
    if line.startswith("#") or not line.strip():
        continue
    name, labels = re.match(r"([a-z_]+)(?:\{(.*)\})? ", line).groups()
    keys = set(re.findall(r'([a-z_]+)="', labels or ""))
    served.setdefault(name, set()).update(keys)
want = {n: l - m.SCRAPE_LABELS for n, l in m.series().items()}
bad = []
for name, labels in want.items():
    if name.startswith("nv_gpu_"):
        continue
    if name not in served:
        bad.append(f"listed but not served: {name}")
    elif served[name] != labels:
        bad.append(f"{name}: served labels {sorted(served[name])}, listed {sorted(labels)}")
for name in served:
    if name not in want:
        bad.append(f"served but not listed: {name}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
"##;
    let t_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("t");
    let out = Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(&t_dir)
        .arg(&sample)
        .output()
        .expect("python3");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ngx.assert_healthy();
}
