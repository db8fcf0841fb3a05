//! The worker's GPU thread: takes jobs from a bounded channel, runs each op on the GPU
//! (or on the CPU when there is no usable GPU and `gpu_fallback cpu`), and sends the
//! results back over a channel, waking the event loop through the eventfd.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};

use crate::gpu::{no_panic, Gpu, GpuError};
use crate::job::{Completion, Device, Event, Fallback, Job, JobError, Level};
use crate::notify::Notifier;
use crate::ops::Output;

/// Where the thread gets its kernels from: PTX compiled at configuration time, or the
/// reason there is none (then the thread never touches CUDA).
pub enum Kernels {
    Ptx(Arc<str>),
    Unavailable(String),
}

pub struct GpuThread {
    jobs: Option<Sender<Job>>,
    events: Receiver<Event>,
    notifier: Arc<Notifier>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl GpuThread {
    pub fn spawn(queue_size: usize, kernels: Kernels) -> io::Result<GpuThread> {
        let (job_tx, job_rx) = bounded::<Job>(queue_size.max(1));
        let (ev_tx, ev_rx) = unbounded::<Event>();
        let notifier = Arc::new(Notifier::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let out = Outbox { tx: ev_tx, notifier: notifier.clone() };
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("nginx-gpu".into())
            .spawn(move || run(job_rx, out, stop2, kernels))?;
        Ok(GpuThread { jobs: Some(job_tx), events: ev_rx, notifier, stop, handle: Some(handle) })
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

fn run(jobs: Receiver<Job>, out: Outbox, stop: Arc<AtomicBool>, kernels: Kernels) {
    let mut gpu = match kernels {
        Kernels::Ptx(ptx) => match Gpu::open(&ptx) {
            Ok(g) => {
                out.log(Level::Notice, format!("gpu: using {}", g.info));
                Some(g)
            }
            Err(e) => {
                out.log(Level::Warn, format!("gpu: no usable GPU in this worker: {e}"));
                None
            }
        },
        Kernels::Unavailable(why) => {
            out.log(Level::Warn, format!("gpu: no usable GPU in this worker: {why}"));
            None
        }
    };

    while let Ok(job) = jobs.recv() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        if job.is_cancelled() {
            // The request is gone: nobody is waiting for a result.
            continue;
        }
        let started = Instant::now();
        let (result, device) = execute(&mut gpu, &job, &out);
        out.send(Event::Done(Completion {
            id: job.id,
            result,
            device,
            batch_size: 1,
            queue_time: started - job.queued_at,
            exec_time: started.elapsed(),
        }));
    }

    if let Some(g) = gpu.take() {
        let _ = no_panic("releasing the GPU", || {
            drop(g);
            Ok(())
        });
    }
}

enum Failure {
    Read(io::Error),
    Gpu(GpuError),
}

fn execute(gpu: &mut Option<Gpu>, job: &Job, out: &Outbox) -> (Result<Output, JobError>, Device) {
    if let Some(g) = gpu.as_mut() {
        let ordinal = g.info.ordinal;
        let res = no_panic("GPU op", || Ok(run_on_gpu(g, job)))
            .unwrap_or_else(|e| Err(Failure::Gpu(GpuError(e))));
        match res {
            Ok(output) => return (Ok(output), Device::Gpu(ordinal)),
            Err(Failure::Read(e)) => {
                return (Err(JobError::Internal(format!("reading the request body: {e}"))), Device::None)
            }
            Err(Failure::Gpu(e)) => {
                out.log(
                    Level::Alert,
                    format!("gpu: {} failed on gpu{ordinal}, GPU disabled in this worker: {e}", job.op.name()),
                );
                out.send(Event::GpuLost);
                let lost = gpu.take();
                let _ = no_panic("releasing the GPU", || {
                    drop(lost);
                    Ok(())
                });
            }
        }
    }
    match job.fallback {
        Fallback::Off => (Err(JobError::Unavailable("no GPU available".into())), Device::None),
        Fallback::Cpu => match job.body.to_vec() {
            Ok(input) => {
                let op = job.op;
                match no_panic("CPU op", || Ok(op.run_cpu(&input))) {
                    Ok(output) => (Ok(output), Device::Cpu),
                    Err(e) => (Err(JobError::Internal(e)), Device::None),
                }
            }
            Err(e) => (Err(JobError::Internal(format!("reading the request body: {e}"))), Device::None),
        },
    }
}

fn run_on_gpu(gpu: &mut Gpu, job: &Job) -> Result<Output, Failure> {
    let len = job.body.len() as usize;
    let staged = gpu.input(len).map_err(Failure::Gpu)?;
    job.body.read_into(staged).map_err(Failure::Read)?;
    job.op.run_gpu(gpu, len).map_err(Failure::Gpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Body, Segment};
    use crate::ops::Op;
    use std::time::Duration;

    fn job(id: u64, op: Op, fallback: Fallback, data: &[u8]) -> Job {
        let mut body = Body::default();
        body.push(Segment::Memory(data.to_vec()));
        Job { id, op, fallback, body, cancelled: Arc::default(), queued_at: Instant::now() }
    }

    fn wait_done(t: &GpuThread, n: usize) -> Vec<Completion> {
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while done.len() < n && Instant::now() < deadline {
            for ev in t.drain() {
                if let Event::Done(c) = ev {
                    done.push(c);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        done
    }

    #[test]
    fn cpu_fallback_answers_every_job_with_its_own_result() {
        let t = GpuThread::spawn(64, Kernels::Unavailable("test".into())).unwrap();
        let inputs: Vec<Vec<u8>> = (0..50).map(|i| vec![i as u8; i * 37]).collect();
        for (i, data) in inputs.iter().enumerate() {
            let op = if i % 2 == 0 { Op::Echo } else { Op::Blake3 };
            t.submit(job(i as u64, op, Fallback::Cpu, data)).unwrap();
        }
        let done = wait_done(&t, inputs.len());
        assert_eq!(done.len(), inputs.len());
        for c in done {
            let data = &inputs[c.id as usize];
            let body = c.result.unwrap().body;
            if c.id % 2 == 0 {
                assert_eq!(&body, data);
            } else {
                assert_eq!(body, format!("{}\n", ::blake3::hash(data).to_hex()).into_bytes());
            }
            assert_eq!(c.device, Device::Cpu);
        }
    }

    #[test]
    fn fallback_off_without_gpu_is_unavailable() {
        let t = GpuThread::spawn(4, Kernels::Unavailable("test".into())).unwrap();
        t.submit(job(7, Op::Echo, Fallback::Off, b"x")).unwrap();
        let done = wait_done(&t, 1);
        assert!(matches!(done[0].result, Err(JobError::Unavailable(_))));
    }

    #[test]
    fn cancelled_jobs_are_skipped_and_others_still_answered() {
        let t = GpuThread::spawn(8, Kernels::Unavailable("test".into())).unwrap();
        let a = job(1, Op::Echo, Fallback::Cpu, b"a");
        a.cancelled.store(true, Ordering::Release);
        t.submit(a).unwrap();
        t.submit(job(2, Op::Echo, Fallback::Cpu, b"b")).unwrap();
        let done = wait_done(&t, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].id, 2);
    }

    #[test]
    fn the_start_line_says_why_there_is_no_gpu() {
        let t = GpuThread::spawn(1, Kernels::Unavailable("libnvrtc not found".into())).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let logs: Vec<String> = t
            .drain()
            .into_iter()
            .filter_map(|e| if let Event::Log(_, m) = e { Some(m) } else { None })
            .collect();
        assert!(logs.iter().any(|m| m.contains("no usable GPU") && m.contains("libnvrtc")), "{logs:?}");
    }

    #[test]
    fn a_full_queue_hands_the_job_back() {
        let (tx, _rx) = bounded::<Job>(1);
        let t = GpuThread {
            jobs: Some(tx),
            events: unbounded().1,
            notifier: Arc::new(Notifier::new().unwrap()),
            stop: Arc::default(),
            handle: None,
        };
        t.submit(job(1, Op::Echo, Fallback::Cpu, b"")).unwrap();
        assert!(matches!(t.submit(job(2, Op::Echo, Fallback::Cpu, b"")), Err(TrySendError::Full(_))));
    }
}
