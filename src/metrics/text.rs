//! The Prometheus text format (0.0.4) of the zone: per location, op and device (the
//! `device` label, `gpuN` as `$gpu_device` names it, or `cpu`), per NVML device, per
//! worker; summed over every worker. Names after Triton's where one fits.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use super::status::{self, Live};
use super::zone::{Hist, Outcome, Zone, BATCH_BOUNDS, DURATION_BOUNDS_US};

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

type HistOf = fn(&super::zone::LocStats) -> &Hist<19>;
type DeviceValue = fn(&status::DeviceNow) -> f64;

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A number as Prometheus reads it (integers without a fraction).
fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Renders every series. `locations` are (model, location) by location index, `workers`
/// the running configuration's worker count.
pub fn render(zone: &Zone, locations: &[(String, String)], workers: usize, live: Live) -> String {
    let groups = status::groups(zone, locations);
    let series: Vec<Series> = groups
        .iter()
        .flat_map(|g| {
            g.blocks(zone, live).into_iter().map(move |b| Series {
                group: g,
                block: b,
                labels: format!(
                    "model=\"{}\",location=\"{}\",device=\"{}\"",
                    escape(&g.model),
                    escape(&g.location),
                    escape(&zone.layout.label(b))
                ),
            })
        })
        .collect();
    let mut out = String::with_capacity(4096 + series.len() * 4096);
    per_location(&mut out, zone, &series, live);
    per_device(&mut out, zone);
    let ready = status::readiness(zone, locations, workers, live);
    head(
        &mut out,
        "ngx_gpu_worker_ready",
        "gauge",
        "Whether the worker's GPU thread is up and it can serve every configured op (1) or not (0)",
    );
    for (w, ok) in ready.workers.iter().enumerate() {
        let _ = writeln!(out, "ngx_gpu_worker_ready{{worker=\"{w}\"}} {}", *ok as u8);
    }
    out
}

/// One label set of the per-location series: a group of locations on one device block.
struct Series<'a> {
    group: &'a status::Group,
    block: usize,
    labels: String,
}

impl<'a> Series<'a> {
    fn stats(&self, zone: &'a Zone) -> impl Iterator<Item = &'a super::zone::LocStats> + 'a {
        self.group.stats_at(zone, self.block)
    }
}

fn per_location(out: &mut String, zone: &Zone, series: &[Series], live: Live) {
    type Get = fn(&super::zone::LocStats) -> u64;
    let counters: [(&str, &str, Get); 9] = [
        (
            "nv_inference_request_success",
            "Number of successful requests",
            |s| s.count(Outcome::Success).load(Relaxed),
        ),
        (
            "nv_inference_count",
            "Number of inferences performed (requests run, on the GPU or the CPU path)",
            |s| s.inferences.load(Relaxed),
        ),
        (
            "nv_inference_exec_count",
            "Number of batches run",
            |s| s.batches.load(Relaxed),
        ),
        (
            "nv_inference_request_duration_us",
            "Cumulative request duration in microseconds (every outcome)",
            |s| s.request.sum.load(Relaxed),
        ),
        (
            "nv_inference_queue_duration_us",
            "Cumulative time requests waited for a batch, in microseconds",
            |s| s.queue.sum.load(Relaxed),
        ),
        (
            "nv_inference_compute_infer_duration_us",
            "Cumulative compute time of requests (their batch on the GPU or the CPU path), in microseconds",
            |s| s.compute.sum.load(Relaxed),
        ),
        (
            "ngx_gpu_request_bytes_total",
            "Request body bytes read",
            |s| s.request_bytes.load(Relaxed),
        ),
        (
            "ngx_gpu_response_bytes_total",
            "Response body bytes of successful requests",
            |s| s.response_bytes.load(Relaxed),
        ),
        ("", "", |_| 0),
    ];
    for (i, (name, help, get)) in counters.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        head(out, name, "counter", help);
        for g in series {
            let v: u64 = g.stats(zone).map(get).sum();
            let _ = writeln!(out, "{name}{{{}}} {v}", g.labels);
        }
        if i == 0 {
            head(
                out,
                "nv_inference_request_failure",
                "counter",
                "Number of failed requests, by reason",
            );
            for g in series {
                for o in Outcome::FAILURES {
                    let v: u64 = g.stats(zone).map(|s| s.count(o).load(Relaxed)).sum();
                    let _ = writeln!(
                        out,
                        "nv_inference_request_failure{{{},reason=\"{}\"}} {v}",
                        g.labels,
                        o.reason()
                    );
                }
            }
        }
    }
    head(
        out,
        "nv_inference_pending_request_count",
        "gauge",
        "Requests queued or in a batch now",
    );
    for g in series {
        let v = status::pending_in(zone, &g.group.indexes, Some(g.block), live);
        let _ = writeln!(
            out,
            "nv_inference_pending_request_count{{{}}} {v}",
            g.labels
        );
    }
    let hists: [(&str, &str, HistOf); 3] = [
        (
            "ngx_gpu_request_duration_seconds",
            "Request duration, from the handler to the answer (every outcome)",
            |s| &s.request,
        ),
        (
            "ngx_gpu_queue_duration_seconds",
            "Time requests waited for their batch",
            |s| &s.queue,
        ),
        (
            "ngx_gpu_compute_duration_seconds",
            "Compute time of requests (their batch)",
            |s| &s.compute,
        ),
    ];
    for (name, help, get) in hists {
        head(out, name, "histogram", help);
        for g in series {
            let bounds: Vec<String> = DURATION_BOUNDS_US
                .iter()
                .map(|b| num(*b as f64 / 1e6))
                .collect();
            let (cum, sum) = sum_hist(g.stats(zone).map(get));
            histogram(out, name, &g.labels, &bounds, &cum, &num(sum as f64 / 1e6));
        }
    }
    head(
        out,
        "ngx_gpu_batch_size",
        "histogram",
        "Requests (pieces of bodies) per batch",
    );
    for g in series {
        let bounds: Vec<String> = BATCH_BOUNDS.iter().map(|b| b.to_string()).collect();
        let (cum, sum) = sum_hist(g.stats(zone).map(|s| &s.batch_size));
        histogram(
            out,
            "ngx_gpu_batch_size",
            &g.labels,
            &bounds,
            &cum,
            &sum.to_string(),
        );
    }
}

