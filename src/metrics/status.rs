//! Readiness, and the status JSON of `gpu_status` (per worker, per location and its
//! devices, per device), read from the zone.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};

use super::zone::{
    DeviceState, LocStats, OpState, Outcome, Zone, CPU_BLOCK, MPS_OFF, MPS_ON, NVML_OK,
    NVML_UNAVAILABLE,
};

/// Whether a process id is running (workers that died leave their slot behind).
pub type Live<'a> = &'a dyn Fn(u64) -> bool;

/// The locations that share (model, location) labels, summed as one.
pub struct Group {
    pub model: String,
    pub location: String,
    pub indexes: Vec<usize>,
}

impl Group {
    /// The counters of every device block: summed, the group's totals.
    pub fn stats<'a>(&'a self, zone: &'a Zone) -> impl Iterator<Item = &'a LocStats> + 'a {
        self.indexes.iter().flat_map(move |&l| zone.loc_all(l))
    }

    /// The counters of device block `b`.
    pub fn stats_at<'a>(
        &'a self,
        zone: &'a Zone,
        b: usize,
    ) -> impl Iterator<Item = &'a LocStats> + 'a {
        self.indexes.iter().filter_map(move |&l| zone.loc(l, b))
    }

    /// The device blocks that have series: every block a running worker counts under now
    /// (so a device's series are there, at 0, from its workers' start) and every block
    /// with counts; `cpu` at least, so that a location always has its series.
    pub fn blocks(&self, zone: &Zone, live: Live<'_>) -> Vec<usize> {
        let used: Vec<usize> = live_slots(zone, live)
            .iter()
            .filter_map(|&w| zone.slot(w))
            .map(|s| s.block.load(Relaxed) as usize)
            .collect();
        let out: Vec<usize> = (0..zone.layout.blocks())
            .filter(|&b| used.contains(&b) || self.stats_at(zone, b).any(counted))
            .collect();
        if out.is_empty() {
            vec![CPU_BLOCK]
        } else {
            out
        }
    }
}

/// Whether any request was read, answered or run in these counters.
fn counted(s: &LocStats) -> bool {
    s.outcomes.iter().any(|n| n.load(Relaxed) != 0)
        || s.inferences.load(Relaxed) != 0
        || s.batches.load(Relaxed) != 0
        || s.request_bytes.load(Relaxed) != 0
}

pub type Groups = Vec<Group>;

pub fn groups(zone: &Zone, locations: &[(String, String)]) -> Groups {
    let mut out: Groups = Vec::new();
    for (i, (model, location)) in locations.iter().enumerate() {
        if zone.loc(i, CPU_BLOCK).is_none() {
            continue;
        }
        match out
            .iter_mut()
            .find(|g| &g.model == model && &g.location == location)
        {
            Some(g) => g.indexes.push(i),
            None => out.push(Group {
                model: model.clone(),
                location: location.clone(),
                indexes: vec![i],
            }),
        }
    }
    out
}

/// Slots held by a running worker.
fn live_slots(zone: &Zone, live: Live<'_>) -> Vec<usize> {
    (0..zone.layout.workers)
        .filter(|&w| {
            zone.slot(w)
                .is_some_and(|s| s.generation.load(Relaxed) != 0 && live(s.pid.load(Relaxed)))
        })
        .collect()
}

/// Requests of these locations queued or in a batch now, over the running workers.
pub fn pending(zone: &Zone, locations: &[usize], live: Live<'_>) -> i64 {
    pending_in(zone, locations, None, live)
}

/// The same over the running workers that count under device block `block` now (None:
/// every worker).
pub fn pending_in(zone: &Zone, locations: &[usize], block: Option<usize>, live: Live<'_>) -> i64 {
    let mut n = 0;
    for w in live_slots(zone, live) {
        let here = zone
            .slot(w)
            .is_some_and(|s| block.is_none_or(|b| s.block.load(Relaxed) as usize == b));
        if !here {
            continue;
        }
        for &l in locations {
            n += zone.pending(w, l).map_or(0, |p| p.load(Relaxed).max(0));
        }
    }
    n
}

