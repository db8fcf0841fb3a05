//! Metrics, health and status, summed over all workers through one shared memory zone of
//! the module's own (`zone.rs`: its layout; `shm.rs`: the zone in nginx; `nvml.rs`: device
//! samples; `text.rs`: the Prometheus text; `status.rs`: readiness and the status JSON).
//!
//! This file is the process's side: the zone it attached to, its worker slot, the device
//! block it writes into (that of the device its GPU thread has open, `cpu` while none),
//! and what the request path, the event loop and the GPU thread record. Every write is an
//! atomic on plain memory (no lock, no nginx API), so any thread of a worker may record; a
//! process without a zone (unit tests, a configuration without metrics) records nothing.

pub mod nvml;
pub mod shm;
pub mod status;
pub mod text;
pub mod zone;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

pub use zone::{DeviceState, OpState, Outcome, Zone};
use zone::{LocStats, BATCH_BOUNDS, CPU_BLOCK, DURATION_BOUNDS_US, MPS_OFF, MPS_ON, MPS_UNKNOWN};

/// What this process attached to in init_process.
struct Attached {
    zone: Zone,
    /// Its worker slot (`ngx_worker`), if it has one.
    slot: Option<usize>,
    generation: u64,
    pid: u64,
}

static ATTACHED: OnceLock<Attached> = OnceLock::new();

/// The device block this process writes its locations' counters into: its open device's,
/// `CPU_BLOCK` while it has none (set by the GPU thread, read by every thread).
static BLOCK: AtomicUsize = AtomicUsize::new(CPU_BLOCK);

