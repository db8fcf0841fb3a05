//! The worker's GPU thread: takes jobs from a bounded channel, forms batches (`batch.rs`),
//! runs them on the GPU with several batches in flight (or on the CPU when there is no
//! usable GPU and `gpu_fallback cpu`), and sends each request's result back over a
//! channel, waking the event loop through the eventfd.
//!
//! The thread waits on one `select`: new jobs, GPU slots reported done by the driver, and
//! the moment a held-back batch falls due (`gpu_batch_delay`). Whenever a slot is free and
//! a batch is due, it packs the batch into the slot's pinned buffer and launches it without
//! waiting, so it packs the next batch while the GPU runs the last one.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, never, select, unbounded, Receiver, Sender, TrySendError};

use crate::batch::{align, pieces_of, Batch, Piece, Queue};
use crate::gpu::{no_panic, Gpu, GpuError};
use crate::job::{Completion, Device, Event, Fallback, Job, JobError, Level};
use crate::notify::Notifier;
use crate::ops::{Assembly, Output, Staged};
use crate::stats::{self, Stats};

/// Where the thread gets its kernels from: PTX compiled at configuration time, or the
/// reason there is none (then the thread never touches CUDA).
pub enum Kernels {
    Ptx(Arc<str>),
    Unavailable(String),
}

/// Per-worker settings of the thread.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `gpu_queue_size`: the channel's capacity.
    pub queue_size: usize,
    /// `gpu_batch_bytes`: the most body bytes in one batch.
    pub batch_bytes: u64,
    /// `gpu_poll`: how long the thread spins on in-flight batches and new jobs before it
    /// sleeps (zero: it sleeps at once and the driver's callback wakes it).
    pub poll: Duration,
}

/// How often the thread looks at in-flight batches when the driver has not reported them
/// done: a failed device may never call back.
const STALL_CHECK: Duration = Duration::from_secs(1);

pub struct GpuThread {
    jobs: Option<Sender<Job>>,
    events: Receiver<Event>,
    notifier: Arc<Notifier>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    handle: Option<JoinHandle<()>>,
}