fn sum_hist<'a, const B: usize>(hists: impl Iterator<Item = &'a Hist<B>>) -> ([u64; B], u64) {
    let mut cum = [0u64; B];
    let mut sum = 0;
    for h in hists {
        for (c, v) in cum.iter_mut().zip(h.cumulative()) {
            *c += v;
        }
        sum += h.sum.load(Relaxed);
    }
    (cum, sum)
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[String],
    cum: &[u64],
    sum: &str,
) {
    for (b, c) in bounds.iter().zip(cum) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
    }
    let count = cum.last().copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

fn per_device(out: &mut String, zone: &Zone) {
    let devices = status::devices(zone);
    if devices.is_empty() {
        return;
    }
    let series: [(&str, &str, DeviceValue); 4] = [
        (
            "nv_gpu_memory_used_bytes",
            "GPU memory used, in bytes (NVML)",
            |d| d.memory_used as f64,
        ),
        (
            "nv_gpu_memory_total_bytes",
            "GPU memory, in bytes (NVML)",
            |d| d.memory_total as f64,
        ),
        (
            "nv_gpu_utilization",
            "GPU utilization over NVML's last sample period (0..1)",
            |d| d.utilization as f64 / 100.0,
        ),
        (
            "nv_gpu_power_usage",
            "GPU power draw in watts (NVML)",
            |d| d.power_mw as f64 / 1000.0,
        ),
    ];
    for (name, help, get) in series {
        head(out, name, "gauge", help);
        for d in &devices {
            let _ = writeln!(
                out,
                "{name}{{device=\"gpu{}\",gpu_uuid=\"{}\"}} {}",
                d.index,
                escape(&d.uuid),
                num(get(d))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::zone::{Layout, OpState, CPU_BLOCK};

    fn zone(buf: &mut [u64], layout: Layout) -> Zone {
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: the buffer is large enough and outlives the zone in each test.
        unsafe { Zone::at(p.add(p.align_offset(64)), layout) }
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn sums_locations_with_the_same_labels_and_keeps_histograms_cumulative() {
        let layout = Layout::new(3, 2, None);
        let mut buf = vec![0u64; layout.size / 8 + 16];
        let z = zone(&mut buf, layout);
        z.init_fresh(0);
        let locs = vec![
            ("echo".to_string(), "/e".to_string()),
            ("kernel \"q\"".to_string(), "/k".to_string()),
            ("echo".to_string(), "/e".to_string()),
        ];
        // Two requests on location 0, three on location 2 (same labels), one failure;
        // every worker without a device (block cpu).
        for (l, us) in [(0, 40u64), (0, 3_000), (2, 60), (2, 60), (2, 90_000_000)] {
            let s = z.loc(l, CPU_BLOCK).unwrap();
            s.count(Outcome::Success).fetch_add(1, Relaxed);
            s.request.observe(&DURATION_BOUNDS_US, us);
        }
        z.loc(1, CPU_BLOCK)
            .unwrap()
            .count(Outcome::Timeout)
            .fetch_add(1, Relaxed);
        for w in 0..2 {
            z.take_slot(w, 1, std::process::id() as u64, 0);
            z.slot(w).unwrap().thread_up.store(1, Relaxed);
            for l in 0..3 {
                z.op_state(w, l).unwrap().store(OpState::Cpu as u8, Relaxed);
            }
        }
        z.pending(0, 0).unwrap().store(2, Relaxed);
        z.pending(1, 2).unwrap().store(3, Relaxed);
        let text = render(&z, &locs, 2, &|_| true);
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        let e = "model=\"echo\",location=\"/e\",device=\"cpu\"";
        has(&format!("nv_inference_request_success{{{e}}} 5"));
        has("nv_inference_request_failure{model=\"kernel \\\"q\\\"\",location=\"/k\",device=\"cpu\",reason=\"timeout\"} 1");
        has(&format!("nv_inference_pending_request_count{{{e}}} 5"));
        has(&format!(
            "ngx_gpu_request_duration_seconds_bucket{{{e},le=\"0.00005\"}} 1"
        ));
        has(&format!(
            "ngx_gpu_request_duration_seconds_bucket{{{e},le=\"0.0001\"}} 3"
        ));
        has(&format!(
            "ngx_gpu_request_duration_seconds_bucket{{{e},le=\"30\"}} 4"
        ));
        has(&format!(
            "ngx_gpu_request_duration_seconds_bucket{{{e},le=\"+Inf\"}} 5"
        ));
        has(&format!("ngx_gpu_request_duration_seconds_count{{{e}}} 5"));
        has(&format!(
            "ngx_gpu_request_duration_seconds_sum{{{e}}} 90.00316"
        ));
        has("ngx_gpu_worker_ready{worker=\"1\"} 1");
        assert_eq!(
            text.matches("# TYPE nv_inference_request_success counter")
                .count(),
            1
        );
        // No worker on a device and nothing counted there: no device's series.
        assert!(!text.contains("device=\"gpu"), "{text}");
        // Without NVML samples, no device series.
        assert!(!text.contains("nv_gpu_"), "{text}");
        // Every sample line is `name{labels} value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }

    /// The lines of series `name` whose labels contain `has`, as (labels, value).
    fn lines_of<'t>(text: &'t str, name: &str, has: &str) -> Vec<(&'t str, u64)> {
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix('{')?;
                let (labels, v) = rest.rsplit_once("} ")?;
                labels.contains(has).then(|| (labels, v.parse().unwrap()))
            })
            .collect()
    }

    #[test]
    fn each_device_has_its_own_label_set_and_they_sum_to_the_location() {
        // 4 workers over "gpu_devices 3,1": workers 0 and 2 on gpu3, 1 and 3 on gpu1;
        // worker 3 has not opened its device yet (cpu).
        let layout = Layout::new(1, 4, Some(&[3, 1]));
        let mut buf = vec![0u64; layout.size / 8 + 16];
        let z = zone(&mut buf, layout);
        z.init_fresh(0);
        let locs = vec![("echo".to_string(), "/e".to_string())];
        let (gpu3, gpu1) = (layout.block_of(3).unwrap(), layout.block_of(1).unwrap());
        for (w, b) in [(0, gpu3), (1, gpu1), (2, gpu3), (3, CPU_BLOCK)] {
            z.take_slot(w, 1, 100 + w as u64, 0);
            z.slot(w).unwrap().block.store(b as u64, Relaxed);
            z.pending(w, 0).unwrap().store(w as i64 + 1, Relaxed);
        }
        // Fresh random requests per block: (block, request us, batch size).
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut want = std::collections::HashMap::<usize, (u64, Vec<u64>, u64)>::new();
        for _ in 0..(50 + next() % 50) {
            let b = [gpu3, gpu1, CPU_BLOCK][(next() % 3) as usize];
            let us = next() % 40_000_000;
            let s = z.loc(0, b).unwrap();
            s.count(Outcome::Success).fetch_add(1, Relaxed);
            s.request.observe(&DURATION_BOUNDS_US, us);
            let n = 1 + next() % 300;
            s.batches.fetch_add(1, Relaxed);
            s.batch_size.observe(&BATCH_BOUNDS, n);
            let e = want.entry(b).or_default();
            e.0 += 1;
            e.1.push(us);
            e.2 += n;
        }
        let text = render(&z, &locs, 4, &|_| true);
        let success = lines_of(&text, "nv_inference_request_success", "location=\"/e\"");
        assert_eq!(success.len(), 3, "{text}");
        let mut total = 0;
        for (b, label) in [(gpu3, "gpu3"), (gpu1, "gpu1"), (CPU_BLOCK, "cpu")] {
            let (n, times, batch) = want.get(&b).cloned().unwrap_or_default();
            let dev = format!("device=\"{label}\"");
            let got = lines_of(&text, "nv_inference_request_success", &dev);
            assert_eq!(got.len(), 1, "{label}: {text}");
            assert_eq!(got[0].1, n, "{label}");
            total += got[0].1;
            // Pending: the workers counting under it now (1 + 3 on gpu3, 2 on gpu1, 4 cpu).
            let pending = lines_of(&text, "nv_inference_pending_request_count", &dev);
            let p = [(gpu3, 4), (gpu1, 2), (CPU_BLOCK, 4)]
                .iter()
                .find(|(x, _)| *x == b)
                .unwrap()
                .1;
            assert_eq!(pending[0].1, p, "{label}");
            // Request time buckets: cumulative, each equal to the count of times at or
            // under its bound (float64 bounds from the text), +Inf the count.
            let buckets = lines_of(&text, "ngx_gpu_request_duration_seconds_bucket", &dev);
            assert_eq!(buckets.len(), DURATION_BOUNDS_US.len() + 1);
            let mut last = 0;
            for (labels, c) in &buckets {
                assert!(*c >= last, "{label}: not cumulative at {labels}");
                last = *c;
                let le = labels.rsplit_once("le=\"").unwrap().1.trim_end_matches('"');
                let want_c = match le {
                    "+Inf" => times.len(),
                    le => {
                        let bound: f64 = le.parse().unwrap();
                        times.iter().filter(|&&t| t as f64 / 1e6 <= bound).count()
                    }
                };
                assert_eq!(*c, want_c as u64, "{label} le={le}");
            }
            let count = lines_of(&text, "ngx_gpu_request_duration_seconds_count", &dev);
            assert_eq!(count[0].1, n);
            let bsum = lines_of(&text, "ngx_gpu_batch_size_sum", &dev);
            assert_eq!(bsum[0].1, batch, "{label}");
        }
        assert_eq!(total, want.values().map(|w| w.0).sum::<u64>());
        // The status JSON has the same split, and the location's totals.
        let j = status::json(&z, &locs, 4, &|_| true, 0);
        let loc = &j["locations"][0];
        let by = &loc["devices"];
        let n = |b: usize| want.get(&b).map_or(0, |w| w.0);
        assert_eq!(by["gpu3"]["success"], n(gpu3), "{j}");
        assert_eq!(by["gpu1"]["success"], n(gpu1), "{j}");
        assert_eq!(by["cpu"]["pending"], 4, "{j}");
        assert_eq!(loc["success"], total, "{j}");
        assert_eq!(loc["pending"], 10, "{j}");
        assert_eq!(j["workers"][1]["metrics_device"], "gpu1", "{j}");
        // A device nobody counts under and with nothing counted has no series: with
        // worker 3 on gpu1 and nothing on cpu, the cpu series go.
        z.slot(3).unwrap().block.store(gpu1 as u64, Relaxed);
        z.loc(0, CPU_BLOCK)
            .unwrap()
            .count(Outcome::Success)
            .store(0, Relaxed);
        z.loc(0, CPU_BLOCK).unwrap().batches.store(0, Relaxed);
        let text = render(&z, &locs, 4, &|_| true);
        assert!(!text.contains("device=\"cpu\""), "{text}");
        assert_eq!(
            lines_of(&text, "nv_inference_request_success", "").len(),
            2,
            "{text}"
        );
    }
}
