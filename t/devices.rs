//! `gpu_devices` through nginx: workers spread over devices by worker number, the same
//! device after a respawn and a reload, `$gpu_device` naming it, a missing device failing
//! only its workers, and the MPS and spread lines. The devices are the fault-injection
//! build's test device standing for several GPUs (`fake-devices:N`), so this runs on any
//! machine; the real spread is `t/gpu/multi.sh`'s.

mod harness;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use harness::*;

/// `workers` workers of the fault-injection module over `fake` (a fault plan), with
/// `gpu_devices` as `devices` says (None: not set). `reuseport` so that fresh
/// connections reach every worker.
fn conf(workers: usize, devices: Option<&str>) -> String {
    let devices = devices.map_or(String::new(), |d| format!("gpu_devices {d};"));
    config(&format!(
        "{devices}\n\
         server {{ listen 127.0.0.1:{{PORT}} reuseport; add_header X-Dev $gpu_device always;\n\
           location /echo {{ gpu_process echo; }}\n\
           location /off {{ gpu_process echo; gpu_fallback off; }} }}"
    ))
    .replace(
        "worker_processes 2;",
        &format!("worker_processes {workers};"),
    )
    .replace(
        "env CUDA_VISIBLE_DEVICES;",
        "env CUDA_VISIBLE_DEVICES; env NGX_GPU_FAULTS;",
    )
}

fn start(workers: usize, devices: Option<&str>, fake: &str) -> Nginx {
    let ngx = Nginx::start_module(
        &conf(workers, devices),
        &[("NGX_GPU_FAULTS", &format!("fake,{fake}"))],
        &fault_module_path(),
    );
    wait_started(&ngx, workers, &[]);
    ngx
}

/// Waits until there are `n` workers, none of them in `old`, and each has said which
/// device it uses or that it has none (and worker 0 its spread lines, said before).
fn wait_started(ngx: &Nginx, n: usize, old: &[u32]) {
    wait_until("every worker's start line", || {
        let pids = ngx.worker_pids();
        let log = ngx.error_log();
        let said: HashSet<u32> = log
            .lines()
            .filter(|l| l.contains("gpu: using ") || l.contains("gpu: no usable GPU"))
            .map(pid_of)
            .collect();
        pids.len() == n && pids.iter().all(|p| said.contains(p) && !old.contains(p))
    });
    // The MPS warning follows a start line.
    std::thread::sleep(Duration::from_millis(100));
}

/// The pid of an error log line (`... [notice] 1234#1234: ...`).
fn pid_of(line: &str) -> u32 {
    let after = line.split("] ").nth(1).expect("a level");
    after.split('#').next().unwrap().parse().expect("a pid")
}

/// Each worker's device, by pid, from the start lines in `log`.
fn devices_by_pid(log: &str) -> BTreeMap<u32, String> {
    log.lines()
        .filter_map(|l| {
            let dev = l.split("gpu: using ").nth(1)?.split(' ').next()?;
            Some((pid_of(l), dev.to_string()))
        })
        .collect()
}

/// How many workers use each device.
fn census(by_pid: &BTreeMap<u32, String>, pids: &[u32]) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for p in pids {
        let dev = by_pid
            .get(p)
            .unwrap_or_else(|| panic!("no start line of {p}"));
        *n.entry(dev.clone()).or_default() += 1;
    }
    n
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(d, n)| (d.to_string(), *n)).collect()
}

/// Sends requests on fresh connections until answers came from every one of `want`
/// devices (each answer checked), within 20 s; returns the devices seen.
fn answers_from(addr: &str, path: &str, want: &[&str]) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut rng = Rng::fresh();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !want.iter().all(|d| seen.contains(*d)) && Instant::now() < deadline {
        let n = 1 + (rng.next() % 3000) as usize;
        let data = rng.bytes(n);
        let r = post(addr, path, &data);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.body == data, "wrong echo");
        seen.insert(r.header("X-Dev").expect("X-Dev").to_string());
    }
    seen
}

