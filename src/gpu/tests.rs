//! The GPU path against independent references, on fresh random inputs of awkward sizes,
//! through the real GPU thread (batches, pieces, two slots in flight). Where no GPU is
//! usable these tests say so and pass, unless NGX_GPU_REQUIRE=1 (set on the GPU
//! machine), where a missing GPU fails them.

use std::time::Duration;

use super::*;
use crate::engine::job::{Batching, Device};
use crate::engine::thread::{Config, GpuThread, Kernels};
use crate::testing::{collect, log_lines, ops, run_mixed, Rng};

fn require_gpu() -> bool {
    std::env::var("NGX_GPU_REQUIRE").as_deref() == Ok("1")
}

/// The test ops' programs compiled (in this process), if this machine can run them
/// (checked by opening the device once).
fn ptx() -> Option<Arc<Compiled>> {
    let opened = if nvrtc_present() {
        let mut compiled = Compiled::default();
        ops()
            .iter()
            .flat_map(|op| op.programs())
            .try_for_each(|p| compile(&p).map(|ptx| compiled.insert(&p, Arc::from(ptx))))
            .and_then(|()| {
                Gpu::open(0, 1 << 30, None)
                    .map(|g| g.info.clone())
                    .map_err(|e| e.to_string())
            })
            .map(|info| (info, compiled))
    } else {
        Err("libnvrtc not found".into())
    };
    match opened {
        Ok((info, compiled)) => {
            eprintln!("device: {info}");
            Some(Arc::new(compiled))
        }
        Err(e) if require_gpu() => panic!("NGX_GPU_REQUIRE=1 but no usable GPU: {e}"),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

use std::sync::Arc;

const MIB: usize = 1 << 20;

fn awkward(rng: &mut Rng, big: bool) -> Vec<Vec<u8>> {
    let mut s = vec![
        0,
        1,
        3,
        15,
        16,
        17,
        63,
        64,
        65,
        1023,
        1024,
        1025,
        2047,
        2048,
        2049,
        3072,
        3073,
        4096,
        4097,
        31 * 1024 + 7,
        65536,
        65537,
        MIB - 1,
        MIB,
        MIB + 1,
        3 * MIB + 333,
    ];
    // NGX_GPU_TEST_SMALL (set for the compute-sanitizer runs, where kernels run many
    // times slower) leaves the 64 MiB body out.
    if big && std::env::var_os("NGX_GPU_TEST_SMALL").is_none() {
        s.push(64 * MIB + 1);
    }
    for _ in 0..40 {
        s.push(rng.below(3000) as usize);
    }
    for _ in 0..8 {
        s.push(rng.below(5 * MIB as u64) as usize);
    }
    s.iter().map(|&n| rng.bytes(n)).collect()
}

/// A thread on the GPU, once its device is open (requests before that take the CPU path).
fn gpu_thread(ptx: &Arc<Compiled>, batch_bytes: u64, poll: Duration) -> GpuThread {
    let t = GpuThread::spawn(
        Config::new(ops(), batch_bytes, poll, 1 << 30),
        Kernels::Ptx(ptx.clone()),
    )
    .unwrap();
    let events = collect(&t, Duration::from_secs(30), |e| {
        log_lines(e).iter().any(|m| m.contains("gpu: using"))
    });
    assert!(
        log_lines(&events).iter().any(|m| m.contains("gpu: using")),
        "the device did not open: {events:?}"
    );
    t
}

#[test]
fn batches_on_the_gpu_answer_every_request_correctly() {
    let Some(ptx) = ptx() else { return };
    let mut rng = Rng::fresh();
    let inputs = awkward(&mut rng, true);
    // The default byte bound (16 MiB): the 64 MiB body is cut into four pieces.
    let t = gpu_thread(&ptx, 16 * MIB as u64, Duration::ZERO);
    let batching = Batching {
        size: 64,
        delay: Duration::from_micros(500),
    };
    let max = run_mixed(&t, &inputs, batching, Device::Gpu(0), |_| false);
    eprintln!("largest batch: {max}");
    assert!(max > 1);
}

#[test]
fn small_pieces_on_the_gpu_merge_to_the_right_digest() {
    let Some(ptx) = ptx() else { return };
    let mut rng = Rng::fresh();
    let inputs = awkward(&mut rng, false);
    // 64 KiB pieces: most bodies over it are cut, and pieces of different bodies share
    // batches.
    // Spinning on the slots (gpu_poll) must give the same answers.
    let t = gpu_thread(&ptx, 64 * 1024, Duration::from_micros(200));
    let batching = Batching {
        size: 256,
        delay: Duration::ZERO,
    };
    run_mixed(&t, &inputs, batching, Device::Gpu(0), |_| false);
}

#[test]
fn cancelled_requests_in_gpu_batches_harm_no_one_else() {
    let Some(ptx) = ptx() else { return };
    let mut rng = Rng::fresh();
    let inputs = awkward(&mut rng, false);
    let t = gpu_thread(&ptx, MIB as u64, Duration::from_micros(50));
    let batching = Batching {
        size: 32,
        delay: Duration::from_millis(1),
    };
    run_mixed(&t, &inputs, batching, Device::Gpu(0), |id| id % 4 == 3);
}

#[test]
fn broken_kernel_source_fails_with_the_nvrtc_log() {
    if !nvrtc_present() {
        assert!(!require_gpu(), "NGX_GPU_REQUIRE=1 but libnvrtc is missing");
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let p = Program::new(
        "broken.cu",
        "extern \"C\" __global__ void k() { undeclared_thing(); }",
        Vec::new(),
        Vec::new(),
    );
    let err = compile(&p).unwrap_err();
    assert!(err.contains("broken.cu does not compile"), "{err}");
    assert!(
        err.contains("broken.cu(1): error"),
        "the log names file and line: {err}"
    );
    assert!(
        err.contains("undeclared_thing"),
        "the NVRTC log names the error: {err}"
    );
}
