//! The worker's GPU thread: takes jobs from a channel, forms batches (`batch.rs`), runs
//! them on the device with several batches in flight (or on the CPU when there is no
//! usable GPU and `gpu_fallback cpu`), and sends each request's result back over a
//! channel, waking the event loop through the eventfd.
//!
//! The thread waits on one `select`: new jobs, slots reported done by the driver, and a
//! timer (a held-back batch falling due, a batch's deadline, a retry of opening the
//! device, trimming idle buffers). Whenever a slot is free and a batch is due, it packs the
//! batch into the slot's pinned buffer and launches it without waiting, so it packs the
//! next batch while the GPU runs the last one.
//!
//! Failures, and what each costs:
//! - a transient CUDA failure (out of memory, a refused launch) fails that batch: its
//!   requests take the CPU path (`gpu_fallback cpu`) or get 503 (`off`); the device stays;
//! - a lost device (a sticky CUDA error, or a batch past its deadline: a kernel cannot be
//!   stopped) fails the batches in flight the same way, gives the device up without
//!   waiting for it, and asks for a fresh worker: CUDA documents these errors as leaving
//!   the context unusable for the rest of the process;
//! - a device that cannot be opened yet (busy, out of memory, MPS not ready) is retried
//!   with backoff, serving meanwhile as `gpu_fallback` says;
//! - a panic anywhere on the thread is caught by its supervisor: every request the thread
//!   holds is answered (CPU path, or 500), its state starts afresh, and after repeated
//!   panics it asks for a fresh worker.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, unbounded, Receiver, Sender};

use crate::engine::batch::{pieces_of, Batch, OpKey, Piece, Queue};
use crate::engine::devices::Placement;
use crate::engine::job::{Completion, Device as Ran, Event, Fallback, Job, JobError, Level};
use crate::engine::notify::Notifier;
use crate::engine::stats::{self, Stats};
use crate::gpu::{no_panic, panic_message, Compiled, Device, Gpu, GpuError, Loader, Memory};
use crate::metrics::{self, DeviceState, OpState};
use crate::ops::{Assembly, Item, Layout, Op, OpOnDevice, Output};

/// Where the thread gets its kernels from: the configuration's compiled programs, or the
/// reason there are none (then the thread never touches CUDA).
pub enum Kernels {
    Ptx(Arc<Compiled>),
    Unavailable(String),
    /// The test device of `gpu/fake.rs` (tests, fault-injection builds).
    #[cfg(any(test, feature = "fault-injection"))]
    Fake,
}

/// Per-worker settings of the thread.
#[derive(Clone)]
pub struct Config {
    /// The configuration's op instances, by `OpKey`: each one is loaded on the device when
    /// it opens.
    pub ops: Vec<Arc<dyn Op>>,
    /// `gpu_batch_bytes`: the most body bytes in one batch.
    pub batch_bytes: u64,
    /// `gpu_poll`: how long the thread spins on in-flight batches and new jobs before it
    /// sleeps (zero: it sleeps at once and the driver's callback wakes it), and on new jobs
    /// after the last GPU batch was done (a lone client's next request comes that soon).
    pub poll: Duration,
    /// `gpu_pinned_limit`: the most pinned host memory the device's slots may hold.
    pub pinned_limit: usize,
    /// Each op's `gpu_fallback`, by `OpKey` (`cpu` where missing): for its readiness.
    pub fallbacks: Vec<Fallback>,
    /// Buffers larger than what batches needed over this long are freed.
    pub trim_after: Duration,
    /// At exit, how long batches still running are waited for before the device is
    /// abandoned.
    pub exit_wait: Duration,
    /// Which device this worker opens (`gpu_devices` and its worker number).
    pub placement: Placement,
    #[cfg(any(test, feature = "fault-injection"))]
    pub faults: crate::faults::Plan,
}

impl Config {
    pub fn new(
        ops: Vec<Arc<dyn Op>>,
        batch_bytes: u64,
        poll: Duration,
        pinned_limit: usize,
    ) -> Config {
        Config {
            ops,
            batch_bytes,
            poll,
            pinned_limit,
            fallbacks: Vec::new(),
            trim_after: TRIM_AFTER,
            exit_wait: EXIT_WAIT,
            placement: Placement::default(),
            #[cfg(any(test, feature = "fault-injection"))]
            faults: Default::default(),
        }
    }
}

/// How often the thread looks at in-flight batches when the driver has not reported them
/// done: a failed device may never call back.
const STALL_CHECK: Duration = Duration::from_secs(1);
/// A batch's deadline is its requests' longest `gpu_timeout`, but never shorter than this:
/// a request's own short timeout answers it with 504; it does not make a GPU "hung".
pub const MIN_DEADLINE: Duration = Duration::from_secs(1);
/// Default for `Config::trim_after`.
pub const TRIM_AFTER: Duration = Duration::from_secs(30);
/// Retries of opening the device wait 1 s, 2 s, 4 s ... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// This many panics within `PANIC_WINDOW` ask for a fresh worker.
const PANIC_LIMIT: usize = 3;
const PANIC_WINDOW: Duration = Duration::from_secs(60);
/// At exit, in-flight batches are waited for this long at most, then abandoned.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// The GPU thread has stopped: it takes no more jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

pub struct GpuThread {
    jobs: Option<Sender<Job>>,
    events: Receiver<Event>,
    notifier: Arc<Notifier>,
    stop: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    stats: Arc<Stats>,
    handle: Option<JoinHandle<()>>,
}

