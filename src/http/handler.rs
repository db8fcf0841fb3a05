//! The `gpu_process` content handler and a request's life around its job: read the
//! body, queue the job, then answer from the completion or on timeout.

use core::ffi::c_void;
use core::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ngx::ffi::*;
use ngx::ngx_log_error;

use crate::conf::{ClientEof, LocConf};
use crate::engine::batch::OpKey;
use crate::engine::job::{Batching, Completion, Device, Job, JobError};
use crate::engine::worker;
use crate::engine::worker::{log_repeated, Repeated};
use crate::http::body;
use crate::http::response::{send, send_error_shaped};
use crate::metrics::{self, Outcome};
use crate::ngx_http_gpu_module;
use crate::ops::{Op, Params};

/// Per-request state, in the request pool; dropped by its pool cleanup.
pub struct RequestCtx {
    request: *mut ngx_http_request_t,
    id: u64,
    /// When the content handler started (the request time of the metrics), and whether
    /// the request's outcome was counted.
    started: Instant,
    counted: bool,
    /// Shared with the job: set when the request goes away before its result.
    cancelled: Arc<AtomicBool>,
    /// Waiting for a completion (registered with the worker, timer armed).
    queued: bool,
    /// The op, its key and the parameters a protocol chose for the request (KServe);
    /// `None`: the location's op.
    target: Option<(Arc<dyn Op>, OpKey, Params)>,
    /// The op instance the request is counted under in the metrics: the location's, or the
    /// one a protocol chose.
    key: OpKey,
    timer: ngx_event_t,
    /// Filled from the completion, for the $gpu_* variables.
    pub device: Device,
    pub batch_size: usize,
    pub queue_time: Duration,
    pub exec_time: Duration,
}

/// Runs `f`, answering `fallback` instead of letting a panic reach nginx.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(fallback)
}

unsafe fn loc_conf(r: *mut ngx_http_request_t) -> &'static LocConf {
    &*(*(*r).loc_conf.add(ngx_http_gpu_module.ctx_index) as *const LocConf)
}

/// Sends an error in the shape of the location's op (`Op::error_shape`; plain JSON for
/// KServe locations, whose ops vary per request).
unsafe fn send_error(
    r: *mut ngx_http_request_t,
    status: ngx_uint_t,
    message: &str,
    headers: &[(&str, &str)],
) -> ngx_int_t {
    let shape = loc_conf(r)
        .op
        .as_ref()
        .map_or(crate::ops::ErrorShape::Plain, |op| op.error_shape());
    send_error_shaped(r, shape, status, message, headers)
}

pub unsafe fn ctx_of(r: *mut ngx_http_request_t) -> Option<&'static mut RequestCtx> {
    (*(*r).ctx.add(ngx_http_gpu_module.ctx_index) as *mut RequestCtx).as_mut()
}

pub unsafe extern "C" fn gpu_content_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        content_handler(r)
    })
}

/// Counts the request's answer in the metrics zone, once.
unsafe fn record(r: *mut ngx_http_request_t, outcome: Outcome, bytes_out: u64) {
    let (key, took) = match ctx_of(r) {
        Some(c) if c.counted => return,
        Some(c) => {
            c.counted = true;
            (c.key, c.started.elapsed())
        }
        None => (loc_conf(r).op_key, Duration::ZERO),
    };
    metrics::answered(key, outcome, took, bytes_out);
}

/// Log phase: counts the answers nginx gave itself to requests of `gpu_process`
/// locations (413 over client_max_body_size before the handler ran, 408 a body that
/// never came, 400 a malformed one); 499, a client gone, is no outcome.
pub unsafe extern "C" fn log_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard(NGX_OK as ngx_int_t, || {
        let lcf = loc_conf(r);
        let status = (*r).headers_out.status;
        if lcf.op.is_some()
            && ctx_of(r).is_none_or(|c| !c.counted)
            && status >= 400
            && status != NGX_HTTP_CLIENT_CLOSED_REQUEST as ngx_uint_t
        {
            record(r, Outcome::of_status(status), 0);
        }
        NGX_OK as ngx_int_t
    })
}

