//! The event-loop side of one worker: its GPU thread, the eventfd registered as a
//! connection in the worker's event loop, the map from job id to waiting request, and the
//! summary of log lines that overload would repeat for every request.
//!
//! Only the event-loop thread touches this state (it is thread-local).

use core::ptr;
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use ngx::ffi::*;
use ngx::ngx_log_error;

use crate::engine::batch::OpKey;
use crate::engine::job::{Completion, Device, Event, Job, JobError, Level};
use crate::engine::thread::{Config, GpuThread, Kernels};
use crate::http::handler::{self, RequestCtx};
use crate::metrics;

struct Worker {
    thread: GpuThread,
    conn: *mut ngx_connection_t,
    /// Requests waiting for their job's answer, and the op instance (location) of each.
    pending: HashMap<u64, (*mut RequestCtx, OpKey)>,
    /// Pending requests per location, for the locations' `gpu_queue_size`.
    per_op: HashMap<OpKey, usize>,
    /// `gpu_queue_size` in the http block: most requests waiting for (or running on) the
    /// GPU thread.
    queue_size: usize,
    next_id: u64,
    log: *mut ngx_log_t,
    /// A fresh worker has been asked for.
    restarting: bool,
    noisy: Noisy,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Starts the GPU thread and registers its eventfd. Called from init_process.
pub unsafe fn start(
    cycle: *mut ngx_cycle_t,
    config: Config,
    queue_size: usize,
    kernels: Kernels,
) -> Result<(), String> {
    let log = (*cycle).log;
    let thread =
        GpuThread::spawn(config, kernels).map_err(|e| format!("starting the GPU thread: {e}"))?;
    // The connection owns a duplicate of the eventfd, so ngx_close_connection can close it
    // while the thread's notifier keeps its own.
    let fd = libc::fcntl(thread.wake_fd(), libc::F_DUPFD_CLOEXEC, 0);
    if fd < 0 {
        return Err(format!(
            "dup of the eventfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    let c = ngx_get_connection(fd, log);
    if c.is_null() {
        libc::close(fd);
        return Err("no free connection for the GPU thread's eventfd".into());
    }
    (*c).data = ptr::null_mut();
    (*(*c).read).handler = Some(wake_handler);
    (*(*c).read).log = log;
    (*(*c).write).log = log;
    if ngx_handle_read_event((*c).read, 0) != NGX_OK as ngx_int_t {
        ngx_close_connection(c);
        return Err("cannot add the GPU thread's eventfd to the event loop".into());
    }
    WORKER.with_borrow_mut(|w| {
        *w = Some(Worker {
            thread,
            conn: c,
            pending: HashMap::new(),
            per_op: HashMap::new(),
            queue_size,
            next_id: 1,
            log,
            restarting: false,
            noisy: Noisy::new(log),
        });
    });
    metrics::thread_up(true);
    Ok(())
}

/// Stops and joins the GPU thread. Called from exit_process.
pub unsafe fn stop() {
    let Some(mut w) = WORKER.with_borrow_mut(Option::take) else {
        return;
    };
    w.noisy.flush();
    w.noisy.disarm();
    ngx_close_connection(w.conn);
    w.thread.stop();
    metrics::thread_up(false);
    metrics::pending_cleared();
    ngx_log_error!(NGX_LOG_NOTICE, w.log, "{}", w.thread.stats().summary());
}

/// Whether requests can be handed to a GPU thread in this process.
pub fn running() -> bool {
    WORKER.with_borrow(|w| w.as_ref().is_some_and(|w| w.thread.alive()))
}

pub fn next_id() -> u64 {
    WORKER.with_borrow_mut(|w| {
        w.as_mut().map_or(0, |w| {
            w.next_id += 1;
            w.next_id
        })
    })
}

/// Why a job was not queued: its queue is full (`full`), or the thread is gone.
pub struct NotQueued {
    pub full: bool,
    pub why: String,
}

/// Hands `job` to the GPU thread, unless the worker's queue (`gpu_queue_size` of the http
/// block) or its location's (`location_bound`) is full.
pub fn submit(job: Job, location_bound: usize) -> Result<(), NotQueued> {
    let full = |why: String| NotQueued { full: true, why };
    let gone = |why: &str| NotQueued {
        full: false,
        why: why.into(),
    };
    WORKER.with_borrow(|w| match w {
        None => Err(gone("the GPU thread is not running")),
        // Counted here, where requests wait: the thread drains its channel into batches.
        Some(w) if w.pending.len() >= w.queue_size => Err(full(format!(
            "GPU queue is full ({} requests waiting)",
            w.pending.len()
        ))),
        Some(w) if w.per_op.get(&job.op_key).copied().unwrap_or(0) >= location_bound => Err(full(
            format!("GPU queue of this location is full ({location_bound} requests waiting)"),
        )),
        Some(w) => w
            .thread
            .submit(job)
            .map_err(|_| gone("the GPU thread has stopped")),
    })
}

pub fn remember(id: u64, op: OpKey, ctx: *mut RequestCtx) {
    WORKER.with_borrow_mut(|w| {
        if let Some(w) = w {
            w.pending.insert(id, (ctx, op));
            *w.per_op.entry(op).or_default() += 1;
            metrics::pending(op, 1, w.pending.len());
        }
    });
}

impl Worker {
    /// Removes a pending request; its context if it was there.
    fn take(&mut self, id: u64) -> Option<*mut RequestCtx> {
        let (ctx, op) = self.pending.remove(&id)?;
        if let Some(n) = self.per_op.get_mut(&op) {
            *n = n.saturating_sub(1);
        }
        metrics::pending(op, -1, self.pending.len());
        Some(ctx)
    }
}

pub fn forget(id: u64) {
    // try_with: a request pool may be cleaned up while the thread-local is being torn down.
    let _ = WORKER.try_with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            if let Some(w) = w.as_mut() {
                w.take(id);
            }
        }
    });
}

unsafe extern "C" fn wake_handler(ev: *mut ngx_event_t) {
    let _ = std::panic::catch_unwind(|| {
        let Some((events, log)) =
            WORKER.with_borrow(|w| w.as_ref().map(|w| (w.thread.drain(), w.log)))
        else {
            return;
        };
        for event in events {
            match event {
                Event::Done(done) => {
                    let ctx = WORKER.with_borrow_mut(|w| w.as_mut().and_then(|w| w.take(done.id)));
                    // No entry: the request already went away (client gone, timed out).
                    if let Some(ctx) = ctx {
                        handler::complete(ctx, done);
                    }
                }
                Event::Log(level, msg) => {
                    if matches!(level, Level::Alert | Level::Error | Level::Warn) {
                        metrics::error(&msg);
                    } else if msg.starts_with("gpu: using ") {
                        metrics::start_line(&msg);
                    }
                    log_line(log, level, &msg)
                }
                Event::Restart(why) => {
                    metrics::error(&why);
                    restart(log, &why)
                }
                Event::Stopped => {
                    metrics::thread_up(false);
                    metrics::error("the GPU thread stopped unexpectedly");
                    ngx_log_error!(
                        NGX_LOG_ALERT,
                        log,
                        "gpu: the GPU thread stopped unexpectedly; its requests get 500"
                    );
                    fail_pending("the GPU thread stopped");
                    restart(log, "the GPU thread stopped");
                }
            }
        }
        if ngx_handle_read_event(ev, 0) != NGX_OK as ngx_int_t {
            ngx_log_error!(
                NGX_LOG_ALERT,
                log,
                "gpu: cannot re-arm the GPU thread's eventfd"
            );
        }
    });
}

/// Answers every waiting request with 500 (nothing else will answer them).
unsafe fn fail_pending(why: &str) {
    let pending: Vec<(u64, *mut RequestCtx)> = WORKER.with_borrow_mut(|w| {
        w.as_mut().map_or_else(Vec::new, |w| {
            w.per_op.clear();
            metrics::pending_cleared();
            w.pending.drain().map(|(id, (ctx, _))| (id, ctx)).collect()
        })
    });
    for (id, ctx) in pending {
        handler::complete(
            ctx,
            Completion {
                id,
                result: Err(JobError::Internal(why.into())),
                device: Device::None,
                batch_size: 0,
                queue_time: Duration::ZERO,
                exec_time: Duration::ZERO,
            },
        );
    }
}

/// Asks the master for a fresh worker (once): this one exits gracefully, answering what
/// it holds on the fallback. A single-process nginx has no master to ask: it keeps serving
/// on the fallback.
unsafe fn restart(log: *mut ngx_log_t, why: &str) {
    let first = WORKER.with_borrow_mut(|w| {
        w.as_mut()
            .is_some_and(|w| !std::mem::replace(&mut w.restarting, true))
    });
    if !first {
        return;
    }
    if ngx_process == NGX_PROCESS_WORKER as ngx_uint_t {
        ngx_log_error!(
            NGX_LOG_ALERT,
            log,
            "gpu: {why}: this worker exits gracefully and the master starts a fresh one"
        );
        request_quit();
    } else {
        ngx_log_error!(
            NGX_LOG_ALERT,
            log,
            "gpu: {why}: serving on the fallback until nginx is restarted"
        );
    }
}

/// Sets nginx's `ngx_quit` so this worker shuts down gracefully (the master respawns it).
/// Looked up at run time: a direct reference would keep the unit tests from linking.
unsafe fn request_quit() {
    let sym = libc::dlsym(libc::RTLD_DEFAULT, c"ngx_quit".as_ptr());
    if !sym.is_null() {
        // SAFETY: ngx_quit is nginx's `sig_atomic_t` (a C int) quit flag.
        core::ptr::write_volatile(sym as *mut libc::c_int, 1);
    }
}

unsafe fn log_line(log: *mut ngx_log_t, level: Level, msg: &str) {
    let level = match level {
        Level::Alert => NGX_LOG_ALERT,
        Level::Error => NGX_LOG_ERR,
        Level::Warn => NGX_LOG_WARN,
        Level::Notice => NGX_LOG_NOTICE,
        Level::Info => NGX_LOG_INFO,
    };
    ngx_log_error!(level, log, "{msg}");
}

/* lines that overload repeats */

/// Log lines that come once per request under overload (503 queue full, 504 timeouts,
/// clients gone). The first of each kind in a second is written as it comes; the others
/// are counted and summed up in one line when the second is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeated {
    QueueFull,
    TimedOut,
    ClientClosed,
}