impl GpuThread {
    pub fn spawn(config: Config, kernels: Kernels) -> io::Result<GpuThread> {
        let (job_tx, job_rx) = bounded::<Job>(config.queue_size.max(1));
        let (ev_tx, ev_rx) = unbounded::<Event>();
        let notifier = Arc::new(Notifier::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let out = Outbox {
            tx: ev_tx,
            notifier: notifier.clone(),
        };
        let stop2 = stop.clone();
        let stats = Arc::new(Stats::default());
        let stats2 = stats.clone();
        let handle = std::thread::Builder::new()
            .name("nginx-gpu".into())
            .spawn(move || run(job_rx, out, stop2, kernels, config, stats2))?;
        Ok(GpuThread {
            jobs: Some(job_tx),
            events: ev_rx,
            notifier,
            stop,
            stats,
            handle: Some(handle),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queues a job without blocking; a full queue hands the job back.
    pub fn submit(&self, job: Job) -> Result<(), TrySendError<Job>> {
        match &self.jobs {
            Some(tx) => tx.try_send(job),
            None => Err(TrySendError::Disconnected(job)),
        }
    }

    pub fn queued(&self) -> usize {
        self.jobs.as_ref().map_or(0, Sender::len)
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

/// A job the thread holds, from its arrival until its answer.
struct Active {
    job: Job,
    /// When its first piece went into a batch.
    started: Option<Instant>,
    /// The pieces' results so far, for a body cut into pieces.
    assembly: Option<Assembly>,
}

/// A batch on a GPU slot.
struct InFlight {
    batch: Batch,
    staged: Vec<Staged>,
    launched: Instant,
}

struct State {
    queue: Queue,
    active: HashMap<u64, Active>,
    gpu: Option<Gpu>,
    done: Receiver<usize>,
    in_flight: Vec<Option<InFlight>>,
    out: Outbox,
    stats: Arc<Stats>,
    poll: Duration,
    /// Reused buffers of the CPU path.
    scratch_in: Vec<u8>,
    scratch_out: Vec<u8>,
}

fn run(
    jobs: Receiver<Job>,
    out: Outbox,
    stop: Arc<AtomicBool>,
    kernels: Kernels,
    config: Config,
    stats: Arc<Stats>,
) {
    let gpu = match kernels {
        Kernels::Ptx(ptx) => match Gpu::open(&ptx) {
            Ok(g) => {
                out.log(Level::Notice, format!("gpu: using {}", g.info));
                Some(g)
            }
            Err(e) => {
                out.log(
                    Level::Warn,
                    format!("gpu: no usable GPU in this worker: {e}"),
                );
                None
            }
        },
        Kernels::Unavailable(why) => {
            out.log(
                Level::Warn,
                format!("gpu: no usable GPU in this worker: {why}"),
            );
            None
        }
    };
    let mut st = State::new(gpu, out, config, stats);

    loop {
        if stop.load(Ordering::Acquire) {
            break;
        }
        st.dispatch();
        let busy = st.in_flight.iter().any(Option::is_some);
        if busy && !st.poll.is_zero() && st.spin(&jobs) {
            continue;
        }
        let free = st.in_flight.iter().any(Option::is_none);
        let now = Instant::now();
        let mut wait = if busy { Some(STALL_CHECK) } else { None };
        if free {
            if let Some(due) = st.queue.next_due() {
                let d = due.saturating_duration_since(now);
                wait = Some(wait.map_or(d, |w: Duration| w.min(d)));
            }
        }
        let timeout = match wait {
            Some(d) => crossbeam_channel::after(d),
            None => never(),
        };
        let done = st.done.clone();
        select! {
            recv(jobs) -> msg => match msg {
                Ok(job) => st.arrive(job),
                Err(_) => break,
            },
            recv(done) -> msg => {
                if let Ok(slot) = msg {
                    st.retire(slot);
                }
            },
            recv(timeout) -> _ => st.check_stalled(),
        }
        // Take everything else that is ready now, so that it joins the next batch.
        while let Ok(job) = jobs.try_recv() {
            st.arrive(job);
        }
        while let Ok(slot) = st.done.try_recv() {
            st.retire(slot);
        }
    }

    if let Some(g) = st.gpu.take() {
        let _ = no_panic("releasing the GPU", || {
            drop(g);
            Ok(())
        });
    }
}

impl State {
    fn new(gpu: Option<Gpu>, out: Outbox, config: Config, stats: Arc<Stats>) -> State {
        State {
            queue: Queue::new(config.batch_bytes),
            active: HashMap::new(),
            done: gpu.as_ref().map_or_else(never, |g| g.done().clone()),
            in_flight: (0..gpu.as_ref().map_or(1, Gpu::slots))
                .map(|_| None)
                .collect(),
            gpu,
            out,
            stats,
            poll: config.poll,
            scratch_in: Vec::new(),
            scratch_out: Vec::new(),
        }
    }

    /// Spins for up to `gpu_poll` on new jobs and in-flight batches; true if either
    /// moved (then the caller dispatches again instead of sleeping).
    fn spin(&mut self, jobs: &Receiver<Job>) -> bool {
        let until = Instant::now() + self.poll;
        loop {
            let mut moved = false;
            while let Ok(job) = jobs.try_recv() {
                self.arrive(job);
                moved = true;
            }
            for slot in 0..self.in_flight.len() {
                if self.in_flight[slot].is_some()
                    && self
                        .gpu
                        .as_ref()
                        .is_some_and(|g| !matches!(g.finished(slot), Ok(false)))
                {
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
        if self.gpu.is_none() && job.fallback == Fallback::Off {
            let now = Instant::now();
            self.answer(
                job,
                now,
                now,
                1,
                Device::None,
                Err(JobError::Unavailable("no GPU available".into())),
            );
            return;
        }
        self.queue
            .push(job.id, job.op, job.body.len(), job.batching, job.queued_at);
        self.active.insert(
            job.id,
            Active {
                job,
                started: None,
                assembly: None,
            },
        );
    }

    /// Launches due batches while a slot is free; without a GPU, runs them right away.
    fn dispatch(&mut self) {
        loop {
            let Some(op) = self.queue.due(Instant::now()) else {
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
            self.stats
                .pieces
                .fetch_add(batch.pieces.len() as u64, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_add(batch.pieces.iter().map(|p| p.len).sum(), Ordering::Relaxed);
            if self.gpu.is_some() {
                self.launch(slot, batch);
                stats::add(&self.stats.pack_ns, started.elapsed());
            } else {
                self.run_on_cpu(batch);
                stats::add(&self.stats.finish_ns, started.elapsed());
            }
        }
    }

    /// Packs `batch` into `slot`'s pinned buffer and launches it, without waiting.
    fn launch(&mut self, slot: usize, batch: Batch) {
        let op = batch.op;
        let gpu = self.gpu.as_mut().expect("launch needs a GPU");
        let data_len = batch.staged_len();
        let mut staged = Vec::with_capacity(batch.pieces.len());
        let mut unreadable = Vec::new();
        let res = no_panic("GPU launch", || {
            let (desc, data) = gpu
                .stage(slot, op.desc_len(batch.pieces.len()), data_len as usize)
                .map_err(|e| e.0)?;
            let mut at = 0u64;
            for p in &batch.pieces {
                let dst = &mut data[at as usize..(at + p.len) as usize];
                if let Some(a) = self.active.get(&p.id) {
                    if let Err(e) = a.job.body.read_range_into(p.offset, dst) {
                        unreadable.push((p.id, e));
                    }
                }
                staged.push(Staged {
                    data_off: at,
                    len: p.len,
                    offset: p.offset,
                    whole: p.whole,
                });
                at += align(p.len);
            }
            op.describe(&staged, desc);
            let out_len = op.out_len(staged.len(), data_len);
            gpu.launch(
                slot,
                data_len as usize,
                out_len,
                op.cv_words(&staged),
                |k, l| op.gpu_launch(k, l, &staged, data_len),
            )
            .map_err(|e| e.0)
        });
        for (id, e) in unreadable {
            self.fail(
                id,
                JobError::Internal(format!("reading the request body: {e}")),
            );
        }
        match res {
            Ok(()) => {
                self.in_flight[slot] = Some(InFlight {
                    batch,
                    staged,
                    launched: Instant::now(),
                })
            }
            Err(e) => {
                self.in_flight[slot] = Some(InFlight {
                    batch,
                    staged,
                    launched: Instant::now(),
                });
                self.gpu_lost(&GpuError(e));
            }
        }
    }

    /// A slot's batch is done: hand each piece's result to its request.
    fn retire(&mut self, slot: usize) {
        let Some(fl) = self.in_flight[slot].take() else {
            return;
        };
        let Some(gpu) = self.gpu.as_ref() else { return };
        let ordinal = gpu.info.ordinal;
        // The callback also runs after a failure: the event says which it was. A done
        // message for a batch the spin loop already retired finds the slot busy with the
        // next batch: not finished yet, so it is ignored (its own callback follows).
        match gpu.finished(slot) {
            Err(e) => {
                self.in_flight[slot] = Some(fl);
                self.gpu_lost(&e);
                return;
            }
            Ok(false) => {
                self.in_flight[slot] = Some(fl);
                return;
            }
            Ok(true) => {}
        }
        let seen = Instant::now();
        stats::add(
            &self.stats.gpu_ns,
            seen.saturating_duration_since(fl.launched),
        );
        let op = fl.batch.op;
        let n = fl.batch.pieces.len();
        let gpu = self.gpu.take().expect("checked above");
        let res = gpu.output(slot).map(|out| {
            for (i, (p, s)) in fl.batch.pieces.iter().zip(&fl.staged).enumerate() {
                self.deliver(p, op.result(out, i, s), n, Device::Gpu(ordinal));
            }
        });
        self.gpu = Some(gpu);
        stats::add(&self.stats.finish_ns, seen.elapsed());
        if let Err(e) = res {
            self.gpu_lost(&e);
        }
    }

    /// No done signal for a while: a failed device may never call back.
    fn check_stalled(&mut self) {
        let Some(gpu) = self.gpu.as_ref() else { return };
        for slot in 0..self.in_flight.len() {
            if self.in_flight[slot].is_some() {
                if let Err(e) = gpu.finished(slot) {
                    self.gpu_lost(&e);
                    return;
                }
            }
        }
    }

    fn run_on_cpu(&mut self, batch: Batch) {
        let n = batch.pieces.len();
        for p in &batch.pieces {
            let Some(a) = self.active.get(&p.id) else {
                continue;
            };
            let op = a.job.op;
            if p.whole {
                let res = cpu_whole(&a.job);
                let a = self.active.remove(&p.id).expect("present");
                let started = a.started.unwrap_or_else(Instant::now);
                self.answer(a.job, started, Instant::now(), n, Device::Cpu, res);
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
                Ok(()) => self.deliver(p, &output, n, Device::Cpu),
                Err(e) => self.fail(p.id, JobError::Internal(e)),
            }
            (self.scratch_in, self.scratch_out) = (input, output);
        }
    }

    /// One piece's result: answers a whole body at once, else adds it to the assembly.
    fn deliver(&mut self, p: &Piece, result: &[u8], batch_size: usize, device: Device) {
        let Some(a) = self.active.get_mut(&p.id) else {
            return;
        };
        if a.job.is_cancelled() {
            self.active.remove(&p.id);
            return;
        }
        let op = a.job.op;
        let output = if p.whole {
            op.finish_whole(result)
        } else {
            let piece_len = self.queue.piece_len();
            let asm = a.assembly.get_or_insert_with(|| {
                Assembly::new(
                    op,
                    a.job.body.len(),
                    pieces_of(a.job.body.len(), piece_len),
                    piece_len,
                )
            });
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

    fn fail(&mut self, id: u64, err: JobError) {
        if let Some(a) = self.active.remove(&id) {
            let now = Instant::now();
            self.answer(
                a.job,
                a.started.unwrap_or(now),
                now,
                1,
                Device::None,
                Err(err),
            );
        }
    }

    fn answer(
        &self,
        job: Job,
        started: Instant,
        end: Instant,
        batch_size: usize,
        device: Device,
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

    /// The device failed: stop using it in this worker, ask for a fresh worker, and answer
    /// every request that had a batch in flight from the CPU path (or 503 with
    /// `gpu_fallback off`). Requests still queued go through the CPU path as usual.
    fn gpu_lost(&mut self, e: &GpuError) {
        let Some(gpu) = self.gpu.take() else { return };
        let ordinal = gpu.info.ordinal;
        self.out.log(
            Level::Alert,
            format!("gpu: gpu{ordinal} failed, GPU disabled in this worker: {e}"),
        );
        self.out.send(Event::GpuLost);
        let _ = no_panic("releasing the GPU", || {
            drop(gpu);
            Ok(())
        });
        self.done = never();
        let hit: Vec<u64> = self
            .in_flight
            .iter_mut()
            .filter_map(Option::take)
            .flat_map(|fl| fl.batch.pieces.into_iter().map(|p| p.id))
            .collect();
        self.in_flight.truncate(1);
        for id in hit {
            let Some(a) = self.active.remove(&id) else {
                continue;
            };
            let started = a.started.unwrap_or_else(Instant::now);
            let res = match a.job.fallback {
                Fallback::Off => Err(JobError::Unavailable("the GPU failed".into())),
                Fallback::Cpu => cpu_whole(&a.job),
            };
            let device = if res.is_ok() {
                Device::Cpu
            } else {
                Device::None
            };
            self.answer(a.job, started, Instant::now(), 1, device, res);
        }
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
}

/// The CPU path over a whole body (the fallback, and what replaces a lost GPU batch).
fn cpu_whole(job: &Job) -> Result<Output, JobError> {
    let input = job
        .body
        .to_vec()
        .map_err(|e| JobError::Internal(format!("reading the request body: {e}")))?;
    let op = job.op;
    no_panic("CPU op", || Ok(op.run_cpu(input))).map_err(JobError::Internal)
}

#[cfg(test)]
mod tests;
