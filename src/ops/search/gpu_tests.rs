//! The search op on a real device (embed then search on one stream, through the GPU
//! thread) against the exact float64 search over the CPU embeddings. Without a usable GPU
//! these tests say so and pass, unless NGX_GPU_REQUIRE=1 (set on the GPU machine).

use std::sync::Arc;

use super::tests::{fixture, through_the_thread};
use crate::engine::job::Device as Ran;
use crate::engine::thread::Kernels;
use crate::gpu::{compile, nvrtc_present, Compiled, Gpu};
use crate::ops::knn::index::Metric;
use crate::testing::Rng;

fn required() -> bool {
    std::env::var("NGX_GPU_REQUIRE").as_deref() == Ok("1")
}

/// Both programs compiled, where a GPU can be opened; None (said) where not.
fn kernels() -> Option<Kernels> {
    let opened = if nvrtc_present() {
        (|| {
            let mut c = Compiled::default();
            for p in [
                crate::ops::embed::program(),
                crate::ops::knn::gpu::program(),
            ] {
                let ptx = compile(&p)?;
                c.insert(&p, Arc::from(ptx));
            }
            let g = Gpu::open(0, 1 << 26, None).map_err(|e| e.to_string())?;
            eprintln!("device: {}", g.info);
            drop(g);
            Ok::<_, String>(c)
        })()
    } else {
        Err("libnvrtc not found".into())
    };
    match opened {
        Ok(c) => Some(Kernels::Ptx(Arc::new(c))),
        Err(e) if required() => panic!("NGX_GPU_REQUIRE=1 but no usable GPU: {e}"),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

#[test]
fn the_device_answers_like_the_exact_search_over_cpu_embeddings() {
    let mut rng = Rng::fresh();
    // float32 products: the device's embeddings within about 1e-6 of the CPU's; float16
    // inputs: within about 1e-3 (cosine >= 0.999 to the CPU path).
    for (params, tol) in [("precision=fp32", 2e-4), ("precision=fp16", 4e-3)] {
        for metric in [Metric::Cosine, Metric::Ip, Metric::L2] {
            let Some(k) = kernels() else { return };
            // 4099 rows: just over a selection segment.
            let n = if metric == Metric::Cosine { 4099 } else { 61 };
            let f = fixture("device", &mut rng, n, metric, &[params], &[]);
            through_the_thread(&f, k, Ran::Gpu(0), tol);
        }
    }
}
