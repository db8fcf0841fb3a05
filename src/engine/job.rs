//! What travels between the event loop and the GPU thread: jobs one way, events back.
//!
//! Everything here is owned data: the GPU thread never sees an nginx request, pool,
//! buffer or log.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::batch::OpKey;
use crate::ops::{Decoded, Op, Output, Params};

/// What to do when the worker has no usable GPU (`gpu_fallback`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    Cpu,
    Off,
}

/// A piece of a request body: bytes copied from nginx's memory buffers, a range of nginx's
/// body buffer shared with it (see `body.rs`), or a range of the temp file nginx spilled the
/// body to (read by the GPU thread, not the event loop).
#[derive(Debug)]
pub enum Segment {
    Memory(Vec<u8>),
    Shared(SharedBuf),
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

/// A malloc'd block of nginx's request pool whose freeing the pool handed over: freed when
/// the last reference (the pool's cleanup, or a job) goes.
#[derive(Debug)]
pub struct PoolBlock {
    start: *mut u8,
}

// SAFETY: once shared, nobody writes the block (nginx has read the whole body into it) and
// exactly one owner frees it, on whichever thread drops the last reference.
unsafe impl Send for PoolBlock {}
unsafe impl Sync for PoolBlock {}

impl PoolBlock {
    /// # Safety
    /// `start` came from malloc, nothing else frees it, and nothing writes it any more.
    pub unsafe fn new(start: *mut u8) -> PoolBlock {
        PoolBlock { start }
    }

    pub fn start(&self) -> *mut u8 {
        self.start
    }
}

impl Drop for PoolBlock {
    fn drop(&mut self) {
        // SAFETY: see new(); this is the last reference.
        unsafe { libc::free(self.start.cast()) };
    }
}

/// Body bytes inside a shared pool block.
#[derive(Debug)]
pub struct SharedBuf {
    _block: Arc<PoolBlock>,
    data: *const u8,
    len: usize,
}

// SAFETY: the bytes are only read, and the Arc keeps the block alive.
unsafe impl Send for SharedBuf {}

impl SharedBuf {
    /// # Safety
    /// `data..data+len` lies inside `block`.
    pub unsafe fn new(block: Arc<PoolBlock>, data: *const u8, len: usize) -> SharedBuf {
        SharedBuf {
            _block: block,
            data,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: see new().
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

/// A request body as an ordered list of segments.
#[derive(Debug, Default)]
pub struct Body {
    segments: Vec<Segment>,
    len: u64,
}

impl Body {
    pub fn push(&mut self, segment: Segment) {
        self.len += match &segment {
            Segment::Memory(v) => v.len() as u64,
            Segment::Shared(t) => t.len as u64,
            Segment::File { len, .. } => *len,
        };
        self.segments.push(segment);
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the whole body into `dst`, which must be exactly `len()` bytes.
    pub fn read_into(&self, dst: &mut [u8]) -> io::Result<()> {
        assert_eq!(dst.len() as u64, self.len);
        self.read_range_into(0, dst)
    }

    /// Copies `dst.len()` bytes starting at body offset `start` into `dst`.
    pub fn read_range_into(&self, start: u64, dst: &mut [u8]) -> io::Result<()> {
        let end = start + dst.len() as u64;
        assert!(end <= self.len, "range past the end of the body");
        let (mut seg_start, mut at) = (0u64, 0usize);
        for s in &self.segments {
            let seg_len = match s {
                Segment::Memory(v) => v.len() as u64,
                Segment::Shared(t) => t.len as u64,
                Segment::File { len, .. } => *len,
            };
            let seg_end = seg_start + seg_len;
            if seg_end > start && seg_start < end {
                let from = start.max(seg_start) - seg_start;
                let n = (end.min(seg_end) - seg_start - from) as usize;
                match s {
                    Segment::Memory(v) => {
                        dst[at..at + n].copy_from_slice(&v[from as usize..from as usize + n])
                    }
                    Segment::Shared(t) => dst[at..at + n]
                        .copy_from_slice(&t.as_slice()[from as usize..from as usize + n]),
                    Segment::File { file, offset, .. } => {
                        file.read_exact_at(&mut dst[at..at + n], offset + from)?
                    }
                }
                at += n;
            }
            seg_start = seg_end;
            if seg_start >= end {
                break;
            }
        }
        Ok(())
    }

    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        if let [Segment::Memory(v)] = self.segments.as_slice() {
            return Ok(v.clone());
        }
        let mut v = vec![0u8; self.len as usize];
        self.read_into(&mut v)?;
        Ok(v)
    }
}

/// How a request may be batched (`gpu_batch_size`, `gpu_batch_delay` of its location).
/// A batch takes its limits from its oldest request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Most requests in one launch.
    pub size: usize,
    /// How long the oldest request may wait for a fuller batch.
    pub delay: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            size: 1,
            delay: Duration::ZERO,
        }
    }
}

/// One request's work.
pub struct Job {
    pub id: u64,
    /// Its location's op instance, and that instance's key (batches never mix keys).
    pub op: Arc<dyn Op>,
    pub op_key: OpKey,
    /// Its parameters, from the location's `gpu_process` values (see `Op::admit`).
    pub params: Params,
    pub fallback: Fallback,
    pub batching: Batching,
    pub body: Body,
    /// What `Op::decode` made of the body (set on the GPU thread; `None` before, and for
    /// ops that batch raw bodies).
    pub decoded: Option<Decoded>,
    /// The request's `gpu_timeout`: it gets 504 after that, and a batch holding it is taken
    /// as hung once it has run longer than the longest of its requests' timeouts.
    pub timeout: Duration,
    /// Set by the event loop when the request goes away (client gone, timed out).
    pub cancelled: Arc<AtomicBool>,
    pub queued_at: Instant,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("op", &self.op.name())
            .field("op_key", &self.op_key)
            .field("len", &self.body.len())
            .finish()
    }
}