/// The lines of `log` at `level` (`warn`, `notice`) that contain `text`.
fn lines_at<'a>(log: &'a str, level: &str, text: &str) -> Vec<&'a str> {
    let level = format!("[{level}] ");
    log.lines()
        .filter(|l| l.contains(&level) && l.contains(text))
        .collect()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_spread_over_every_device_and_keep_theirs_across_respawn_and_reload() {
    let ngx = start(5, None, "fake-devices:3");
    let log = ngx.error_log();
    let pids = ngx.worker_pids();
    assert_eq!(pids.len(), 5);
    let by_pid = devices_by_pid(&log);
    // Round-robin by worker number: 0 1 2 0 1.
    let want = counts(&[("gpu0", 2), ("gpu1", 2), ("gpu2", 1)]);
    assert_eq!(census(&by_pid, &pids), want, "{log}");
    for l in log.lines().filter(|l| l.contains("gpu: using")) {
        assert!(l.contains("[notice]") && l.ends_with(", MPS: off"), "{l}");
    }
    let spread =
        "gpu: 5 workers over \"gpu_devices all\", workers per device: gpu0: 2, gpu1: 2, gpu2: 1";
    assert_eq!(lines_at(&log, "notice", spread).len(), 1, "{log}");
    // MPS off and two workers on gpu0 and on gpu1: one warning for each, none for gpu2.
    for dev in ["gpu0", "gpu1"] {
        let line = format!("gpu: 2 workers share {dev} without MPS");
        assert_eq!(lines_at(&log, "warn", &line).len(), 1, "{log}");
    }
    assert!(!log.contains("share gpu2"), "{log}");
    // $gpu_device names the device each answer ran on.
    let seen = answers_from(&ngx.addr(), "/off", &["gpu0", "gpu1", "gpu2"]);
    assert_eq!(seen.len(), 3, "{seen:?}");

    // The worker on gpu2 (worker 2) dies: its replacement has its number, so its device.
    let victim = *by_pid.iter().find(|(_, d)| *d == "gpu2").unwrap().0;
    // SAFETY: kill(2) on a child of our nginx.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_started(&ngx, 5, &[victim]);
    let by_pid = devices_by_pid(&ngx.error_log());
    assert_eq!(census(&by_pid, &ngx.worker_pids()), want);
    // The respawned lowest worker of gpu2 does not share it: still no warning for it.
    assert!(!ngx.error_log().contains("share gpu2"));

    // A reload numbers the new workers from 0 again: the same spread. With 6 workers
    // every device gets two.
    let old = ngx.worker_pids();
    ngx.reload_with(&conf(6, None));
    wait_started(&ngx, 6, &old);
    let by_pid = devices_by_pid(&ngx.error_log());
    assert_eq!(
        census(&by_pid, &ngx.worker_pids()),
        counts(&[("gpu0", 2), ("gpu1", 2), ("gpu2", 2)])
    );
    // Nothing went wrong but the kill itself.
    let log = ngx.error_log();
    let alerts: Vec<&str> = log.lines().filter(|l| l.contains("[alert]")).collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].contains(&format!("worker process {victim} exited on signal 9")));
    assert!(
        !log.contains("panicked") && !log.contains("[emerg]"),
        "{log}"
    );
}

#[test]
fn a_listed_device_that_is_not_there_fails_only_its_workers() {
    // "1,4" on 2 devices: worker 0 takes gpu1; worker 1 is given gpu4, which is missing.
    let ngx = start(2, Some("1,4"), "fake-devices:2");
    let log = ngx.error_log();
    assert_eq!(
        log.matches("gpu: no usable GPU in this worker: \"gpu_devices 1,4\" gives this worker (worker 1) gpu4, but CUDA shows 2 devices").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("gpu: using gpu1 ").count(), 1, "{log}");
    let missing =
        "gpu: \"gpu_devices 1,4\" lists gpu4, which CUDA does not show (it shows 2 devices)";
    assert_eq!(lines_at(&log, "warn", missing).len(), 1, "{log}");
    // Worker 0 serves from gpu1; worker 1 takes the fallback: the CPU path, or 503 with
    // gpu_fallback off. Both kinds of answer must come, on fresh connections.
    let seen = answers_from(&ngx.addr(), "/echo", &["gpu1", "cpu"]);
    assert_eq!(seen, HashSet::from(["gpu1".to_string(), "cpu".to_string()]));
    let mut statuses = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while statuses.len() < 2 && Instant::now() < deadline {
        let r = post(&ngx.addr(), "/off", b"x");
        match r.status {
            200 => assert_eq!(r.header("X-Dev"), Some("gpu1")),
            503 => assert_eq!(r.header("Retry-After"), Some("1")),
            s => panic!("status {s}: {}", r.text()),
        }
        statuses.insert(r.status);
    }
    assert_eq!(statuses, HashSet::from([200, 503]));
    // Said once per worker, not per request.
    assert_eq!(ngx.error_log().matches("gives this worker").count(), 1);
    ngx.assert_healthy();
}

#[test]
fn more_devices_than_workers_is_warned_about() {
    let ngx = start(2, Some("all"), "fake-devices:4,fake-mps");
    let log = ngx.error_log();
    let idle = "gpu: \"gpu_devices all\" gives 4 devices to 2 workers: gpu2, gpu3 get no worker; set worker_processes to 4 or a multiple of it";
    assert_eq!(lines_at(&log, "warn", idle).len(), 1, "{log}");
    // Said by worker 0 alone.
    assert_eq!(log.matches("get no worker").count(), 1, "{log}");
    let by_pid = devices_by_pid(&log);
    assert_eq!(
        census(&by_pid, &ngx.worker_pids()),
        counts(&[("gpu0", 1), ("gpu1", 1)])
    );
    assert_eq!(log.matches(", MPS: on\n").count(), 2, "{log}");
    ngx.assert_healthy();
}

