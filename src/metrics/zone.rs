//! The metrics zone's layout: one block of shared memory, laid out once the configuration
//! is read, holding per location and device the counters and histograms, per worker a
//! status block, and per device the NVML samples. Everything in it is an atomic: writers
//! never lock.
//!
//! ```text
//! Header | LocStats [L][1 + B] | WorkerSlot x W | pending [W][L] i64 | op state [W][L] u8
//!        | DeviceSample x 16
//! ```
//!
//! A location has one block of counters per device a worker can be placed on (B of them,
//! from `gpu_devices` and the worker count, see `Layout::new`) after block 0, `cpu`: what
//! workers answer while they have no device open.

use std::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering::*};

/// Written first into a fresh zone; a reused zone must carry it (same layout version).
pub const MAGIC: u64 = 0x6e67_785f_6770_7531; // "ngx_gpu1"
/// Bumped whenever a struct below changes (it is part of the zone's name too).
pub const LAYOUT_VERSION: u64 = 3;
/// Devices NVML samples, at most.
pub const MAX_DEVICES: usize = 16;
/// Device blocks per location, at most: one per device `gpu_devices` can name (0..=255).
pub const MAX_DEVICE_BLOCKS: usize = 256;
/// The block a worker writes into while it has no device open.
pub const CPU_BLOCK: usize = 0;

/// Upper bounds (microseconds) of the duration histograms' buckets; +Inf follows.
pub const DURATION_BOUNDS_US: [u64; 18] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
];
/// Upper bounds of the batch-size histogram's buckets (requests per batch); +Inf follows.
pub const BATCH_BOUNDS: [u64; 17] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
];

/// A histogram: one (non-cumulative) count per bucket, the last one +Inf, and the sum.
#[repr(C)]
pub struct Hist<const B: usize> {
    pub buckets: [AtomicU64; B],
    pub sum: AtomicU64,
}

impl<const B: usize> Hist<B> {
    pub fn observe(&self, bounds: &[u64], v: u64) {
        debug_assert_eq!(bounds.len() + 1, B);
        let i = bounds.iter().position(|&b| v <= b).unwrap_or(B - 1);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    /// Cumulative counts, one per bound and the last for +Inf (which is also the count:
    /// read this way, `_count` always equals the +Inf bucket).
    pub fn cumulative(&self) -> [u64; B] {
        let mut out = [0; B];
        let mut acc = 0;
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            acc += b.load(Relaxed);
            *o = acc;
        }
        out
    }
}

pub type DurationHist = Hist<19>;
pub type BatchHist = Hist<18>;

/// Why requests of a location failed, as `nv_inference_request_failure{reason=...}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    BadRequest,
    QueueFull,
    Unavailable,
    Timeout,
    Internal,
}

impl Outcome {
    pub const FAILURES: [Outcome; 5] = [
        Outcome::BadRequest,
        Outcome::QueueFull,
        Outcome::Unavailable,
        Outcome::Timeout,
        Outcome::Internal,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::BadRequest => "bad_request",
            Outcome::QueueFull => "queue_full",
            Outcome::Unavailable => "unavailable",
            Outcome::Timeout => "timeout",
            Outcome::Internal => "internal",
        }
    }

    /// The outcome of an answer's HTTP status.
    pub fn of_status(status: usize) -> Outcome {
        match status {
            200..=399 => Outcome::Success,
            503 => Outcome::Unavailable,
            504 => Outcome::Timeout,
            400..=499 => Outcome::BadRequest,
            _ => Outcome::Internal,
        }
    }
}