impl GpuThread {
    pub fn spawn(config: Config, kernels: Kernels) -> io::Result<GpuThread> {
        // Unbounded: the event loop bounds what it holds (`gpu_queue_size`), so nothing is
        // allocated up front for a bound that is rarely reached.
        let (job_tx, job_rx) = unbounded::<Job>();
        let (ev_tx, ev_rx) = unbounded::<Event>();
        let notifier = Arc::new(Notifier::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let out = Outbox {
            tx: ev_tx,
            notifier: notifier.clone(),
        };
        let stats = Arc::new(Stats::default());
        let (stop2, alive2, stats2) = (stop.clone(), alive.clone(), stats.clone());
        // Signals go to nginx's own thread only (nginx blocks them in its thread pools as
        // well): this thread, and the CUDA driver threads it starts, inherit the mask.
        let handle = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("nginx-gpu".into())
                .spawn(move || {
                    // SAFETY: gettid has no arguments and cannot fail.
                    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                    stats2.tid.store(tid, Ordering::Relaxed);
                    let guard = Alive {
                        alive: alive2,
                        out: out.clone(),
                        stop: stop2.clone(),
                    };
                    supervise(job_rx, out, stop2, kernels, config, stats2);
                    drop(guard);
                })
        })?;
        Ok(GpuThread {
            jobs: Some(job_tx),
            events: ev_rx,
            notifier,
            stop,
            alive,
            stats,
            handle: Some(handle),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether the thread is still running (it ends only when stopped, or if its
    /// supervisor itself failed).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Queues a job without blocking (the channel is unbounded: the event loop bounds what
    /// it holds); fails only once the thread has stopped.
    pub fn submit(&self, job: Job) -> Result<(), Stopped> {
        match &self.jobs {
            Some(tx) => tx.send(job).map_err(|_| Stopped),
            None => Err(Stopped),
        }
    }

    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.notifier.fd()
    }

    /// Takes every event sent so far. Resets the eventfd first, so that an event sent
    /// while draining wakes the loop again.
    pub fn drain(&self) -> Vec<Event> {
        self.notifier.reset();
        self.events.try_iter().collect()
    }

    /// Asks the thread to stop, drops what is still queued and joins it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for GpuThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `f` (which starts a thread) with every asynchronous signal blocked and the
/// synchronous ones (faults the thread itself raises) not, so that the new thread inherits
/// exactly that mask, whatever the caller's; the caller's mask is restored afterwards.
pub(crate) fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain signal-mask calls on sets this function owns.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        for s in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE] {
            libc::sigdelset(&mut all, s);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        r
    }
}

#[derive(Clone)]
struct Outbox {
    tx: Sender<Event>,
    notifier: Arc<Notifier>,
}

impl Outbox {
    fn send(&self, ev: Event) {
        // The receiver lives as long as the worker; a send after it is gone is moot.
        let _ = self.tx.send(ev);
        self.notifier.wake();
    }

    fn log(&self, level: Level, msg: String) {
        self.send(Event::Log(level, msg));
    }
}

/// Clears `alive` when the thread ends, and tells the event loop if that was not asked for.
struct Alive {
    alive: Arc<AtomicBool>,
    out: Outbox,
    stop: Arc<AtomicBool>,
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        if !self.stop.load(Ordering::Acquire) {
            self.out.send(Event::Stopped);
        }
    }
}

/// The thread's body: steps of the loop under a supervisor that catches panics.
fn supervise(
    jobs: Receiver<Job>,
    out: Outbox,
    stop: Arc<AtomicBool>,
    kernels: Kernels,
    config: Config,
    stats: Arc<Stats>,
) {
    // The first step starts opening the device.
    let mut st = State::new(out, config, stats, kernels);
    while !stop.load(Ordering::Acquire) {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.step(&jobs))) {
            Ok(true) => {}
            Ok(false) => break,
            Err(p) => {
                let msg = panic_message(&*p).to_string();
                let recovered =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.recover(&msg)));
                if recovered.is_err() {
                    // Nothing sensible is left to do here: the Alive guard tells the
                    // event loop, which answers what it holds and asks for a fresh worker.
                    return;
                }
            }
        }
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.shutdown()));
}

/// A job the thread holds, from its arrival until its answer.
struct Active {
    job: Job,
    /// When its first piece went into a batch.
    started: Option<Instant>,
    /// The pieces' results so far, for a body cut into pieces.
    assembly: Option<Box<dyn Assembly>>,
}

/// A batch on a GPU slot. A batch whose requests were answered elsewhere (the thread
/// panicked while it ran) has no pieces: the slot stays busy until the device is done.
struct InFlight {
    batch: Batch,
    layout: Layout,
    launched: Instant,
    deadline: Instant,
}

/// An open device, and each op's state on it. Dropping it waits for the device's streams
/// before the ops' modules go: a module must not be unloaded under a running kernel.
struct Open {
    ops: Option<HashMap<OpKey, Box<dyn OpOnDevice>>>,
    device: Option<Box<dyn Device>>,
    /// What this worker says once the device is open, when other workers share it
    /// without MPS (see `Placement::mps_warning`).
    mps_warning: Option<String>,
}

impl Open {
    fn device(&self) -> &dyn Device {
        self.device.as_deref().expect("an open device")
    }

    fn device_mut(&mut self) -> &mut dyn Device {
        self.device.as_deref_mut().expect("an open device")
    }

    /// Whether `op` runs on this device (else its batches take the CPU path).
    fn runs(&self, op: OpKey) -> bool {
        self.ops.as_ref().is_some_and(|o| o.contains_key(&op))
    }

    /// The most batches of `op` this device may have in flight (`OpOnDevice::max_in_flight`).
    fn max_in_flight(&self, op: OpKey) -> usize {
        self.ops
            .as_ref()
            .and_then(|o| o.get(&op))
            .map_or(usize::MAX, |o| o.max_in_flight())
    }

    /// Leaves the device without waiting for it (see `Device::abandon`).
    fn abandon(mut self) {
        std::mem::forget(self.ops.take());
        if let Some(d) = self.device.take() {
            d.abandon();
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(d) = &self.device {
            d.quiesce();
        }
        drop(self.ops.take());
    }
}

/// What opening the device gave.
type Opened = Result<Open, GpuError>;

/// What failed under a batch, for the requests it hits (see `State::fall_back`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    Transient,
    Lost,
    Panic,
}

/// The device: open, being opened (on a thread of its own, so that this thread keeps
/// serving: creating a context takes a third of a second, and after a GPU fault far
/// longer), to be tried again later, or not to be had in this worker.
enum Opener {
    Open,
    Opening {
        attempt: u32,
        result: Receiver<Opened>,
    },
    Retry {
        at: Instant,
        attempt: u32,
    },
    Never,
}