pub struct Readiness {
    pub ready: bool,
    pub reasons: Vec<String>,
    /// Per worker number of the running configuration.
    pub workers: Vec<bool>,
}

/// Ready when every worker of the newest configuration runs, has its GPU thread up (where
/// there are `gpu_process` locations) and can serve every location's op.
pub fn readiness(
    zone: &Zone,
    locations: &[(String, String)],
    workers: usize,
    live: Live<'_>,
) -> Readiness {
    let current = live_slots(zone, live)
        .iter()
        .filter_map(|&w| zone.slot(w))
        .map(|s| s.generation.load(Relaxed))
        .max()
        .unwrap_or(0);
    let mut reasons = Vec::new();
    let mut per_worker = Vec::with_capacity(workers);
    for w in 0..workers {
        let before = reasons.len();
        match zone.slot(w) {
            None => reasons.push(format!(
                "worker {w} has no slot in the metrics zone (sized for {})",
                zone.layout.workers
            )),
            Some(s) => {
                let generation = s.generation.load(Relaxed);
                let pid = s.pid.load(Relaxed);
                if generation == 0 {
                    reasons.push(format!("worker {w} has not started"));
                } else if !live(pid) {
                    reasons.push(format!("worker {w} (pid {pid}) is not running"));
                } else if generation < current {
                    reasons.push(format!(
                        "worker {w} (pid {pid}) is of an older configuration"
                    ));
                } else if !locations.is_empty() && s.thread_up.load(Relaxed) == 0 {
                    reasons.push(format!("worker {w}: the GPU thread is not running"));
                } else {
                    for (l, (model, location)) in locations.iter().enumerate() {
                        let st = zone
                            .op_state(w, l)
                            .map_or(OpState::Unknown, |s| OpState::from_u8(s.load(Relaxed)));
                        if !st.serves() {
                            reasons.push(format!(
                                "worker {w}: {location} ({model}) cannot serve: {}",
                                st.name()
                            ));
                        }
                    }
                }
            }
        }
        per_worker.push(reasons.len() == before);
    }
    Readiness {
        ready: reasons.is_empty(),
        reasons,
        workers: per_worker,
    }
}

/// One device's latest NVML sample.
pub struct DeviceNow {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_used: u64,
    pub memory_total: u64,
    pub utilization: u64,
    pub power_mw: u64,
}

pub fn devices(zone: &Zone) -> Vec<DeviceNow> {
    let n = zone.header().devices.load(Relaxed) as usize;
    (0..n)
        .filter_map(|d| zone.device(d))
        .filter(|d| d.present.load(Relaxed) != 0)
        .map(|d| DeviceNow {
            index: d.index.load(Relaxed),
            uuid: d.uuid.get(),
            name: d.name.get(),
            memory_used: d.memory_used.load(Relaxed),
            memory_total: d.memory_total.load(Relaxed),
            utilization: d.utilization.load(Relaxed),
            power_mw: d.power_mw.load(Relaxed),
        })
        .collect()
}

fn nvml_state(zone: &Zone) -> String {
    match zone.header().nvml.load(Relaxed) {
        NVML_OK => "ok".into(),
        NVML_UNAVAILABLE => format!("unavailable: {}", zone.header().nvml_error.get()),
        // Worker 0 has not tried yet (or this configuration has no worker 0 running).
        _ => "not sampled".into(),
    }
}

