//! Which GPU each worker opens: `gpu_devices` parsed, workers spread over the listed devices
//! round-robin by nginx's worker number, and what the spread tells the log (devices left
//! without a worker, ids that are not there, several workers on a device without MPS).
//!
//! Pure logic: the configuration parses here (master), the worker resolves its device here
//! once CUDA has said how many devices it sees (worker, never the master).

use std::fmt;

use crate::engine::job::Level;

/// The highest device number `gpu_devices` takes (hosts have at most a few dozen GPUs).
pub const MAX_DEVICE: usize = 255;

/// `gpu_devices`: every visible device, or these, as `CUDA_VISIBLE_DEVICES` numbers them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceList {
    #[default]
    All,
    Ids(Vec<usize>),
}

impl DeviceList {
    /// The directive's argument: `all`, or device numbers separated by commas, each once.
    /// The error is the `[emerg]` text.
    pub fn parse(v: &str) -> Result<DeviceList, String> {
        if v == "all" {
            return Ok(DeviceList::All);
        }
        let invalid = || {
            format!(
                "invalid value \"{v}\" in \"gpu_devices\" directive, it must be \"all\" or \
                 device numbers separated by commas (\"0,1\")"
            )
        };
        let mut ids = Vec::new();
        for item in v.split(',') {
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            let id = item
                .parse::<usize>()
                .ok()
                .filter(|&n| n <= MAX_DEVICE)
                .ok_or_else(|| {
                    format!(
                        "invalid device \"{item}\" in \"gpu_devices\" directive, it must be \
                         a number from 0 to {MAX_DEVICE}"
                    )
                })?;
            if ids.contains(&id) {
                return Err(format!(
                    "device {id} is listed twice in \"gpu_devices\" directive \"{v}\""
                ));
            }
            ids.push(id);
        }
        Ok(DeviceList::Ids(ids))
    }

    /// The devices in the order workers take them, `visible` being how many CUDA shows.
    /// Listed ids are kept even where they are not visible: the spread must not move
    /// the other workers because one device is missing.
    pub fn resolve(&self, visible: usize) -> Vec<usize> {
        match self {
            DeviceList::All => (0..visible).collect(),
            DeviceList::Ids(ids) => ids.clone(),
        }
    }
}

impl fmt::Display for DeviceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceList::All => f.write_str("all"),
            DeviceList::Ids(ids) => {
                let ids: Vec<String> = ids.iter().map(usize::to_string).collect();
                f.write_str(&ids.join(","))
            }
        }
    }
}

/// The position in the device list that worker `worker` takes: round-robin, so that the
/// first workers cover every device once before any device gets a second one, and a
/// worker's device depends only on its number (nginx gives a respawned worker the number
/// of the one it replaces, and a reload numbers the new workers from 0 again).
pub fn position(worker: usize, devices: usize) -> usize {
    worker % devices
}

/// How many of `workers` workers take position `pos` of a list of `devices`.
pub fn workers_at(pos: usize, devices: usize, workers: usize) -> usize {
    if pos >= workers {
        0
    } else {
        (workers - pos).div_ceil(devices)
    }
}

/// One worker's place: the configured list, its nginx worker number, how many workers
/// this nginx runs (1 for a single-process nginx).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub devices: DeviceList,
    pub worker: usize,
    pub workers: usize,
}

impl Default for Placement {
    fn default() -> Placement {
        Placement {
            devices: DeviceList::All,
            worker: 0,
            workers: 1,
        }
    }
}

impl Placement {
    /// The device this worker opens, or why it has none (the text follows "no usable GPU
    /// in this worker: ").
    pub fn ordinal(&self, visible: usize) -> Result<usize, String> {
        let list = self.devices.resolve(visible);
        if list.is_empty() {
            return Err("no CUDA device visible".into());
        }
        let id = list[position(self.worker, list.len())];
        if id >= visible {
            return Err(format!(
                "\"gpu_devices {}\" gives this worker (worker {}) gpu{id}, but CUDA shows \
                 {visible} device{} (gpu0..gpu{}, as CUDA_VISIBLE_DEVICES numbers them)",
                self.devices,
                self.worker,
                plural(visible),
                visible.saturating_sub(1)
            ));
        }
        Ok(id)
    }

