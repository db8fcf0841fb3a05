//! Triton's model repository and statistics extensions, as far as nginx has answers for them.
//!
//! - `POST /v2/repository/index` lists the declared models that KServe serves, `READY` while
//!   this worker's GPU thread runs (`{"ready": true}` in the body lists only ready ones).
//! - `POST /v2/repository/models/<name>/load`: models are declared with `gpu_model` and loaded
//!   when nginx starts, so loading a declared model is answered as Triton answers a load of a
//!   model already loaded (200); an unknown model, or a load that brings its own config or
//!   files, gets 400. `unload` is refused (400): nginx's configuration says what is served,
//!   and `nginx -s reload` changes it.
//! - `GET /v2/models[/<name>[/versions/1]]/stats`: the model's counters from the metrics zone
//!   (summed over every worker and device): requests that succeeded and failed with their total time,
//!   queue time, compute time (the device's whole batch: copies in and out are part of
//!   `compute_infer`, so `compute_input` and `compute_output` report the same count with 0 ns),
//!   inferences and batches. Triton's per-batch-size statistics are not kept (the batch size
//!   histogram in `gpu_metrics` has them by bucket), so `batch_stats` is empty.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};

use crate::metrics::zone::{LocStats, Outcome};

/// A served model as the repository index shows it.
pub struct Entry<'a> {
    pub name: &'a str,
    /// Why it cannot serve now (`None`: ready).
    pub unavailable: Option<&'a str>,
}

/// `POST /v2/repository/index` (body `{"ready": bool}`, optional).
pub fn repository_index(models: &[Entry], body: &[u8]) -> Result<Value, String> {
    let only_ready = match parse_body(body)?.get("ready") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(format!("\"ready\" must be a boolean, got {v}")),
    };
    Ok(Value::Array(
        models
            .iter()
            .filter(|m| !only_ready || m.unavailable.is_none())
            .map(|m| match m.unavailable {
                None => json!({"name": m.name, "version": "1", "state": "READY"}),
                Some(why) => json!({
                    "name": m.name, "version": "1", "state": "UNAVAILABLE", "reason": why
                }),
            })
            .collect(),
    ))
}

/// `POST /v2/repository/models/<name>/load`: Ok for a declared model and a body without
/// load parameters; the error is the 400's message.
pub fn load(name: &str, declared: bool, body: &[u8]) -> Result<(), String> {
    if !declared {
        return Err(format!(
            "failed to load '{name}': no model '{name}' is declared (models are declared with \
             gpu_model in nginx.conf and loaded when nginx starts)"
        ));
    }
    let doc = parse_body(body)?;
    if let Some(params) = doc.get("parameters").and_then(Value::as_object) {
        if let Some(key) = params.keys().next() {
            return Err(format!(
                "failed to load '{name}': load parameter \"{key}\" is not supported (change \
                 the model's gpu_model line and reload nginx)"
            ));
        }
    }
    Ok(())
}

/// `POST /v2/repository/models/<name>/unload`: the 400's message.
pub fn unload_refused(name: &str) -> String {
    format!(
        "failed to unload '{name}': the models served are those nginx.conf declares with \
         gpu_model; remove its line and reload nginx"
    )
}

/// An empty body is `{}`; anything else must be a JSON object.
fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("the request body must be a JSON object".into()),
        Err(e) => Err(format!("the request body is not JSON: {e}")),
    }
}

fn duration(count: u64, us: u64) -> Value {
    json!({"count": count, "ns": us.saturating_mul(1000)})
}

