//! The test device's staged input for the ops that embed (`embeddings`, KServe embed models,
//! `search`): with no GPU the batch runs through the CPU path but is packed and cut as on
//! the device. Per text: its token count, its ids, its type ids (a missing type id is 0),
//! each a little-endian u32; texts longer than `max` tokens are cut there.

use super::Encoded;

/// The bytes `pack` writes for `texts`.
pub fn bytes(texts: &[&Encoded], max: usize) -> usize {
    texts.iter().map(|e| 4 + 8 * e.ids.len().min(max)).sum()
}

/// Writes `texts` at the start of `data` (at least `bytes(texts, max)` long).
pub fn pack(texts: &[&Encoded], max: usize, data: &mut [u8]) {
    let mut at = 0;
    let mut put = |v: u32| {
        data[at..at + 4].copy_from_slice(&v.to_le_bytes());
        at += 4;
    };
    for e in texts {
        let k = e.ids.len().min(max);
        put(k as u32);
        e.ids[..k].iter().for_each(|&v| put(v));
        (0..k).for_each(|i| put(e.type_ids.get(i).copied().unwrap_or(0)));
    }
}

/// The `n` texts `pack` wrote.
pub fn unpack(data: &[u8], n: usize) -> Vec<Encoded> {
    let word = |i: usize| u32::from_le_bytes(data[4 * i..4 * i + 4].try_into().expect("4"));
    let mut texts = Vec::with_capacity(n);
    let mut w = 0;
    for _ in 0..n {
        let k = word(w) as usize;
        texts.push(Encoded {
            ids: (0..k).map(|i| word(w + 1 + i)).collect(),
            type_ids: (0..k).map(|i| word(w + 1 + k + i)).collect(),
            truncated: false,
        });
        w += 1 + 2 * k;
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// Random texts (empty, one token, over `max`, type ids missing) come back as packed:
    /// cut at `max`, missing type ids as 0, and `bytes` is exactly what was written.
    #[test]
    fn texts_come_back_cut_at_max_tokens() {
        let mut rng = Rng::fresh();
        for max in [1usize, 7, 512] {
            let texts: Vec<Encoded> = (0..9)
                .map(|i| {
                    let len = [0, 1, max, max + 1, 2 * max + 3][i % 5] + rng.below(3) as usize;
                    let ids: Vec<u32> = (0..len).map(|_| rng.next() as u32).collect();
                    let types = if i % 2 == 0 { len } else { len / 2 };
                    Encoded {
                        type_ids: (0..types).map(|_| rng.below(2) as u32).collect(),
                        ids,
                        truncated: false,
                    }
                })
                .collect();
            let refs: Vec<&Encoded> = texts.iter().collect();
            let n = bytes(&refs, max);
            let mut data = vec![0xa5u8; n + 8];
            pack(&refs, max, &mut data);
            assert!(data[n..].iter().all(|&b| b == 0xa5), "wrote past bytes()");
            let back = unpack(&data, texts.len());
            for (e, b) in texts.iter().zip(&back) {
                let k = e.ids.len().min(max);
                assert_eq!(b.ids, e.ids[..k]);
                let want: Vec<u32> = (0..k).map(|i| *e.type_ids.get(i).unwrap_or(&0)).collect();
                assert_eq!(b.type_ids, want);
            }
        }
    }
}
