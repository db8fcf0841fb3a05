//! The device search against a float64 reference computed here, on fresh random data of
//! awkward sizes; exact ties on integer data; the tile plan; and (ignored) the kernel-level
//! benchmark. Without a usable GPU the device tests say so and pass, unless
//! NGX_GPU_REQUIRE=1 (set on the GPU machine).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::*;
use crate::gpu::{compile, nvrtc_present, Compiled, Device, Gpu, Loader};
use crate::ops::knn::index::Hits;
use crate::testing::Rng;

fn require_gpu() -> bool {
    std::env::var("NGX_GPU_REQUIRE").as_deref() == Ok("1")
}

fn require_nvrtc() -> bool {
    require_gpu() || std::env::var("NGX_GPU_REQUIRE_NVRTC").as_deref() == Ok("1")
}

#[test]
fn the_search_kernels_compile_with_nvrtc() {
    if !nvrtc_present() {
        assert!(!require_nvrtc(), "libnvrtc is required but missing");
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let ptx = compile(&program()).unwrap();
    for entry in ["knn_prep", "knn_select_tile", "knn_select_list"] {
        assert!(ptx.contains(&format!(".entry {entry}")), "{entry} missing");
    }
    let ptx = compile(&fused_program()).unwrap();
    for (entry, _, _, _) in FUSED_SHAPES {
        assert!(ptx.contains(&format!(".entry {entry}")), "{entry} missing");
    }
    assert!(
        ptx.contains("mma.sync.aligned.m16n8k16"),
        "no tensor-core product"
    );
}

#[test]
fn tiles_are_whole_segments_and_scratch_is_bounded() {
    for n in [1, 4095, 4096, 4097, 1 << 20, 3_000_001] {
        for nq in [1, 7, 16, 128, 1000, 1024, 2048, 2049, 10_000] {
            for (k, fused) in [1, 10, 64, 65, 100, 2047, MAX_K]
                .into_iter()
                .flat_map(|k| [(k, false), (k, true)])
            {
                let p = Plan::new(n, nq, k, TILE_BYTES, fused);
                assert_eq!((p.first % SEG, p.tile % SEG), (0, 0), "{p:?}");
                assert!(p.tile >= SEG && p.tile < n + SEG, "{p:?}");
                assert!(p.first >= SEG && p.first < n + SEG, "{p:?}");
                assert!(p.chunk <= QUERY_CHUNK && p.chunk <= nq.max(1));
                // Fused only where asked, for more than one query, k allows and rows are
                // left after the first tile; always where more rows than FIRST_ROWS are.
                let can = fused && k <= FUSED_MAX_K && nq > 1;
                assert!(!p.fused || can && p.first < n, "{p:?}");
                assert!(p.fused || !can || n <= FIRST_ROWS, "{p:?}");
                if p.fused {
                    assert!(p.chunk <= FUSED_CHUNK && p.first <= FIRST_ROWS, "{p:?}");
                    assert!(p.chunk * p.first * 4 <= FIRST_BYTES.max(p.chunk * SEG * 4));
                    // The fused kernel's grid has a segment per block row (at most 65535).
                    assert!(p.tile / SEG <= 65535);
                } else {
                    assert_eq!(p.first, p.tile);
                }
                // The product block stays in the L2 budget unless one segment is already more.
                assert!(p.chunk * p.first * 4 <= TILE_BYTES.max(p.chunk * SEG * 4));
                // The running list and every segment's candidates fit in A.
                assert!(p.a_stride >= k * (1 + p.tile.max(p.first).div_ceil(SEG)));
                for d in [1, 128, 4096] {
                    let (offs, total) = p.regions(d);
                    assert!(offs.windows(2).all(|w| w[0] <= w[1] && w[1] % ALIGN == 0));
                    // As the design comment states: independent of n and nq past a chunk.
                    assert!(total < (165 << 20) + 8192 * d, "{n} {nq} {k} {d}: {total}");
                    if k == 10 {
                        assert!(total < (66 << 20) + 8192 * d, "{n} {nq} {k} {d}: {total}");
                    }
                }
            }
        }
    }
}

/// A device, its context's compiled search program, and a stream; None (and a visible
/// skip) where there is no GPU.
struct Bench {
    gpu: Gpu,
    compiled: Compiled,
    stream: Arc<CudaStream>,
}

fn device() -> Option<Bench> {
    let opened = if !nvrtc_present() {
        Err("libnvrtc not found".to_string())
    } else {
        let mut compiled = Compiled::default();
        for p in [program(), fused_program()] {
            compile(&p)
                .map(|ptx| compiled.insert(&p, Arc::from(ptx)))
                .unwrap_or_else(|e| panic!("{} does not compile: {e}", p.name));
        }
        Gpu::open(0, 1 << 26, None)
            .map_err(|e| e.to_string())
            .map(|gpu| (gpu, compiled))
    };
    match opened {
        Ok((gpu, compiled)) => {
            eprintln!("device: {}", gpu.info);
            let Loader::Device(l) = gpu.loader(&compiled) else {
                unreachable!()
            };
            let stream = l.ctx.new_stream().unwrap();
            drop(l);
            Some(Bench {
                gpu,
                compiled,
                stream,
            })
        }
        Err(e) if require_gpu() => panic!("NGX_GPU_REQUIRE=1 but no usable GPU: {e}"),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

impl Bench {
    fn load(&self, index: &Index) -> DeviceIndex {
        let Loader::Device(mut l) = self.gpu.loader(&self.compiled) else {
            unreachable!()
        };
        DeviceIndex::load(&mut l, index, None).unwrap()
    }

    /// Runs one search; returns (rows, scores).
    fn search(&self, dev: &DeviceIndex, queries: &[f32], nq: usize, k: usize) -> Hits {
        let s = &self.stream;
        let q: CudaSlice<f32> = s.clone_htod(queries).unwrap();
        let rows: CudaSlice<i64> = s.alloc_zeros(nq * k).unwrap();
        let scores: CudaSlice<f32> = s.alloc_zeros(nq * k).unwrap();
        let scratch: CudaSlice<u8> = s.alloc_zeros(dev.scratch_bytes(nq, k).max(1)).unwrap();
        dev.search(s, args(s, &q, nq, k, &scratch, (&rows, &scores)))
            .unwrap();
        s.synchronize().unwrap();
        Hits {
            k,
            rows: s.clone_dtoh(&rows).unwrap(),
            scores: s.clone_dtoh(&scores).unwrap(),
        }
    }
}

/// A search's arguments: the device addresses of its buffers on stream `s`.
fn args(
    s: &CudaStream,
    q: &CudaSlice<f32>,
    nq: usize,
    k: usize,
    scratch: &CudaSlice<u8>,
    (rows, scores): (&CudaSlice<i64>, &CudaSlice<f32>),
) -> SearchArgs {
    SearchArgs {
        queries: q.device_ptr(s).0,
        nq,
        k,
        scratch: scratch.device_ptr(s).0,
        rows_out: rows.device_ptr(s).0,
        scores_out: scores.device_ptr(s).0,
    }
}

fn uniform(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.next() >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0)
        .collect()
}

fn index(rows: Vec<f32>, n: usize, d: usize, metric: Metric, precision: Precision) -> Index {
    let mut rows = rows;
    if metric == Metric::Cosine {
        for r in rows.chunks_mut(d) {
            let norm = r.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            if norm > 0.0 {
                r.iter_mut()
                    .for_each(|x| *x = (f64::from(*x) / norm) as f32);
            }
        }
    }
    Index {
        n,
        d,
        rows,
        metric,
        precision,
        ids: None,
    }
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// Every row's exact score for a query, as the metric defines it.
fn scores64(idx: &Index, q: &[f32]) -> Vec<f64> {
    let qn = dot64(q, q);
    idx.rows
        .chunks(idx.d)
        .map(|x| match idx.metric {
            Metric::Ip => dot64(q, x),
            Metric::Cosine => {
                if qn > 0.0 {
                    dot64(q, x) / qn.sqrt()
                } else {
                    0.0
                }
            }
            Metric::L2 => q
                .iter()
                .zip(x)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum(),
        })
        .collect()
}

/// Row numbers best first (ties: lower row), the first k.
fn best(metric: Metric, s: &[f64], k: usize) -> Vec<usize> {
    let better = |a: &usize, b: &usize| {
        let o = if metric == Metric::L2 {
            s[*a].total_cmp(&s[*b])
        } else {
            s[*b].total_cmp(&s[*a])
        };
        o.then(a.cmp(b))
    };
    let mut order: Vec<usize> = (0..s.len()).collect();
    if k < order.len() {
        order.select_nth_unstable_by(k, better);
        order.truncate(k);
    }
    order.sort_by(better);
    order
}

/// Checks a search's hits against the float64 reference; returns the largest score error
/// relative to the query's scale (|q| max|x|, (|q| + max|x|)^2 for L2).
fn check(case: &str, idx: &Index, queries: &[f32], hits: &Hits, rel_tol: f64) -> f64 {
    let (n, d, k) = (idx.n, idx.d, hits.k);
    let xmax = idx
        .rows
        .chunks(d)
        .map(|x| dot64(x, x).sqrt())
        .fold(0.0, f64::max);
    let mut worst: f64 = 0.0;
    for (qi, q) in queries.chunks(d).enumerate() {
        let s = scores64(idx, q);
        let want = best(idx.metric, &s, k);
        let qlen = dot64(q, q).sqrt();
        let scale = match idx.metric {
            Metric::Ip => qlen * xmax,
            Metric::Cosine => xmax,
            Metric::L2 => (qlen + xmax).powi(2),
        }
        .max(1e-30);
        let tol = rel_tol * scale;
        let rows = &hits.rows[qi * k..][..k];
        let got = &hits.scores[qi * k..][..k];
        let mut seen = HashSet::new();
        for i in 0..k {
            let at = format!("{case}: query {qi}, place {i}");
            if i >= n {
                assert_eq!(rows[i], -1, "{at}: beyond the index");
                let worst_score = if idx.metric == Metric::L2 {
                    f32::INFINITY
                } else {
                    f32::NEG_INFINITY
                };
                assert_eq!(got[i], worst_score, "{at}");
                continue;
            }
            let r = rows[i];
            assert!((0..n as i64).contains(&r), "{at}: row {r}");
            assert!(seen.insert(r), "{at}: row {r} twice");
            let r = r as usize;
            let err_own = (f64::from(got[i]) - s[r]).abs();
            let err_rank = (f64::from(got[i]) - s[want[i]]).abs();
            worst = worst.max(err_own / scale).max(err_rank / scale);
            assert!(
                err_own <= tol,
                "{at}: row {r} scored {} not {}",
                got[i],
                s[r]
            );
            assert!(
                err_rank <= tol,
                "{at}: score {} where the reference's is {} (row {} vs {r})",
                got[i],
                s[want[i]],
                want[i]
            );
            if r != want[i] {
                assert!(
                    (s[r] - s[want[i]]).abs() <= 2.0 * tol,
                    "{at}: row {r} ({}) where {} ({}) is better",
                    s[r],
                    want[i],
                    s[want[i]]
                );
            }
            if i > 0 {
                let ordered = if idx.metric == Metric::L2 {
                    got[i - 1] <= got[i]
                } else {
                    got[i - 1] >= got[i]
                };
                assert!(
                    ordered,
                    "{at}: not best first: {} then {}",
                    got[i - 1],
                    got[i]
                );
            }
        }
    }
    worst
}

/// Stated accuracy (scores within this many times |q| max|x|, or (|q| + max|x|)^2 for L2),
/// measured against float64: fp32 within 1e-5, TF32 and fp16 within 4e-3 and 2e-3 (inputs
/// rounded to an 11-bit significand; float32 sums).
fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 1e-5,
        Precision::Tf32 => 4e-3,
        Precision::Fp16 => 2e-3,
    }
}

#[test]
fn gpu_search_matches_float64_on_awkward_sizes() {
    let Some(b) = device() else { return };
    let mut rng = Rng::fresh();
    use Metric::*;
    use Precision::*;
    // (n, d, nq, k, metric, precision, one segment per tile)
    let cases = [
        (1, 1, 1, 1, Ip, Fp32, false),
        (1, 3, 7, 1, L2, Fp32, false),
        (5, 3, 7, 5, Cosine, Fp32, false),
        (10, 8, 4, 20, Ip, Fp32, false),
        (1000, 127, 7, 1000, L2, Fp32, false),
        (SEG + 1, 127, 7, 10, Ip, Fp32, true),
        (3 * SEG - 7, 64, 1000, 10, L2, Fp32, true),
        (3 * SEG - 7, 32, 7, MAX_K, Ip, Fp32, false),
        (3 * SEG - 7, 32, 3, MAX_K, Cosine, Tf32, true),
        (SEG + 1, 127, 1, 100, Cosine, Fp16, true),
        (20_000, 128, 1000, 10, Ip, Tf32, false),
        (20_000, 128, 1000, 10, L2, Fp16, false),
        (20_000, 128, 16, 2000, Cosine, Fp32, false),
        (3000, 17, QUERY_CHUNK + 452, 16, L2, Fp32, false),
        (3 * SEG - 7, 3, 128, 1, Ip, Fp16, true),
    ];
    let mut worst = [0.0f64; 3];
    for (n, d, nq, k, metric, precision, small) in cases {
        let case = format!("n {n} d {d} nq {nq} k {k} {metric:?} {precision:?} small {small}");
        let idx = index(uniform(&mut rng, n * d), n, d, metric, precision);
        let mut dev = b.load(&idx);
        if small {
            dev.set_tile_bytes(1);
            assert_eq!(dev.plan(nq, k).tile, SEG);
        }
        let queries = uniform(&mut rng, nq * d);
        let hits = b.search(&dev, &queries, nq, k);
        let w = check(&case, &idx, &queries, &hits, tolerance(precision));
        eprintln!("{case}: largest error {w:.2e}");
        worst[precision as usize] = worst[precision as usize].max(w);
    }
    eprintln!(
        "accuracy (largest score error / scale): fp32 {:.2e}, tf32 {:.2e}, fp16 {:.2e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn exact_ties_go_to_the_lower_row() {
    let Some(b) = device() else { return };
    let mut rng = Rng::fresh();
    // Small integers: every product and sum is exact in every precision, so duplicated
    // rows tie exactly and the order must be the reference's to the row.
    let (n, d, nq) = (9000, 16, 5);
    let distinct: Vec<Vec<f32>> = (0..40)
        .map(|_| (0..d).map(|_| rng.below(7) as f32 - 3.0).collect())
        .collect();
    let rows: Vec<f32> = (0..n)
        .flat_map(|_| distinct[rng.below(40) as usize].clone())
        .collect();
    let queries: Vec<f32> = (0..nq * d).map(|_| rng.below(7) as f32 - 3.0).collect();
    // k = 10 and 256 take the selection's prefilter (k <= its 256 threads), 300 does not.
    for metric in [Metric::Ip, Metric::L2] {
        assert_exact(&b, &rows, d, &queries, metric, &[10, 256, 300]);
    }
}

/// Searches `rows` (n x d) for `queries` in every precision, with whole and with one-segment
/// tiles, float16 also two-step, for each k; every row and score must be the float64
/// reference's exactly (data whose products are exact in every precision).
fn assert_exact(b: &Bench, rows: &[f32], d: usize, queries: &[f32], metric: Metric, ks: &[usize]) {
    let (n, nq) = (rows.len() / d, queries.len() / d);
    let variants = [
        (Precision::Fp32, true),
        (Precision::Tf32, true),
        (Precision::Fp16, true),
        (Precision::Fp16, false),
    ];
    for (precision, fused) in variants {
        for small in [false, true] {
            let idx = index(rows.to_vec(), n, d, metric, precision);
            let mut dev = b.load(&idx);
            dev.set_fused(fused);
            if small {
                dev.set_tile_bytes(1);
            }
            for &k in ks {
                let hits = b.search(&dev, queries, nq, k);
                for (qi, q) in queries.chunks(d).enumerate() {
                    let s = scores64(&idx, q);
                    let want = best(metric, &s, k);
                    let want_rows: Vec<i64> = want.iter().map(|&r| r as i64).collect();
                    let path = dev.fuses(nq, k);
                    let case =
                        format!("{metric:?} {precision:?} small {small} k {k} q {qi} fused {path}");
                    assert_eq!(&hits.rows[qi * k..][..k], &want_rows[..], "{case}");
                    let want_scores: Vec<f32> = want.iter().map(|&r| s[r] as f32).collect();
                    assert_eq!(&hits.scores[qi * k..][..k], &want_scores[..], "{case}");
                }
            }
        }
    }
}

#[test]
fn graph_rows_are_few_sizes_never_less_and_at_most_half_more() {
    let mut sizes = HashSet::new();
    let mut last = 0;
    for nq in 1..=3 * QUERY_CHUNK {
        let g = graph_rows(nq);
        assert!(g >= nq && g >= last, "{nq} -> {g}");
        // A size is its own: a padded batch is searched as a graph (see `search`).
        assert_eq!(graph_rows(g), g, "{nq} -> {g}");
        // At most half as many again (exact up to 4), so at most a third of a search pads.
        assert!(nq <= 4 && g == nq || 2 * g <= 3 * nq, "{nq} -> {g}");
        if nq <= QUERY_CHUNK {
            sizes.insert(g);
        }
        last = g;
    }
    assert!(sizes.len() <= 24, "{} sizes up to a chunk", sizes.len());
}

/// A search captured as a graph, replayed with new queries in the same buffers, answers
/// what the same search queued call by call answers; one graph for the two.
#[test]
fn a_replayed_search_graph_reads_the_current_queries() {
    let Some(b) = device() else { return };
    let mut rng = Rng::fresh();
    let (n, d, nq, k) = (2 * SEG + 333, 19, 8, 12);
    for precision in [Precision::Fp32, Precision::Fp16] {
        let idx = index(uniform(&mut rng, n * d), n, d, Metric::L2, precision);
        let mut dev = b.load(&idx);
        dev.set_tile_bytes(1);
        let s = &b.stream;
        let mut q: CudaSlice<f32> = s.alloc_zeros(nq * d).unwrap();
        let rows: CudaSlice<i64> = s.alloc_zeros(nq * k).unwrap();
        let scores: CudaSlice<f32> = s.alloc_zeros(nq * k).unwrap();
        let scratch: CudaSlice<u8> = s.alloc_zeros(dev.scratch_bytes(nq, k)).unwrap();
        let args = args(s, &q, nq, k, &scratch, (&rows, &scores));
        for round in 0..3 {
            let queries = uniform(&mut rng, nq * d);
            s.memcpy_htod(&queries, &mut q).unwrap();
            dev.queue_search(s, &args).unwrap();
            let direct = (s.clone_dtoh(&rows).unwrap(), s.clone_dtoh(&scores).unwrap());
            dev.search(s, args).unwrap();
            let graphed = (s.clone_dtoh(&rows).unwrap(), s.clone_dtoh(&scores).unwrap());
            assert_eq!(direct, graphed, "{precision:?} round {round}");
            let hits = Hits {
                k,
                rows: graphed.0,
                scores: graphed.1,
            };
            check("graph", &idx, &queries, &hits, tolerance(precision));
            let g = dev.graphs.lock().unwrap();
            assert!(g.enabled, "capture failed");
            assert_eq!(g.len(), 1);
        }
        // 7 queries is no `graph_rows` size: searched call by call, nothing captured.
        let seven = uniform(&mut rng, 7 * d);
        let hits = b.search(&dev, &seven, 7, k);
        check("uncaptured", &idx, &seven, &hits, tolerance(precision));
        assert_eq!(dev.graphs.lock().unwrap().len(), 1, "{precision:?}");
    }
}

/// Scores in order along the rows (a rising and a falling sawtooth, and all equal): the
/// orders that put a selection block's best values in one thread, or tie every key, for
/// k around the selection's 256 threads. Small integers, exact in every precision.
#[test]
fn ordered_and_equal_scores_are_selected_exactly() {
    let Some(b) = device() else { return };
    let (n, d) = (3 * SEG + 5, 3);
    let rows: Vec<f32> = (0..n).flat_map(|r| [(r % 2048) as f32, 0.0, 1.0]).collect();
    // Rising, falling (a negative query) and flat (scores all equal) for the inner product.
    let queries = [1.0f32, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    for metric in [Metric::Ip, Metric::L2] {
        assert_exact(&b, &rows, d, &queries, metric, &[1, 10, 64, 255, 256, 257]);
    }
}

/// The fused float16 search (fused.cu) against float64, and the same searches two-step, on
/// fresh random data: every kernel shape (16, 32 and 64 queries a block, partial blocks,
/// several blocks), d unaligned (element loads), one chunk of 64 halves and more, a
/// fused tile of one row, one-segment tiles (thresholds carried from tile to tile), k from
/// 1 to FUSED_MAX_K, more queries than a chunk, every metric.
#[test]
fn fused_search_matches_float64_and_the_two_step_search() {
    let Some(b) = device() else { return };
    let mut rng = Rng::fresh();
    use Metric::*;
    // (n, d, nq, k, metric, one segment per tile)
    let cases = [
        (FIRST_ROWS + 1, 128, 2, 10, Ip, false),
        (FIRST_ROWS + 2 * SEG + 77, 17, 5, 1, L2, false),
        (FIRST_ROWS + SEG, 3, 33, FUSED_MAX_K, Cosine, false),
        (3 * SEG + 5, 130, 65, 10, L2, true),
        (50_000, 64, 16, 20, Ip, false),
        (50_000, 72, 130, FUSED_MAX_K, L2, false),
        (FIRST_ROWS + 300, 1, 7, 3, Ip, true),
        (20_000, 16, FUSED_CHUNK + 3, 5, Ip, false),
        (2 * SEG + 1, 40, 32, 7, Cosine, true),
    ];
    for (n, d, nq, k, metric, small) in cases {
        let case = format!("n {n} d {d} nq {nq} k {k} {metric:?} small {small}");
        let idx = index(uniform(&mut rng, n * d), n, d, metric, Precision::Fp16);
        let mut dev = b.load(&idx);
        if dev.fused.is_none() {
            assert!(
                !require_gpu(),
                "NGX_GPU_REQUIRE=1 but the fused kernels did not load"
            );
            eprintln!("skipped: this device does not run the fused kernels");
            return;
        }
        if small {
            dev.set_tile_bytes(1);
        }
        assert!(dev.fuses(nq, k), "{case}: not fused");
        let queries = uniform(&mut rng, nq * d);
        let hits = b.search(&dev, &queries, nq, k);
        let w = check(
            &format!("{case} fused"),
            &idx,
            &queries,
            &hits,
            tolerance(Precision::Fp16),
        );
        dev.set_fused(false);
        let two_step = b.search(&dev, &queries, nq, k);
        check(
            &format!("{case} two-step"),
            &idx,
            &queries,
            &two_step,
            tolerance(Precision::Fp16),
        );
        eprintln!("{case}: largest error {w:.2e}");
    }
    // Past FUSED_MAX_K the float16 search is two-step.
    let idx = index(
        uniform(&mut rng, 50_000 * 8),
        50_000,
        8,
        Ip,
        Precision::Fp16,
    );
    let dev = b.load(&idx);
    assert!(dev.fuses(4, FUSED_MAX_K) && !dev.fuses(4, FUSED_MAX_K + 1));
    // A lone query goes two-step.
    assert!(!dev.fuses(1, 10));
}

#[test]
fn k_out_of_range_is_refused() {
    let Some(b) = device() else { return };
    let idx = index(vec![1.0; 8], 2, 4, Metric::Ip, Precision::Fp32);
    let dev = b.load(&idx);
    for k in [0, MAX_K + 1] {
        let e = dev
            .search(
                &b.stream,
                SearchArgs {
                    queries: 0,
                    nq: 1,
                    k,
                    scratch: 0,
                    rows_out: 0,
                    scores_out: 0,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("k = "), "{e}");
    }
}

/// The kernel-level benchmark: N = 1M, d = 128, k = 10, inner product; queries/s of
/// `search` alone (device data, no HTTP) per precision and batch size.
/// `cargo test --release --lib knn_kernel_benchmark -- --ignored --nocapture`
/// Knobs (environment): KNN_BENCH_N (rows), KNN_BENCH_BATCHES ("1 16 128 1024"),
/// KNN_BENCH_PRECISIONS ("fp32 tf32 fp16"), KNN_BENCH_TILE_MIB (the product block's
/// budget, default TILE_BYTES), KNN_BENCH_STREAMS (searches queued round-robin on this many
/// streams at once, each with its own scratch: what several workers' batches do to the GPU
/// under MPS; default 1), KNN_BENCH_SECS (per cell, default 0.5; 0: one warm-up search and
/// one search, for a profiler), KNN_BENCH_GRAPHS=0 (searches queued call by call; batches
/// that are no `graph_rows` size always are), KNN_BENCH_FUSED=0 (float16 searched
/// two-step).
#[test]
#[ignore]
fn knn_kernel_benchmark() {
    let Some(b) = device() else { return };
    let mut rng = Rng::fresh();
    let (d, k) = (128, 10);
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or(default.to_string());
    let n: usize = env("KNN_BENCH_N", "1000000").parse().unwrap();
    let batches: Vec<usize> = env("KNN_BENCH_BATCHES", "1 16 128 1024")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let precisions: Vec<Precision> = env("KNN_BENCH_PRECISIONS", "fp32 tf32 fp16")
        .split_whitespace()
        .map(|v| Precision::parse(v).unwrap())
        .collect();
    let tile_mib: usize = env("KNN_BENCH_TILE_MIB", &(TILE_BYTES >> 20).to_string())
        .parse()
        .unwrap();
    let streams: usize = env("KNN_BENCH_STREAMS", "1").parse().unwrap();
    let secs: f64 = env("KNN_BENCH_SECS", "0.5").parse().unwrap();
    let streams: Vec<Arc<CudaStream>> = (0..streams.max(1))
        .map(|i| {
            if i == 0 {
                b.stream.clone()
            } else {
                b.stream.context().new_stream().unwrap()
            }
        })
        .collect();
    let mut table = Vec::new();
    for &precision in &precisions {
        let idx = index(uniform(&mut rng, n * d), n, d, Metric::Ip, precision);
        let t = Instant::now();
        let mut dev = b.load(&idx);
        dev.set_tile_bytes(tile_mib << 20);
        dev.graphs.get_mut().unwrap().enabled = env("KNN_BENCH_GRAPHS", "1") != "0";
        dev.set_fused(env("KNN_BENCH_FUSED", "1") != "0");
        let load = t.elapsed().as_secs_f64();
        // Which batches take the fused path (a lone float16 query does not).
        let fused: Vec<usize> = batches
            .iter()
            .copied()
            .filter(|&nq| dev.fuses(nq.max(1), k))
            .collect();
        let mut line = format!("| {precision:?} (fused at {fused:?}) | {load:.2} s |");
        for &nq in &batches {
            let s0 = &b.stream;
            let q: CudaSlice<f32> = s0.clone_htod(&uniform(&mut rng, nq * d)).unwrap();
            // Per stream: results and scratch of its own.
            let bufs: Vec<(CudaSlice<i64>, CudaSlice<f32>, CudaSlice<u8>)> = streams
                .iter()
                .map(|_| {
                    (
                        s0.alloc_zeros(nq * k).unwrap(),
                        s0.alloc_zeros(nq * k).unwrap(),
                        s0.alloc_zeros(dev.scratch_bytes(nq, k)).unwrap(),
                    )
                })
                .collect();
            s0.synchronize().unwrap();
            let run = |times: usize| {
                let t = Instant::now();
                for i in 0..times {
                    let j = i % streams.len();
                    let (s, (r, sc, scratch)) = (&streams[j], &bufs[j]);
                    dev.search(s, args(s, &q, nq, k, scratch, (r, sc))).unwrap();
                }
                for s in &streams {
                    s.synchronize().unwrap();
                }
                t.elapsed().as_secs_f64()
            };
            run(streams.len());
            if secs <= 0.0 {
                run(1);
                line += " - |";
                continue;
            }
            let once = run(streams.len()).max(1e-6) / streams.len() as f64;
            let times = ((secs / once) as usize).clamp(3 * streams.len(), 20000);
            let took = run(times);
            let qps = (nq * times) as f64 / took;
            eprintln!(
                "{precision:?} batch {nq} x {} streams, tile {tile_mib} MiB: {:.1} us per \
                 search, {qps:.0} queries/s, scratch {} MiB",
                streams.len(),
                took / times as f64 * 1e6,
                dev.scratch_bytes(nq, k) >> 20
            );
            line += &format!(" {qps:.0} |");
        }
        if secs <= 0.0 {
            table.push(line);
            continue;
        }
        // Accuracy at this size: 8 queries against float64.
        let queries = uniform(&mut rng, 8 * d);
        let hits = b.search(&dev, &queries, 8, k);
        let (mut found, mut worst) = (0, 0.0f64);
        for (qi, q) in queries.chunks(d).enumerate() {
            let s = scores64(&idx, q);
            let want = best(idx.metric, &s, k);
            let got = &hits.rows[qi * k..][..k];
            found += want.iter().filter(|&&r| got.contains(&(r as i64))).count();
            let scale = dot64(q, q).sqrt() * (d as f64 / 3.0).sqrt();
            for (i, &r) in want.iter().enumerate() {
                worst = worst.max((f64::from(hits.scores[qi * k + i]) - s[r]).abs() / scale);
            }
        }
        line += &format!(" {:.3} | {worst:.1e} |", found as f64 / (8 * k) as f64);
        table.push(line);
    }
    println!(
        "\nknn search alone, N = {n}, d = {d}, k = {k}, inner product, {} stream(s), tile \
         {tile_mib} MiB ({})",
        streams.len(),
        b.gpu.info
    );
    let heads: String = batches.iter().map(|nq| format!(" batch {nq} |")).collect();
    println!("| precision | index load |{heads} recall@{k} | score error / (|q| rms|x|) |");
    println!("|---|---|{}---|---|", "---|".repeat(batches.len()));
    for l in table {
        println!("{l}");
    }
}

#[test]
fn a_missing_libcublas_is_detected_without_a_panic() {
    // Where no CUDA is installed this answers false; on the GPU machine, true.
    let present = cublas_present();
    assert!(
        present || !require_gpu(),
        "NGX_GPU_REQUIRE=1 but libcublas is missing"
    );
    eprintln!("libcublas present: {present}");
}

/// A few small searches that cover every path (several tiles, reduction rounds, k beyond
/// the index, fp16, every fused shape): quick enough for compute-sanitizer's memcheck and racecheck.
#[test]
fn small_searches_cover_every_path() {
    let Some(b) = device() else { return };
    let mut rng = Rng::fresh();
    use Metric::*;
    use Precision::*;
    for (n, d, nq, k, metric, precision, small) in [
        (SEG + 1, 7, 3, 10, L2, Fp32, true),
        (3 * SEG - 7, 5, 2, MAX_K, Ip, Fp32, false),
        (100, 3, 2, 150, Cosine, Fp16, false),
        (FIRST_ROWS + SEG + 3, 9, 40, 10, L2, Fp16, false),
        (2 * SEG + 3, 8, 20, 5, Ip, Fp16, true),
        (FIRST_ROWS + SEG + 3, 9, 12, 10, L2, Fp16, false),
    ] {
        let case = format!("n {n} d {d} nq {nq} k {k} {metric:?} {precision:?} small {small}");
        let idx = index(uniform(&mut rng, n * d), n, d, metric, precision);
        let mut dev = b.load(&idx);
        if small {
            dev.set_tile_bytes(1);
        }
        let queries = uniform(&mut rng, nq * d);
        let hits = b.search(&dev, &queries, nq, k);
        check(&case, &idx, &queries, &hits, tolerance(precision));
    }
}

#[test]
fn stored_layout_and_content_keys() {
    let mut rng = Rng::fresh();
    let (n, d) = (4097, 33);
    let rows = uniform(&mut rng, n * d);
    let of = |metric, precision| Stored::of(&index(rows.clone(), n, d, metric, precision));
    assert_eq!(
        of(Metric::Ip, Precision::Fp32),
        Stored {
            bytes: n * d * 4,
            norms: None
        }
    );
    assert_eq!(
        of(Metric::Cosine, Precision::Fp16),
        Stored {
            bytes: n * d * 2,
            norms: None
        }
    );
    let l2 = of(Metric::L2, Precision::Fp16);
    let at = l2.norms.unwrap();
    assert!(
        at >= n * d * 2 && at % 256 == 0 && at < n * d * 2 + 256,
        "{l2:?}"
    );
    assert_eq!(l2.bytes, at + n * 4);
    // The digest is blake3 of the float32 rows' little-endian bytes (computed here apart).
    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    let digest = index_digest(&rows);
    assert_eq!(digest, *blake3::hash(&bytes).as_bytes());
    let mut flipped = rows.clone();
    flipped[n * d - 1] = f32::from_bits(flipped[n * d - 1].to_bits() ^ 1);
    assert_ne!(index_digest(&flipped), digest);
    // The content key changes with whatever changes what is stored, and only then.
    let key = |metric, precision, n: usize, digest: &[u8; 32]| {
        content_key(
            &index(rows[..n * d].to_vec(), n, d, metric, precision),
            digest,
        )
    };
    let base = key(Metric::Ip, Precision::Fp32, n, &digest);
    assert_eq!(base, key(Metric::Ip, Precision::Fp32, n, &digest));
    for other in [
        key(Metric::L2, Precision::Fp32, n, &digest),
        key(Metric::Ip, Precision::Fp16, n, &digest),
        key(Metric::Ip, Precision::Tf32, n, &digest),
        key(Metric::Ip, Precision::Fp32, n - 1, &digest),
        key(Metric::Ip, Precision::Fp32, n, &index_digest(&flipped)),
    ] {
        assert_ne!(other, base);
    }
}

#[test]
fn a_shared_index_is_made_once_imported_after_and_searches_as_a_copy_of_its_own() {
    let Some(b) = device() else { return };
    let dir = std::env::temp_dir().join(format!("ngx-gpu-share-test.{}", std::process::id()));
    crate::gpu::shared::set_dir(dir.clone());
    let mut rng = Rng::fresh();
    for (metric, precision) in [
        (Metric::Ip, Precision::Fp32),
        (Metric::L2, Precision::Fp16),
        (Metric::Cosine, Precision::Tf32),
        (Metric::L2, Precision::Fp32),
    ] {
        let (n, d, nq, k) = (9000, 37, 5, 17);
        let idx = index(uniform(&mut rng, n * d), n, d, metric, precision);
        // A digest of this test's own making, so that runs never meet an earlier one.
        let mut digest = index_digest(&idx.rows);
        digest[..8].copy_from_slice(&rng.next().to_le_bytes());
        let load = |share: Option<(&str, &[u8; 32])>| {
            let Loader::Device(mut l) = b.gpu.loader(&b.compiled) else {
                unreachable!()
            };
            let dev = DeviceIndex::load(&mut l, &idx, share).unwrap();
            (dev, l.notes.clone())
        };
        let (own, notes) = load(None);
        assert!(notes.is_empty(), "{notes:?}");
        let (first, notes) = load(Some(("m", &digest)));
        assert!(
            notes.len() == 1 && notes[0].contains("uploaded by this worker"),
            "{notes:?}"
        );
        let (second, notes) = load(Some(("m", &digest)));
        assert!(
            notes.len() == 1 && notes[0].contains("imported from another worker"),
            "{notes:?}"
        );
        let queries = uniform(&mut rng, nq * d);
        let want = b.search(&own, &queries, nq, k);
        assert_eq!(
            b.search(&first, &queries, nq, k),
            want,
            "{metric:?} {precision:?}"
        );
        // The first holder goes: the memory stays with the second.
        drop(first);
        assert_eq!(
            b.search(&second, &queries, nq, k),
            want,
            "{metric:?} {precision:?}"
        );
    }
    crate::gpu::rendezvous::remove_dir(&dir);
}