/// One `gpu_process` location's counters on one device (or `cpu`), summed over the
/// workers placed there.
#[repr(C)]
pub struct LocStats {
    /// By `Outcome` (success first).
    pub outcomes: [AtomicU64; 6],
    /// Requests run (on the GPU or the CPU path), and batches run.
    pub inferences: AtomicU64,
    pub batches: AtomicU64,
    pub request_bytes: AtomicU64,
    pub response_bytes: AtomicU64,
    /// Microseconds of the requests answered with success, and of the rest (KServe's
    /// statistics split request time by outcome).
    pub success_us: AtomicU64,
    pub failure_us: AtomicU64,
    /// When the last successful request was answered (ms since the Unix epoch; 0: never).
    pub last_success_ms: AtomicU64,
    pub request: DurationHist,
    pub queue: DurationHist,
    pub compute: DurationHist,
    pub batch_size: BatchHist,
}

impl LocStats {
    pub fn count(&self, o: Outcome) -> &AtomicU64 {
        let i = match o {
            Outcome::Success => 0,
            Outcome::BadRequest => 1,
            Outcome::QueueFull => 2,
            Outcome::Unavailable => 3,
            Outcome::Timeout => 4,
            Outcome::Internal => 5,
        };
        &self.outcomes[i]
    }
}

/// A short text written by one thread and read by any process: a sequence lock over
/// atomic words (the writer makes `seq` odd while it writes; a reader retries).
#[repr(C)]
pub struct Text<const W: usize> {
    seq: AtomicU64,
    len: AtomicU64,
    words: [AtomicU64; W],
}

impl<const W: usize> Text<W> {
    /// Writes `s`, cut at W * 8 bytes (on a character boundary). One writer at a time.
    pub fn set(&self, s: &str) {
        let mut n = s.len().min(W * 8);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        let bytes = &s.as_bytes()[..n];
        self.seq.fetch_add(1, AcqRel);
        fence(Release);
        for (i, w) in self.words.iter().enumerate() {
            let mut b = [0u8; 8];
            let start = (i * 8).min(n);
            let end = (i * 8 + 8).min(n);
            b[..end - start].copy_from_slice(&bytes[start..end]);
            w.store(u64::from_le_bytes(b), Relaxed);
        }
        self.len.store(n as u64, Relaxed);
        self.seq.fetch_add(1, Release);
    }

    /// The text, or an empty one if the writer kept writing while this read.
    pub fn get(&self) -> String {
        for _ in 0..64 {
            let s1 = self.seq.load(Acquire);
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let n = (self.len.load(Relaxed) as usize).min(W * 8);
            let mut bytes = Vec::with_capacity(W * 8);
            for w in &self.words {
                bytes.extend_from_slice(&w.load(Relaxed).to_le_bytes());
            }
            fence(Acquire);
            if self.seq.load(Relaxed) == s1 {
                bytes.truncate(n);
                return String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        String::new()
    }
}

/// What a worker's GPU thread has of its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DeviceState {
    Starting = 0,
    Opening = 1,
    Open = 2,
    Retrying = 3,
    Unavailable = 4,
}

impl DeviceState {
    pub fn from_u32(v: u32) -> DeviceState {
        match v {
            1 => DeviceState::Opening,
            2 => DeviceState::Open,
            3 => DeviceState::Retrying,
            4 => DeviceState::Unavailable,
            _ => DeviceState::Starting,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Starting => "starting",
            DeviceState::Opening => "opening",
            DeviceState::Open => "open",
            DeviceState::Retrying => "retrying",
            DeviceState::Unavailable => "unavailable",
        }
    }
}

/// Whether one worker can serve one location's op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpState {
    /// Not said yet (the GPU thread has not started).
    Unknown = 0,
    Gpu = 1,
    /// On the CPU path (no GPU in this worker, or the op does not run on it).
    Cpu = 2,
    /// Its requests wait for the device being opened.
    Waiting = 3,
    /// No GPU here and no CPU path for it (or `gpu_fallback off`): 503.
    NoDevice = 4,
    /// The op itself is not ready (`Op::ready`).
    NotReady = 5,
}

impl OpState {
    pub fn from_u8(v: u8) -> OpState {
        match v {
            1 => OpState::Gpu,
            2 => OpState::Cpu,
            3 => OpState::Waiting,
            4 => OpState::NoDevice,
            5 => OpState::NotReady,
            _ => OpState::Unknown,
        }
    }