#[test]
fn one_device_with_all_or_0_is_what_it_was() {
    for devices in [None, Some("all"), Some("0")] {
        let ngx = start(3, devices, "");
        let log = ngx.error_log();
        let by_pid = devices_by_pid(&log);
        assert_eq!(
            census(&by_pid, &ngx.worker_pids()),
            counts(&[("gpu0", 3)]),
            "{devices:?}: {log}"
        );
        // One device: no spread line, one MPS warning (three workers share it, MPS off).
        assert!(!log.contains("workers per device"), "{log}");
        assert_eq!(
            log.matches("gpu: 3 workers share gpu0 without MPS").count(),
            1,
            "{log}"
        );
        let seen = answers_from(&ngx.addr(), "/off", &["gpu0"]);
        assert_eq!(seen, HashSet::from(["gpu0".to_string()]));
        ngx.assert_healthy();
    }
}

/// The value of series `name` with exactly these `labels` (in the order served); None if
/// absent.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let want = format!("{name}{{{}}} ", want.join(","));
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map(|v| v.parse::<f64>().unwrap() as u64)
}

#[test]
fn metrics_count_each_workers_requests_under_its_device() {
    // 3 workers over "gpu_devices 1,0,5" on 2 devices: worker 0 on gpu1, worker 1 on gpu0,
    // worker 2 given gpu5, which is missing: it answers on the CPU path, counted as cpu.
    let conf = conf(3, Some("1,0,5")).replace(
        "location /off",
        "location = /metrics { gpu_metrics; }\n location = /status { gpu_status; }\n \
         location /off",
    );
    let ngx = Nginx::start_module(
        &conf,
        &[("NGX_GPU_FAULTS", "fake,fake-devices:2")],
        &fault_module_path(),
    );
    wait_started(&ngx, 3, &[]);
    let addr = ngx.addr();
    fn echo(dev: &str) -> [(&str, &str); 3] {
        [("model", "echo"), ("location", "/echo"), ("device", dev)]
    }
    // Before any request every device a worker counts under has its series, at 0;
    // gpu5, which no worker has open, has none.
    let m = request(&addr, "GET", "/metrics", Send::None).text();
    for dev in ["gpu1", "gpu0", "cpu"] {
        assert_eq!(
            series(&m, "nv_inference_request_success", &echo(dev)),
            Some(0),
            "{dev}: {m}"
        );
    }
    assert!(!m.contains("device=\"gpu5\""), "{m}");

    // Requests on fresh connections until each device answered a few, each answer checked
    // and counted by where it says it ran ($gpu_device).
    let mut rng = Rng::fresh();
    let mut sent: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(sent.len() == 3 && sent.values().all(|(n, _)| *n >= 5)) {
        assert!(Instant::now() < deadline, "answers so far: {sent:?}");
        let n = match rng.next() % 4 {
            0 => 0,
            1 => 1,
            _ => 1 + 2 * (rng.next() % 1500) as usize,
        };
        let data = rng.bytes(n);
        let r = post(&addr, "/echo", &data);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.body == data, "wrong echo");
        let dev = r.header("X-Dev").expect("X-Dev").to_string();
        let e = sent.entry(dev).or_default();
        e.0 += 1;
        e.1 += n as u64;
    }
    assert_eq!(
        sent.keys().cloned().collect::<Vec<_>>(),
        ["cpu", "gpu0", "gpu1"]
    );
    let m = request(&addr, "GET", "/metrics", Send::None).text();
    let status: serde_json::Value =
        serde_json::from_str(&request(&addr, "GET", "/status", Send::None).text()).unwrap();
    let loc = status["locations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["location"] == "/echo")
        .unwrap();
    let mut total = 0;
    for (dev, (n, bytes)) in &sent {
        let get = |name: &str| {
            series(&m, name, &echo(dev)).unwrap_or_else(|| panic!("{name} {dev}: {m}"))
        };
        assert_eq!(get("nv_inference_request_success"), *n, "{dev}: {m}");
        assert_eq!(get("nv_inference_count"), *n, "{dev}");
        assert_eq!(get("ngx_gpu_request_bytes_total"), *bytes, "{dev}");
        assert_eq!(get("ngx_gpu_response_bytes_total"), *bytes, "{dev}");
        assert_eq!(get("ngx_gpu_request_duration_seconds_count"), *n, "{dev}");
        assert_eq!(get("ngx_gpu_compute_duration_seconds_count"), *n, "{dev}");
        // Every body fits one piece: the batch sizes add up to the requests.
        assert_eq!(get("ngx_gpu_batch_size_sum"), *n, "{dev}");
        let inf = series(
            &m,
            "ngx_gpu_request_duration_seconds_bucket",
            &[echo(dev).as_slice(), &[("le", "+Inf")]].concat(),
        );
        assert_eq!(inf, Some(*n), "{dev}");
        assert_eq!(get("nv_inference_pending_request_count"), 0, "{dev}");
        assert_eq!(loc["devices"][dev]["success"], *n, "{dev}: {loc}");
        total += n;
    }
    assert_eq!(loc["success"], total, "{loc}");
    assert!(!m.contains("device=\"gpu5\""), "{m}");
    // Each worker says which device it counts under.
    let by_worker: Vec<&str> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["metrics_device"].as_str().unwrap())
        .collect();
    assert_eq!(by_worker, ["gpu1", "gpu0", "cpu"], "{status}");
    ngx.assert_healthy();
}
