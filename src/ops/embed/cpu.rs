//! The encoder's forward pass on the CPU, in float32: the fallback without a GPU and the
//! reference the device is tested against. Each text runs alone at its own length, which
//! is what the device's padding mask computes for a padded batch.

use super::files::{Activation, Pooling};
use super::weights::{Linear, Norm};
use super::{EmbedModel, Encoded};

extern "C" {
    // The C library's double-precision error function (libm, which std links).
    fn erf(x: f64) -> f64;
}

/// `y[r] = x[r] W^T + b` for each of the `rows` rows of `x`.
fn linear(x: &[f32], rows: usize, l: &Linear, y: &mut Vec<f32>) {
    let (inp, out) = (l.inp, l.out);
    y.clear();
    y.resize(rows * out, 0.0);
    // Four rows of W against one row of x at a time (each x row is read once per four
    // outputs); blocks of 64 rows of W stay in cache across the rows of x.
    for o0 in (0..out).step_by(64) {
        let o1 = (o0 + 64).min(out);
        for r in 0..rows {
            let xr = &x[r * inp..][..inp];
            let yr = &mut y[r * out..][..out];
            let mut o = o0;
            while o + 4 <= o1 {
                let w = |k: usize| &l.w[(o + k) * inp..][..inp];
                let d = dot4(xr, [w(0), w(1), w(2), w(3)]);
                for k in 0..4 {
                    yr[o + k] = d[k] + l.b[o + k];
                }
                o += 4;
            }
            for (o, y) in yr.iter_mut().enumerate().take(o1).skip(o) {
                *y = dot(xr, &l.w[o * inp..][..inp]) + l.b[o];
            }
        }
    }
}

/// Dot products of `x` with four rows, in eight independent lanes each (vectorized).
fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let n = x.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let xs = &x[i..i + 8];
        for k in 0..4 {
            let ws = &w[k][i..i + 8];
            for j in 0..8 {
                acc[k][j] += xs[j] * ws[j];
            }
        }
    }
    let mut out = [0f32; 4];
    for k in 0..4 {
        out[k] = acc[k].iter().sum::<f32>()
            + x[n..]
                .iter()
                .zip(&w[k][n..])
                .map(|(a, b)| a * b)
                .sum::<f32>();
    }
    out
}

fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = x.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        for j in 0..8 {
            acc[j] += x[i + j] * w[i + j];
        }
    }
    acc.iter().sum::<f32>() + x[n..].iter().zip(&w[n..]).map(|(a, b)| a * b).sum::<f32>()
}

/// Layer norm of each row of `x` (width `n.g.len()`) in place.
fn layer_norm(x: &mut [f32], n: &Norm, eps: f32) {
    let h = n.g.len();
    for row in x.chunks_exact_mut(h) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (i, v) in row.iter_mut().enumerate() {
            *v = ((*v as f64 - mean) * inv) as f32 * n.g[i] + n.b[i];
        }
    }
}

pub fn activate(act: Activation, x: f32) -> f32 {
    match act {
        // SAFETY: erf is a pure function of its argument.
        Activation::Gelu => {
            (0.5 * x as f64 * (1.0 + unsafe { erf(x as f64 / std::f64::consts::SQRT_2) })) as f32
        }
        Activation::GeluTanh => {
            let x = x as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
        }
        Activation::Relu => x.max(0.0),
    }
}

/// One text's embedding: the encoder, pooling, and normalization where configured.
pub fn embed(m: &EmbedModel, e: &Encoded) -> Vec<f32> {
    let a = &m.arch;
    let w = &m.weights;
    let (h, n) = (a.hidden, e.ids.len().min(m.max_tokens));
    if n == 0 {
        return vec![0.0; h];
    }
    // Embeddings. Ids outside the tables (only a hand-made Encoded can hold them) are
    // clamped, as the device does.
    let mut x = vec![0f32; n * h];
    for t in 0..n {
        let id = (e.ids[t] as usize).min(a.vocab - 1);
        let ty = (e.type_ids.get(t).copied().unwrap_or(0) as usize).min(a.type_vocab - 1);
        let pos = t + a.position_offset;
        let row = &mut x[t * h..][..h];
        for (i, v) in row.iter_mut().enumerate() {
            *v = w.word[id * h + i] + w.position[pos * h + i] + w.token_type[ty * h + i];
        }
    }
    layer_norm(&mut x, &w.emb_norm, a.eps);

    let (heads, dh) = (a.heads, a.hidden / a.heads);
    let scale = 1.0 / (dh as f32).sqrt();
    let (mut qkv, mut ctx, mut tmp, mut ffn) =
        (Vec::new(), vec![0f32; n * h], Vec::new(), Vec::new());
    let mut scores = vec![0f32; n];
    for l in &w.layers {
        linear(&x, n, &l.qkv, &mut qkv);
        for hd in 0..heads {
            for i in 0..n {
                let q = &qkv[i * 3 * h + hd * dh..][..dh];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let k = &qkv[j * 3 * h + h + hd * dh..][..dh];
                    *s = dot(q, k) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let out = &mut ctx[i * h + hd * dh..][..dh];
                out.fill(0.0);
                for (j, s) in scores.iter().enumerate() {
                    let v = &qkv[j * 3 * h + 2 * h + hd * dh..][..dh];
                    let p = s / sum;
                    for d in 0..dh {
                        out[d] += p * v[d];
                    }
                }
            }
        }
        linear(&ctx, n, &l.attn_out, &mut tmp);
        for (t, xv) in tmp.iter_mut().zip(&x) {
            *t += xv;
        }
        layer_norm(&mut tmp, &l.attn_norm, a.eps);
        std::mem::swap(&mut x, &mut tmp);
        linear(&x, n, &l.ffn_in, &mut ffn);
        for v in ffn.iter_mut() {
            *v = activate(a.act, *v);
        }
        linear(&ffn, n, &l.ffn_out, &mut tmp);
        for (t, xv) in tmp.iter_mut().zip(&x) {
            *t += xv;
        }
        layer_norm(&mut tmp, &l.ffn_norm, a.eps);
        std::mem::swap(&mut x, &mut tmp);
    }

    let mut out = match m.pooling {
        Pooling::Cls => x[..h].to_vec(),
        Pooling::Mean => {
            let mut s = vec![0f64; h];
            for row in x.chunks_exact(h) {
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += v as f64;
                }
            }
            s.iter().map(|&v| (v / n as f64) as f32).collect()
        }
    };
    if m.normalize {
        normalize(&mut out);
    }
    out
}

/// Scales `v` to length 1 (as torch's normalize: a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    let d = norm.max(1e-12);
    for x in v.iter_mut() {
        *x = (*x as f64 / d) as f32;
    }
}