/// One model's statistics, summed over `stats`: its counters in every device block (none
/// where there is no metrics zone in this process: all zero). `last_inference` is the
/// latest of them.
pub fn model_stats(name: &str, stats: &[&LocStats]) -> Value {
    let get = |f: fn(&LocStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    let last = stats
        .iter()
        .map(|s| s.last_success_ms.load(Relaxed))
        .max()
        .unwrap_or(0);
    let success = get(|s| s.count(Outcome::Success).load(Relaxed));
    let fail = get(|s| {
        Outcome::FAILURES
            .iter()
            .map(|&o| s.count(o).load(Relaxed))
            .sum()
    });
    let inferences = get(|s| s.inferences.load(Relaxed));
    let queue_us = get(|s| s.queue.sum.load(Relaxed));
    let compute_us = get(|s| s.compute.sum.load(Relaxed));
    json!({
        "name": name,
        "version": "1",
        "last_inference": last,
        "inference_count": inferences,
        "execution_count": get(|s| s.batches.load(Relaxed)),
        "inference_stats": {
            "success": duration(success, get(|s| s.success_us.load(Relaxed))),
            "fail": duration(fail, get(|s| s.failure_us.load(Relaxed))),
            "queue": duration(inferences, queue_us),
            "compute_input": duration(inferences, 0),
            "compute_infer": duration(inferences, compute_us),
            "compute_output": duration(inferences, 0),
            "cache_hit": duration(0, 0),
            "cache_miss": duration(0, 0),
        },
        "batch_stats": [],
        "memory_usage": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::zone::DURATION_BOUNDS_US;

    #[test]
    fn the_index_lists_every_model_and_filters_on_ready() {
        let models = [
            Entry {
                name: "a",
                unavailable: None,
            },
            Entry {
                name: "b",
                unavailable: Some("loading"),
            },
        ];
        let all = repository_index(&models, b"").unwrap();
        assert_eq!(
            all,
            json!([
                {"name": "a", "version": "1", "state": "READY"},
                {"name": "b", "version": "1", "state": "UNAVAILABLE", "reason": "loading"},
            ])
        );
        assert_eq!(
            repository_index(&models, b"{\"ready\": false}").unwrap(),
            all
        );
        let ready = repository_index(&models, b" {\"ready\": true} ").unwrap();
        assert_eq!(ready.as_array().unwrap().len(), 1);
        assert_eq!(ready[0]["name"], "a");
        assert!(repository_index(&models, b"{\"ready\": 1}")
            .unwrap_err()
            .contains("boolean"));
        assert!(repository_index(&models, b"[1]")
            .unwrap_err()
            .contains("JSON object"));
        assert!(repository_index(&models, b"{")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn load_answers_declared_models_and_refuses_parameters() {
        assert!(load("m", true, b"").is_ok());
        assert!(load("m", true, b"{}").is_ok());
        assert!(load("m", true, b"{\"parameters\": {}}").is_ok());
        let e = load("m", true, b"{\"parameters\": {\"config\": \"{}\"}}").unwrap_err();
        assert!(e.contains("\"config\" is not supported"), "{e}");
        let e = load("x", false, b"").unwrap_err();
        assert!(e.starts_with("failed to load 'x'"), "{e}");
        assert!(unload_refused("m").starts_with("failed to unload 'm'"));
    }

    #[test]
    fn statistics_come_from_the_counters() {
        // SAFETY: LocStats is atomics only; all-zero is its fresh state in the zone.
        let s: LocStats = unsafe { std::mem::zeroed() };
        s.count(Outcome::Success).fetch_add(3, Relaxed);
        s.count(Outcome::Timeout).fetch_add(1, Relaxed);
        s.count(Outcome::BadRequest).fetch_add(2, Relaxed);
        s.success_us.fetch_add(1500, Relaxed);
        s.failure_us.fetch_add(70, Relaxed);
        s.last_success_ms.store(1_765_000_000_123, Relaxed);
        s.inferences.fetch_add(4, Relaxed);
        s.batches.fetch_add(2, Relaxed);
        for (q, c) in [(10, 100), (30, 300), (5, 50), (1, 7)] {
            s.queue.observe(&DURATION_BOUNDS_US, q);
            s.compute.observe(&DURATION_BOUNDS_US, c);
        }
        let v = model_stats("m", &[&s]);
        assert_eq!(v["name"], "m");
        assert_eq!(v["version"], "1");
        assert_eq!(v["last_inference"], 1_765_000_000_123u64);
        assert_eq!(v["inference_count"], 4);
        assert_eq!(v["execution_count"], 2);
        let st = &v["inference_stats"];
        assert_eq!(st["success"], json!({"count": 3, "ns": 1_500_000}));
        assert_eq!(st["fail"], json!({"count": 3, "ns": 70_000}));
        assert_eq!(st["queue"], json!({"count": 4, "ns": 46_000}));
        assert_eq!(st["compute_infer"], json!({"count": 4, "ns": 457_000}));
        assert_eq!(st["compute_input"]["ns"], 0);
        assert_eq!(v["batch_stats"], json!([]));
        let none = model_stats("m", &[]);
        assert_eq!(none["inference_count"], 0);
        assert_eq!(none["inference_stats"]["success"]["count"], 0);
        // Two devices' blocks: counts and times add up, the last inference is the latest.
        // SAFETY: as above.
        let t: LocStats = unsafe { std::mem::zeroed() };
        t.count(Outcome::Success).fetch_add(2, Relaxed);
        t.success_us.fetch_add(500, Relaxed);
        t.last_success_ms.store(1_765_000_000_000, Relaxed);
        t.inferences.fetch_add(2, Relaxed);
        t.batches.fetch_add(1, Relaxed);
        t.queue.observe(&DURATION_BOUNDS_US, 4);
        t.queue.observe(&DURATION_BOUNDS_US, 6);
        let both = model_stats("m", &[&s, &t]);
        assert_eq!(both["last_inference"], 1_765_000_000_123u64);
        assert_eq!(both["inference_count"], 6);
        assert_eq!(both["execution_count"], 3);
        let st = &both["inference_stats"];
        assert_eq!(st["success"], json!({"count": 5, "ns": 2_000_000}));
        assert_eq!(st["fail"], json!({"count": 3, "ns": 70_000}));
        assert_eq!(st["queue"], json!({"count": 6, "ns": 56_000}));
    }
}