    pub fn serves(self) -> bool {
        matches!(self, OpState::Gpu | OpState::Cpu)
    }

    pub fn name(self) -> &'static str {
        match self {
            OpState::Unknown => "unknown",
            OpState::Gpu => "gpu",
            OpState::Cpu => "cpu",
            OpState::Waiting => "waiting for the GPU",
            OpState::NoDevice => "no GPU and no CPU path (or gpu_fallback off)",
            OpState::NotReady => "not ready",
        }
    }
}

pub const MPS_UNKNOWN: u32 = 0;
pub const MPS_OFF: u32 = 1;
pub const MPS_ON: u32 = 2;

/// One worker's status, taken by worker number (`ngx_worker`): a respawned worker takes
/// its slot back, a worker of a newer configuration takes it over.
#[repr(C)]
pub struct WorkerSlot {
    /// The configuration generation of the worker that holds the slot (0: never held).
    pub generation: AtomicU64,
    pub pid: AtomicU64,
    /// Unix time (ms) the slot was taken.
    pub started_ms: AtomicU64,
    pub thread_up: AtomicU32,
    /// `DeviceState`.
    pub device_state: AtomicU32,
    /// CUDA ordinal of the device in use (while open).
    pub device_ordinal: AtomicU32,
    pub mps: AtomicU32,
    /// Requests waiting for (or in) a batch now.
    pub queue_depth: AtomicU64,
    pub batches: AtomicU64,
    /// Requests answered by this worker (every outcome).
    pub requests: AtomicU64,
    pub last_error_ms: AtomicU64,
    /// The device block (`Layout::block_of`) the worker writes its counters into now.
    pub block: AtomicU64,
    pub device_name: Text<8>,
    pub last_error: Text<32>,
}

/// One device's NVML sample.
#[repr(C)]
pub struct DeviceSample {
    /// Set once the strings are written; cleared where NVML lost the device.
    pub present: AtomicU32,
    pub index: AtomicU32,
    pub memory_used: AtomicU64,
    pub memory_total: AtomicU64,
    /// Percent (0..100) over NVML's last sample period.
    pub utilization: AtomicU64,
    pub power_mw: AtomicU64,
    pub sampled_ms: AtomicU64,
    pub uuid: Text<8>,
    pub name: Text<8>,
}

pub const NVML_OK: u32 = 1;
pub const NVML_UNAVAILABLE: u32 = 2;

#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU64,
    /// Configuration generation: bumped each time a configuration (re)uses the zone.
    pub generation: AtomicU64,
    pub locations: AtomicU64,
    pub workers: AtomicU64,
    /// Device blocks per location, `cpu` not counted.
    pub device_blocks: AtomicU64,
    /// Unix time (ms) the zone was laid out.
    pub created_ms: AtomicU64,
    pub nvml: AtomicU32,
    pub devices: AtomicU32,
    pub nvml_error: Text<16>,
}

/// Offsets of the parts of a zone of `locations` x `workers`, and its device blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub locations: usize,
    pub workers: usize,
    /// Device blocks per location after `cpu` (B).
    pub device_blocks: usize,
    /// The CUDA ordinal of each device block (block `b` is `ordinals[b - 1]`).
    ordinals: [u8; MAX_DEVICE_BLOCKS],
    locs: usize,
    slots: usize,
    pending: usize,
    states: usize,
    devices: usize,
    pub size: usize,
}

