//! Proof under faults, through nginx: the module built with the `fault-injection` feature
//! (src/faults.rs) makes its GPU thread panic, lose its device, hang, or find its device
//! busy at start, on purpose, while clients send load; every answer is checked. Without a
//! GPU the faults happen on the test device; on the GPU machine (NGX_GPU_REQUIRE=1) on the
//! real one, with real kernels that touch an illegal address or never end.

mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::*;

/// The fault plan for this machine: on the test device where there is no GPU.
fn plan(faults: &str) -> String {
    if gpu_required() {
        faults.to_string()
    } else {
        format!("fake,{faults}")
    }
}

/// One worker with the fault-injection module and `faults` planned.
fn start(faults: &str, extra: &str) -> Nginx {
    let conf = config(&format!(
        "client_max_body_size 4m; {extra}\n\
         server {{ listen 127.0.0.1:{{PORT}}; add_header X-Dev $gpu_device always;\n\
           location /echo {{ gpu_process echo; gpu_batch_size 16; }}\n\
           location /blake3 {{ gpu_process blake3; gpu_batch_size 16; }} }}"
    ))
    .replace("worker_processes 2;", "worker_processes 1;")
    .replace(
        "env CUDA_VISIBLE_DEVICES;",
        "env CUDA_VISIBLE_DEVICES; env NGX_GPU_FAULTS;",
    );
    Nginx::start_module(
        &conf,
        &[("NGX_GPU_FAULTS", &plan(faults))],
        &fault_module_path(),
    )
}