struct State {
    queue: Queue,
    active: HashMap<u64, Active>,
    device: Option<Open>,
    opener: Opener,
    /// `gpu_fallback off` requests that came while the device was being opened: they wait
    /// for it (the CPU path is not theirs to take).
    held: Vec<Job>,
    kernels: Kernels,
    done: Receiver<usize>,
    in_flight: Vec<Option<InFlight>>,
    out: Outbox,
    /// Whether the spread of workers over devices was told (worker 0, once).
    spread_told: Arc<AtomicBool>,
    stats: Arc<Stats>,
    config: Config,
    next_trim: Instant,
    /// Batches launched on a device so far (fault plans count them).
    launches: u64,
    panics: VecDeque<Instant>,
    /// When the last GPU batch was seen done (see `Config::poll`).
    last_done: Option<Instant>,
    /// Reused buffers of the CPU path.
    scratch_in: Vec<u8>,
    scratch_out: Vec<u8>,
}

impl State {
    fn new(out: Outbox, config: Config, stats: Arc<Stats>, kernels: Kernels) -> State {
        State {
            queue: Queue::new(config.batch_bytes),
            active: HashMap::new(),
            device: None,
            opener: Opener::Retry {
                at: Instant::now(),
                attempt: 1,
            },
            held: Vec::new(),
            kernels,
            done: never(),
            in_flight: vec![None],
            out,
            spread_told: Arc::new(AtomicBool::new(false)),
            stats,
            next_trim: Instant::now() + config.trim_after,
            config,
            launches: 0,
            panics: VecDeque::new(),
            last_done: None,
            scratch_in: Vec::new(),
            scratch_out: Vec::new(),
        }
    }

