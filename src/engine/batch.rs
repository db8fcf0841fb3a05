//! Forming batches: the GPU thread's queue of waiting requests, one FIFO per op instance
//! (a `gpu_process` location: two locations never share a batch), and the rules that cut
//! it into batches (`gpu_batch_size`, `gpu_batch_delay`, `gpu_batch_bytes`).
//!
//! Pure bookkeeping, no CUDA: the same batches are formed whether they then run on the
//! GPU or on the CPU fallback, so the CPU tests exercise exactly this logic.
//!
//! For ops that allow it (`Op::splittable`), a body larger than the piece length (the
//! largest power of two, in 1 KiB units, not over the byte bound) is cut into pieces at
//! multiples of the piece length; after each piece the rest of the body goes to the back of
//! its op's queue, so small requests behind a huge one get into the next batch instead of
//! waiting for the whole body (`echo` copies each piece to its place; for `blake3` an
//! aligned power-of-two run of chunks is a complete BLAKE3 subtree, whose chaining values
//! are merged at the end). Other ops' bodies go whole; one larger than the byte bound is a
//! batch of its own.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use crate::engine::job::Batching;

/// Identifies an op instance (a `gpu_process` location) in a configuration.
pub type OpKey = usize;

/// Each piece starts at a multiple of this in the staging buffer (16-byte vector loads).
pub const STAGE_ALIGN: u64 = 64;
/// The smallest byte bound: a piece is a whole number of BLAKE3 chunks.
pub const MIN_BATCH_BYTES: u64 = 64 * 1024;

pub fn align(n: u64) -> u64 {
    n.div_ceil(STAGE_ALIGN) * STAGE_ALIGN
}

/// One contiguous part of one request's body, processed in one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub id: u64,
    /// Where the piece starts in the body.
    pub offset: u64,
    pub len: u64,
    /// The piece's number in its body (`offset / piece_len`).
    pub index: u32,
    /// The whole body is this one piece.
    pub whole: bool,
}

#[derive(Debug)]
pub struct Batch {
    pub op: OpKey,
    pub pieces: Vec<Piece>,
}

impl Batch {
    /// Staging bytes the batch needs: every piece at an aligned offset.
    pub fn staged_len(&self) -> u64 {
        self.pieces.iter().map(|p| align(p.len)).sum()
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    queued_at: Instant,
    batching: Batching,
    len: u64,
    /// First byte not yet handed to a batch.
    next: u64,
    /// The body may be cut into pieces.
    split: bool,
    /// For decoded requests: their rows, and the most rows a batch they open may take
    /// (`Op::max_rows`). Raw bodies: 0 and no limit.
    rows: usize,
    max_rows: usize,
}

pub struct Queue {
    /// One FIFO per op instance.
    fifos: BTreeMap<OpKey, VecDeque<Entry>>,
    max_bytes: u64,
    piece_len: u64,
    waiting: usize,
}

/// The largest power of two (times 1 KiB) not over `max_bytes`.
pub fn piece_len(max_bytes: u64) -> u64 {
    let chunks = (max_bytes.max(MIN_BATCH_BYTES) / 1024).max(1);
    1024 << (63 - chunks.leading_zeros())
}

/// How many pieces a body of `len` bytes is cut into.
pub fn pieces_of(len: u64, piece_len: u64) -> u32 {
    len.div_ceil(piece_len).max(1) as u32
}

impl Queue {
    pub fn new(max_bytes: u64) -> Queue {
        let max_bytes = max_bytes.max(MIN_BATCH_BYTES);
        Queue {
            fifos: BTreeMap::new(),
            max_bytes,
            piece_len: piece_len(max_bytes),
            waiting: 0,
        }
    }

