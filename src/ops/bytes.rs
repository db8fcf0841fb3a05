//! For ops over raw bytes: items packed back to back in the staged data, each at an aligned
//! offset, read from the request bodies (memory or temp file) into pinned staging.

use super::{Item, Layout, Placed};
use crate::engine::job::JobError;

/// Each item starts at a multiple of this in the staged data (16-byte vector loads, and
/// room for a kernel to read whole words).
pub const ALIGN: u64 = 64;

pub fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Items back to back, aligned; outputs where `out(len)` puts them (`None`: no per-item
/// output region).
pub fn layout(items: &[Item], out: Option<&dyn Fn(u64) -> u64>) -> Layout {
    let mut l = Layout::default();
    let (mut at, mut out_at) = (0u64, 0u64);
    for it in items {
        let len = it.piece.len;
        let cap = out.map_or(0, |f| f(len));
        l.items.push(Placed {
            data_off: at,
            len,
            out_off: out_at,
            out_cap: cap,
        });
        at += align(len);
        out_at += align(cap);
    }
    l.data_len = at as usize;
    l.out_len = out_at as usize;
    l
}

/// Copies every item's bytes to its place in `data`; items whose body cannot be read are
/// returned with the error.
pub fn pack(items: &[Item], layout: &Layout, data: &mut [u8]) -> Vec<(usize, JobError)> {
    let mut failed = Vec::new();
    for (i, (it, p)) in items.iter().zip(&layout.items).enumerate() {
        let dst = &mut data[p.data_off as usize..(p.data_off + p.len) as usize];
        if let Err(e) = it.body.read_range_into(it.piece.offset, dst) {
            failed.push((
                i,
                JobError::Internal(format!("reading the request body: {e}")),
            ));
        }
    }
    failed
}

/// Item `i`'s bytes in the staged data.
pub fn data_of<'d>(layout: &Layout, i: usize, data: &'d [u8]) -> &'d [u8] {
    let p = &layout.items[i];
    &data[p.data_off as usize..(p.data_off + p.len) as usize]
}
