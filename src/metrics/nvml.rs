//! Device samples from NVML (`nvml-wrapper`, which loads libnvidia-ml at run time): memory
//! used and total, utilization and power, about once a second, on a thread of its own in
//! one worker (worker 0), written into the zone. Without NVML nothing is sampled, the
//! device series are absent, and the status says why.

use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

use super::zone::{Zone, MAX_DEVICES, NVML_OK, NVML_UNAVAILABLE};

pub const EVERY: Duration = Duration::from_secs(1);

/// The sampling thread; stopped and joined when dropped.
pub struct Sampler {
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling into `zone`. `spawn` starts the thread (with the worker's signals
    /// blocked).
    pub fn start(
        zone: Zone,
        spawn: impl FnOnce(Box<dyn FnOnce() + Send>) -> std::io::Result<JoinHandle<()>>,
    ) -> std::io::Result<Sampler> {
        let (tx, rx) = bounded::<()>(1);
        let handle = spawn(Box::new(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&zone, &|| {
                    rx.recv_timeout(EVERY).is_err_and(|e| e.is_timeout())
                })
            }));
        }))?;
        Ok(Sampler {
            stop: Some(tx),
            handle: Some(handle),
        })
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Samples until `wait` (a one-second pause) says to stop.
fn run(zone: &Zone, wait: &dyn Fn() -> bool) {
    let h = zone.header();
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            h.nvml_error.set(&e.to_string());
            h.nvml.store(NVML_UNAVAILABLE, Relaxed);
            return;
        }
    };
    h.nvml.store(NVML_OK, Relaxed);
    loop {
        let count = nvml.device_count().unwrap_or(0).min(MAX_DEVICES as u32);
        for i in 0..count {
            let Some(slot) = zone.device(i as usize) else {
                continue;
            };
            let Ok(dev) = nvml.device_by_index(i) else {
                slot.present.store(0, Relaxed);
                continue;
            };
            if slot.present.load(Relaxed) == 0 {
                slot.uuid.set(&dev.uuid().unwrap_or_default());
                slot.name.set(&dev.name().unwrap_or_default());
                slot.index.store(i, Relaxed);
            }
            if let Ok(m) = dev.memory_info() {
                slot.memory_used.store(m.used, Relaxed);
                slot.memory_total.store(m.total, Relaxed);
            }
            if let Ok(u) = dev.utilization_rates() {
                slot.utilization.store(u.gpu as u64, Relaxed);
            }
            if let Ok(p) = dev.power_usage() {
                slot.power_mw.store(p as u64, Relaxed);
            }
            slot.sampled_ms.store(super::now_ms(), Relaxed);
            slot.present.store(1, Relaxed);
        }
        h.devices.store(count, Relaxed);
        if !wait() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::zone::Layout;

    /// No NVML on the build machines: the sampler says so and samples nothing. (Where
    /// libnvidia-ml is installed this checks the other way round.)
    #[test]
    fn without_nvml_nothing_is_sampled_and_the_reason_is_kept() {
        let layout = Layout::new(1, 1, None);
        let mut buf = vec![0u64; layout.size / 8 + 16];
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: the buffer is large enough and outlives the zone.
        let z = unsafe { Zone::at(p.add(p.align_offset(64)), layout) };
        z.init_fresh(0);
        run(&z, &|| false);
        let h = z.header();
        let has_nvml = std::path::Path::new("/dev/nvidiactl").exists();
        if has_nvml {
            assert_eq!(h.nvml.load(Relaxed), NVML_OK);
        } else {
            assert_eq!(h.nvml.load(Relaxed), NVML_UNAVAILABLE);
            assert!(!h.nvml_error.get().is_empty());
            assert_eq!(h.devices.load(Relaxed), 0);
        }
    }
}
