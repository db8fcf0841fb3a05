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
use ngx_http_gpu_module::gpu::{compile_kernels, nvrtc_present, Gpu, KERNEL_SOURCE};
use ngx_http_gpu_module::ops::Op;

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

/// Pushes `n` jobs of `input` through `t`, at most `window` outstanding; returns the
/// wall time, the largest batch seen and the device of the last answer.
fn pump(
    t: &GpuThread,
    op: Op,
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
                op,
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
    let ptx: Arc<str> = compile_kernels(KERNEL_SOURCE)
        .expect("kernels compile")
        .into();
    let mut gpu = match Gpu::open(&ptx, 1 << 30) {
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

    let cfg = Config::new(16 * MIB as u64, Duration::ZERO, 1 << 30);
    let gpu_t = GpuThread::spawn(cfg.clone(), Kernels::Ptx(ptx.clone())).expect("thread");
    let cpu_t =
        GpuThread::spawn(cfg.clone(), Kernels::Unavailable("benchmark".into())).expect("thread");

    let big = data(16 * MIB, 7);
    let want = *::blake3::hash(&big).as_bytes();
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(*::blake3::hash(&big).as_bytes(), want);
    }
    let crate_gbps = 5.0 * big.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
    pump(&gpu_t, Op::Blake3, &big, 8, 8, 128); // warm-up: buffers grow once
    let (d, _, dev) = pump(&gpu_t, Op::Blake3, &big, 64, 8, 128);
    let gpu_gbps = 64.0 * big.len() as f64 / d.as_secs_f64() / 1e9;
    let (d, _, _) = pump(&cpu_t, Op::Blake3, &big, 8, 8, 128);
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
        pump(&gpu_t, Op::Echo, &small, 2000, window, batch);
        let n = 100_000;
        let (d, max_batch, _) = pump(&gpu_t, Op::Echo, &small, n, window, batch);
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
    for (batch, window) in [(1usize, 1usize), (128, 256)] {
        pump(&polled, Op::Echo, &small, 2000, window, batch);
        let n = 100_000;
        let (d, max_batch, _) = pump(&polled, Op::Echo, &small, n, window, batch);
        rows.push((
            format!("echo 1 KiB, GPU path, gpu_poll 100us, gpu_batch_size {batch}, {window} outstanding"),
            format!("{:.0} requests/s (largest batch {max_batch})", n as f64 / d.as_secs_f64()),
        ));
    }
    println!(
        "GPU thread counters, gpu_poll 100us: {}",
        polled.stats().summary()
    );
    let (d, _, _) = pump(&cpu_t, Op::Echo, &small, 100_000, 256, 128);
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
