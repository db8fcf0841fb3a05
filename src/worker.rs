//! The event-loop side of one worker: its GPU thread, the eventfd registered as a
//! connection in the worker's event loop, and the map from job id to waiting request.
//!
//! Only the event-loop thread touches this state (it is thread-local).

use core::ptr;
use std::cell::RefCell;
use std::collections::HashMap;

use crossbeam_channel::TrySendError;
use ngx::ffi::*;
use ngx::ngx_log_error;

use crate::gpu_thread::{Config, GpuThread, Kernels};
use crate::handler::{self, RequestCtx};
use crate::job::{Event, Job, Level};

struct Worker {
    thread: GpuThread,
    conn: *mut ngx_connection_t,
    pending: HashMap<u64, *mut RequestCtx>,
    /// `gpu_queue_size`: most requests waiting for (or running on) the GPU thread.
    queue_size: usize,
    next_id: u64,
    log: *mut ngx_log_t,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Starts the GPU thread and registers its eventfd. Called from init_process.
pub unsafe fn start(
    cycle: *mut ngx_cycle_t,
    config: Config,
    kernels: Kernels,
) -> Result<(), String> {
    let log = (*cycle).log;
    let queue_size = config.queue_size;
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
            queue_size,
            next_id: 1,
            log,
        });
    });
    Ok(())
}

/// Stops and joins the GPU thread. Called from exit_process.
pub unsafe fn stop() {
    let Some(mut w) = WORKER.with_borrow_mut(Option::take) else {
        return;
    };
    ngx_close_connection(w.conn);
    w.thread.stop();
    ngx_log_error!(NGX_LOG_NOTICE, w.log, "{}", w.thread.stats().summary());
}

pub fn running() -> bool {
    WORKER.with_borrow(Option::is_some)
}

pub fn next_id() -> u64 {
    WORKER.with_borrow_mut(|w| {
        w.as_mut().map_or(0, |w| {
            w.next_id += 1;
            w.next_id
        })
    })
}

pub fn submit(job: Job) -> Result<(), String> {
    WORKER.with_borrow(|w| match w {
        None => Err("the GPU thread is not running".into()),
        // Counted here, where requests wait: the thread drains its channel into batches.
        Some(w) if w.pending.len() >= w.queue_size => Err(format!(
            "GPU queue is full ({} requests waiting)",
            w.pending.len()
        )),
        Some(w) => match w.thread.submit(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(format!(
                "GPU queue is full ({} requests waiting)",
                w.thread.queued()
            )),
            Err(TrySendError::Disconnected(_)) => Err("the GPU thread has stopped".into()),
        },
    })
}

pub fn remember(id: u64, ctx: *mut RequestCtx) {
    WORKER.with_borrow_mut(|w| {
        if let Some(w) = w {
            w.pending.insert(id, ctx);
        }
    });
}

pub fn forget(id: u64) {
    // try_with: a request pool may be cleaned up while the thread-local is being torn down.
    let _ = WORKER.try_with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            if let Some(w) = w.as_mut() {
                w.pending.remove(&id);
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
                    let ctx = WORKER
                        .with_borrow_mut(|w| w.as_mut().and_then(|w| w.pending.remove(&done.id)));
                    // No entry: the request already went away (client gone, timed out).
                    if let Some(ctx) = ctx {
                        handler::complete(ctx, done);
                    }
                }
                Event::Log(level, msg) => log_line(log, level, &msg),
                Event::GpuLost => {
                    if ngx_process == NGX_PROCESS_WORKER as ngx_uint_t {
                        ngx_log_error!(NGX_LOG_ALERT, log, "gpu: the GPU failed; this worker exits gracefully and the master starts a fresh one");
                        request_quit();
                    }
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
