//! GPU ops against their CPU paths, measured in one run on one machine.
//!
//! Prints one table: BLAKE3 on a 256 MiB input (GPU kernels alone, GPU including the
//! host->device copy, and the `blake3` crate on one CPU core), and echo's round trip.
//! Run on the GPU machine (see the README); exits 2 where no GPU is usable.

use std::time::{Duration, Instant};

use ngx_http_gpu_module::gpu::{compile_kernels, host_copy, nvrtc_present, Gpu, KERNEL_SOURCE};

const MIB: usize = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut last = f(); // warm-up
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        last = f();
        times.push(t.elapsed());
    }
    (median(times), last)
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() {
    let len: usize = std::env::var("BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256) * MIB;
    if !nvrtc_present() {
        eprintln!("no libnvrtc: nothing to measure");
        std::process::exit(2);
    }
    let ptx = compile_kernels(KERNEL_SOURCE).expect("kernels compile");
    let mut gpu = match Gpu::open(&ptx) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no usable GPU: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {}", gpu.info);

    let mut x = 0x1234_5678_9abc_def0u64;
    let input: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();

    let (cpu_t, cpu_hash) = time(5, || *::blake3::hash(&input).as_bytes());

    gpu.input(len).unwrap().copy_from_slice(&input);
    gpu.upload(len).unwrap();
    let (kern_t, kern_hash) = time(20, || gpu.blake3_resident(len).unwrap());
    let (e2e_t, e2e_hash) = time(10, || gpu.blake3(len).unwrap());
    assert_eq!(kern_hash, cpu_hash, "GPU digest differs from the blake3 crate");
    assert_eq!(e2e_hash, cpu_hash, "GPU digest differs from the blake3 crate");

    let (echo_t, echo_out) = time(10, || gpu.echo(len).unwrap());
    let (copy_t, _) = time(10, || std::hint::black_box(host_copy(std::hint::black_box(&input))));
    assert!(echo_out == input, "echo changed the data");

    println!();
    println!("| {} MiB input | median time | GB/s | vs blake3 crate, 1 core |", len / MIB);
    println!("|---|---|---|---|");
    let row = |name: &str, d: Duration| {
        println!(
            "| {name} | {:.3} ms | {:.2} | {:.1}x |",
            d.as_secs_f64() * 1e3,
            gbps(len, d),
            cpu_t.as_secs_f64() / d.as_secs_f64()
        );
    };
    row("blake3 crate, 1 CPU core", cpu_t);
    row("blake3 GPU kernels (data on device)", kern_t);
    row("blake3 GPU incl. pinned H2D", e2e_t);
    row("echo GPU round trip (H2D, copy, D2H, to Vec)", echo_t);
    row("host only: copy into a fresh Vec (part of echo)", copy_t);
}
