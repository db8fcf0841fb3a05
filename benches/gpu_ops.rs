//! The GPU thread's own throughput, without nginx, against its CPU path and the PCIe
//! reference, measured in one run on one machine (see the README). Exits 2 where no
//! GPU is usable.
//!
//! - pinned memcpy host->device and device->host (the PCIe reference);
//! - blake3 on 16 MiB bodies through the GPU thread (batches, pieces, two slots), through
//!   the CPU path, and the `blake3` crate on one core;
//! - echo on 1 KiB bodies through the GPU thread with batching on and off (requests/s
//!   one worker's GPU thread can serve).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ngx_http_gpu_module::engine::job::{Batching, Body, Device, Event, Fallback, Job, Segment};
use ngx_http_gpu_module::engine::thread::{Config, GpuThread, Kernels};
use ngx_http_gpu_module::gpu::{compile, nvrtc_present, Compiled, Gpu};
use ngx_http_gpu_module::ops::{self, Op, Params};

/// The two built-in ops as a configuration of two locations has them: keys 0 and 1.
const ECHO: usize = 0;
const BLAKE3: usize = 1;

const MIB: usize = 1 << 20;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Waits until `t` has opened its device (requests before that take the CPU path).
fn wait_open(t: &GpuThread) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        for ev in t.drain() {
            if let Event::Log(_, m) = ev {
                if m.contains("gpu: using") {
                    return;
                }
                eprintln!("{m}");
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("the device did not open");
    std::process::exit(2);
}

/// Pushes `n` jobs of `input` through `t`, at most `window` outstanding; returns the
/// wall time, the largest batch seen and the device of the last answer.
fn pump(
    t: &GpuThread,
    ops: &[Arc<dyn Op>],
    op: usize,
    input: &[u8],
    n: usize,
    window: usize,
    batch: usize,
) -> (Duration, usize, Device) {
    let start = Instant::now();
    let (mut sent, mut done, mut max_batch, mut device) = (0usize, 0usize, 0usize, Device::None);
    while done < n {
        while sent < n && sent - done < window {
            let mut body = Body::default();
            body.push(Segment::Memory(input.to_vec()));
            let job = Job {
                id: sent as u64,
                op: ops[op].clone(),
                op_key: op,
                params: Params::default(),
                fallback: Fallback::Cpu,
                batching: Batching {
                    size: batch,
                    delay: Duration::ZERO,
                },
                body,
                timeout: Duration::from_secs(60),
                cancelled: Default::default(),
                queued_at: Instant::now(),
            };
            if t.submit(job).is_err() {
                break;
            }
            sent += 1;
        }
        for ev in t.drain() {
            if let Event::Done(c) = ev {
                assert!(c.result.is_ok(), "job failed: {:?}", c.result.err());
                max_batch = max_batch.max(c.batch_size);
                device = c.device;
                done += 1;
            }
        }
        std::hint::spin_loop();
    }
    (start.elapsed(), max_batch, device)
}

fn main() {
    if !nvrtc_present() {
        eprintln!("no libnvrtc: nothing to measure");
        std::process::exit(2);
    }
    let ops: Vec<Arc<dyn Op>> = vec![
        ops::parse(&["echo"]).unwrap().op,
        ops::parse(&["blake3"]).unwrap().op,
    ];
    let mut compiled = Compiled::default();
    for p in ops.iter().flat_map(|op| op.programs()) {
        compiled.insert(&p, Arc::from(compile(&p).expect("kernels compile")));
    }
    let ptx = Arc::new(compiled);
    let mut gpu = match Gpu::open(0, 1 << 30, None) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no usable GPU: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {}", gpu.info);
    let mut rows: Vec<(String, String)> = Vec::new();

    for len in [16 * MIB, 256 * MIB] {
        let (h2d, d2h) = gpu.memcpy_reference(len, 10).expect("memcpy");
        rows.push((
            format!("pinned memcpy {} MiB", len / MIB),
            format!(
                "H2D {:.1} GB/s, D2H {:.1} GB/s",
                len as f64 / h2d / 1e9,
                len as f64 / d2h / 1e9
            ),
        ));
    }
    drop(gpu);

    let cfg = Config::new(ops.clone(), 16 * MIB as u64, Duration::ZERO, 1 << 30);
    let gpu_t = GpuThread::spawn(cfg.clone(), Kernels::Ptx(ptx.clone())).expect("thread");
    wait_open(&gpu_t);
    let cpu_t =
        GpuThread::spawn(cfg.clone(), Kernels::Unavailable("benchmark".into())).expect("thread");

    let big = data(16 * MIB, 7);
    let want = *::blake3::hash(&big).as_bytes();
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(*::blake3::hash(&big).as_bytes(), want);
    }
    let crate_gbps = 5.0 * big.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
    pump(&gpu_t, &ops, BLAKE3, &big, 8, 8, 128); // warm-up: buffers grow once
    let (d, _, dev) = pump(&gpu_t, &ops, BLAKE3, &big, 64, 8, 128);
    let gpu_gbps = 64.0 * big.len() as f64 / d.as_secs_f64() / 1e9;
    let (d, _, _) = pump(&cpu_t, &ops, BLAKE3, &big, 8, 8, 128);
    let cpu_gbps = 8.0 * big.len() as f64 / d.as_secs_f64() / 1e9;
    rows.push((
        "blake3 16 MiB, blake3 crate 1 core".into(),
        format!("{crate_gbps:.2} GB/s"),
    ));
    rows.push((
        "blake3 16 MiB, CPU path (GPU thread, no GPU)".into(),
        format!("{cpu_gbps:.2} GB/s"),
    ));
    rows.push((
        format!("blake3 16 MiB, GPU path ({dev:?}), 8 in flight"),
        format!(
            "{gpu_gbps:.2} GB/s ({:.1}x the CPU path)",
            gpu_gbps / cpu_gbps
        ),
    ));

    let small = data(1024, 9);
    for (batch, window) in [(1usize, 1usize), (1, 256), (128, 256), (128, 2048)] {
        pump(&gpu_t, &ops, ECHO, &small, 2000, window, batch);
        let n = 100_000;
        let (d, max_batch, _) = pump(&gpu_t, &ops, ECHO, &small, n, window, batch);
        rows.push((
            format!("echo 1 KiB, GPU path, gpu_batch_size {batch}, {window} outstanding"),
            format!(
                "{:.0} requests/s (largest batch {max_batch})",
                n as f64 / d.as_secs_f64()
            ),
        ));
    }
    drop(gpu_t);
    let polled = GpuThread::spawn(
        Config {
            poll: Duration::from_micros(100),
            ..cfg
        },
        Kernels::Ptx(ptx.clone()),
    )
    .expect("thread");
    wait_open(&polled);
    for (batch, window) in [(1usize, 1usize), (128, 256)] {
        pump(&polled, &ops, ECHO, &small, 2000, window, batch);
        let n = 100_000;
        let (d, max_batch, _) = pump(&polled, &ops, ECHO, &small, n, window, batch);
        rows.push((
            format!("echo 1 KiB, GPU path, gpu_poll 100us, gpu_batch_size {batch}, {window} outstanding"),
            format!("{:.0} requests/s (largest batch {max_batch})", n as f64 / d.as_secs_f64()),
        ));
    }
    println!(
        "GPU thread counters, gpu_poll 100us: {}",
        polled.stats().summary()
    );
    let (d, _, _) = pump(&cpu_t, &ops, ECHO, &small, 100_000, 256, 128);
    rows.push((
        "echo 1 KiB, CPU path, 256 outstanding".into(),
        format!("{:.0} requests/s", 1e5 / d.as_secs_f64()),
    ));

    println!();
    println!("| measurement (one GPU thread, no nginx) | result |");
    println!("|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}
