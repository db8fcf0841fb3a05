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

/// The most rows and the largest dimension an index may have (row numbers are i64 on the
/// wire, offsets are usize here; d bounds one query's bytes).
pub const MAX_ROWS: usize = 1 << 31;
pub const MAX_DIM: usize = 65536;

impl Metric {
    pub fn parse(v: &str) -> Option<Metric> {
        match v {
            "ip" => Some(Metric::Ip),
            "cosine" => Some(Metric::Cosine),
            "l2" => Some(Metric::L2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Ip => "ip",
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
        }
    }
}

impl Precision {
    pub fn parse(v: &str) -> Option<Precision> {
        match v {
            "fp32" => Some(Precision::Fp32),
            "tf32" => Some(Precision::Tf32),
            "fp16" => Some(Precision::Fp16),
            _ => None,
        }
    }
}

impl Index {
    /// Loads `path` (a 2-D C-order float32 or float16 `.npy`) and, if given, `ids` (a 1-D
    /// int64 `.npy` of one id per row). `precision` defaults to the file's own (fp32 for
    /// float32, fp16 for float16). Errors name the file and the problem.
    pub fn load(
        path: &str,
        metric: Metric,
        precision: Option<Precision>,
        ids: Option<&str>,
    ) -> Result<Index, String> {
        let rows_file = npy::open(path)?;
        let (n, d) = match rows_file.shape[..] {
            [n, d] => (n, d),
            _ => {
                return Err(format!(
                    "index \"{path}\" has shape {:?}: a knn index is 2-D (rows, dimension)",
                    rows_file.shape
                ))
            }
        };
        if n == 0 || d == 0 {
            return Err(format!("index \"{path}\" is empty (shape ({n}, {d}))"));
        }
        if n > MAX_ROWS || d > MAX_DIM {
            return Err(format!(
                "index \"{path}\" has shape ({n}, {d}): at most {MAX_ROWS} rows of at most {MAX_DIM} values"
            ));
        }
        let (mut rows, file_precision) = match rows_file.dtype {
            npy::Dtype::F32 => (rows_file.read_f32(path)?, Precision::Fp32),
            npy::Dtype::F16 => (rows_file.read_f16(path)?, Precision::Fp16),
            other => {
                return Err(format!(
                    "index \"{path}\" holds {}: a knn index is float32 or float16",
                    other.name()
                ))
            }
        };
        if let Some(at) = rows.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "index \"{path}\" holds a NaN or infinite value in row {}",
                at / d
            ));
        }
        if metric == Metric::Cosine {
            for row in rows.chunks_exact_mut(d) {
                normalize(row);
            }
        }
        let ids = match ids {
            None => None,
            Some(ids_path) => {
                let f = npy::open(ids_path)?;
                if f.dtype != npy::Dtype::I64 {
                    return Err(format!(
                        "ids \"{ids_path}\" hold {}: ids are int64",
                        f.dtype.name()
                    ));
                }
                if f.shape.len() != 1 || f.shape[0] != n {
                    return Err(format!(
                        "ids \"{ids_path}\" have shape {:?}: expected ({n},), one id per row of \"{path}\"",
                        f.shape
                    ));
                }
                Some(f.read_i64(ids_path)?)
            }
        };
        Ok(Index {
            n,
            d,
            rows,
            metric,
            precision: precision.unwrap_or(file_precision),
            ids,
        })
    }

    /// The external id of row `row`.
    pub fn id_of(&self, row: i64) -> i64 {
        match &self.ids {
            Some(ids) => ids[row as usize],
            None => row,
        }
    }
}

/// Scales `v` to unit length (in f64); a zero vector stays zero.
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (*x as f64 / norm) as f32;
        }
    }
}

/// IEEE half to single precision (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24, normalized for f32.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Reading `.npy` files (format versions 1 to 3): the header's dtype, order and shape are
/// checked before any data is read, and the data length against the file's size.
pub mod npy {
    use std::fs::File;
    use std::io::{BufReader, Read, Seek, SeekFrom};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Dtype {
        F32,
        F16,
        I64,
        /// Any other `descr`, kept for the message.
        Other(&'static str),
    }

    impl Dtype {
        pub fn name(self) -> &'static str {
            match self {
                Dtype::F32 => "float32",
                Dtype::F16 => "float16",
                Dtype::I64 => "int64",
                Dtype::Other(s) => s,
            }
        }

        fn size(self) -> usize {
            match self {
                Dtype::F32 => 4,
                Dtype::F16 => 2,
                Dtype::I64 => 8,
                Dtype::Other(_) => 0,
            }
        }
    }

    /// An opened `.npy`: its header, and the reader positioned at the data.
    pub struct NpyFile {
        pub dtype: Dtype,
        pub shape: Vec<usize>,
        reader: BufReader<File>,
        data_len: u64,
    }