impl Job {
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// Why a job produced no output; each maps to one HTTP status at the nginx edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// 400: the body or a parameter is not valid input for the op.
    BadInput(String),
    /// 404: the request names something the location does not serve (a model).
    NotFound(String),
    /// 413: the body is larger than the op takes.
    TooLarge(String),
    /// 503: no GPU and `gpu_fallback off`.
    Unavailable(String),
    /// 500: anything else (a failed temp-file read, a GPU failure without fallback).
    Internal(String),
}

/// Where a job ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Gpu(usize),
    Cpu,
    None,
}

#[derive(Debug)]
pub struct Completion {
    pub id: u64,
    pub result: Result<Output, JobError>,
    pub device: Device,
    pub batch_size: usize,
    pub queue_time: Duration,
    pub exec_time: Duration,
}

/// Log severity for messages the GPU thread asks the event loop to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Alert,
    Error,
    Warn,
    Notice,
    Info,
}

/// What the GPU thread sends back to the event loop.
#[derive(Debug)]
pub enum Event {
    Done(Completion),
    Log(Level, String),
    /// The worker should be replaced (its GPU failed for good, or its thread keeps
    /// panicking): the reason.
    Restart(String),
    /// The thread ended without being asked to: nothing will answer what it held.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn body_joins_memory_and_file_segments_in_order() {
        let mut tmp = tempfile();
        tmp.write_all(b"0123456789").unwrap();
        let file = Arc::new(tmp);
        let mut body = Body::default();
        body.push(Segment::Memory(b"ab".to_vec()));
        body.push(Segment::File {
            file: file.clone(),
            offset: 3,
            len: 4,
        });
        body.push(Segment::Memory(b"z".to_vec()));
        body.push(Segment::File {
            file,
            offset: 0,
            len: 1,
        });
        assert_eq!(body.len(), 8);
        assert_eq!(body.to_vec().unwrap(), b"ab3456z0");
    }

    #[test]
    fn any_range_reads_across_segments() {
        let mut tmp = tempfile();
        tmp.write_all(b"0123456789").unwrap();
        let file = Arc::new(tmp);
        let mut body = Body::default();
        body.push(Segment::Memory(b"abc".to_vec()));
        body.push(Segment::Memory(Vec::new()));
        body.push(Segment::File {
            file,
            offset: 2,
            len: 5,
        });
        body.push(Segment::Memory(b"xy".to_vec()));
        let whole = body.to_vec().unwrap();
        assert_eq!(whole, b"abc23456xy");
        for start in 0..=whole.len() {
            for end in start..=whole.len() {
                let mut dst = vec![b'?'; end - start];
                body.read_range_into(start as u64, &mut dst).unwrap();
                assert_eq!(dst, &whole[start..end], "range {start}..{end}");
            }
        }
    }

    #[test]
    fn a_shared_block_reads_its_ranges_and_is_freed_by_its_last_owner() {
        // SAFETY: a fresh malloc'd block, owned by the PoolBlock from here on.
        let block = unsafe {
            let p = libc::malloc(100) as *mut u8;
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            Arc::new(PoolBlock::new(p))
        };
        let start = block.start();
        let mut body = Body::default();
        body.push(Segment::Memory(b"ab".to_vec()));
        // SAFETY: both ranges lie inside the 100-byte block.
        unsafe {
            body.push(Segment::Shared(SharedBuf::new(
                block.clone(),
                start.add(10),
                50,
            )));
            body.push(Segment::Shared(SharedBuf::new(
                block.clone(),
                start.add(90),
                10,
            )));
        }
        assert_eq!(body.len(), 62);
        let v = body.to_vec().unwrap();
        assert_eq!(&v[..2], b"ab");
        assert_eq!(v[2..52], (10u8..60).collect::<Vec<_>>()[..]);
        assert_eq!(v[52..], (90u8..100).collect::<Vec<_>>()[..]);
        let mut part = [0u8; 5];
        body.read_range_into(20, &mut part).unwrap();
        assert_eq!(part, [28, 29, 30, 31, 32]);
        // The pool's reference and the body's two: the block outlives whichever goes first.
        assert_eq!(Arc::strong_count(&block), 3);
        drop(body);
        assert_eq!(Arc::strong_count(&block), 1);
    }

    #[test]
    fn short_temp_file_is_an_error() {
        let mut tmp = tempfile();
        tmp.write_all(b"abc").unwrap();
        let mut body = Body::default();
        body.push(Segment::File {
            file: Arc::new(tmp),
            offset: 1,
            len: 5,
        });
        assert!(body.to_vec().is_err());
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "ngx-gpu-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