/// Request counters summed over `stats` (some locations' blocks): requests, outcomes,
/// batches, the time and byte sums.
fn counters(stats: &[&LocStats]) -> serde_json::Map<String, Value> {
    let sum = |f: &dyn Fn(&LocStats) -> u64| -> u64 { stats.iter().map(|s| f(s)).sum() };
    let success = sum(&|s| s.count(Outcome::Success).load(Relaxed));
    let mut failures = serde_json::Map::new();
    let mut failed = 0;
    for o in Outcome::FAILURES {
        let n = sum(&|s| s.count(o).load(Relaxed));
        failed += n;
        failures.insert(o.reason().into(), n.into());
    }
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.into(), v);
    };
    put("requests", (success + failed).into());
    put("success", success.into());
    put("failures", Value::Object(failures));
    put("inferences", sum(&|s| s.inferences.load(Relaxed)).into());
    put("batches", sum(&|s| s.batches.load(Relaxed)).into());
    put(
        "batch_size_sum",
        sum(&|s| s.batch_size.sum.load(Relaxed)).into(),
    );
    put("request_us", sum(&|s| s.request.sum.load(Relaxed)).into());
    put("queue_us", sum(&|s| s.queue.sum.load(Relaxed)).into());
    put("compute_us", sum(&|s| s.compute.sum.load(Relaxed)).into());
    put(
        "request_bytes",
        sum(&|s| s.request_bytes.load(Relaxed)).into(),
    );
    put(
        "response_bytes",
        sum(&|s| s.response_bytes.load(Relaxed)).into(),
    );
    m
}

/// A location's requests per device block (`{"gpu0": {...}, "cpu": {...}}`).
fn by_device(zone: &Zone, g: &Group, live: Live<'_>) -> Value {
    let mut out = serde_json::Map::new();
    for b in g.blocks(zone, live) {
        let mut m = counters(&g.stats_at(zone, b).collect::<Vec<_>>());
        m.insert(
            "pending".into(),
            pending_in(zone, &g.indexes, Some(b), live).into(),
        );
        out.insert(zone.layout.label(b), Value::Object(m));
    }
    Value::Object(out)
}

