//! GPU path against the CPU reference, on fresh random inputs of awkward sizes.
//! Where no GPU is usable these tests say so and pass, unless NGX_GPU_REQUIRE=1 (set
//! on the GPU machine), where a missing GPU fails them.

use super::*;
use crate::ops::Op;

fn require_gpu() -> bool {
    std::env::var("NGX_GPU_REQUIRE").as_deref() == Ok("1")
}

fn open_gpu() -> Option<Gpu> {
    let opened = if nvrtc_present() {
        compile_kernels(KERNEL_SOURCE).and_then(|ptx| Gpu::open(&ptx))
    } else {
        Err("libnvrtc not found".into())
    };
    match opened {
        Ok(g) => {
            eprintln!("device: {}", g.info);
            Some(g)
        }
        Err(e) if require_gpu() => panic!("NGX_GPU_REQUIRE=1 but no usable GPU: {e}"),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

/// splitmix64, seeded from the clock so every run sees new data; the seed is printed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn fresh() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        eprintln!("random seed: {seed:#x}");
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

const MIB: usize = 1 << 20;

fn sizes(rng: &mut Rng) -> Vec<usize> {
    let mut s = vec![
        0, 1, 3, 15, 16, 17, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 3072, 3073, 4096,
        4097, 31 * 1024 + 7, 65536, MIB - 1, MIB, MIB + 1, 3 * MIB + 333, 64 * MIB,
    ];
    for _ in 0..8 {
        s.push((rng.next() % (5 * MIB as u64)) as usize);
    }
    s
}

fn run(gpu: &mut Gpu, op: Op, input: &[u8]) -> crate::ops::Output {
    gpu.input(input.len()).unwrap().copy_from_slice(input);
    op.run_gpu(gpu, input.len()).unwrap()
}

#[test]
fn blake3_gpu_equals_the_blake3_crate() {
    let Some(mut gpu) = open_gpu() else { return };
    let mut rng = Rng::fresh();
    for n in sizes(&mut rng) {
        let input = rng.bytes(n);
        let got = run(&mut gpu, Op::Blake3, &input);
        let want = format!("{}\n", ::blake3::hash(&input).to_hex());
        assert_eq!(String::from_utf8(got.body).unwrap(), want, "blake3 of {n} bytes");
    }
}

#[test]
fn echo_gpu_returns_the_input() {
    let Some(mut gpu) = open_gpu() else { return };
    let mut rng = Rng::fresh();
    for n in sizes(&mut rng) {
        let input = rng.bytes(n);
        // Poison the output buffer from the last round so a short copy cannot pass.
        let got = run(&mut gpu, Op::Echo, &input);
        assert_eq!(got.body.len(), n);
        assert!(got.body == input, "echo of {n} bytes differs");
    }
}

#[test]
fn broken_kernel_source_fails_with_the_nvrtc_log() {
    if !nvrtc_present() {
        assert!(!require_gpu(), "NGX_GPU_REQUIRE=1 but libnvrtc is missing");
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let err = compile_kernels("extern \"C\" __global__ void k() { undeclared_thing(); }").unwrap_err();
    assert!(err.contains("kernel compilation failed"), "{err}");
    assert!(err.contains("undeclared_thing"), "the NVRTC log names the error: {err}");
}