    /// What worker 0 tells once about the whole spread, given `visible` devices: listed
    /// devices that are not there, listed devices that get no worker, and how many
    /// workers each device gets where there are several devices. Other workers: nothing.
    pub fn spread_notes(&self, visible: usize) -> Vec<(Level, String)> {
        let list = self.devices.resolve(visible);
        if self.worker != 0 || list.is_empty() {
            return Vec::new();
        }
        let mut notes = Vec::new();
        let missing: Vec<String> = list
            .iter()
            .filter(|&&id| id >= visible)
            .map(|id| format!("gpu{id}"))
            .collect();
        if !missing.is_empty() {
            notes.push((
                Level::Warn,
                format!(
                    "gpu: \"gpu_devices {}\" lists {}, which CUDA does not show (it shows \
                     {visible} device{}): the workers given {} take the fallback \
                     (gpu_fallback), the others serve",
                    self.devices,
                    missing.join(", "),
                    plural(visible),
                    if missing.len() == 1 { "it" } else { "them" }
                ),
            ));
        }
        if self.workers < list.len() {
            let idle: Vec<String> = list[self.workers..]
                .iter()
                .map(|id| format!("gpu{id}"))
                .collect();
            notes.push((
                Level::Warn,
                format!(
                    "gpu: \"gpu_devices {}\" gives {} devices to {} worker{}: {} get{} no \
                     worker; set worker_processes to {} or a multiple of it",
                    self.devices,
                    list.len(),
                    self.workers,
                    plural(self.workers),
                    idle.join(", "),
                    if idle.len() == 1 { "s" } else { "" },
                    list.len()
                ),
            ));
        }
        if list.len() > 1 {
            let each: Vec<String> = list
                .iter()
                .enumerate()
                .map(|(pos, id)| format!("gpu{id}: {}", workers_at(pos, list.len(), self.workers)))
                .collect();
            notes.push((
                Level::Notice,
                format!(
                    "gpu: {} worker{} over \"gpu_devices {}\", workers per device: {}",
                    self.workers,
                    plural(self.workers),
                    self.devices,
                    each.join(", ")
                ),
            ));
        }
        notes
    }

    /// The warning the lowest-numbered worker of a device gives when other workers share
    /// that device and its contexts are not shared through MPS (`mps` as the driver
    /// answered; no warning when it could not say).
    pub fn mps_warning(&self, visible: usize, mps: Option<bool>) -> Option<String> {
        let list = self.devices.resolve(visible);
        if mps != Some(false) || list.is_empty() || self.worker >= list.len() {
            return None;
        }
        let sharing = workers_at(self.worker, list.len(), self.workers);
        if sharing < 2 {
            return None;
        }
        Some(format!(
            "gpu: {sharing} workers share gpu{} without MPS, so their CUDA contexts take \
             turns on it: on an H100 with 4 busy workers a small batch took about 470 us \
             from launch to done instead of 60 us with MPS; start the MPS control daemon \
             (the image starts it; elsewhere see \"Many workers on one GPU: use MPS\" in the \
             README) and keep CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY with \
             nginx's \"env\" directive",
            list[self.worker]
        ))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[usize]) -> DeviceList {
        DeviceList::Ids(v.to_vec())
    }

    fn place(devices: DeviceList, worker: usize, workers: usize) -> Placement {
        Placement {
            devices,
            worker,
            workers,
        }
    }

