//! A knn index as loaded: row-major vectors, the metric they are compared by, the precision
//! the device keeps them in, and the external ids of the rows.

/// How a query is compared with a row. Scores are "best first": largest first for `Ip` and
/// `Cosine`, smallest first for `L2` (the squared Euclidean distance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Inner product `q . x`.
    Ip,
    /// Cosine similarity: rows are normalized when loaded, queries when searched.
    Cosine,
    /// Squared L2 distance `|q - x|^2`.
    L2,
}

/// What the device computes the product in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// float32 inputs, float32 products (no TF32).
    Fp32,
    /// float32 inputs, TF32 tensor cores (10-bit mantissa products, float32 sums).
    Tf32,
    /// float16 rows and queries, float32 sums, on tensor cores.
    Fp16,
}

/// The rows of an index, as the device and the CPU path search them.
pub struct Index {
    /// Number of rows and their dimension.
    pub n: usize,
    pub d: usize,
    /// `n * d` values, row-major. Rows of a float16 file are widened to f32 here (exactly);
    /// for `Cosine` the rows are already normalized.
    pub rows: Vec<f32>,
    pub metric: Metric,
    pub precision: Precision,
    /// External ids of the rows (`ids=` file); row numbers where absent.
    pub ids: Option<Vec<i64>>,
}

/// The result of a search of `nq` queries: for query `q`, `ids[q*k..][..k]` (row numbers,
/// not external ids) and their `scores`, best first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hits {
    pub k: usize,
    pub rows: Vec<i64>,
    pub scores: Vec<f32>,
}