    /// Starts an attempt to open the device, on a thread of its own; its outcome comes
    /// back through `Opener::Opening` (see `opened`).
    fn start_open(&mut self, attempt: u32) {
        let open = self.open_fn(attempt);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spawned = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("nginx-gpu-open".into())
                .spawn(move || {
                    let opened = no_panic("opening the device", || Ok(open()))
                        .unwrap_or_else(|panic| Err(GpuError::Unavailable(panic)));
                    // Nobody waits any more when the worker is exiting: the device goes.
                    let _ = tx.send(opened);
                })
        });
        match spawned {
            Ok(_) => {
                self.opener = Opener::Opening {
                    attempt,
                    result: rx,
                }
            }
            Err(e) => self.opened(
                attempt,
                Err(GpuError::Busy(format!(
                    "starting a thread to open the device: {e}"
                ))),
            ),
        }
        self.publish();
    }

    /// Tells the metrics zone what this worker has of its device and whether it can serve
    /// each op now (for readiness and `gpu_status`).
    fn publish(&self) {
        let state = match (&self.device, &self.opener) {
            (Some(_), _) => DeviceState::Open,
            (None, Opener::Opening { .. }) => DeviceState::Opening,
            (None, Opener::Retry { .. }) => DeviceState::Retrying,
            (None, Opener::Never) => DeviceState::Unavailable,
            (None, Opener::Open) => DeviceState::Starting,
        };
        let ordinal = self.device.as_ref().map(|o| o.device().info().ordinal);
        metrics::device(state, ordinal);
        for (key, op) in self.config.ops.iter().enumerate() {
            let cpu = op.has_cpu() && self.config.fallbacks.get(key) != Some(&Fallback::Off);
            let st = if !op.ready() {
                OpState::NotReady
            } else if self.device.as_ref().is_some_and(|o| o.runs(key)) {
                OpState::Gpu
            } else if cpu {
                OpState::Cpu
            } else if state == DeviceState::Opening {
                OpState::Waiting
            } else {
                OpState::NoDevice
            };
            metrics::op_state(key, st);
        }
    }

    /// What the opening thread runs: how many devices CUDA shows, which one is this
    /// worker's (`gpu_devices`), the device, then every op's state on it.
    fn open_fn(&self, attempt: u32) -> Box<dyn FnOnce() -> Opened + Send> {
        let injected = self.injected_open_failure(attempt);
        let slow = self.injected_open_delay();
        let (fake_visible, fake_mps) = self.fake_devices();
        let limit = self.config.pinned_limit;
        let ops = self.config.ops.clone();
        let placement = self.config.placement.clone();
        let (out, told) = (self.out.clone(), self.spread_told.clone());
        let compiled = match &self.kernels {
            Kernels::Unavailable(why) => {
                let why = why.clone();
                return Box::new(move || Err(GpuError::Unavailable(why)));
            }
            Kernels::Ptx(compiled) => compiled.clone(),
            #[cfg(any(test, feature = "fault-injection"))]
            Kernels::Fake => Arc::new(Compiled::default()),
        };
        let fake = !matches!(self.kernels, Kernels::Ptx(_));
        Box::new(move || {
            std::thread::sleep(slow);
            if injected {
                return Err(GpuError::Busy(
                    "opening the device: injected failure".into(),
                ));
            }
            let visible = if fake { fake_visible } else { Gpu::visible()? };
            if !told.swap(true, Ordering::Relaxed) {
                for (level, msg) in placement.spread_notes(visible) {
                    out.log(level, msg);
                }
            }
            let ordinal = placement.ordinal(visible).map_err(GpuError::Unavailable)?;
            let device: Box<dyn Device> = if fake {
                fake_device(ordinal, fake_mps, limit)?
            } else {
                Box::new(Gpu::open(ordinal, limit, fault_kernels(&compiled))?)
            };
            let mps_warning = placement.mps_warning(visible, device.info().mps);
            let mut states = HashMap::new();
            {
                let mut loader = device.loader(&compiled);
                for (key, op) in ops.iter().enumerate() {
                    match op.load(&mut loader) {
                        Ok(Some(state)) => {
                            states.insert(key, state);
                        }
                        Ok(None) => {}
                        // This op cannot run here (no cuBLAS, a shape beyond its kernels):
                        // the others still use the device, and the operator learns why
                        // this one's requests take the CPU path.
                        Err(GpuError::Unavailable(why)) => out.log(
                            Level::Warn,
                            format!(
                                "gpu: {} does not run on the GPU: {why}; its requests \
                                 take the CPU path (gpu_fallback)",
                                op.name()
                            ),
                        ),
                        Err(e) => return Err(e),
                    }
                }
                if let Loader::Device(d) = &mut loader {
                    for note in d.notes.drain(..) {
                        out.log(Level::Notice, note);
                    }
                }
            }
            Ok(Open {
                ops: Some(states),
                device: Some(device),
                mps_warning,
            })
        })
    }

    /// An attempt to open the device ended: use the device, or log why not and schedule a
    /// retry when that may help. Requests held for the device go on either way.
    fn opened(&mut self, attempt: u32, opened: Opened) {
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        match opened {
            Ok(open) => {
                let after = if attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                let info = open.device().info();
                self.out.log(
                    Level::Notice,
                    format!("gpu: using {info}{after}, MPS: {}", info.mps_text()),
                );
                if let Some(warning) = &open.mps_warning {
                    self.out.log(Level::Warn, warning.clone());
                }
                self.done = open.device().done().clone();
                self.in_flight = (0..open.device().slots()).map(|_| None).collect();
                self.device = Some(open);
                self.opener = Opener::Open;
            }
            Err(e @ GpuError::Busy(_)) => {
                let wait = Duration::from_secs(1 << (attempt - 1).min(6)).min(MAX_BACKOFF);
                // The first failure is worth a warning; the retries are routine.
                let level = if attempt == 1 {
                    Level::Warn
                } else {
                    Level::Info
                };
                self.out.log(
                    level,
                    format!(
                        "gpu: no usable GPU in this worker yet: {e}; trying again in {}s \
                         (gpu_fallback applies meanwhile)",
                        wait.as_secs()
                    ),
                );
                self.opener = Opener::Retry {
                    at: Instant::now() + wait,
                    attempt: attempt + 1,
                };
            }
            Err(e) => {
                self.out.log(
                    Level::Warn,
                    format!("gpu: no usable GPU in this worker: {e}"),
                );
                self.opener = Opener::Never;
            }
        }
        self.publish();
        for job in std::mem::take(&mut self.held) {
            self.arrive(job);
        }
    }

    #[cfg(any(test, feature = "fault-injection"))]
    fn injected_open_delay(&self) -> Duration {
        self.config.faults.open_delay
    }

    #[cfg(not(any(test, feature = "fault-injection")))]
    fn injected_open_delay(&self) -> Duration {
        Duration::ZERO
    }

    /// How many devices the test device stands for, and whether it says MPS is on.
    #[cfg(any(test, feature = "fault-injection"))]
    fn fake_devices(&self) -> (usize, bool) {
        let plan = &self.config.faults;
        (plan.fake_devices.max(1), plan.fake_mps)
    }

    #[cfg(not(any(test, feature = "fault-injection")))]
    fn fake_devices(&self) -> (usize, bool) {
        (0, false)
    }

    #[cfg(any(test, feature = "fault-injection"))]
    fn injected_open_failure(&self, attempt: u32) -> bool {
        attempt <= self.config.faults.open_failures
    }

    #[cfg(not(any(test, feature = "fault-injection")))]
    fn injected_open_failure(&self, _attempt: u32) -> bool {
        false
    }

    #[cfg(any(test, feature = "fault-injection"))]
    fn planned_fault(&self) -> Option<crate::faults::Fault> {
        self.config.faults.at_batch(self.launches)
    }

    #[cfg(not(any(test, feature = "fault-injection")))]
    fn planned_fault(&self) -> Option<std::convert::Infallible> {
        None
    }

    /// One turn of the loop: launch what is due, then wait for something to happen.
    /// False when the job channel is gone (the worker is stopping).
    fn step(&mut self, jobs: &Receiver<Job>) -> bool {
        if let Opener::Retry { at, attempt } = self.opener {
            if Instant::now() >= at {
                self.start_open(attempt);
            }
        }
        self.dispatch();
        let busy = self.in_flight.iter().any(Option::is_some);
        let poll = self.config.poll;
        let lingering = self.last_done.is_some_and(|t| t.elapsed() < poll);
        if (busy || lingering) && !poll.is_zero() && self.spin(jobs) {
            return true;
        }
        // Lingers once per batch: the next batch done sets it again.
        self.last_done = None;
        let timeout = match self.next_wake() {
            Some(at) => crossbeam_channel::at(at),
            None => never(),
        };
        let done = self.done.clone();
        let opening = match &self.opener {
            Opener::Opening { result, .. } => result.clone(),
            _ => never(),
        };
        select! {
            recv(jobs) -> msg => match msg {
                Ok(job) => self.arrive(job),
                Err(_) => return false,
            },
            recv(opening) -> msg => {
                if let Opener::Opening { attempt, .. } = self.opener {
                    let opened = msg.unwrap_or_else(|_| {
                        Err(GpuError::Unavailable("the thread opening the device ended".into()))
                    });
                    self.opened(attempt, opened);
                }
            },
            recv(done) -> msg => {
                if let Ok(slot) = msg {
                    self.retire(slot);
                }
            },
            recv(timeout) -> _ => self.tick(),
        }
        // Take everything else that is ready now, so that it joins the next batch.
        while let Ok(job) = jobs.try_recv() {
            self.arrive(job);
        }
        while let Ok(slot) = self.done.try_recv() {
            self.retire(slot);
        }
        true
    }

    /// When the thread must look again even if nothing arrives.
    fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut at: Option<Instant> = None;
        let mut consider = |t: Instant| at = Some(at.map_or(t, |a: Instant| a.min(t)));
        for fl in self.in_flight.iter().flatten() {
            consider(fl.deadline.min(now + STALL_CHECK));
        }
        if self.in_flight.iter().any(Option::is_none) {
            if let Some(due) = self.queue.next_due(|op| self.held(op)) {
                consider(due);
            }
        }
        if let Opener::Retry { at: retry, .. } = self.opener {
            consider(retry);
        }
        if self.device.is_some() {
            consider(self.next_trim);
        }
        // An op that is not ready yet (a model loading) is looked at again each second.
        if self.config.ops.iter().any(|op| !op.ready()) {
            consider(now + STALL_CHECK);
        }
        at
    }

    /// The timer: look at in-flight batches (a failed device may never call back; a hung
    /// one never finishes), and trim idle buffers when it is time.
    fn tick(&mut self) {
        let now = Instant::now();
        for slot in 0..self.in_flight.len() {
            let Some(open) = self.device.as_ref() else {
                return;
            };
            let Some(fl) = self.in_flight.get(slot).and_then(Option::as_ref) else {
                continue;
            };
            match open.device().finished(slot) {
                Ok(true) => self.retire(slot),
                Ok(false) if now >= fl.deadline => {
                    let e = GpuError::Hung {
                        op: self.op_name(fl.batch.op),
                        secs: now.duration_since(fl.launched).as_secs_f64(),
                    };
                    self.gpu_failed(Some(slot), e);
                }
                Ok(false) => {}
                Err(e) => self.gpu_failed(Some(slot), e),
            }
        }
        if now >= self.next_trim {
            self.next_trim = now + self.config.trim_after;
            self.trim();
        }
        self.publish();
    }

    /// Frees the idle slots' buffers that were larger than batches needed lately.
    fn trim(&mut self) {
        let Some(open) = self.device.as_mut() else {
            return;
        };
        let device = open.device_mut();
        let mut freed = 0;
        for slot in 0..device.slots() {
            if self.in_flight[slot].is_none() {
                freed += device.trim(slot);
            }
        }
        self.stats.set_memory(self.memory());
        if freed > 0 {
            self.stats
                .trimmed
                .fetch_add(freed as u64, Ordering::Relaxed);
            self.out.log(
                Level::Info,
                format!("gpu: freed {} MiB of idle batch buffers", freed >> 20),
            );
        }
    }

    /// Memory the device holds for batches now.
    fn memory(&self) -> Memory {
        self.device
            .as_ref()
            .map_or_else(Memory::default, |o| o.device().memory())
    }

    /// Spins for up to `gpu_poll` on new jobs and in-flight batches; true if either
    /// moved (then the caller dispatches again instead of sleeping).
    fn spin(&mut self, jobs: &Receiver<Job>) -> bool {
        let until = Instant::now() + self.config.poll;
        loop {
            let mut moved = false;
            while let Ok(job) = jobs.try_recv() {
                self.arrive(job);
                moved = true;
            }
            // The device may go (and the slots with it) while retiring: look it up anew
            // for every slot.
            for slot in 0..self.in_flight.len() {
                let busy = self.in_flight.get(slot).is_some_and(Option::is_some);
                let ready = busy
                    && self
                        .device
                        .as_ref()
                        .is_some_and(|o| !matches!(o.device().finished(slot), Ok(false)));
                if ready {
                    self.retire(slot);
                    moved = true;
                }
            }
            if moved {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn arrive(&mut self, job: Job) {
        if job.is_cancelled() {
            // The request is gone: nobody is waiting for a result.
            return;
        }
        // While the device opens, requests the CPU path cannot serve (gpu_fallback off, or
        // an op without one) or should not (an op whose CPU path is far slower) wait for
        // it, within their gpu_timeout.
        let cpu = job.fallback == Fallback::Cpu && job.op.has_cpu() && job.op.cpu_while_opening();
        if self.device.is_none() && !cpu && matches!(self.opener, Opener::Opening { .. }) {
            self.held.push(job);
            return;
        }
        if self.device.is_none() && job.fallback == Fallback::Off {
            self.refuse(job, JobError::Unavailable("no GPU available".into()));
            return;
        }
        let mut job = job;
        // Ops that decode do it here, on this thread, before the request is batched.
        let op = job.op.clone();
        let decoded = no_panic("decoding a request", || {
            Ok(op.decode(&job.body, &job.params))
        })
        .map_err(JobError::Internal)
        .and_then(|r| r);
        match decoded {
            Err(e) => {
                self.refuse(job, e);
                return;
            }
            Ok(Some(d)) => {
                self.queue.push_rows(
                    job.id,
                    job.op_key,
                    d.rows,
                    op.max_rows(),
                    job.batching,
                    job.queued_at,
                );
                job.decoded = Some(d);
            }
            Ok(None) => self.queue.push(
                job.id,
                job.op_key,
                op.splittable(),
                job.body.len(),
                job.batching,
                job.queued_at,
            ),
        }
        self.active.insert(
            job.id,
            Active {
                job,
                started: None,
                assembly: None,
            },
        );
    }

    /// Whether `op` has as many batches in flight as its device allows: its requests wait
    /// (and join one larger batch) until one is done.
    fn held(&self, op: OpKey) -> bool {
        let Some(open) = self.device.as_ref() else {
            return false;
        };
        let running = self
            .in_flight
            .iter()
            .flatten()
            .filter(|fl| fl.batch.op == op);
        running.count() >= open.max_in_flight(op)
    }

    /// Launches due batches while a slot is free; without a GPU, runs them right away.
    fn dispatch(&mut self) {
        loop {
            let Some(op) = self.queue.due(Instant::now(), |op| self.held(op)) else {
                return;
            };
            let Some(slot) = self.in_flight.iter().position(Option::is_none) else {
                return;
            };
            let active = &self.active;
            let (batch, dropped) = self.queue.take(op, |id| {
                active.get(&id).is_none_or(|a| a.job.is_cancelled())
            });
            for id in dropped {
                self.active.remove(&id);
            }
            if batch.pieces.is_empty() {
                continue;
            }
            let started = Instant::now();
            for p in &batch.pieces {
                if let Some(a) = self.active.get_mut(&p.id) {
                    if a.started.is_none() {
                        a.started = Some(started);
                        stats::add(
                            &self.stats.queue_ns,
                            started.saturating_duration_since(a.job.queued_at),
                        );
                    }
                }
            }
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            metrics::batch(op, batch.pieces.len());
            self.stats
                .pieces
                .fetch_add(batch.pieces.len() as u64, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_add(batch.pieces.iter().map(|p| p.len).sum(), Ordering::Relaxed);
            if self.device.as_ref().is_some_and(|o| o.runs(op)) {
                self.launch(slot, batch);
                self.stats.set_memory(self.memory());
                stats::add(&self.stats.pack_ns, started.elapsed());
            } else {
                self.run_on_cpu(batch);
                stats::add(&self.stats.finish_ns, started.elapsed());
            }
        }
    }

    /// A batch's deadline: its requests' longest `gpu_timeout`, at least `MIN_DEADLINE`.
    fn deadline_of(&self, batch: &Batch, launched: Instant) -> Instant {
        let longest = batch
            .pieces
            .iter()
            .filter_map(|p| self.active.get(&p.id))
            .map(|a| a.job.timeout)
            .max()
            .unwrap_or_default();
        launched + longest.max(MIN_DEADLINE)
    }

    /// Packs `batch` into `slot`'s pinned buffer and launches it, without waiting.
    fn launch(&mut self, slot: usize, batch: Batch) {
        self.launches += 1;
        let fault = self.planned_fault();
        let open = self.device.as_mut().expect("launch needs a device");
        let op_dev = &open.ops.as_ref().expect("an open device")[&batch.op];
        let device = open.device.as_deref_mut().expect("an open device");
        let active = &self.active;
        let items: Vec<Item> = batch
            .pieces
            .iter()
            .map(|p| {
                let a = &active[&p.id];
                Item {
                    piece: p,
                    body: &a.job.body,
                    params: &a.job.params,
                    decoded: a.job.decoded.as_ref(),
                }
            })
            .collect();
        let mut unpacked = Vec::new();
        let mut queueing = Duration::ZERO;
        let res = (|| {
            #[cfg(any(test, feature = "fault-injection"))]
            {
                use crate::faults::Fault;
                match fault {
                    Some(Fault::Panic) => panic!("injected panic while packing a batch"),
                    Some(Fault::OutOfMemory) => {
                        return Err(GpuError::OutOfMemory("staging a batch: injected".into()))
                    }
                    Some(Fault::BadLaunch) => {
                        return Err(GpuError::BadLaunch("launching a kernel: injected".into()))
                    }
                    Some(Fault::Lost) => {
                        return Err(GpuError::Lost("launching a kernel: injected".into()))
                    }
                    Some(Fault::Kernel(k)) => device.inject(slot, k)?,
                    Some(Fault::PanicInFlight) | None => {}
                }
            }
            #[cfg(not(any(test, feature = "fault-injection")))]
            let _ = fault;
            let layout = op_dev.layout(&items);
            let (desc, data) = device.stage(slot, layout.desc_len, layout.data_len)?;
            unpacked = op_dev.pack(&items, &layout, desc, data);
            let t = Instant::now();
            device.launch(slot, &layout, &mut |target| op_dev.launch(&layout, target))?;
            queueing = t.elapsed();
            Ok::<Layout, GpuError>(layout)
        })();
        drop(items);
        stats::add(&self.stats.launch_ns, queueing);
        for (i, e) in unpacked {
            self.fail(batch.pieces[i].id, e);
        }
        let launched = Instant::now();
        let deadline = self.deadline_of(&batch, launched);
        match res {
            Ok(layout) => {
                self.in_flight[slot] = Some(InFlight {
                    batch,
                    layout,
                    launched,
                    deadline,
                });
                #[cfg(any(test, feature = "fault-injection"))]
                if fault == Some(crate::faults::Fault::PanicInFlight) {
                    panic!("injected panic with a batch in flight");
                }
            }
            Err(e) if e.is_lost() => {
                self.in_flight[slot] = Some(InFlight {
                    batch,
                    layout: Layout::default(),
                    launched,
                    deadline,
                });
                self.gpu_failed(Some(slot), e);
            }
            Err(e) => {
                // Nothing of this batch runs: its slot is free again.
                self.transient_failure(&e, batch.pieces.iter().map(|p| p.id).collect());
            }
        }
    }

    /// A slot's batch is done: hand each piece's result to its request.
    fn retire(&mut self, slot: usize) {
        let Some(fl) = self.in_flight.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let Some(open) = self.device.as_ref() else {
            return;
        };
        // The callback also runs after a failure: the event says which it was. A done
        // message for a batch the spin loop already retired finds the slot busy with the
        // next batch: not finished yet, so it is ignored (its own callback follows).
        match open.device().finished(slot) {
            Err(e) => {
                self.in_flight[slot] = Some(fl);
                self.gpu_failed(Some(slot), e);
                return;
            }
            Ok(false) => {
                self.in_flight[slot] = Some(fl);
                return;
            }
            Ok(true) => {}
        }
        if fl.batch.pieces.is_empty() {
            return;
        }
        let seen = Instant::now();
        self.last_done = Some(seen);
        stats::add(
            &self.stats.gpu_ns,
            seen.saturating_duration_since(fl.launched),
        );
        let ordinal = open.device().info().ordinal;
        let n = fl.batch.pieces.len();
        let open = self.device.take().expect("checked above");
        let op_dev = &open.ops.as_ref().expect("an open device")[&fl.batch.op];
        let res = open.device().output(slot).map(|out| {
            for (i, p) in fl.batch.pieces.iter().enumerate() {
                match op_dev.result(&fl.layout, i, out) {
                    Ok(bytes) => self.deliver(p, &bytes, n, Ran::Gpu(ordinal)),
                    Err(e) => self.fail(p.id, e),
                }
            }
        });
        self.device = Some(open);
        stats::add(&self.stats.finish_ns, seen.elapsed());
        if let Err(e) = res {
            // Nothing was delivered: the batch is still the slot's, for the failure path.
            self.in_flight[slot] = Some(fl);
            self.gpu_failed(Some(slot), e);
        }
    }

    /// The name of op instance `key`, for log lines.
    fn op_name(&self, key: OpKey) -> String {
        self.config
            .ops
            .get(key)
            .map_or_else(|| format!("op {key}"), |op| op.name().to_string())
    }

    /// A CUDA failure at `slot` (or outside any slot).
    fn gpu_failed(&mut self, slot: Option<usize>, e: GpuError) {
        if e.is_lost() {
            self.lose_device(e);
            return;
        }
        let ids = slot
            .and_then(|s| self.in_flight.get_mut(s).and_then(Option::take))
            .map(|fl| fl.batch.pieces.iter().map(|p| p.id).collect())
            .unwrap_or_default();
        self.transient_failure(&e, ids);
    }

    /// A failure that costs one batch: its requests fall back, the device stays. After
    /// running out of memory the idle slots' buffers are trimmed, to make room.
    fn transient_failure(&mut self, e: &GpuError, ids: Vec<u64>) {
        self.stats.gpu_errors.fetch_add(1, Ordering::Relaxed);
        self.out.log(
            Level::Warn,
            format!(
                "gpu: {e}; the batch's {} requests fall back (gpu_fallback), the GPU stays in use",
                ids.len()
            ),
        );
        if matches!(e, GpuError::OutOfMemory(_)) {
            self.trim();
        }
        self.fall_back(
            ids,
            &format!("the GPU failed this batch: {e}"),
            Failure::Transient,
        );
    }

    /// The device is lost: stop using it in this worker, ask for a fresh worker, and answer
    /// every request that had a batch in flight from the CPU path (or 503 with
    /// `gpu_fallback off`). Requests still queued go through the CPU path as usual.
    fn lose_device(&mut self, e: GpuError) {
        let Some(open) = self.device.take() else {
            return;
        };
        self.stats.gpu_errors.fetch_add(1, Ordering::Relaxed);
        let info = open.device().info().clone();
        let mut ops: Vec<String> = Vec::new();
        let mut hit: Vec<u64> = Vec::new();
        for fl in self.in_flight.iter_mut().filter_map(Option::take) {
            if !fl.batch.pieces.is_empty() {
                let name = self.config.ops.get(fl.batch.op).map_or("?", |o| o.name());
                if !ops.iter().any(|o| o == name) {
                    ops.push(name.to_string());
                }
            }
            hit.extend(fl.batch.pieces.into_iter().map(|p| p.id));
        }
        self.out.log(
            Level::Alert,
            format!(
                "gpu: gpu{} failed: {e}; {} requests in flight (batches of {}) fall back or \
                 get 500; the GPU is given up in this worker (its CUDA context cannot be used \
                 again)",
                info.ordinal,
                hit.len(),
                if ops.is_empty() {
                    "none".to_string()
                } else {
                    ops.join(", ")
                }
            ),
        );
        self.out
            .send(Event::Restart(format!("gpu{} failed: {e}", info.ordinal)));
        // No waiting for streams that may never finish: leak the context, the process is
        // replaced.
        let _ = no_panic("releasing the GPU", || {
            open.abandon();
            Ok(())
        });
        self.done = never();
        self.in_flight = vec![None];
        self.opener = Opener::Never;
        self.publish();
        self.fall_back(hit, &format!("the GPU failed: {e}"), Failure::Lost);
        // Jobs still queued with `gpu_fallback off` get their 503 now.
        let off: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| a.job.fallback == Fallback::Off)
            .map(|(id, _)| *id)
            .collect();
        for id in off {
            self.fail(id, JobError::Unavailable("the GPU failed".into()));
        }
    }

    /// Answers each of `ids`, whose batch (or thread) failed with `why`: from the CPU path
    /// where the op has one and `gpu_fallback cpu` allows; else 503 (try again) for a
    /// transient failure, and 500 after a panic, or for an op without a CPU path whose
    /// batch died with the device (a faulting user kernel).
    fn fall_back(&mut self, mut ids: Vec<u64>, why: &str, failure: Failure) {
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let Some(a) = self.active.remove(&id) else {
                continue;
            };
            self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            let started = a.started.unwrap_or_else(Instant::now);
            let op = &a.job.op;
            let cpu = op.has_cpu() && a.job.fallback == Fallback::Cpu;
            let failed = |why: &str| match failure {
                Failure::Panic => JobError::Internal(why.to_string()),
                Failure::Lost if !op.has_cpu() => {
                    JobError::Internal(format!("{}: {why}", op.name()))
                }
                Failure::Lost | Failure::Transient => JobError::Unavailable(why.to_string()),
            };
            let (res, ran) = if cpu {
                match cpu_whole(&a.job) {
                    Ok(out) => (Ok(out), Ran::Cpu),
                    Err(e) => (Err(e), Ran::None),
                }
            } else {
                (Err(failed(why)), Ran::None)
            };
            self.answer(a.job, started, Instant::now(), 1, ran, res);
        }
    }

    /// After a panic: answer every request held (CPU path, or 500), start the queue
    /// afresh, and keep in-flight slots busy until the device is done with them. Repeated
    /// panics ask for a fresh worker.
    fn recover(&mut self, msg: &str) {
        self.stats.panics.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        self.panics.push_back(now);
        while self
            .panics
            .front()
            .is_some_and(|t| now.duration_since(*t) > PANIC_WINDOW)
        {
            self.panics.pop_front();
        }
        let ids: Vec<u64> = self.active.keys().copied().collect();
        for job in std::mem::take(&mut self.held) {
            self.refuse(job, JobError::Internal("the GPU thread failed".into()));
        }
        self.out.log(
            Level::Alert,
            format!(
                "gpu: the GPU thread panicked: {msg}; its {} requests are answered from the \
                 CPU path or with 500, and it carries on",
                ids.len()
            ),
        );
        for fl in self.in_flight.iter_mut().flatten() {
            fl.batch.pieces.clear();
        }
        self.queue = Queue::new(self.config.batch_bytes);
        self.fall_back(ids, "the GPU thread failed", Failure::Panic);
        if self.panics.len() >= PANIC_LIMIT {
            self.panics.clear();
            self.out.send(Event::Restart(format!(
                "the GPU thread panicked {PANIC_LIMIT} times within {}s",
                PANIC_WINDOW.as_secs()
            )));
        }
    }

    /// At exit: wait a little for batches in flight, then release the device, or abandon it
    /// if a batch is still running (a hung kernel must not hang the worker's exit).
    fn shutdown(&mut self) {
        let Some(open) = self.device.take() else {
            return;
        };
        let limit = Instant::now() + self.config.exit_wait;
        let finished = loop {
            let running = (0..self.in_flight.len())
                .filter(|&s| self.in_flight[s].is_some())
                .any(|s| matches!(open.device().finished(s), Ok(false)));
            if !running {
                break true;
            }
            if Instant::now() >= limit {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let _ = no_panic("releasing the GPU", || {
            if finished {
                drop(open);
            } else {
                open.abandon();
            }
            Ok(())
        });
    }

    fn run_on_cpu(&mut self, batch: Batch) {
        let n = batch.pieces.len();
        for p in &batch.pieces {
            let Some(a) = self.active.get(&p.id) else {
                continue;
            };
            let op = a.job.op.clone();
            if p.whole {
                let res = cpu_whole(&a.job);
                let a = self.active.remove(&p.id).expect("present");
                let started = a.started.unwrap_or_else(Instant::now);
                self.answer(a.job, started, Instant::now(), n, Ran::Cpu, res);
                continue;
            }
            self.scratch_in.resize(p.len as usize, 0);
            if let Err(e) = a.job.body.read_range_into(p.offset, &mut self.scratch_in) {
                self.fail(
                    p.id,
                    JobError::Internal(format!("reading the request body: {e}")),
                );
                continue;
            }
            let (input, mut output) = (
                std::mem::take(&mut self.scratch_in),
                std::mem::take(&mut self.scratch_out),
            );
            let res = no_panic("CPU op", || {
                op.cpu_piece(&input, p, &mut output);
                Ok(())
            });
            match res {
                Ok(()) => self.deliver(p, &output, n, Ran::Cpu),
                Err(e) => self.fail(p.id, JobError::Internal(e)),
            }
            (self.scratch_in, self.scratch_out) = (input, output);
        }
    }

    /// One piece's result: answers a whole body at once, else adds it to the assembly.
    fn deliver(&mut self, p: &Piece, result: &[u8], batch_size: usize, device: Ran) {
        let Some(a) = self.active.get_mut(&p.id) else {
            return;
        };
        if a.job.is_cancelled() {
            self.active.remove(&p.id);
            return;
        }
        let op = a.job.op.clone();
        let output = if p.whole {
            op.finish(result, a.job.decoded.as_ref())
        } else {
            let piece_len = self.queue.piece_len();
            let len = a.job.body.len();
            let asm = a
                .assembly
                .get_or_insert_with(|| op.assembly(len, pieces_of(len, piece_len), piece_len));
            if !asm.add(p.index, result) {
                return;
            }
            a.assembly.take().expect("just used").finish()
        };
        let a = self.active.remove(&p.id).expect("present");
        let started = a.started.unwrap_or_else(Instant::now);
        self.answer(
            a.job,
            started,
            Instant::now(),
            batch_size,
            device,
            Ok(output),
        );
    }

    /// Answers a job that never ran with `err`.
    fn refuse(&self, job: Job, err: JobError) {
        let now = Instant::now();
        self.answer(job, now, now, 1, Ran::None, Err(err));
    }

    fn fail(&mut self, id: u64, err: JobError) {
        if let Some(a) = self.active.remove(&id) {
            let now = Instant::now();
            self.answer(a.job, a.started.unwrap_or(now), now, 1, Ran::None, Err(err));
        }
    }

    fn answer(
        &self,
        job: Job,
        started: Instant,
        end: Instant,
        batch_size: usize,
        device: Ran,
        result: Result<Output, JobError>,
    ) {
        if job.is_cancelled() {
            return;
        }
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        self.out.send(Event::Done(Completion {
            id: job.id,
            result,
            device,
            batch_size,
            queue_time: started.saturating_duration_since(job.queued_at),
            exec_time: end.saturating_duration_since(started),
        }));
    }
}

/// The CPU path over a whole body (the fallback, and what replaces a failed GPU batch).
fn cpu_whole(job: &Job) -> Result<Output, JobError> {
    // An op that decoded has what it needs in its decoded state.
    let input = match job.decoded {
        Some(_) => Vec::new(),
        None => job
            .body
            .to_vec()
            .map_err(|e| JobError::Internal(format!("reading the request body: {e}")))?,
    };
    let op = &job.op;
    no_panic("CPU op", || {
        Ok(op.run_cpu(input, &job.params, job.decoded.as_ref()))
    })
    .map_err(JobError::Internal)?
}

/// The test device, in builds that have it.
#[cfg(any(test, feature = "fault-injection"))]
fn fake_device(
    ordinal: usize,
    mps: bool,
    pinned_limit: usize,
) -> Result<Box<dyn Device>, GpuError> {
    Ok(Box::new(crate::gpu::fake::FakeDevice::new(
        ordinal,
        mps,
        pinned_limit,
    )))
}

#[cfg(not(any(test, feature = "fault-injection")))]
fn fake_device(
    _ordinal: usize,
    _mps: bool,
    _pinned_limit: usize,
) -> Result<Box<dyn Device>, GpuError> {
    Err(GpuError::Unavailable("no test device in this build".into()))
}

/// The fault-injection kernels, where this build has them and they were compiled.
#[cfg(any(test, feature = "fault-injection"))]
fn fault_kernels(compiled: &Compiled) -> Option<(&'static crate::gpu::Program, &Compiled)> {
    let program = crate::faults::program();
    compiled
        .ptx(program)
        .is_some()
        .then_some((program, compiled))
}

#[cfg(not(any(test, feature = "fault-injection")))]
fn fault_kernels(_compiled: &Compiled) -> Option<(&'static crate::gpu::Program, &Compiled)> {
    None
}

#[cfg(test)]
mod tests;