unsafe fn content_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    if loc_conf(r).kserve {
        return crate::http::kserve::handle(r, read_for);
    }
    // The context first: it marks the request counted, whichever way it is answered.
    if create_ctx(r).is_none() {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    if (*r).method & (NGX_HTTP_POST | NGX_HTTP_PUT) as ngx_uint_t == 0 {
        let rc = ngx_http_discard_request_body(r);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        record(r, Outcome::BadRequest, 0);
        return send_error(
            r,
            NGX_HTTP_NOT_ALLOWED as ngx_uint_t,
            "method not allowed: use POST or PUT",
            &[("Allow", "POST, PUT")],
        );
    }
    if !worker::running() {
        let rc = ngx_http_discard_request_body(r);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        record(r, Outcome::Unavailable, 0);
        return send_error(
            r,
            503,
            "the GPU thread is not running in this process",
            &[("Retry-After", "1")],
        );
    }
    let rc = ngx_http_read_client_request_body(r, Some(body_read));
    if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
        // nginx's own answer (413 over client_max_body_size, 400 a malformed body).
        record(r, Outcome::of_status(rc as usize), 0);
        return rc;
    }
    NGX_DONE as ngx_int_t
}

/// For protocols that pick the op per request (KServe: the model in the path): reads the
/// body and queues it for `op` (instance `key`) with `params`.
unsafe fn read_for(
    r: *mut ngx_http_request_t,
    op: Arc<dyn Op>,
    key: OpKey,
    params: Params,
) -> ngx_int_t {
    if !worker::running() {
        let rc = ngx_http_discard_request_body(r);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        return send_error(
            r,
            503,
            "the GPU thread is not running in this process",
            &[("Retry-After", "1")],
        );
    }
    let Some(ctx) = create_ctx(r) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    (*ctx).target = Some((op, key, params));
    (*ctx).key = key;
    let rc = ngx_http_read_client_request_body(r, Some(body_read));
    if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
        return rc;
    }
    NGX_DONE as ngx_int_t
}

unsafe fn create_ctx(r: *mut ngx_http_request_t) -> Option<*mut RequestCtx> {
    let pool = (*r).pool;
    let ctx = ngx_pcalloc(pool, size_of::<RequestCtx>()) as *mut RequestCtx;
    let cln = ngx_pool_cleanup_add(pool, 0);
    if ctx.is_null() || cln.is_null() {
        return None;
    }
    // SAFETY: ctx is fresh pool memory of the right size; the zeroed timer is a valid
    // idle ngx_event_t.
    ptr::write(
        ctx,
        RequestCtx {
            request: r,
            id: 0,
            started: Instant::now(),
            counted: false,
            cancelled: Arc::default(),
            queued: false,
            target: None,
            key: loc_conf(r).op_key,
            timer: core::mem::zeroed(),
            device: Device::None,
            batch_size: 0,
            queue_time: Duration::ZERO,
            exec_time: Duration::ZERO,
        },
    );
    (*cln).handler = Some(ctx_cleanup);
    (*cln).data = ctx.cast();
    *(*r).ctx.add(ngx_http_gpu_module.ctx_index) = ctx.cast();
    Some(ctx)
}

/// The request pool is going away: forget the job, disarm the timer, drop the ctx.
unsafe extern "C" fn ctx_cleanup(data: *mut c_void) {
    let ctx = data as *mut RequestCtx;
    guard((), || {
        let c = &mut *ctx;
        c.cancelled.store(true, Ordering::Release);
        if c.queued {
            worker::forget(c.id);
            c.queued = false;
        }
        if c.timer.timer_set() != 0 {
            ngx_del_timer(&mut c.timer);
        }
    });
    // SAFETY: written by create_ctx; the pool frees the memory itself.
    ptr::drop_in_place(ctx);
}

/// Body post-handler: the whole body is in r->request_body; hand it to the GPU thread.
unsafe extern "C" fn body_read(r: *mut ngx_http_request_t) {
    // A panic while queueing still finalizes the request (500) instead of leaving it hanging.
    let rc = guard(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || queue_job(r));
    if rc != NGX_DONE as ngx_int_t {
        ngx_http_finalize_request(r, rc);
    }
}