    pub fn open(path: &str) -> Result<NpyFile, String> {
        let file = File::open(path).map_err(|e| format!("cannot open \"{path}\": {e}"))?;
        let size = file
            .metadata()
            .map_err(|e| format!("cannot read \"{path}\": {e}"))?
            .len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let bad = |why: &str| format!("\"{path}\" is not a valid .npy file: {why}");
        let mut magic = [0u8; 8];
        reader
            .read_exact(&mut magic)
            .map_err(|_| bad("too short for the magic string"))?;
        if &magic[..6] != b"\x93NUMPY" {
            return Err(bad("no .npy magic string"));
        }
        let header_len = match magic[6] {
            1 => {
                let mut b = [0u8; 2];
                reader
                    .read_exact(&mut b)
                    .map_err(|_| bad("truncated header"))?;
                u16::from_le_bytes(b) as u64
            }
            2 | 3 => {
                let mut b = [0u8; 4];
                reader
                    .read_exact(&mut b)
                    .map_err(|_| bad("truncated header"))?;
                u32::from_le_bytes(b) as u64
            }
            v => return Err(bad(&format!("unknown format version {v}"))),
        };
        let prelude = if magic[6] == 1 { 10 } else { 12 };
        if header_len > 1 << 20 || prelude + header_len > size {
            return Err(bad("truncated header"));
        }
        let mut header = vec![0u8; header_len as usize];
        reader
            .read_exact(&mut header)
            .map_err(|_| bad("truncated header"))?;
        let header = String::from_utf8(header).map_err(|_| bad("header is not text"))?;
        let (dtype, fortran, shape) = parse_header(&header).map_err(|e| bad(&e))?;
        if fortran {
            return Err(format!(
                "\"{path}\" is in Fortran order: save it in C order (numpy.ascontiguousarray)"
            ));
        }
        let data_len = size - prelude - header_len;
        let count = shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| bad("shape too large"))?;
        if dtype.size() > 0 {
            let want = (count as u64).saturating_mul(dtype.size() as u64);
            if data_len < want {
                return Err(format!(
                    "\"{path}\" is truncated: {data_len} bytes of data where shape {shape:?} of {} needs {want}",
                    dtype.name()
                ));
            }
            if data_len > want {
                return Err(format!(
                    "\"{path}\" has {} bytes after the data of shape {shape:?}",
                    data_len - want
                ));
            }
        }
        reader
            .seek(SeekFrom::Start(prelude + header_len))
            .map_err(|e| format!("cannot read \"{path}\": {e}"))?;
        Ok(NpyFile {
            dtype,
            shape,
            reader,
            data_len,
        })
    }

    impl NpyFile {
        fn read_bytes<const W: usize, T>(
            mut self,
            path: &str,
            conv: impl Fn([u8; W]) -> T,
        ) -> Result<Vec<T>, String> {
            let count = (self.data_len as usize) / W;
            let mut out = Vec::with_capacity(count);
            let mut buf = vec![0u8; (1 << 20) / W * W];
            let mut left = count * W;
            while left > 0 {
                let take = left.min(buf.len());
                self.reader
                    .read_exact(&mut buf[..take])
                    .map_err(|e| format!("cannot read \"{path}\": {e}"))?;
                out.extend(
                    buf[..take]
                        .chunks_exact(W)
                        .map(|c| conv(c.try_into().expect("W bytes"))),
                );
                left -= take;
            }
            Ok(out)
        }

        pub fn read_f32(self, path: &str) -> Result<Vec<f32>, String> {
            self.read_bytes(path, f32::from_le_bytes)
        }

        pub fn read_f16(self, path: &str) -> Result<Vec<f32>, String> {
            self.read_bytes(path, |b| super::f16_to_f32(u16::from_le_bytes(b)))
        }

        pub fn read_i64(self, path: &str) -> Result<Vec<i64>, String> {
            self.read_bytes(path, i64::from_le_bytes)
        }
    }

    /// The header dict: `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
    fn parse_header(h: &str) -> Result<(Dtype, bool, Vec<usize>), String> {
        let value = |key: &str| -> Result<&str, String> {
            let at = h
                .find(&format!("'{key}'"))
                .ok_or_else(|| format!("header has no '{key}'"))?;
            let rest = h[at + key.len() + 2..].trim_start();
            rest.strip_prefix(':')
                .map(str::trim_start)
                .ok_or_else(|| format!("header's '{key}' has no value"))
        };
        let descr = value("descr")?;
        let descr = descr
            .strip_prefix('\'')
            .and_then(|d| d.split_once('\''))
            .map(|(d, _)| d)
            .ok_or("header's 'descr' is not a simple dtype string")?;
        let dtype = match descr {
            "<f4" => Dtype::F32,
            "<f2" => Dtype::F16,
            "<i8" => Dtype::I64,
            ">f4" | ">f2" | ">i8" => Dtype::Other("big-endian data"),
            "<f8" => Dtype::Other("float64"),
            "<i4" => Dtype::Other("int32"),
            "|u1" => Dtype::Other("uint8"),
            _ => Dtype::Other("an unsupported dtype"),
        };
        let fortran = value("fortran_order")?;
        let fortran = if fortran.starts_with("False") {
            false
        } else if fortran.starts_with("True") {
            true
        } else {
            return Err("header's 'fortran_order' is not True or False".into());
        };
        let shape = value("shape")?;
        let inner = shape
            .strip_prefix('(')
            .and_then(|s| s.split_once(')'))
            .map(|(s, _)| s)
            .ok_or("header's 'shape' is not a tuple")?;
        let shape = inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('L').parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "header's 'shape' is not a tuple of sizes".to_string())?;
        Ok((dtype, fortran, shape))
    }
}
