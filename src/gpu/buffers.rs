//! How staging and device buffers are sized: to what a batch needs (rounded up to whole
//! MiB, so that similar batches reuse them), never past the worker's pinned-memory limit,
//! and shrunk when they have been larger than needed for a while. The real device and the
//! test device share this, so the tests check the policy the GPU runs.

/// Buffers are whole multiples of this (and at least this).
pub const STEP: usize = 1 << 20;

/// The capacity a buffer gets for `need` bytes.
pub fn capacity_for(need: usize) -> usize {
    need.max(1).div_ceil(STEP) * STEP
}

/// One buffer, allocated on demand.
pub struct Held<T> {
    pub buf: Option<T>,
    cap: usize,
    /// The largest need since the last trim.
    high: usize,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Held {
            buf: None,
            cap: 0,
            high: 0,
        }
    }
}

impl<T> Held<T> {
    /// Bytes held now.
    pub fn capacity(&self) -> usize {
        if self.buf.is_some() {
            self.cap
        } else {
            0
        }
    }

    /// Makes room for `need` bytes with `alloc(capacity)` when the buffer is too small;
    /// `budget` is how many more bytes may be allocated (None: no limit). The old buffer is
    /// freed before the new one is allocated.
    pub fn ensure<E>(
        &mut self,
        need: usize,
        budget: Option<usize>,
        over: impl FnOnce(usize) -> E,
        alloc: impl FnOnce(usize) -> Result<T, E>,
    ) -> Result<&mut T, E> {
        self.high = self.high.max(need);
        if self.buf.is_none() || self.cap < need {
            let cap = capacity_for(need);
            let freed = self.capacity();
            if budget.is_some_and(|b| cap > b + freed) {
                return Err(over(cap));
            }
            self.buf = None;
            self.buf = Some(alloc(cap)?);
            self.cap = cap;
        }
        Ok(self.buf.as_mut().expect("allocated above"))
    }

    /// Frees the buffer if it is larger than what was needed since the last trim (the next
    /// batch that needs it allocates what it needs); returns the bytes freed.
    pub fn trim(&mut self) -> usize {
        let freed = if self.buf.is_some() && self.cap > capacity_for(self.high) {
            self.buf = None;
            self.cap
        } else {
            0
        };
        self.high = 0;
        freed
    }
}

/// The most pinned host memory one worker's staging can take, for the configuration check
/// and the README: per slot an input buffer (descriptors, then up to `batch_bytes` of
/// bodies) and an output buffer, each rounded up to whole MiB. `desc_len(n)` and
/// `out_len(n, data)` are the largest an op asks for `n` pieces of `data` bytes.
pub fn pinned_worst_case(
    slots: usize,
    batch_bytes: usize,
    max_pieces: usize,
    desc_len: impl Fn(usize) -> usize,
    out_len: impl Fn(usize, usize) -> usize,
) -> usize {
    let input = capacity_for(super::device::align_desc(desc_len(max_pieces)) + batch_bytes);
    let output = capacity_for(out_len(max_pieces, batch_bytes));
    slots * (input + output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_the_need_in_whole_mib_not_the_next_power_of_two() {
        assert_eq!(capacity_for(0), STEP);
        assert_eq!(capacity_for(1), STEP);
        assert_eq!(capacity_for(STEP), STEP);
        assert_eq!(capacity_for(STEP + 1), 2 * STEP);
        // A full 16 MiB batch plus its descriptors: 17 MiB, not 32.
        assert_eq!(capacity_for((16 << 20) + 5120), 17 * STEP);
    }

    #[test]
    fn grows_to_need_refuses_past_the_budget_and_shrinks_after_a_quiet_while() {
        let mut h: Held<Vec<u8>> = Held::default();
        let alloc = |n: usize| Ok::<_, String>(vec![0u8; n]);
        h.ensure(10, Some(4 * STEP), |c| format!("{c}"), alloc)
            .unwrap();
        assert_eq!(h.capacity(), STEP);
        h.ensure(3 * STEP + 1, Some(4 * STEP), |c| format!("{c}"), alloc)
            .unwrap();
        assert_eq!(h.capacity(), 4 * STEP);
        // The old buffer counts as freed: 5 MiB against 4 free + 4 held is fine, 9 is not.
        let err = h.ensure(8 * STEP + 1, Some(4 * STEP), |c| format!("over {c}"), alloc);
        assert_eq!(err.unwrap_err(), format!("over {}", 9 * STEP));
        assert_eq!(
            h.capacity(),
            4 * STEP,
            "a refused growth keeps the old buffer"
        );
        // Needed at full size in this window: kept.
        assert_eq!(h.trim(), 0);
        // Only small batches since: freed, and the next need allocates what it needs.
        h.ensure(100, None, |c| format!("{c}"), alloc).unwrap();
        assert_eq!(h.trim(), 4 * STEP);
        assert_eq!(h.capacity(), 0);
        h.ensure(100, None, |c| format!("{c}"), alloc).unwrap();
        assert_eq!(h.capacity(), STEP);
        // A 1 MiB buffer used in the window stays.
        assert_eq!(h.trim(), 0);
    }
}