    /// Device lists of 1 to 8 devices, in CUDA's order and shuffled (ids with gaps).
    fn lists() -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for n in 1..=8usize {
            out.push((0..n).collect());
            // Distinct ids out of order and with gaps: 0, 9, 1, 10, 2, 11, 3, 12.
            out.push(
                (0..n)
                    .map(|i| (i * 7 + 2 * (i % 2)) % 13 + i / 13)
                    .collect(),
            );
        }
        for l in &out {
            let mut s = l.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), l.len(), "test list has duplicates: {l:?}");
        }
        out
    }

    #[test]
    fn every_worker_count_spreads_evenly_and_stably() {
        for list in lists() {
            let visible = list.iter().max().unwrap() + 1;
            for workers in 1..=17usize {
                let got: Vec<usize> = (0..workers)
                    .map(|w| {
                        place(ids(&list), w, workers)
                            .ordinal(visible)
                            .expect("every listed id is visible")
                    })
                    .collect();
                // Every device taken is a listed one.
                assert!(got.iter().all(|d| list.contains(d)), "{list:?} {got:?}");
                // The first workers take each listed device once, in the list's order.
                let first = workers.min(list.len());
                assert_eq!(&got[..first], &list[..first], "{list:?} x{workers}");
                // Every device gets a worker when there are enough workers; counts differ
                // by at most one.
                let counts: Vec<usize> = list
                    .iter()
                    .map(|d| got.iter().filter(|g| *g == d).count())
                    .collect();
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(hi - lo <= 1, "{list:?} x{workers}: {counts:?}");
                assert_eq!(*lo > 0, workers >= list.len(), "{list:?} x{workers}");
                assert_eq!(counts.iter().sum::<usize>(), workers);
                // workers_at agrees with what the workers took.
                for (pos, c) in counts.iter().enumerate() {
                    assert_eq!(workers_at(pos, list.len(), workers), *c);
                }
                // Stable: a worker's device depends only on its number, not on how many
                // workers there are (a respawn, a reload with more or fewer workers).
                for (w, d) in got.iter().enumerate() {
                    for other in [w + 1, workers + 3, 17] {
                        assert_eq!(place(ids(&list), w, other).ordinal(visible), Ok(*d));
                    }
                }
            }
        }
    }

    #[test]
    fn hand_worked_spreads() {
        // Worked out by hand from the rule "worker w takes the (w mod n)-th listed device".
        let dev = |l: DeviceList, workers: usize, visible: usize| -> Vec<usize> {
            (0..workers)
                .map(|w| place(l.clone(), w, workers).ordinal(visible).unwrap())
                .collect()
        };
        assert_eq!(dev(ids(&[3, 1]), 5, 4), [3, 1, 3, 1, 3]);
        assert_eq!(dev(DeviceList::All, 6, 4), [0, 1, 2, 3, 0, 1]);
        assert_eq!(dev(DeviceList::All, 3, 1), [0, 0, 0]);
        assert_eq!(dev(ids(&[0]), 4, 1), [0, 0, 0, 0]);
        assert_eq!(dev(ids(&[2, 0, 1]), 7, 3), [2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn all_and_0_on_one_device_are_what_it_was() {
        for workers in 1..=17 {
            for w in 0..workers {
                assert_eq!(place(DeviceList::All, w, workers).ordinal(1), Ok(0));
                assert_eq!(place(ids(&[0]), w, workers).ordinal(1), Ok(0));
            }
        }
        assert!(place(DeviceList::All, 0, 1).spread_notes(1).is_empty());
    }

    #[test]
    fn missing_ids_fail_only_their_workers() {
        let l = ids(&[1, 5, 0]);
        let got: Vec<Result<usize, String>> =
            (0..6).map(|w| place(l.clone(), w, 6).ordinal(2)).collect();
        assert_eq!(got[0], Ok(1));
        assert_eq!(got[2], Ok(0));
        assert_eq!(got[3], Ok(1));
        assert_eq!(got[5], Ok(0));
        for w in [1, 4] {
            let e = got[w].as_ref().unwrap_err();
            assert!(
                e.contains(&format!(
                    "\"gpu_devices 1,5,0\" gives this worker (worker {w}) gpu5, but CUDA \
                     shows 2 devices"
                )),
                "{e}"
            );
        }
        let notes = place(l.clone(), 0, 6).spread_notes(2);
        assert!(
            notes.iter().any(|(lv, m)| *lv == Level::Warn
                && m.contains("lists gpu5, which CUDA does not show (it shows 2 devices)")),
            "{notes:?}"
        );
        // Only worker 0 tells about the spread.
        assert!(place(l, 1, 6).spread_notes(2).is_empty());
    }

    #[test]
    fn all_with_nothing_visible_has_no_device() {
        for w in 0..3 {
            assert_eq!(
                place(DeviceList::All, w, 3).ordinal(0),
                Err("no CUDA device visible".to_string())
            );
        }
        assert!(place(DeviceList::All, 0, 3).spread_notes(0).is_empty());
        // A list with nothing visible: every listed id is missing.
        assert!(place(ids(&[0]), 0, 1).ordinal(0).is_err());
    }

    #[test]
    fn devices_without_a_worker_are_warned_about() {
        let notes = place(DeviceList::All, 0, 3).spread_notes(8);
        let warn: Vec<&String> = notes
            .iter()
            .filter(|(l, _)| *l == Level::Warn)
            .map(|(_, m)| m)
            .collect();
        assert_eq!(warn.len(), 1, "{notes:?}");
        assert!(
            warn[0].contains(
                "\"gpu_devices all\" gives 8 devices to 3 workers: gpu3, gpu4, gpu5, gpu6, \
                 gpu7 get no worker; set worker_processes to 8 or a multiple of it"
            ),
            "{}",
            warn[0]
        );
        let one = place(ids(&[0, 2]), 0, 1).spread_notes(4);
        assert!(
            one.iter()
                .any(|(_, m)| m.contains("gpu2 gets no worker; set worker_processes to 2")),
            "{one:?}"
        );
        // Enough workers: no warning, and the spread is told.
        let fine = place(DeviceList::All, 0, 6).spread_notes(4);
        assert!(fine.iter().all(|(l, _)| *l == Level::Notice), "{fine:?}");
        assert!(
            fine[0]
                .1
                .contains("6 workers over \"gpu_devices all\", workers per device: gpu0: 2, gpu1: 2, gpu2: 1, gpu3: 1"),
            "{fine:?}"
        );
    }

    #[test]
    fn the_mps_warning_comes_once_per_shared_device() {
        // 5 workers over 2 devices, MPS off: workers 0 (gpu0, shared by 3) and 1 (gpu1,
        // shared by 2) warn; the others do not.
        let who: Vec<usize> = (0..5)
            .filter(|&w| {
                place(DeviceList::All, w, 5)
                    .mps_warning(2, Some(false))
                    .is_some()
            })
            .collect();
        assert_eq!(who, [0, 1]);
        let w0 = place(DeviceList::All, 0, 5)
            .mps_warning(2, Some(false))
            .unwrap();
        assert!(
            w0.starts_with("gpu: 3 workers share gpu0 without MPS"),
            "{w0}"
        );
        assert!(w0.contains("470 us") && w0.contains("60 us"), "{w0}");
        assert!(w0.contains("CUDA_MPS_PIPE_DIRECTORY"), "{w0}");
        let w1 = place(DeviceList::All, 1, 5)
            .mps_warning(2, Some(false))
            .unwrap();
        assert!(
            w1.starts_with("gpu: 2 workers share gpu1 without MPS"),
            "{w1}"
        );
        // 3 workers over 3 devices: nobody shares.
        assert!((0..3).all(|w| place(DeviceList::All, w, 3)
            .mps_warning(3, Some(false))
            .is_none()));
        // MPS on, or unknown: no warning.
        assert!(place(DeviceList::All, 0, 4)
            .mps_warning(1, Some(true))
            .is_none());
        assert!(place(DeviceList::All, 0, 4).mps_warning(1, None).is_none());
        // A listed device's lowest worker warns by its listed id.
        let w = place(ids(&[3, 1]), 1, 4)
            .mps_warning(4, Some(false))
            .unwrap();
        assert!(
            w.starts_with("gpu: 2 workers share gpu1 without MPS"),
            "{w}"
        );
    }

    #[test]
    fn parse_accepts_all_and_lists_and_refuses_the_rest() {
        assert_eq!(DeviceList::parse("all"), Ok(DeviceList::All));
        assert_eq!(DeviceList::parse("0"), Ok(ids(&[0])));
        assert_eq!(DeviceList::parse("3,0,12"), Ok(ids(&[3, 0, 12])));
        assert_eq!(DeviceList::parse("255"), Ok(ids(&[255])));
        assert_eq!(DeviceList::parse("007"), Ok(ids(&[7])));
        for bad in [
            "", "ALL", "all,0", "0,", ",0", "0,,1", "gpu0", "-1", "+1", "1 2", "0;1", "0x1", "1.5",
        ] {
            let e = DeviceList::parse(bad).unwrap_err();
            assert_eq!(
                e,
                format!(
                    "invalid value \"{bad}\" in \"gpu_devices\" directive, it must be \"all\" \
                     or device numbers separated by commas (\"0,1\")"
                )
            );
        }
        for (bad, item) in [
            ("256", "256"),
            ("0,99999999999999999999999", "99999999999999999999999"),
        ] {
            assert_eq!(
                DeviceList::parse(bad).unwrap_err(),
                format!(
                    "invalid device \"{item}\" in \"gpu_devices\" directive, it must be a \
                     number from 0 to 255"
                )
            );
        }
        assert_eq!(
            DeviceList::parse("0,1,0").unwrap_err(),
            "device 0 is listed twice in \"gpu_devices\" directive \"0,1,0\""
        );
        assert_eq!(
            DeviceList::parse("2,02").unwrap_err(),
            "device 2 is listed twice in \"gpu_devices\" directive \"2,02\""
        );
        for text in ["all", "0", "3,0,12"] {
            assert_eq!(DeviceList::parse(text).unwrap().to_string(), text);
        }
    }
}