/// Location `loc`'s counters in this process's device block now.
fn stats(loc: usize) -> Option<&'static LocStats> {
    ATTACHED.get()?.zone.loc(loc, BLOCK.load(Relaxed))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Attaches this process to `zone` and, for a worker, takes slot `worker` back (a
/// respawned worker) or over (a worker of a newer configuration). Once per process.
pub fn attach(zone: Zone, worker: Option<usize>) -> Result<(), String> {
    let generation = zone.header().generation.load(Relaxed);
    let pid = std::process::id() as u64;
    let slot = match worker {
        Some(w) if zone.take_slot(w, generation, pid, now_ms()) => Some(w),
        Some(w) => {
            return Err(format!(
                "worker {w} has no slot in the metrics zone ({} slots: is \"worker_processes\" \
                 after the http block?)",
                zone.layout.workers
            ))
        }
        None => None,
    };
    ATTACHED
        .set(Attached {
            zone,
            slot,
            generation,
            pid,
        })
        .map_err(|_| "attached twice".into())
}

/// The zone this process attached to.
pub fn zone() -> Option<Zone> {
    ATTACHED.get().map(|a| a.zone)
}

/// This worker's slot, while it still holds it (a newer configuration's worker of the
/// same number takes it over; the old worker then stops writing there).
fn mine() -> Option<(&'static Attached, usize)> {
    let a = ATTACHED.get()?;
    let w = a.slot?;
    a.zone.owns(w, a.generation, a.pid).then_some((a, w))
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/* the request path (event loop) */

/// A request of location `loc` was answered with `outcome`, `took` after its handler
/// started, with `bytes_out` body bytes (0 for errors).
pub fn answered(loc: usize, outcome: Outcome, took: Duration, bytes_out: u64) {
    if let Some(s) = stats(loc) {
        s.count(outcome).fetch_add(1, Relaxed);
        s.request.observe(&DURATION_BOUNDS_US, us(took));
        if outcome == Outcome::Success {
            s.success_us.fetch_add(us(took), Relaxed);
            s.last_success_ms.fetch_max(now_ms(), Relaxed);
        } else {
            s.failure_us.fetch_add(us(took), Relaxed);
        }
        s.response_bytes.fetch_add(bytes_out, Relaxed);
    }
    if let Some((a, w)) = mine() {
        if let Some(s) = a.zone.slot(w) {
            s.requests.fetch_add(1, Relaxed);
        }
    }
}

/// A request body of `n` bytes was read for location `loc`.
pub fn request_bytes(loc: usize, n: u64) {
    if let Some(s) = stats(loc) {
        s.request_bytes.fetch_add(n, Relaxed);
    }
}

/// A request of location `loc` ran (GPU or CPU path): its queue and compute time.
pub fn ran(loc: usize, queue: Duration, compute: Duration) {
    if let Some(s) = stats(loc) {
        s.inferences.fetch_add(1, Relaxed);
        s.queue.observe(&DURATION_BOUNDS_US, us(queue));
        s.compute.observe(&DURATION_BOUNDS_US, us(compute));
    }
}

/// Requests of `loc` this worker holds changed by `delta`; `depth` is the worker's total.
pub fn pending(loc: usize, delta: i64, depth: usize) {
    let Some((a, w)) = mine() else { return };
    if let Some(p) = a.zone.pending(w, loc) {
        p.fetch_add(delta, Relaxed);
    }
    if let Some(s) = a.zone.slot(w) {
        s.queue_depth.store(depth as u64, Relaxed);
    }
}

/// Every request this worker held is gone (its GPU thread stopped).
pub fn pending_cleared() {
    let Some((a, w)) = mine() else { return };
    for l in 0..a.zone.layout.locations {
        if let Some(p) = a.zone.pending(w, l) {
            p.store(0, Relaxed);
        }
    }
    if let Some(s) = a.zone.slot(w) {
        s.queue_depth.store(0, Relaxed);
    }
}

/// The worker's last error or warning, for `gpu_status`.
pub fn error(msg: &str) {
    let Some((a, w)) = mine() else { return };
    if let Some(s) = a.zone.slot(w) {
        s.last_error.set(msg.strip_prefix("gpu: ").unwrap_or(msg));
        s.last_error_ms.store(now_ms(), Relaxed);
    }
}

pub fn thread_up(up: bool) {
    let Some((a, w)) = mine() else { return };
    if let Some(s) = a.zone.slot(w) {
        s.thread_up.store(up as u32, Relaxed);
        if !up {
            for l in 0..a.zone.layout.locations {
                if let Some(st) = a.zone.op_state(w, l) {
                    st.store(OpState::Unknown as u8, Relaxed);
                }
            }
        }
    }
}

/* the GPU thread */

/// A batch of `n` requests (pieces) of location `loc` ran.
pub fn batch(loc: usize, n: usize) {
    if let Some(s) = stats(loc) {
        s.batches.fetch_add(1, Relaxed);
        s.batch_size.observe(&BATCH_BOUNDS, n as u64);
    }
    if let Some((a, w)) = mine() {
        if let Some(s) = a.zone.slot(w) {
            s.batches.fetch_add(1, Relaxed);
        }
    }
}

/// The worker's device: its state, and once open its CUDA ordinal. From now on the
/// worker counts under that device's block, or `cpu` while it has none open.
pub fn device(state: DeviceState, ordinal: Option<usize>) {
    let Some(a) = ATTACHED.get() else { return };
    let block = block_for(&a.zone.layout, state, ordinal);
    BLOCK.store(block, Relaxed);
    let Some((a, w)) = mine() else { return };
    let Some(s) = a.zone.slot(w) else { return };
    if let Some(ordinal) = ordinal {
        s.device_ordinal.store(ordinal as u32, Relaxed);
    }
    s.device_state.store(state as u32, Relaxed);
    s.block.store(block as u64, Relaxed);
}

/// The block of a worker whose device is in `state` (`ordinal` once open). The layout has
/// a block for every device a worker is placed on (`Layout::new`); a device it has none
/// for (a worker count that changed without the zone) counts under `cpu`.
fn block_for(layout: &zone::Layout, state: DeviceState, ordinal: Option<usize>) -> usize {
    match (state, ordinal) {
        (DeviceState::Open, Some(o)) => layout.block_of(o).unwrap_or(CPU_BLOCK),
        _ => CPU_BLOCK,
    }
}

/* the event loop, from the GPU thread's log lines */

/// The worker's start line (`gpu: using gpu0 "NAME", ..., MPS: on`): the device's name,
/// and whether MPS shares its context, as the driver told.
pub fn start_line(line: &str) {
    let Some((a, w)) = mine() else { return };
    let Some(s) = a.zone.slot(w) else { return };
    let (name, mps) = parse_start_line(line);
    if let Some(name) = name {
        s.device_name.set(name);
    }
    s.mps.store(mps, Relaxed);
}

fn parse_start_line(line: &str) -> (Option<&str>, u32) {
    let mps = if line.contains("MPS: on") {
        MPS_ON
    } else if line.contains("MPS: off") {
        MPS_OFF
    } else {
        MPS_UNKNOWN
    };
    (line.split('"').nth(1), mps)
}

/// Whether this worker can serve location `loc`'s op now.
pub fn op_state(loc: usize, state: OpState) {
    let Some((a, w)) = mine() else { return };
    if let Some(st) = a.zone.op_state(w, loc) {
        st.store(state as u8, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_counts_under_its_open_device_else_cpu() {
        let l = zone::Layout::new(1, 4, Some(&[2, 5]));
        assert_eq!(block_for(&l, DeviceState::Open, Some(2)), 1);
        assert_eq!(block_for(&l, DeviceState::Open, Some(5)), 2);
        assert_eq!(l.label(block_for(&l, DeviceState::Open, Some(5))), "gpu5");
        for st in [
            DeviceState::Starting,
            DeviceState::Opening,
            DeviceState::Retrying,
            DeviceState::Unavailable,
        ] {
            assert_eq!(block_for(&l, st, None), CPU_BLOCK);
        }
        // Not a device of this layout.
        assert_eq!(block_for(&l, DeviceState::Open, Some(3)), CPU_BLOCK);
    }

    #[test]
    fn the_start_line_gives_the_device_name_and_mps() {
        let line = "gpu: using gpu0 \"NVIDIA H100 80GB HBM3\", compute capability 9.0, \
                    81079 MiB, MPS: on";
        assert_eq!(
            parse_start_line(line),
            (Some("NVIDIA H100 80GB HBM3"), MPS_ON)
        );
        let off = line.replace("MPS: on", "MPS: off");
        assert_eq!(parse_start_line(&off).1, MPS_OFF);
        let before = "gpu: using gpu1 \"X\", compute capability 8.0, 100 MiB";
        assert_eq!(parse_start_line(before), (Some("X"), MPS_UNKNOWN));
    }
}
