//! The exact search on the CPU: every row scored in f64, the best `k` kept, ties broken by
//! the lower row number. The fallback, and the reference the device path is tested against.

use super::index::{normalize, Hits, Index, Metric};

/// Searches `queries` (`nq * d` values, row-major, not normalized) for their `k` best rows.
/// `k` larger than the index's rows gives `n` hits per query (see `hits_k`).
pub fn search(index: &Index, queries: &[f32], k: usize) -> Hits {
    let d = index.d;
    assert_eq!(queries.len() % d, 0, "queries are whole rows");
    let k = hits_k(index, k);
    let nq = queries.len() / d;
    let mut hits = Hits {
        k,
        rows: Vec::with_capacity(nq * k),
        scores: Vec::with_capacity(nq * k),
    };
    let mut q = vec![0f32; d];
    let mut scored: Vec<(f64, i64)> = Vec::with_capacity(index.n);
    for query in queries.chunks_exact(d) {
        q.copy_from_slice(query);
        if index.metric == Metric::Cosine {
            normalize(&mut q);
        }
        scored.clear();
        for (row, x) in index.rows.chunks_exact(d).enumerate() {
            let s = score(index.metric, &q, x);
            // Sorted ascending by key: the best score has the smallest key.
            let key = if index.metric == Metric::L2 { s } else { -s };
            scored.push((key, row as i64));
        }
        let better = |a: &(f64, i64), b: &(f64, i64)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if k < scored.len() {
            scored.select_nth_unstable_by(k - 1, better);
            scored.truncate(k);
        }
        scored.sort_unstable_by(better);
        for &(key, row) in &scored {
            hits.rows.push(row);
            let s = if index.metric == Metric::L2 {
                key
            } else {
                -key
            };
            hits.scores.push(s as f32);
        }
    }
    hits
}

/// Hits per query for a request of `k`: `k`, or the index's row count if that is smaller.
pub fn hits_k(index: &Index, k: usize) -> usize {
    k.min(index.n)
}

/// One query against one row, in f64.
fn score(metric: Metric, q: &[f32], x: &[f32]) -> f64 {
    match metric {
        Metric::Ip | Metric::Cosine => q.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum(),
        Metric::L2 => q
            .iter()
            .zip(x)
            .map(|(&a, &b)| {
                let t = a as f64 - b as f64;
                t * t
            })
            .sum(),
    }
}
