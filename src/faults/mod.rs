//! Fault injection, for the tests and for module builds with the `fault-injection` feature
//! (never in production builds): makes each failure path of the GPU thread happen on
//! purpose, with or without a GPU.
//!
//! A plan is a comma-separated list, read from `NGX_GPU_FAULTS` by a fault-injection build
//! (keep it with `env NGX_GPU_FAULTS;`):
//!
//! | item | effect |
//! |---|---|
//! | `fake` | use the test device (`gpu/fake.rs`) instead of a GPU |
//! | `fake-devices:N` | the test device stands for N visible devices (default 1) |
//! | `fake-mps` | the test device says its contexts are shared through MPS |
//! | `open-fail:N` | the first N attempts to open the device fail as if it were busy |
//! | `open-slow:MS` | every attempt to open the device takes MS milliseconds longer |
//! | `panic@N` | the thread panics while packing its N-th batch (1-based) |
//! | `panic-in-flight@N` | the thread panics right after launching its N-th batch |
//! | `oom@N`, `bad-launch@N` | the N-th batch fails with out-of-memory / a refused launch |
//! | `lost@N` | the N-th batch's launch reports a lost device |
//! | `trap@N` | a kernel that touches an illegal address runs before the N-th batch |
//! | `hang@N` | a kernel that never ends runs before the N-th batch |
//!
//! `N` may be `N+` for "the N-th batch and every one after it".

/// The kernels that fail on purpose (`faults.cu`), as a program of their own: compiled
/// into test and fault-injection builds only.
pub fn program() -> &'static crate::gpu::Program {
    static P: std::sync::OnceLock<crate::gpu::Program> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        crate::gpu::Program::new(
            "faults.cu",
            include_str!("faults.cu"),
            Vec::new(),
            Vec::new(),
        )
    })
}

/// What goes wrong at one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Panic,
    PanicInFlight,
    OutOfMemory,
    BadLaunch,
    Lost,
    Kernel(KernelFault),
}

/// A fault the device itself produces, with a real kernel on a real GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFault {
    IllegalAddress,
    Hang,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub fake_device: bool,
    /// How many devices the test device says are visible (`fake-devices:N`; 0: one).
    pub fake_devices: usize,
    pub fake_mps: bool,
    pub open_failures: u32,
    pub open_delay: std::time::Duration,
    /// (batch number, and whether every later one too, fault)
    pub batches: Vec<(u64, bool, Fault)>,
}

impl Plan {
    pub fn parse(text: &str) -> Result<Plan, String> {
        let mut plan = Plan::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "fake" {
                plan.fake_device = true;
                continue;
            }
            if item == "fake-mps" {
                plan.fake_mps = true;
                continue;
            }
            if let Some(n) = item.strip_prefix("fake-devices:") {
                plan.fake_devices = n.parse().map_err(|_| format!("bad count in \"{item}\""))?;
                continue;
            }
            if let Some(n) = item.strip_prefix("open-fail:") {
                plan.open_failures = n.parse().map_err(|_| format!("bad count in \"{item}\""))?;
                continue;
            }
            if let Some(ms) = item.strip_prefix("open-slow:") {
                let ms = ms.parse().map_err(|_| format!("bad time in \"{item}\""))?;
                plan.open_delay = std::time::Duration::from_millis(ms);
                continue;
            }
            let (what, at) = item
                .split_once('@')
                .ok_or_else(|| format!("unknown fault \"{item}\""))?;
            let fault = match what {
                "panic" => Fault::Panic,
                "panic-in-flight" => Fault::PanicInFlight,
                "oom" => Fault::OutOfMemory,
                "bad-launch" => Fault::BadLaunch,
                "lost" => Fault::Lost,
                "trap" => Fault::Kernel(KernelFault::IllegalAddress),
                "hang" => Fault::Kernel(KernelFault::Hang),
                _ => return Err(format!("unknown fault \"{what}\"")),
            };
            let (n, on) = match at.strip_suffix('+') {
                Some(n) => (n, true),
                None => (at, false),
            };
            let n: u64 = n
                .parse()
                .map_err(|_| format!("bad batch number in \"{item}\""))?;
            if n == 0 {
                return Err(format!("batches count from 1 in \"{item}\""));
            }
            plan.batches.push((n, on, fault));
        }
        Ok(plan)
    }

    /// The fault planned for the `n`-th batch (1-based), if any.
    pub fn at_batch(&self, n: u64) -> Option<Fault> {
        self.batches
            .iter()
            .find(|(at, on, _)| *at == n || (*on && n > *at))
            .map(|(_, _, f)| *f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_plan_and_finds_each_batch_fault() {
        let p = Plan::parse(
            "fake, open-fail:2,panic@3,oom@5+,trap@4,open-slow:250,fake-devices:3,fake-mps",
        )
        .unwrap();
        assert!(p.fake_device);
        assert_eq!((p.fake_devices, p.fake_mps), (3, true));
        assert_eq!(p.open_failures, 2);
        assert_eq!(p.open_delay, std::time::Duration::from_millis(250));
        assert_eq!(p.at_batch(1), None);
        assert_eq!(p.at_batch(3), Some(Fault::Panic));
        assert_eq!(
            p.at_batch(4),
            Some(Fault::Kernel(KernelFault::IllegalAddress))
        );
        assert_eq!(p.at_batch(5), Some(Fault::OutOfMemory));
        assert_eq!(p.at_batch(9), Some(Fault::OutOfMemory));
        for bad in [
            "boom@1",
            "panic@0",
            "panic@x",
            "open-fail:x",
            "panic",
            "fake-devices:x",
        ] {
            assert!(Plan::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Plan::parse("").unwrap(), Plan::default());
    }
}