const REPEATED: [(Repeated, ngx_uint_t, &str); 3] = [
    (
        Repeated::QueueFull,
        NGX_LOG_WARN as ngx_uint_t,
        "answered 503 (GPU queue full)",
    ),
    (
        Repeated::TimedOut,
        NGX_LOG_ERR as ngx_uint_t,
        "answered 504 (gpu_timeout)",
    ),
    (
        Repeated::ClientClosed,
        NGX_LOG_INFO as ngx_uint_t,
        "closed by their clients while waiting",
    ),
];

/// How often each repeated kind is written at most.
const SUMMARY_EVERY: Duration = Duration::from_secs(1);

struct Noisy {
    /// Per kind: when its last line was written, and how many were held back since.
    kinds: [(Option<Instant>, u64); 3],
    /// Fires when held-back lines are due for their summary. Boxed: nginx's timer tree
    /// points at it.
    timer: Box<ngx_event_t>,
    log: *mut ngx_log_t,
}

impl Noisy {
    unsafe fn new(log: *mut ngx_log_t) -> Noisy {
        // SAFETY: a zeroed ngx_event_t is a valid idle event.
        let mut timer: Box<ngx_event_t> = Box::new(core::mem::zeroed());
        timer.handler = Some(summary_timer);
        timer.log = log;
        // A pending summary must not keep a gracefully exiting worker alive.
        timer.set_cancelable(1);
        Noisy {
            kinds: [(None, 0); 3],
            timer,
            log,
        }
    }