unsafe fn queue_job(r: *mut ngx_http_request_t) -> ngx_int_t {
    let Some(ctx) = ctx_of(r) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    let lcf = loc_conf(r);
    let log = (*(*r).connection).log;
    let body = match body::take(r) {
        Ok(b) => b,
        Err(e) => {
            ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "gpu: cannot hand the request body over: {e}"
            );
            record(r, Outcome::Internal, 0);
            return send_error(r, 500, "internal error", &[]);
        }
    };
    let (op, op_key, params) = match ctx.target.take() {
        Some(t) => t,
        None => {
            let op = lcf
                .op
                .clone()
                .expect("gpu_process sets the op with the handler");
            let Some(values) = evaluate(r, &lcf.values) else {
                record(r, Outcome::Internal, 0);
                return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
            };
            // The op's checks that need no body bytes: its parameters, the body's length.
            match op.admit(body.len(), &values) {
                Ok(p) => (op, lcf.op_key, p),
                Err(e) => return respond_error(r, e),
            }
        }
    };
    metrics::request_bytes(op_key, body.len());
    let job = Job {
        id: worker::next_id(),
        op,
        op_key,
        params,
        fallback: lcf.fallback.unwrap_or(crate::engine::job::Fallback::Cpu),
        batching: Batching {
            size: lcf.batch_size,
            delay: Duration::from_millis(lcf.batch_delay as u64),
        },
        body,
        decoded: None,
        timeout: Duration::from_millis(lcf.timeout as u64),
        cancelled: ctx.cancelled.clone(),
        queued_at: Instant::now(),
    };
    let id = job.id;
    if let Err(e) = worker::submit(job, lcf.queue_size) {
        log_repeated(
            Repeated::QueueFull,
            log,
            &format!("gpu: {}, answering 503", e.why),
        );
        let outcome = if e.full {
            Outcome::QueueFull
        } else {
            Outcome::Unavailable
        };
        record(r, outcome, 0);
        return send_error(r, 503, &e.why, &[("Retry-After", "1")]);
    }
    ctx.id = id;
    ctx.queued = true;
    worker::remember(id, op_key, ctx);
    ctx.timer.handler = Some(timeout_handler);
    ctx.timer.data = (ctx as *mut RequestCtx).cast();
    ctx.timer.log = log;
    ngx_add_timer(&mut ctx.timer, lcf.timeout);
    watch_client(r);
    NGX_DONE as ngx_int_t
}

/// Notices a client that goes away while its job waits, so that its job is skipped: over
/// HTTP/1 a reset or closed connection (edge-triggered events, as nginx's upstream module
/// watches them), over HTTP/2 a reset stream or a lost connection.
unsafe fn watch_client(r: *mut ngx_http_request_t) {
    if !(*r).stream.is_null() {
        (*r).read_event_handler = Some(check_client);
    } else if ngx_event_flags & NGX_USE_CLEAR_EVENT as ngx_uint_t != 0 {
        (*r).read_event_handler = Some(check_client);
        // An end of input (or reset) that came with the body was reported before this
        // handler was set, and an edge-triggered event does not come again: look once from
        // the event loop.
        let rev = (*(*r).connection).read;
        if (*rev).pending_eof() != 0 || (*rev).ready() != 0 {
            ngx_post_event(rev, core::ptr::addr_of_mut!(ngx_posted_events));
        }
    }
}

unsafe extern "C" fn check_client(r: *mut ngx_http_request_t) {
    guard((), || {
        let c = (*r).connection;
        // HTTP/2 marks a stream's connection on RST_STREAM or when the connection goes;
        // its descriptor is the whole connection's, not to be read here.
        let gone = if (*c).error() != 0 {
            true
        } else if !(*r).stream.is_null() {
            false
        } else {
            let mut byte = 0u8;
            let n = libc::recv((*c).fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK);
            let err = std::io::Error::last_os_error().raw_os_error();
            if n > 0 || (n < 0 && err == Some(libc::EAGAIN)) {
                false
            } else if n == 0 {
                // End of input: a client that half-closed after its request (shutdown
                // SHUT_WR) is still waiting for the answer, and looks the same as one that
                // closed completely until the answer is written.
                loc_conf(r).client_eof == Some(ClientEof::Cancel)
            } else {
                true
            }
        };
        if !gone {
            return;
        }
        (*(*c).read).set_eof(1);
        (*c).set_error(1);
        log_repeated(
            Repeated::ClientClosed,
            (*c).log,
            "gpu: client closed the connection while waiting for the result",
        );
        ngx_http_finalize_request(r, NGX_HTTP_CLIENT_CLOSED_REQUEST as ngx_int_t);
    });
}