    pub fn piece_len(&self) -> u64 {
        self.piece_len
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Requests with bytes not yet handed to a batch.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Queues request `id` of op instance `op`, `len` body bytes; `split`: the body may be
    /// cut into pieces.
    pub fn push(
        &mut self,
        id: u64,
        op: OpKey,
        split: bool,
        len: u64,
        batching: Batching,
        queued_at: Instant,
    ) {
        self.fifos.entry(op).or_default().push_back(Entry {
            id,
            queued_at,
            batching,
            len,
            next: 0,
            split,
            rows: 0,
            max_rows: usize::MAX,
        });
        self.waiting += 1;
    }

    /// Queues a decoded request (`Op::decode`) of `rows` rows: it goes whole, and a batch
    /// holds at most `max_rows` rows (one larger request is a batch of its own).
    pub fn push_rows(
        &mut self,
        id: u64,
        op: OpKey,
        rows: usize,
        max_rows: usize,
        batching: Batching,
        queued_at: Instant,
    ) {
        self.fifos.entry(op).or_default().push_back(Entry {
            id,
            queued_at,
            batching,
            len: 0,
            next: 0,
            split: false,
            rows,
            max_rows: max_rows.max(1),
        });
        self.waiting += 1;
    }

    /// The op whose batch should go next at `now`, if one is due: a batch is due when its
    /// oldest request's `gpu_batch_delay` has run out, or it is already full (by count or
    /// bytes). Among due ops the one with the oldest request goes first; ops for which
    /// `held(op)` holds (at their in-flight limit) are passed over.
    pub fn due(&self, now: Instant, held: impl Fn(OpKey) -> bool) -> Option<OpKey> {
        let mut best: Option<(Instant, OpKey)> = None;
        for (&op, fifo) in &self.fifos {
            if held(op) {
                continue;
            }
            let Some(head) = fifo.front() else { continue };
            if best.is_some_and(|(t, _)| t <= head.queued_at) {
                continue;
            }
            let is_due = now >= head.queued_at + head.batching.delay
                || fifo.len() >= head.batching.size.max(1)
                || fifo.iter().map(|e| align(e.len - e.next)).sum::<u64>() >= self.max_bytes
                || fifo.iter().map(|e| e.rows).sum::<usize>() >= head.max_rows;
            if is_due {
                best = Some((head.queued_at, op));
            }
        }
        best.map(|(_, op)| op)
    }

    /// When a batch falls due if nothing else arrives: the earliest time an op's oldest
    /// request has waited its `gpu_batch_delay`, among the ops that `held` does not hold.
    pub fn next_due(&self, held: impl Fn(OpKey) -> bool) -> Option<Instant> {
        self.fifos
            .iter()
            .filter(|(&op, _)| !held(op))
            .filter_map(|(_, f)| f.front())
            .map(|h| h.queued_at + h.batching.delay)
            .min()
    }

    /// Cuts the next batch of `op`: requests in arrival order, up to the oldest one's
    /// `gpu_batch_size` and the byte bound (a batch always takes at least one piece).
    /// Requests for which `gone(id)` holds are dropped; their ids are returned.
    pub fn take(&mut self, op: OpKey, gone: impl Fn(u64) -> bool) -> (Batch, Vec<u64>) {
        let fifo = self.fifos.entry(op).or_default();
        let mut batch = Batch {
            op,
            pieces: Vec::new(),
        };
        let mut dropped = Vec::new();
        let (mut bytes, mut limit) = (0u64, usize::MAX);
        let (mut rows, mut max_rows) = (0usize, usize::MAX);
        while let Some(e) = fifo.front_mut() {
            if gone(e.id) {
                dropped.push(e.id);
                fifo.pop_front();
                self.waiting -= 1;
                continue;
            }
            if batch.pieces.is_empty() {
                limit = e.batching.size.max(1);
                max_rows = e.max_rows;
            }
            if batch.pieces.len() >= limit {
                break;
            }
            if !batch.pieces.is_empty() && rows.saturating_add(e.rows) > max_rows {
                break;
            }
            rows = rows.saturating_add(e.rows);
            let len = if e.split {
                (e.len - e.next).min(self.piece_len)
            } else {
                e.len
            };
            if !batch.pieces.is_empty() && bytes + align(len) > self.max_bytes {
                break;
            }
            batch.pieces.push(Piece {
                id: e.id,
                offset: e.next,
                len,
                index: (e.next / self.piece_len) as u32,
                whole: !e.split || e.len <= self.piece_len,
            });
            bytes += align(len);
            e.next += len;
            let e = fifo.pop_front().expect("front exists");
            if e.next < e.len {
                // The rest of a big body waits behind what is queued now.
                fifo.push_back(e);
            } else {
                self.waiting -= 1;
            }
        }
        (batch, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ECHO: OpKey = 0;
    const BLAKE3: OpKey = 1;

    fn batching(size: usize, delay_ms: u64) -> Batching {
        Batching {
            size,
            delay: Duration::from_millis(delay_ms),
        }
    }

    #[test]
    fn piece_len_is_a_power_of_two_of_chunks_within_the_bound() {
        assert_eq!(piece_len(16 << 20), 16 << 20);
        assert_eq!(piece_len((16 << 20) + 1), 16 << 20);
        assert_eq!(piece_len((12 << 20) + 5), 8 << 20);
        assert_eq!(piece_len(1), MIN_BATCH_BYTES);
        assert_eq!(pieces_of(0, 1024), 1);
        assert_eq!(pieces_of(1024, 1024), 1);
        assert_eq!(pieces_of(1025, 1024), 2);
    }

    #[test]
    fn takes_up_to_the_batch_size_in_arrival_order() {
        let mut q = Queue::new(1 << 20);
        let t = Instant::now();
        for id in 1..=5 {
            q.push(id, ECHO, true, 100, batching(3, 0), t);
        }
        let (b, dropped) = q.take(ECHO, |_| false);
        assert!(dropped.is_empty());
        assert_eq!(b.pieces.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(b
            .pieces
            .iter()
            .all(|p| p.whole && p.offset == 0 && p.len == 100));
        assert_eq!(q.waiting(), 2);
        let (b, _) = q.take(ECHO, |_| false);
        assert_eq!(b.pieces.iter().map(|p| p.id).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn ops_are_never_mixed_and_the_oldest_op_goes_first() {
        let mut q = Queue::new(1 << 20);
        let t = Instant::now();
        q.push(1, BLAKE3, true, 10, batching(8, 0), t);
        q.push(
            2,
            ECHO,
            true,
            10,
            batching(8, 0),
            t + Duration::from_micros(1),
        );
        q.push(
            3,
            BLAKE3,
            true,
            10,
            batching(8, 0),
            t + Duration::from_micros(2),
        );
        let now = t + Duration::from_millis(1);
        assert_eq!(q.due(now, |_| false), Some(BLAKE3));
        let (b, _) = q.take(BLAKE3, |_| false);
        assert_eq!(b.op, BLAKE3);
        assert_eq!(b.pieces.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(q.due(now, |_| false), Some(ECHO));
    }

    #[test]
    fn delay_holds_a_partial_batch_until_the_oldest_has_waited() {
        let mut q = Queue::new(1 << 20);
        let t = Instant::now();
        q.push(1, ECHO, true, 10, batching(4, 5), t);
        q.push(2, ECHO, true, 10, batching(4, 5), t);
        assert_eq!(q.due(t + Duration::from_millis(1), |_| false), None);
        assert_eq!(q.next_due(|_| false), Some(t + Duration::from_millis(5)));
        assert_eq!(q.due(t + Duration::from_millis(5), |_| false), Some(ECHO));
        // A full batch is due at once.
        q.push(3, ECHO, true, 10, batching(4, 5), t);
        q.push(4, ECHO, true, 10, batching(4, 5), t);
        assert_eq!(q.due(t, |_| false), Some(ECHO));
    }

    #[test]
    fn the_byte_bound_closes_a_batch() {
        let mut q = Queue::new(MIN_BATCH_BYTES);
        let t = Instant::now();
        for id in 1..=4 {
            q.push(id, ECHO, true, 30_000, batching(100, 0), t);
        }
        let (b, _) = q.take(ECHO, |_| false);
        assert_eq!(b.pieces.len(), 2);
        assert!(b.staged_len() <= MIN_BATCH_BYTES);
    }

    #[test]
    fn a_huge_body_is_cut_into_pieces_and_small_ones_pass_between() {
        let mut q = Queue::new(MIN_BATCH_BYTES);
        let p = q.piece_len();
        let t = Instant::now();
        q.push(1, BLAKE3, true, 3 * p + 5, batching(100, 0), t);
        q.push(2, BLAKE3, true, 7, batching(100, 0), t);
        let mut seen = Vec::new();
        while q.waiting() > 0 {
            let (b, _) = q.take(BLAKE3, |_| false);
            assert!(b.staged_len() <= MIN_BATCH_BYTES);
            seen.push(b.pieces);
        }
        // The first batch is one full piece of the big body; the small body comes next,
        // not after the big body's last piece.
        assert_eq!(
            seen[0],
            [Piece {
                id: 1,
                offset: 0,
                len: p,
                index: 0,
                whole: false
            }]
        );
        assert_eq!(seen[1][0].id, 2);
        let big: Vec<&Piece> = seen.iter().flatten().filter(|p| p.id == 1).collect();
        assert_eq!(big.len(), 4);
        for (i, piece) in big.iter().enumerate() {
            assert_eq!(piece.index as usize, i);
            assert_eq!(piece.offset, i as u64 * p);
        }
        assert_eq!(big[3].len, 5);
        assert_eq!(big.iter().map(|p| p.len).sum::<u64>(), 3 * p + 5);
    }

    #[test]
    fn bodies_of_ops_that_cannot_split_go_whole_even_past_the_bound() {
        let mut q = Queue::new(MIN_BATCH_BYTES);
        let t = Instant::now();
        q.push(1, ECHO, false, 3 * MIN_BATCH_BYTES + 5, batching(100, 0), t);
        q.push(2, ECHO, false, 10, batching(100, 0), t);
        let (b, _) = q.take(ECHO, |_| false);
        assert_eq!(
            b.pieces,
            [Piece {
                id: 1,
                offset: 0,
                len: 3 * MIN_BATCH_BYTES + 5,
                index: 0,
                whole: true
            }]
        );
        let (b, _) = q.take(ECHO, |_| false);
        assert_eq!(b.pieces.iter().map(|p| p.id).collect::<Vec<_>>(), [2]);
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn decoded_requests_batch_up_to_the_row_limit() {
        let mut q = Queue::new(1 << 20);
        let t = Instant::now();
        for (id, rows) in [(1, 3), (2, 4), (3, 2), (4, 9), (5, 1)] {
            q.push_rows(id, ECHO, rows, 8, batching(100, 5), t);
        }
        // 3 + 4 rows fill most of 8; 2 more would not fit. The 9-row request goes alone.
        assert_eq!(q.due(t, |_| false), Some(ECHO));
        let ids = |b: Batch| b.pieces.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(q.take(ECHO, |_| false).0), [1, 2]);
        assert_eq!(ids(q.take(ECHO, |_| false).0), [3]);
        assert_eq!(ids(q.take(ECHO, |_| false).0), [4]);
        // One row waits for the delay: far from the row limit.
        assert_eq!(q.due(t, |_| false), None);
        assert_eq!(ids(q.take(ECHO, |_| false).0), [5]);
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn gone_requests_are_dropped_and_reported() {
        let mut q = Queue::new(1 << 20);
        let t = Instant::now();
        for id in 1..=4 {
            q.push(id, ECHO, true, 1, batching(10, 0), t);
        }
        let (b, dropped) = q.take(ECHO, |id| id % 2 == 0);
        assert_eq!(b.pieces.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(dropped, [2, 4]);
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn empty_bodies_are_one_whole_piece() {
        let mut q = Queue::new(1 << 20);
        q.push(9, BLAKE3, true, 0, batching(1, 0), Instant::now());
        let (b, _) = q.take(BLAKE3, |_| false);
        assert_eq!(
            b.pieces,
            [Piece {
                id: 9,
                offset: 0,
                len: 0,
                index: 0,
                whole: true
            }]
        );
    }
}
