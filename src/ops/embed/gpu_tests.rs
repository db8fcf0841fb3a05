//! The embed kernels compile with NVRTC (CI, no GPU), and on a GPU the device path matches
//! the CPU path and sentence-transformers. Without a usable GPU the device tests say so and
//! pass, unless NGX_GPU_REQUIRE=1 (set on the GPU machine).

use std::sync::Arc;

use super::tests::{cosine, golden, minilm, random_texts, tiny};
use super::*;
use crate::gpu::{compile, entries, nvrtc_present, Compiled, Device, Gpu, Loader};
use crate::testing::Rng;

fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

#[test]
fn the_kernels_compile_with_nvrtc_and_have_every_entry() {
    if !nvrtc_present() {
        assert!(
            !required("NGX_GPU_REQUIRE_NVRTC") && !required("NGX_GPU_REQUIRE"),
            "libnvrtc is required here but missing"
        );
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let ptx = compile(&program()).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = entries(&ptx).into_iter().map(|(n, _)| n).collect();
    let mut want = vec!["embed_pool".to_string()];
    for p in ["f32", "f16", "bf16"] {
        for k in ["embed_ln", "embed_add_ln", "embed_bias_act"] {
            want.push(format!("{k}_{p}"));
        }
        for dh in [32, 64] {
            want.push(format!("embed_attention_{p}_{dh}"));
        }
    }
    for w in &want {
        assert!(names.contains(w), "{w} missing from {names:?}");
    }
}

/// The device and the compiled kernels, or None (said) where there is no usable GPU.
pub(super) fn device() -> Option<(Gpu, Compiled)> {
    let opened = if nvrtc_present() {
        compile(&program()).and_then(|ptx| {
            let mut c = Compiled::default();
            c.insert(&program(), Arc::from(ptx));
            Gpu::open(0, 1 << 30, None)
                .map(|g| (g, c))
                .map_err(|e| e.to_string())
        })
    } else {
        Err("libnvrtc not found".into())
    };
    match opened {
        Ok((g, c)) => {
            eprintln!("device: {}", g.info);
            Some((g, c))
        }
        Err(e) if required("NGX_GPU_REQUIRE") => panic!("NGX_GPU_REQUIRE=1 but no usable GPU: {e}"),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

/// Embeds `texts` in one batch on the device, with `model`'s precision.
fn on_device(
    gpu: &Gpu,
    compiled: &Compiled,
    model: &EmbedModel,
    texts: &[Encoded],
) -> Vec<Vec<f32>> {
    let Loader::Device(mut dl) = gpu.loader(compiled) else {
        panic!("not a device loader")
    };
    let enc = DeviceEncoder::load(&mut dl, model).unwrap_or_else(|e| panic!("{e}"));
    let stream = dl.ctx.new_stream().unwrap();
    let refs: Vec<&Encoded> = texts.iter().collect();
    enc.embed_now(&stream, &refs)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn floor(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 0.9999,
        Precision::Fp16 => 0.999,
        Precision::Bf16 => 0.995,
    }
}

fn precisions() -> [(&'static str, Precision); 3] {
    [
        ("precision=fp32", Precision::Fp32),
        ("precision=fp16", Precision::Fp16),
        ("precision=bf16", Precision::Bf16),
    ]
}

#[test]
fn the_device_matches_the_cpu_on_a_generated_model() {
    let Some((gpu, compiled)) = device() else {
        return;
    };
    let mut rng = Rng::fresh();
    let dir = std::env::temp_dir().join(format!("ngx-gpu-embed-dev-{}", std::process::id()));
    // Heads of 9 dimensions (the attention kernel for heads up to 32), then one head of
    // 36 (the kernel for up to 64).
    for heads in [4, 1] {
        let mut t = tiny::Tiny::new(&dir, 0xd1ce);
        t.config["num_attention_heads"] = serde_json::json!(heads);
        t.write();
        for (param, p) in precisions() {
            for extra in [&[][..], &["pooling=cls", "normalize=off"][..]] {
                let params: Vec<&str> = std::iter::once(param)
                    .chain(extra.iter().copied())
                    .collect();
                let m = EmbedModel::load("m", &dir, &params).unwrap();
                // Batches of awkward sizes, texts from empty to truncated, a hand-made text
                // of no tokens at all (pooled to zeros on both paths) and one too long.
                for n in [1usize, 2, 3, 33, 100] {
                    let mut texts: Vec<Encoded> = random_texts(&mut rng, n, 60)
                        .iter()
                        .map(|s| m.tokenize(s).unwrap())
                        .collect();
                    if n == 33 {
                        texts.push(Encoded::default());
                        // Longer than max_tokens (40): both paths cut it there.
                        texts.push(Encoded {
                            ids: (0..45).map(|i| 4 + i % 50).collect(),
                            type_ids: vec![0; 45],
                            truncated: false,
                        });
                    }
                    let want = m.cpu_embed(&texts.iter().collect::<Vec<_>>());
                    let got = on_device(&gpu, &compiled, &m, &texts);
                    assert_eq!(got.len(), texts.len());
                    for i in 0..texts.len() {
                        if texts[i].ids.is_empty() {
                            assert!(got[i].iter().all(|&x| x == 0.0), "{:?}", got[i]);
                            continue;
                        }
                        let c = cosine(&got[i], &want[i]);
                        assert!(
                            c >= floor(p),
                            "{params:?} heads {heads} batch {n} text {i}: cosine {c}"
                        );
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn minilm_on_the_device_matches_sentence_transformers_and_the_cpu() {
    let Some((gpu, compiled)) = device() else {
        return;
    };
    let Some(dir) = minilm() else { return };
    let g = golden();
    for (param, p) in precisions() {
        let m = EmbedModel::load("minilm", &dir, &[param]).unwrap();
        let texts: Vec<Encoded> = g.texts.iter().map(|t| m.tokenize(t).unwrap()).collect();
        let cpu = m.cpu_embed(&texts.iter().collect::<Vec<_>>());
        // All texts in one batch (short and long mixed), then each alone: the same answers.
        let batch = on_device(&gpu, &compiled, &m, &texts);
        let (mut worst_ref, mut worst_cpu) = (1.0f64, 1.0f64);
        for i in 0..texts.len() {
            let (r, c) = (
                cosine(&batch[i], &g.embeddings[i]),
                cosine(&batch[i], &cpu[i]),
            );
            worst_ref = worst_ref.min(r);
            worst_cpu = worst_cpu.min(c);
            assert!(
                r >= floor(p),
                "{param} text {i} {:?}: cosine to the reference {r}",
                g.texts[i]
            );
            assert!(
                c >= floor(p),
                "{param} text {i}: cosine to the CPU path {c}"
            );
        }
        for i in [0, 5, 29, 31] {
            let alone = on_device(&gpu, &compiled, &m, &texts[i..i + 1]);
            let c = cosine(&alone[0], &batch[i]);
            assert!(c >= 0.99999, "{param} text {i} alone vs in the batch: {c}");
        }
        eprintln!(
            "{param}: lowest cosine to sentence-transformers {worst_ref:.6}, to the CPU path \
             {worst_cpu:.6}"
        );
    }
}

#[test]
fn shared_weights_are_uploaded_once_imported_after_and_embed_as_the_cpu_does() {
    let Some((gpu, compiled)) = device() else {
        return;
    };
    // Workers of nginx share; this test process does from here on (a directory of its own).
    crate::gpu::shared::set_dir(
        std::env::temp_dir().join(format!("ngx-gpu-share-test.{}", std::process::id())),
    );
    let mut rng = Rng::fresh();
    let dir = std::env::temp_dir().join(format!("ngx-gpu-embed-share-{}", std::process::id()));
    // A seed of this run's own: no other test or run holds these weights.
    let t = tiny::Tiny::new(&dir, rng.next());
    t.write();
    for (param, p) in precisions() {
        let m = EmbedModel::load("m", &dir, &[param]).unwrap();
        let texts: Vec<Encoded> = random_texts(&mut rng, 7, 40)
            .iter()
            .map(|s| m.tokenize(s).unwrap())
            .collect();
        let refs: Vec<&Encoded> = texts.iter().collect();
        let want = m.cpu_embed(&refs);
        let load = || {
            let Loader::Device(mut dl) = gpu.loader(&compiled) else {
                panic!("not a device loader")
            };
            let enc = DeviceEncoder::load(&mut dl, &m).unwrap_or_else(|e| panic!("{e}"));
            let stream = dl.ctx.new_stream().unwrap();
            (enc, stream, dl.notes.clone())
        };
        let (first, s1, notes) = load();
        assert!(
            notes.len() == 1 && notes[0].contains("uploaded by this worker"),
            "{param}: {notes:?}"
        );
        let (second, s2, notes) = load();
        assert!(
            notes.len() == 1 && notes[0].contains("imported from another worker"),
            "{param}: {notes:?}"
        );
        assert_eq!(first.weight_bytes(), second.weight_bytes());
        let a = first
            .embed_now(&s1, &refs)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(first);
        // The first holder is gone; the memory stays with the second.
        let b = second
            .embed_now(&s2, &refs)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b, "{param}: the same weights give the same embeddings");
        for i in 0..texts.len() {
            let c = cosine(&b[i], &want[i]);
            assert!(c >= floor(p), "{param} text {i}: cosine {c}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