/// `clients` threads each send `each` requests of mixed sizes to both ops and check every
/// answer; returns (status, X-Dev) of every request, in no particular order.
fn load(addr: &str, clients: u64, each: u64, seed: u64) -> Vec<(u16, String)> {
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addr.to_string();
            thread::spawn(move || {
                let mut rng = Rng(seed ^ (c * 0x9E37_79B9_7F4A_7C15));
                let mut seen = Vec::new();
                for i in 0..each {
                    let n = match rng.next() % 4 {
                        0 => 0,
                        1 => (rng.next() % 100) as usize,
                        _ => (rng.next() % 150_000) as usize,
                    };
                    let data = rng.bytes(n);
                    let blake = (c + i).is_multiple_of(2);
                    let r = post(&addr, if blake { "/blake3" } else { "/echo" }, &data);
                    if r.status == 200 {
                        if blake {
                            assert_eq!(r.text(), b3(&data), "client {c} request {i}");
                        } else {
                            assert!(r.body == data, "client {c} request {i}: echo changed");
                        }
                    }
                    seen.push((r.status, r.header("X-Dev").unwrap_or("").to_string()));
                }
                seen
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn panics_on_the_gpu_thread_are_answered_and_the_worker_serves_on() {
    let ngx = start("panic@5,panic-in-flight@12", "");
    let pid = ngx.worker_pids();
    let seen = load(&ngx.addr(), 8, 30, Rng::fresh().next());
    assert!(seen.iter().all(|(s, _)| *s == 200), "{seen:?}");
    let log = ngx.wait_log("injected panic with a batch in flight");
    assert!(
        log.contains("the GPU thread panicked: injected panic while packing"),
        "{log}"
    );
    // Two panics are not a pattern: the same worker, still on its device.
    assert_eq!(ngx.worker_pids(), pid);
    let r = post(&ngx.addr(), "/blake3", b"after");
    assert_eq!((r.text(), r.header("X-Dev")), (b3(b"after"), Some("gpu0")));
    assert!(!log.contains("exited on signal"), "{log}");
}

#[test]
fn a_lost_device_fails_only_its_batches_and_a_fresh_worker_takes_over() {
    let ngx = start("trap@6", "");
    let old = ngx.worker_pids();
    let seen = load(&ngx.addr(), 8, 30, Rng::fresh().next());
    // Every request is answered right: the batches in flight from the CPU path.
    assert!(seen.iter().all(|(s, _)| *s == 200), "{seen:?}");
    assert!(
        seen.iter().any(|(_, d)| d == "cpu"),
        "nothing fell back: {seen:?}"
    );
    let log = ngx.wait_log("the master starts a fresh one");
    assert!(
        log.contains("failed: device lost while waiting for a batch"),
        "{log}"
    );
    assert!(log.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{log}");
    wait_for("the old worker to exit", Duration::from_secs(20), || {
        old.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });
    wait_for("a fresh worker", Duration::from_secs(20), || {
        ngx.worker_pids().iter().any(|p| !old.contains(p))
    });
    // The fresh worker has its own device (and its own plan: its 6th batch traps again).
    wait_for("the fresh worker's device", Duration::from_secs(20), || {
        post(&ngx.addr(), "/echo", b"fresh").header("X-Dev") == Some("gpu0")
    });
    let log = ngx.error_log();
    assert!(!log.contains("exited on signal"), "{log}");
}

#[test]
fn a_hung_kernel_fails_its_batch_and_the_worker_exits_without_hanging() {
    let ngx = start("hang@4", "gpu_timeout 400ms;");
    let old = ngx.worker_pids();
    let start = Instant::now();
    let seen = load(&ngx.addr(), 4, 20, Rng::fresh().next());
    // The hung batch's requests time out (504); everything else is answered right.
    let timed_out = seen.iter().filter(|(s, _)| *s == 504).count();
    assert!(seen.iter().all(|(s, _)| *s == 200 || *s == 504), "{seen:?}");
    assert!(
        (1..=16).contains(&timed_out),
        "{timed_out} timed out: {seen:?}"
    );
    let log = ngx.wait_log("the master starts a fresh one");
    assert!(log.contains("has not finished"), "{log}");
    wait_for("the old worker to exit", Duration::from_secs(30), || {
        old.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });
    eprintln!(
        "hung batch detected and worker replaced within {:?}",
        start.elapsed()
    );
    // The fresh worker serves at once (the CPU path while its device opens) ...
    let r = post(&ngx.addr(), "/blake3", b"after");
    assert_eq!((r.status, r.text()), (200, b3(b"after")));
    // ... and gets its own device.
    let replaced = Instant::now();
    wait_for("the fresh worker's device", Duration::from_secs(60), || {
        ngx.error_log().matches("gpu: using").count() >= 2
    });
    eprintln!(
        "the fresh worker's device was open {:?} later",
        replaced.elapsed()
    );
    for line in ngx.error_log().lines().filter(|l| l.contains("gpu:")) {
        eprintln!("  {line}");
    }
    assert!(!ngx.error_log().contains("exited on signal"));
}

#[test]
fn a_device_that_is_busy_at_start_is_tried_again() {
    let ngx = start("open-fail:2", "");
    let r = post(&ngx.addr(), "/blake3", b"early");
    assert_eq!((r.text(), r.header("X-Dev")), (b3(b"early"), Some("cpu")));
    let log = ngx.wait_log("(attempt 3)");
    assert!(log.contains("no usable GPU in this worker yet: opening the device: injected failure; trying again in 1s"), "{log}");
    assert!(log.contains("gpu: using gpu0"), "{log}");
    let r = post(&ngx.addr(), "/blake3", b"late");
    assert_eq!((r.text(), r.header("X-Dev")), (b3(b"late"), Some("gpu0")));
}

/// Every thread of a worker other than nginx's own blocks nginx's signals: the GPU thread
/// and, on a GPU machine, the CUDA driver's threads it started.
#[test]
fn worker_threads_other_than_nginx_block_its_signals() {
    let ngx = Nginx::start(&config(
        "server { listen 127.0.0.1:{PORT}; location /h { gpu_process blake3; } }",
    ));
    assert_eq!(post(&ngx.addr(), "/h", b"x").text(), b3(b"x"));
    let mut threads = 0;
    for pid in ngx.worker_pids() {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let tid: u32 = task.file_name().to_str().unwrap().parse().unwrap();
            if tid == pid {
                continue;
            }
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap();
            let mask = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            for sig in [
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGTERM,
                libc::SIGCHLD,
                libc::SIGUSR1,
            ] {
                assert!(
                    mask & (1 << (sig - 1)) != 0,
                    "worker {pid} thread {tid} ({}) does not block signal {sig}: {mask:x}",
                    comm.trim()
                );
            }
            threads += 1;
        }
    }
    assert!(threads >= 2, "no GPU thread found");
}