const fn align(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

impl Layout {
    /// `listed`: the devices of `gpu_devices` (None: `all`). Workers take them
    /// round-robin by worker number, so `workers` workers reach only the first
    /// `min(n, workers)` of a list of n. With `all`, worker w gets device w mod (the count
    /// CUDA shows), which the master cannot ask: any ordinal below `workers` (and 256).
    pub fn new(locations: usize, workers: usize, listed: Option<&[usize]>) -> Layout {
        let mut ordinals = [0u8; MAX_DEVICE_BLOCKS];
        let device_blocks = match listed {
            Some(ids) => {
                let n = ids.len().min(workers).min(MAX_DEVICE_BLOCKS);
                for (o, id) in ordinals.iter_mut().zip(&ids[..n]) {
                    *o = (*id).min(255) as u8;
                }
                n
            }
            None => {
                let n = workers.min(MAX_DEVICE_BLOCKS);
                for (i, o) in ordinals.iter_mut().enumerate().take(n) {
                    *o = i as u8;
                }
                n
            }
        };
        let blocks = locations * (1 + device_blocks);
        let locs = align(size_of::<Header>(), 64);
        let slots = locs + blocks * size_of::<LocStats>();
        let pending = slots + workers * size_of::<WorkerSlot>();
        let states = pending + workers * locations * 8;
        let devices = align(states + workers * locations, 64);
        let size = devices + MAX_DEVICES * size_of::<DeviceSample>();
        Layout {
            locations,
            workers,
            device_blocks,
            ordinals,
            locs,
            slots,
            pending,
            states,
            devices,
            size,
        }
    }

    /// Blocks per location, `cpu` included.
    pub fn blocks(&self) -> usize {
        1 + self.device_blocks
    }

    /// The block of the device with CUDA ordinal `ordinal`; None where the layout has
    /// none for it (not one the configuration places workers on).
    pub fn block_of(&self, ordinal: usize) -> Option<usize> {
        self.ordinals[..self.device_blocks]
            .iter()
            .position(|&o| o as usize == ordinal)
            .map(|i| i + 1)
    }

    /// The `device` label of block `b`: `cpu`, or `gpuN` as `$gpu_device` names it.
    pub fn label(&self, b: usize) -> String {
        match b {
            CPU_BLOCK => "cpu".into(),
            b => format!("gpu{}", self.ordinals[(b - 1).min(MAX_DEVICE_BLOCKS - 1)]),
        }
    }
}

/// A laid-out zone in memory (shared memory in nginx, a plain buffer in unit tests).
#[derive(Clone, Copy)]
pub struct Zone {
    base: *mut u8,
    pub layout: Layout,
}

// SAFETY: everything reached through a Zone is atomics; the memory outlives the process's
// use of it (nginx's shared zones stay mapped until the process exits).
unsafe impl Send for Zone {}
unsafe impl Sync for Zone {}

impl Zone {
    /// The zone at `base`, `layout.size` bytes, 64-byte aligned, zeroed or laid out
    /// earlier with the same layout.
    ///
    /// # Safety
    /// `base` must point to `layout.size` bytes that stay valid for as long as the Zone
    /// and anything taken from it are used.
    pub unsafe fn at(base: *mut u8, layout: Layout) -> Zone {
        Zone { base, layout }
    }

    /// Writes the header of a fresh (zeroed) zone.
    pub fn init_fresh(&self, now_ms: u64) {
        let h = self.header();
        h.version.store(LAYOUT_VERSION, Relaxed);
        h.locations.store(self.layout.locations as u64, Relaxed);
        h.workers.store(self.layout.workers as u64, Relaxed);
        h.device_blocks
            .store(self.layout.device_blocks as u64, Relaxed);
        h.created_ms.store(now_ms, Relaxed);
        h.magic.store(MAGIC, Release);
    }

    /// Whether this memory holds a zone of this layout.
    pub fn matches(&self) -> bool {
        let h = self.header();
        h.magic.load(Acquire) == MAGIC
            && h.version.load(Relaxed) == LAYOUT_VERSION
            && h.locations.load(Relaxed) == self.layout.locations as u64
            && h.workers.load(Relaxed) == self.layout.workers as u64
            && h.device_blocks.load(Relaxed) == self.layout.device_blocks as u64
    }

    fn part<T>(&self, off: usize, i: usize) -> &T {
        // SAFETY: Zone::at's contract; offsets come from Layout and callers index within
        // its counts (checked below); every T here is made of atomics, valid when zeroed.
        unsafe { &*(self.base.add(off + i * size_of::<T>()) as *const T) }
    }

    pub fn header(&self) -> &Header {
        self.part(0, 0)
    }

    /// Location `l`'s counters in device block `b`.
    pub fn loc(&self, l: usize, b: usize) -> Option<&LocStats> {
        let blocks = self.layout.blocks();
        (l < self.layout.locations && b < blocks)
            .then(|| self.part(self.layout.locs, l * blocks + b))
    }

    /// Location `l`'s counters in every block (summed, they are the location's).
    pub fn loc_all(&self, l: usize) -> impl Iterator<Item = &LocStats> + '_ {
        (0..self.layout.blocks()).filter_map(move |b| self.loc(l, b))
    }

    pub fn slot(&self, w: usize) -> Option<&WorkerSlot> {
        (w < self.layout.workers).then(|| self.part(self.layout.slots, w))
    }

    pub fn pending(&self, w: usize, l: usize) -> Option<&AtomicI64> {
        (w < self.layout.workers && l < self.layout.locations)
            .then(|| self.part(self.layout.pending, w * self.layout.locations + l))
    }

    pub fn op_state(&self, w: usize, l: usize) -> Option<&AtomicU8> {
        (w < self.layout.workers && l < self.layout.locations)
            .then(|| self.part(self.layout.states, w * self.layout.locations + l))
    }

    pub fn device(&self, d: usize) -> Option<&DeviceSample> {
        (d < MAX_DEVICES).then(|| self.part(self.layout.devices, d))
    }

    /// Takes worker slot `w` for a worker of configuration `generation`: what the slot's
    /// earlier holder (a worker that died, or one of an older configuration) left is reset.
    pub fn take_slot(&self, w: usize, generation: u64, pid: u64, now_ms: u64) -> bool {
        let Some(s) = self.slot(w) else {
            return false;
        };
        s.generation.store(generation, Release);
        s.pid.store(pid, Relaxed);
        s.started_ms.store(now_ms, Relaxed);
        s.thread_up.store(0, Relaxed);
        s.device_state.store(DeviceState::Starting as u32, Relaxed);
        s.device_ordinal.store(0, Relaxed);
        s.mps.store(MPS_UNKNOWN, Relaxed);
        s.queue_depth.store(0, Relaxed);
        s.batches.store(0, Relaxed);
        s.requests.store(0, Relaxed);
        s.last_error_ms.store(0, Relaxed);
        s.block.store(CPU_BLOCK as u64, Relaxed);
        s.device_name.set("");
        s.last_error.set("");
        for l in 0..self.layout.locations {
            if let Some(p) = self.pending(w, l) {
                p.store(0, Relaxed);
            }
            if let Some(st) = self.op_state(w, l) {
                st.store(OpState::Unknown as u8, Relaxed);
            }
        }
        true
    }

    /// Whether slot `w` is still held by the worker (`generation`, `pid`).
    pub fn owns(&self, w: usize, generation: u64, pid: u64) -> bool {
        self.slot(w)
            .is_some_and(|s| s.generation.load(Acquire) == generation && s.pid.load(Relaxed) == pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zeroed, 64-byte aligned buffer for a zone.
    pub(crate) fn buffer(layout: Layout) -> Vec<u64> {
        vec![0u64; layout.size.div_ceil(8) + 8]
    }

    fn zone(buf: &mut [u64], layout: Layout) -> Zone {
        let p = buf.as_mut_ptr() as *mut u8;
        let skip = p.align_offset(64);
        // SAFETY: the buffer has 64 spare bytes for the alignment and lives for the test.
        unsafe { Zone::at(p.add(skip), layout) }
    }

    #[test]
    fn parts_do_not_overlap_and_fit() {
        let list = [3usize, 0, 7];
        for (l, w, listed) in [
            (0, 1, None),
            (1, 1, None),
            (3, 7, None),
            (3, 7, Some(&list[..])),
            (2, 2, Some(&list[..])),
            (100, 64, None),
        ] {
            let layout = Layout::new(l, w, listed);
            let mut buf = buffer(layout);
            let z = zone(&mut buf, layout);
            z.init_fresh(1);
            assert!(z.matches());
            let blocks = layout.blocks();
            // Write every counter of the last location's last block and of the last slot,
            // then check the header, the first location and the devices still read as
            // written.
            if l > 0 {
                z.loc(l - 1, blocks - 1).unwrap().batches.store(7, Relaxed);
                z.pending(w - 1, l - 1).unwrap().store(-1, Relaxed);
                z.op_state(w - 1, l - 1).unwrap().store(9, Relaxed);
            }
            z.slot(w - 1).unwrap().last_error.set(&"x".repeat(300));
            z.device(MAX_DEVICES - 1).unwrap().name.set("last");
            assert!(z.matches());
            assert_eq!(z.slot(w - 1).unwrap().last_error.get().len(), 256);
            assert_eq!(z.device(MAX_DEVICES - 1).unwrap().name.get(), "last");
            if l > 1 || (l == 1 && blocks > 1) {
                assert_eq!(z.loc(0, 0).unwrap().batches.load(Relaxed), 0);
            }
            if l > 0 {
                let sum: u64 = z.loc_all(l - 1).map(|s| s.batches.load(Relaxed)).sum();
                assert_eq!(sum, 7);
                assert!(z.loc(l - 1, blocks).is_none());
            }
            assert!(z.loc(l, 0).is_none() && z.slot(w).is_none());
            assert!(z.device(MAX_DEVICES).is_none());
        }
    }

    #[test]
    fn device_blocks_follow_the_list_and_the_worker_count() {
        // A list of 3 over 7 workers: every listed device gets workers, in list order.
        let l = Layout::new(1, 7, Some(&[3, 0, 7]));
        assert_eq!(l.device_blocks, 3);
        let labels: Vec<String> = (0..l.blocks()).map(|b| l.label(b)).collect();
        assert_eq!(labels, ["cpu", "gpu3", "gpu0", "gpu7"]);
        assert_eq!(
            (l.block_of(3), l.block_of(0), l.block_of(7), l.block_of(1)),
            (Some(1), Some(2), Some(3), None)
        );
        // 2 workers over that list: gpu7 gets none, so no block.
        let l = Layout::new(1, 2, Some(&[3, 0, 7]));
        assert_eq!((l.device_blocks, l.block_of(7)), (2, None));
        // `all`: ordinals below the worker count, each its own block.
        let l = Layout::new(1, 5, None);
        assert_eq!(l.device_blocks, 5);
        for o in 0..5 {
            assert_eq!(l.block_of(o), Some(o + 1));
            assert_eq!(l.label(o + 1), format!("gpu{o}"));
        }
        assert_eq!(l.block_of(5), None);
        assert_eq!(Layout::new(1, 1000, None).device_blocks, 256);
        assert_eq!(Layout::new(1, 1000, None).label(256), "gpu255");
        // Whatever the list, every worker's device has its block.
        for workers in 1..=9usize {
            for list in [vec![5usize], vec![2, 9, 4], vec![0, 1, 2, 3, 4, 5, 6, 7]] {
                let l = Layout::new(1, workers, Some(&list));
                for w in 0..workers {
                    let dev = list[crate::engine::devices::position(w, list.len())];
                    assert!(l.block_of(dev).is_some(), "{list:?} x{workers}: worker {w}");
                }
            }
            let l = Layout::new(1, workers, None);
            for visible in 1..=12usize {
                for w in 0..workers {
                    assert!(l.block_of(w % visible).is_some());
                }
            }
        }
    }

    #[test]
    fn a_zone_of_other_device_blocks_does_not_match() {
        let a = Layout::new(2, 4, None);
        let mut buf = buffer(a);
        let z = zone(&mut buf, a);
        z.init_fresh(1);
        assert!(z.matches());
        let b = Layout::new(2, 4, Some(&[1]));
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: as in zone(); b is smaller than a.
        let zb = unsafe { Zone::at(p.add(p.align_offset(64)), b) };
        assert!(!zb.matches());
    }

    #[test]
    fn histograms_count_into_the_first_bucket_that_holds_the_value() {
        let h: BatchHist = unsafe { core::mem::zeroed() };
        for v in [1, 2, 3, 128, 129, 70_000] {
            h.observe(&BATCH_BOUNDS, v);
        }
        let c = h.cumulative();
        // le=1: 1; le=2: 2; le=4: 3 (the 3); le=128: 4; le=256: 5; +Inf: 6.
        assert_eq!((c[0], c[1], c[2], c[7], c[8], c[17]), (1, 2, 3, 4, 5, 6));
        assert_eq!(h.sum.load(Relaxed), 1 + 2 + 3 + 128 + 129 + 70_000);
    }

    #[test]
    fn text_keeps_utf8_whole_when_cut() {
        let t: Text<1> = unsafe { core::mem::zeroed() };
        t.set("ééééé"); // 10 bytes: cut at 8, a boundary
        assert_eq!(t.get(), "éééé");
        t.set("ab");
        assert_eq!(t.get(), "ab");
    }

    #[test]
    fn a_new_holder_resets_the_slot_and_the_old_one_loses_it() {
        let layout = Layout::new(2, 2, None);
        let mut buf = buffer(layout);
        let z = zone(&mut buf, layout);
        z.take_slot(1, 1, 100, 0);
        z.pending(1, 1).unwrap().store(5, Relaxed);
        z.slot(1).unwrap().last_error.set("boom");
        assert!(z.owns(1, 1, 100));
        z.take_slot(1, 1, 101, 0); // respawned after a crash
        assert!(!z.owns(1, 1, 100) && z.owns(1, 1, 101));
        assert_eq!(z.pending(1, 1).unwrap().load(Relaxed), 0);
        assert_eq!(z.slot(1).unwrap().last_error.get(), "");
        z.take_slot(1, 2, 102, 0); // a reload's worker
        assert!(!z.owns(1, 1, 101));
    }
}

#[cfg(test)]
mod sizes {
    use super::*;

    /// The README's figures for the zone's size.
    #[test]
    fn zone_sizes_as_documented() {
        assert_eq!(size_of::<LocStats>(), 736);
        assert_eq!(size_of::<WorkerSlot>(), 432);
        assert_eq!(size_of::<DeviceSample>(), 208);
        assert_eq!(align(size_of::<Header>(), 64), 256);
        // 256 + 736 L (1 + B) + 432 W + 9 W L, rounded up to 64, + 16 devices x 208.
        let formula = |l: usize, w: usize, b: usize| {
            (256 + 736 * l * (1 + b) + 432 * w + 9 * w * l).div_ceil(64) * 64 + 3328
        };
        for (l, w) in [(0, 1), (1, 1), (10, 16), (1000, 128), (7, 3)] {
            assert_eq!(
                Layout::new(l, w, None).size,
                formula(l, w, w.min(256)),
                "{l} x {w}"
            );
            let list = [0, 1, 2, 3, 4, 5, 6, 7];
            assert_eq!(
                Layout::new(l, w, Some(&list)).size,
                formula(l, w, w.min(8)),
                "{l} x {w} over 8"
            );
        }
        // 10 locations, 16 workers: over 8 listed GPUs, and with `all`.
        assert_eq!(formula(10, 16, 8), 78_208);
        assert_eq!(formula(10, 16, 16), 137_088);
        // 1000 locations, 128 workers: over 8 listed GPUs, and with `all`.
        assert_eq!(formula(1000, 128, 8), 7_834_880);
        assert_eq!(formula(1000, 128, 128), 96_154_880);
    }
}