/// The status JSON: readiness, each worker, each location's totals, each device.
pub fn json(
    zone: &Zone,
    locations: &[(String, String)],
    workers: usize,
    live: Live<'_>,
    now_ms: u64,
) -> Value {
    let ready = readiness(zone, locations, workers, live);
    let h = zone.header();
    let worker_list: Vec<Value> = (0..workers.min(zone.layout.workers))
        .filter_map(|w| zone.slot(w).map(|s| (w, s)))
        .map(|(w, s)| {
            let state = DeviceState::from_u32(s.device_state.load(Relaxed));
            let ops: Vec<Value> = locations
                .iter()
                .enumerate()
                .map(|(l, (model, location))| {
                    let st = zone
                        .op_state(w, l)
                        .map_or(OpState::Unknown, |s| OpState::from_u8(s.load(Relaxed)));
                    json!({"location": location, "model": model, "state": st.name()})
                })
                .collect();
            let device = (state == DeviceState::Open)
                .then(|| format!("gpu{}", s.device_ordinal.load(Relaxed)));
            json!({
                "worker": w,
                "pid": s.pid.load(Relaxed),
                "running": s.generation.load(Relaxed) != 0 && live(s.pid.load(Relaxed)),
                "ready": ready.workers.get(w).copied().unwrap_or(false),
                "generation": s.generation.load(Relaxed),
                "started_ms": s.started_ms.load(Relaxed),
                "gpu_thread": s.thread_up.load(Relaxed) != 0,
                "device_state": state.name(),
                "device": device,
                "device_name": s.device_name.get(),
                "metrics_device": zone.layout.label(s.block.load(Relaxed) as usize),
                "mps": match s.mps.load(Relaxed) { MPS_ON => "on", MPS_OFF => "off", _ => "unknown" },
                "queue_depth": s.queue_depth.load(Relaxed),
                "batches": s.batches.load(Relaxed),
                "requests": s.requests.load(Relaxed),
                "last_error": s.last_error.get(),
                "last_error_ms": s.last_error_ms.load(Relaxed),
                "ops": ops,
            })
        })
        .collect();
    let locs: Vec<Value> = groups(zone, locations)
        .iter()
        .map(|g| {
            let mut m = serde_json::Map::new();
            m.insert("model".into(), g.model.clone().into());
            m.insert("location".into(), g.location.clone().into());
            m.extend(counters(&g.stats(zone).collect::<Vec<_>>()));
            m.insert("pending".into(), pending(zone, &g.indexes, live).into());
            m.insert("devices".into(), by_device(zone, g, live));
            Value::Object(m)
        })
        .collect();
    let devs: Vec<Value> = devices(zone)
        .iter()
        .map(|d| {
            json!({
                "device": format!("gpu{}", d.index),
                "uuid": d.uuid,
                "name": d.name,
                "memory_used": d.memory_used,
                "memory_total": d.memory_total,
                "utilization": d.utilization as f64 / 100.0,
                "power_w": d.power_mw as f64 / 1000.0,
            })
        })
        .collect();
    json!({
        "ready": ready.ready,
        "reasons": ready.reasons,
        "time_ms": now_ms,
        "since_ms": h.created_ms.load(Relaxed),
        "generation": h.generation.load(Relaxed),
        "nvml": nvml_state(zone),
        "workers": worker_list,
        "locations": locs,
        "devices": devs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::zone::Layout;

    #[test]
    fn readiness_names_each_worker_that_cannot_serve_and_why() {
        let layout = Layout::new(2, 3, None);
        let mut buf = vec![0u64; layout.size / 8 + 16];
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: the buffer is large enough and outlives the zone.
        let z = unsafe { Zone::at(p.add(p.align_offset(64)), layout) };
        z.init_fresh(0);
        let locs = vec![
            ("echo".to_string(), "/e".to_string()),
            ("kernel k".to_string(), "/k".to_string()),
        ];
        let alive = |pid: u64| pid != 666;
        let r = readiness(&z, &locs, 3, &alive);
        assert!(!r.ready);
        assert_eq!(r.reasons.len(), 3, "{:?}", r.reasons);
        assert!(r.reasons[0].contains("worker 0 has not started"));
        for w in 0..3 {
            z.take_slot(w, 1, 100 + w as u64, 0);
            z.slot(w).unwrap().thread_up.store(1, Relaxed);
            for l in 0..2 {
                z.op_state(w, l).unwrap().store(OpState::Gpu as u8, Relaxed);
            }
        }
        assert!(readiness(&z, &locs, 3, &alive).ready);
        // A kernel location on a worker without a GPU.
        z.op_state(1, 1)
            .unwrap()
            .store(OpState::NoDevice as u8, Relaxed);
        let r = readiness(&z, &locs, 3, &alive);
        assert_eq!(r.workers, vec![true, false, true]);
        assert!(
            r.reasons[0].starts_with("worker 1: /k (kernel k) cannot serve"),
            "{:?}",
            r.reasons
        );
        z.op_state(1, 1).unwrap().store(OpState::Cpu as u8, Relaxed);
        // A worker that died; then one of a newer configuration beside older ones.
        z.slot(2).unwrap().pid.store(666, Relaxed);
        let r = readiness(&z, &locs, 3, &alive);
        assert_eq!(r.workers, vec![true, true, false]);
        z.take_slot(2, 2, 102, 0);
        z.slot(2).unwrap().thread_up.store(1, Relaxed);
        z.op_state(2, 0).unwrap().store(OpState::Cpu as u8, Relaxed);
        z.op_state(2, 1).unwrap().store(OpState::Gpu as u8, Relaxed);
        let r = readiness(&z, &locs, 3, &alive);
        assert_eq!(r.workers, vec![false, false, true], "{:?}", r.reasons);
        assert!(r.reasons[0].contains("older configuration"));
        // The thread down.
        z.take_slot(0, 2, 100, 0);
        let r = readiness(&z, &locs, 3, &alive);
        assert!(r.reasons[0].contains("worker 0: the GPU thread is not running"));
    }
}
