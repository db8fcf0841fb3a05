//! The content handlers of `gpu_metrics`, `gpu_health` and `gpu_status`: the zone read
//! and answered at once (Prometheus text, health JSON, status JSON or its HTML page).

use ngx::ffi::*;

use crate::conf::main_conf_of_cycle;
use crate::http::response::{send, send_error};
use crate::metrics::{self, shm, status, text};

/// The self-contained status page (inline CSS and JS; it polls the same location's JSON).
const PAGE: &str = include_str!("status.html");

/// What a location serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Metrics,
    Live,
    Ready,
    Status,
}

fn guard(f: impl FnOnce() -> ngx_int_t) -> ngx_int_t {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t)
}

pub unsafe extern "C" fn metrics_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard(|| serve(r, Endpoint::Metrics))
}

pub unsafe extern "C" fn live_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard(|| serve(r, Endpoint::Live))
}

pub unsafe extern "C" fn ready_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard(|| serve(r, Endpoint::Ready))
}

pub unsafe extern "C" fn status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard(|| serve(r, Endpoint::Status))
}

/// Whether a process runs (a worker that died leaves its slot behind until respawned).
fn live(pid: u64) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    pid != 0 && (rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

const NO_STORE: (&str, &str) = ("Cache-Control", "no-store");

unsafe fn serve(r: *mut ngx_http_request_t, what: Endpoint) -> ngx_int_t {
    if (*r).method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t == 0 {
        return send_error(
            r,
            NGX_HTTP_NOT_ALLOWED as ngx_uint_t,
            "method not allowed: use GET or HEAD",
            &[("Allow", "GET, HEAD")],
        );
    }
    let rc = ngx_http_discard_request_body(r);
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    if what == Endpoint::Live {
        return send(
            r,
            200,
            "application/json",
            b"{\"live\":true}\n".to_vec(),
            &[NO_STORE],
        );
    }
    let (Some(zone), Some(mcf)) = (metrics::zone(), main_conf_of_cycle(ngx_cycle)) else {
        return send_error(
            r,
            503,
            "the metrics zone is not available in this process",
            &[],
        );
    };
    let locations = mcf.metric_labels();
    let workers = shm::workers_now();
    match what {
        Endpoint::Metrics => {
            let body = text::render(&zone, &locations, workers, &live);
            send(
                r,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                body.into_bytes(),
                &[NO_STORE],
            )
        }
        Endpoint::Ready => {
            let ready = status::readiness(&zone, &locations, workers, &live);
            let body = serde_json::json!({
                "ready": ready.ready,
                "reasons": ready.reasons,
                "workers": workers,
            });
            let status = if ready.ready { 200 } else { 503 };
            send(r, status, "application/json", json_line(&body), &[NO_STORE])
        }
        Endpoint::Status if wants_html(r) => send(
            r,
            200,
            "text/html; charset=utf-8",
            PAGE.as_bytes().to_vec(),
            &[NO_STORE],
        ),
        _ => {
            let body = status::json(&zone, &locations, workers, &live, metrics::now_ms());
            send(r, 200, "application/json", json_line(&body), &[NO_STORE])
        }
    }
}

fn json_line(v: &serde_json::Value) -> Vec<u8> {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    b
}

/// A browser (`Accept: text/html`), or `?html` asked for.
unsafe fn wants_html(r: *mut ngx_http_request_t) -> bool {
    let args = (*r).args.as_bytes();
    if args
        .split(|&c| c == b'&')
        .any(|kv| kv.split(|&c| c == b'=').next() == Some(b"html"))
    {
        return true;
    }
    let accept = (*r).headers_in.accept;
    !accept.is_null()
        && (*accept)
            .value
            .as_bytes()
            .windows(9)
            .any(|w| w.eq_ignore_ascii_case(b"text/html"))
}