    /// Writes `msg` now, or counts it for the summary; true if written.
    fn admit(&mut self, kind: Repeated) -> bool {
        let i = REPEATED
            .iter()
            .position(|(k, ..)| *k == kind)
            .expect("listed");
        let now = Instant::now();
        let (last, held) = &mut self.kinds[i];
        if last.is_none_or(|t| now.duration_since(t) >= SUMMARY_EVERY) && *held == 0 {
            *last = Some(now);
            return true;
        }
        *held += 1;
        if self.timer.timer_set() == 0 {
            let due = last.map_or(Duration::ZERO, |t| {
                (t + SUMMARY_EVERY).saturating_duration_since(now)
            });
            // SAFETY: the timer lives in a Box owned by the worker and is removed in stop().
            unsafe { ngx_add_timer(&mut *self.timer, due.as_millis() as ngx_msec_t + 1) };
        }
        false
    }

    /// Writes the summary line of every kind with held-back lines.
    fn flush(&mut self) {
        let now = Instant::now();
        for (i, (last, held)) in self.kinds.iter_mut().enumerate() {
            if *held == 0 {
                continue;
            }
            let (_, level, what) = REPEATED[i];
            let secs = last.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
            ngx_log_error!(
                level,
                self.log,
                "gpu: {held} more requests {what} in the last {secs:.1}s"
            );
            *held = 0;
            *last = Some(now);
        }
    }

    fn disarm(&mut self) {
        if self.timer.timer_set() != 0 {
            // SAFETY: the timer was added by admit().
            unsafe { ngx_del_timer(&mut *self.timer) };
        }
    }
}

unsafe extern "C" fn summary_timer(_ev: *mut ngx_event_t) {
    let _ = std::panic::catch_unwind(|| {
        WORKER.with_borrow_mut(|w| {
            if let Some(w) = w.as_mut() {
                w.noisy.flush();
            }
        })
    });
}

/// Logs `msg` at the kind's level on `log`, unless lines of this kind come faster than one
/// a second (then they are summed up).
pub unsafe fn log_repeated(kind: Repeated, log: *mut ngx_log_t, msg: &str) {
    let write = WORKER.with_borrow_mut(|w| w.as_mut().is_none_or(|w| w.noisy.admit(kind)));
    if write {
        let level = REPEATED
            .iter()
            .find(|(k, ..)| *k == kind)
            .map_or(NGX_LOG_ERR as ngx_uint_t, |(_, l, _)| *l);
        ngx_log_error!(level, log, "{msg}");
    }
}
