//! Helpers shared by the unit tests: fresh random data, jobs, and a driver that submits
//! jobs to a GPU thread from several threads at once and checks every answer against an
//! independent reference (the `blake3` crate, or the input itself for echo).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::sync::{Arc, OnceLock};

use crate::engine::job::{Batching, Body, Completion, Device, Event, Fallback, Job, Segment};
use crate::engine::thread::GpuThread;
use crate::ops::{self, Params};

/// The built-in ops the thread tests use, as a configuration would have them: `Echo` is op
/// instance 0, `Blake3` instance 1 (see `ops()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Echo,
    Blake3,
    /// A user kernel: no CPU path, and it does not run on the test device.
    Kernel,
}

impl Op {
    pub fn key(self) -> usize {
        match self {
            Op::Echo => 0,
            Op::Blake3 => 1,
            Op::Kernel => 2,
        }
    }
}

/// The op instances of the tests' configuration, by key: what a device loads. The test
/// kernel (key 2, never declared) is not among them: it runs on no device here.
pub fn ops() -> Vec<Arc<dyn ops::Op>> {
    all_ops()[..2].to_vec()
}

fn all_ops() -> &'static [Arc<dyn ops::Op>] {
    static OPS: OnceLock<Vec<Arc<dyn ops::Op>>> = OnceLock::new();
    OPS.get_or_init(|| {
        vec![
            ops::parse(&["echo"]).unwrap().op,
            ops::parse(&["blake3"]).unwrap().op,
            ops::parse(&["kernel", "k"]).unwrap().op,
        ]
    })
}

/// splitmix64, seeded from the clock so every run sees new data; the seed is printed.
pub struct Rng(u64);

impl Rng {
    pub fn fresh() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        eprintln!("random seed: {seed:#x}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

pub fn job(id: u64, op: Op, data: &[u8], batching: Batching) -> Job {
    let mut body = Body::default();
    // Split into two memory segments where possible, as nginx's buffers often are.
    let cut = data.len() / 3;
    body.push(Segment::Memory(data[..cut].to_vec()));
    body.push(Segment::Memory(data[cut..].to_vec()));
    Job {
        id,
        op: all_ops()[op.key()].clone(),
        op_key: op.key(),
        params: Params::default(),
        fallback: Fallback::Cpu,
        batching,
        body,
        decoded: None,
        timeout: Duration::from_secs(60),
        cancelled: Default::default(),
        queued_at: Instant::now(),
    }
}

/// What a correct answer is, computed without the module's code.
pub fn reference(op: Op, data: &[u8]) -> Vec<u8> {
    match op {
        Op::Echo => data.to_vec(),
        Op::Blake3 => format!("{}\n", ::blake3::hash(data).to_hex()).into_bytes(),
        Op::Kernel => unreachable!("a user kernel has no CPU reference here"),
    }
}

/// Collects `n` completions (or what came within `limit`).
pub fn wait_done(t: &GpuThread, n: usize, limit: Duration) -> Vec<Completion> {
    let mut done = Vec::new();
    let deadline = Instant::now() + limit;
    while done.len() < n && Instant::now() < deadline {
        for ev in t.drain() {
            if let Event::Done(c) = ev {
                done.push(c);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    done
}

/// Collects every event until `enough` holds for what came (or `limit` passes).
pub fn collect(t: &GpuThread, limit: Duration, enough: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    while !enough(&got) && Instant::now() < deadline {
        got.extend(t.drain());
        std::thread::sleep(Duration::from_micros(200));
    }
    got
}

/// The completions among `events`.
pub fn completions(events: &[Event]) -> Vec<&Completion> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Done(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// The log lines among `events`.
pub fn log_lines(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Log(_, m) => Some(m.as_str()),
            _ => None,
        })
        .collect()
}

/// Submits one job per input (ops alternating) from four threads at once, cancels the
/// ids for which `cancel(id)` holds right after submitting them, and checks that every
/// other job gets exactly its own correct answer from `device`. A cancelled job may still
/// be answered, when the thread answered it before the cancel came (the event loop drops
/// such an answer), but then once and rightly. Returns the largest batch size seen.
pub fn run_mixed(
    t: &GpuThread,
    inputs: &[Vec<u8>],
    batching: Batching,
    device: Device,
    cancel: impl Fn(u64) -> bool + Sync,
) -> usize {
    let op_of = |id: u64| {
        if id.is_multiple_of(2) {
            Op::Echo
        } else {
            Op::Blake3
        }
    };
    std::thread::scope(|s| {
        for part in 0..4u64 {
            let cancel = &cancel;
            s.spawn(move || {
                for (i, data) in inputs.iter().enumerate().skip(part as usize).step_by(4) {
                    let id = i as u64;
                    let j = job(id, op_of(id), data, batching);
                    let flag = j.cancelled.clone();
                    t.submit(j).expect("queue has room");
                    if cancel(id) {
                        flag.store(true, Ordering::Release);
                    }
                }
            });
        }
    });
    let expected = (0..inputs.len() as u64).filter(|id| !cancel(*id)).count();
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.iter().filter(|c: &&Completion| !cancel(c.id)).count() < expected
        && Instant::now() < deadline
    {
        done.extend(wait_done(t, 1, Duration::from_millis(50)));
    }
    // Give stray answers a moment to show up, to catch a second answer to a job.
    std::thread::sleep(Duration::from_millis(20));
    for ev in t.drain() {
        if let Event::Done(c) = ev {
            done.push(c);
        }
    }
    let answered = done.iter().filter(|c| !cancel(c.id)).count();
    assert_eq!(
        answered, expected,
        "answers: {answered}, expected {expected}"
    );
    let mut seen = vec![false; inputs.len()];
    let mut max_batch = 0;
    for c in done {
        let id = c.id as usize;
        assert!(!seen[id], "job {id} answered twice");
        seen[id] = true;
        let out = c.result.unwrap_or_else(|e| panic!("job {id}: {e:?}"));
        let want = reference(op_of(c.id), &inputs[id]);
        assert!(
            out.body == want,
            "job {id} ({} bytes, {:?}): wrong answer",
            inputs[id].len(),
            op_of(c.id)
        );
        assert_eq!(c.device, device, "job {id}");
        assert!(c.batch_size >= 1);
        max_batch = max_batch.max(c.batch_size);
    }
    max_batch
}