unsafe extern "C" fn timeout_handler(ev: *mut ngx_event_t) {
    guard((), || {
        let ctx = &mut *((*ev).data as *mut RequestCtx);
        let r = ctx.request;
        let c = (*r).connection;
        ctx.cancelled.store(true, Ordering::Release);
        if ctx.queued {
            worker::forget(ctx.id);
            ctx.queued = false;
        }
        log_repeated(
            Repeated::TimedOut,
            (*c).log,
            "gpu: timed out waiting for the GPU thread",
        );
        record(r, Outcome::Timeout, 0);
        let rc = send_error(
            r,
            NGX_HTTP_GATEWAY_TIME_OUT as ngx_uint_t,
            "timed out waiting for the GPU",
            &[],
        );
        ngx_http_finalize_request(r, rc);
        ngx_http_run_posted_requests(c);
    });
}

/// The `gpu_process` values of the request's location, evaluated (nginx variables); None
/// if nginx could not.
unsafe fn evaluate(
    r: *mut ngx_http_request_t,
    values: &[*mut ngx_http_complex_value_t],
) -> Option<Vec<Vec<u8>>> {
    values
        .iter()
        .map(|&cv| {
            let mut v = ngx_str_t::default();
            (ngx_http_complex_value(r, cv, &mut v) == NGX_OK as ngx_int_t)
                .then(|| v.as_bytes().to_vec())
        })
        .collect()
}

/// Answers a request with `e`'s status and message (JSON, or the location's error_page).
unsafe fn respond_error(r: *mut ngx_http_request_t, e: JobError) -> ngx_int_t {
    let outcome = match e {
        JobError::BadInput(_) | JobError::TooLarge(_) => Outcome::BadRequest,
        JobError::Unavailable(_) => Outcome::Unavailable,
        JobError::Internal(_) => Outcome::Internal,
    };
    record(r, outcome, 0);
    match e {
        JobError::BadInput(m) => send_error(r, NGX_HTTP_BAD_REQUEST as ngx_uint_t, &m, &[]),
        JobError::TooLarge(m) => {
            send_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE as ngx_uint_t, &m, &[])
        }
        JobError::Unavailable(m) => send_error(r, 503, &m, &[("Retry-After", "1")]),
        JobError::Internal(m) => {
            ngx_log_error!(NGX_LOG_ERR, (*(*r).connection).log, "gpu: {m}");
            send_error(
                r,
                NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_uint_t,
                "internal error",
                &[],
            )
        }
    }
}

/// Answers the request of a completed job (already removed from the worker's map).
pub unsafe fn complete(ctx: *mut RequestCtx, done: Completion) {
    guard((), || {
        let ctx = &mut *ctx;
        let r = ctx.request;
        let c = (*r).connection;
        ctx.queued = false;
        if ctx.timer.timer_set() != 0 {
            ngx_del_timer(&mut ctx.timer);
        }
        ctx.device = done.device;
        ctx.batch_size = done.batch_size;
        ctx.queue_time = done.queue_time;
        ctx.exec_time = done.exec_time;
        (*r).read_event_handler = Some(ngx_http_block_reading);
        if done.device != Device::None {
            metrics::ran(ctx.key, done.queue_time, done.exec_time);
        }
        let rc = match done.result {
            Ok(out) => {
                record(r, Outcome::Success, out.body.len() as u64);
                let headers: Vec<(&str, &str)> =
                    out.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                send(
                    r,
                    NGX_HTTP_OK as ngx_uint_t,
                    &out.content_type,
                    out.body,
                    &headers,
                )
            }
            Err(e) => respond_error(r, e),
        };
        ngx_http_finalize_request(r, rc);
        ngx_http_run_posted_requests(c);
    });
}
