//! `gpu_process kserve;`: the KServe v2 (Open Inference Protocol) HTTP routes under `/v2`.
//! GET routes (health, metadata) are answered here at the event loop (small documents); an
//! infer request picks its model's op instance here and goes to the GPU thread, whose op
//! decodes the body (`decode.rs`) and encodes the answer (`encode.rs`).

pub mod decode;
pub mod encode;
pub mod extensions;
#[cfg(test)]
mod fuzz;

use std::sync::Arc;

use ngx::ffi::*;

use crate::conf::MainConf;
use crate::engine::batch::OpKey;
use crate::engine::worker;
use crate::http::response::{send, send_error};
use crate::ngx_http_gpu_module;
use crate::ops::model::Model;
use crate::ops::{Op, Params, Value};

/// A model served over KServe: the declared model and its op instance.
pub struct Served {
    pub model: Arc<dyn Model>,
    pub op: Arc<dyn Op>,
    pub key: OpKey,
}

/// What a request's path asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Server,
    Live,
    Ready,
    Model(&'a str),
    ModelReady(&'a str),
    ModelConfig(&'a str),
    Infer(&'a str),
    /// `GET /v2/models/stats` (every model) or `/v2/models/<name>/stats`.
    Stats(Option<&'a str>),
    RepositoryIndex,
    RepositoryLoad(&'a str),
    RepositoryUnload(&'a str),
    /// 404 with this message.
    NotFound(String),
}

impl Route<'_> {
    /// The methods the route takes (for 405 and `Allow`).
    pub fn allow(&self) -> &'static str {
        match self {
            Route::Infer(_)
            | Route::RepositoryIndex
            | Route::RepositoryLoad(_)
            | Route::RepositoryUnload(_) => "POST",
            _ => "GET, HEAD",
        }
    }
}

/// Routes a request path (the part from `/v2` on).
pub fn route(path: &str) -> Route<'_> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Route::NotFound(format!("no route {path}: the KServe routes start with /v2"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let parts: Vec<&str> = rest.split('/').skip(1).collect();
    match parts[..] {
        [] => Route::Server,
        ["health", "live"] => Route::Live,
        ["health", "ready"] => Route::Ready,
        ["models", "stats"] => Route::Stats(None),
        ["repository", "index"] => Route::RepositoryIndex,
        ["repository", "models", name, "load"] if !name.is_empty() => Route::RepositoryLoad(name),
        ["repository", "models", name, "unload"] if !name.is_empty() => {
            Route::RepositoryUnload(name)
        }
        ["models", name, ref tail @ ..] if !name.is_empty() => {
            let tail = match tail {
                ["versions", "1", t @ ..] => t,
                ["versions", v, ..] => {
                    return Route::NotFound(format!(
                        "model \"{name}\" has no version \"{v}\" (versions: 1)"
                    ))
                }
                t => t,
            };
            match tail {
                [] => Route::Model(name),
                ["ready"] => Route::ModelReady(name),
                ["config"] => Route::ModelConfig(name),
                ["infer"] => Route::Infer(name),
                ["stats"] => Route::Stats(Some(name)),
                _ => Route::NotFound(format!("no route {path}")),
            }
        }
        _ => Route::NotFound(format!("no route {path}")),
    }
}

/// The content handler of a `gpu_process kserve;` location. Returns what the content
/// handler returns; an infer request is read and queued by `queue`.
pub unsafe fn handle(
    r: *mut ngx_http_request_t,
    queue: unsafe fn(*mut ngx_http_request_t, Arc<dyn Op>, OpKey, Params) -> ngx_int_t,
) -> ngx_int_t {
    let uri = std::str::from_utf8((*r).uri.as_bytes()).unwrap_or("");
    let route = route(uri);
    let method = (*r).method;
    let get = method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t != 0;
    let post = method & NGX_HTTP_POST as ngx_uint_t != 0;
    let mcf = &*(*(*r).main_conf.add(ngx_http_gpu_module.ctx_index) as *const MainConf);
    let find = |name: &str| mcf.served.iter().find(|s| s.model.name() == name);
    let unknown = |name: &str| format!("unknown model \"{name}\"");
    if let Route::Infer(name) = route {
        if !post {
            return discard_then(r, |r| {
                send_error(r, 405, "method not allowed: use POST", &[("Allow", "POST")])
            });
        }
        let Some(s) = find(name) else {
            return discard_then(r, |r| send_error(r, 404, &unknown(name), &[]));
        };
        if let Some(enc) = header(r, "Content-Encoding") {
            if !enc.eq_ignore_ascii_case("identity") {
                let msg = format!("Content-Encoding \"{enc}\" is not supported");
                return discard_then(r, |r| send_error(r, 400, &msg, &[]));
            }
        }
        let header_len = match header(r, encode::HEADER_LENGTH) {
            None => -1,
            Some(v) => match v.trim().parse::<i64>() {
                Ok(n) if n >= 0 => n,
                _ => {
                    let msg = format!("{} \"{v}\" is not a length", encode::HEADER_LENGTH);
                    return discard_then(r, |r| send_error(r, 400, &msg, &[]));
                }
            },
        };
        return queue(r, s.op.clone(), s.key, Params(vec![Value::I64(header_len)]));
    }
    if matches!(
        route,
        Route::RepositoryIndex | Route::RepositoryLoad(_) | Route::RepositoryUnload(_)
    ) {
        if !post {
            return discard_then(r, |r| {
                send_error(r, 405, "method not allowed: use POST", &[("Allow", "POST")])
            });
        }
        if (*r).headers_in.content_length_n > REPOSITORY_BODY_MAX {
            let msg = format!("a repository request's body is at most {REPOSITORY_BODY_MAX} bytes");
            return discard_then(r, |r| send_error(r, 413, &msg, &[]));
        }
        let rc = ngx_http_read_client_request_body(r, Some(repository_body_read));
        if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
            return rc;
        }
        return NGX_DONE as ngx_int_t;
    }
    if !get {
        let allow = route.allow();
        return discard_then(r, |r| {
            send_error(r, 405, "method not allowed", &[("Allow", allow)])
        });
    }
    let ready = worker::running();
    let doc = match route {
        Route::Server => encode::server_metadata(),
        Route::Live => return discard_then(r, |r| send_json(r, 200, &serde_json::json!({}))),
        Route::Ready if ready => {
            return discard_then(r, |r| send_json(r, 200, &serde_json::json!({})))
        }
        Route::Ready => {
            return discard_then(r, |r| {
                send_error(
                    r,
                    503,
                    "the GPU thread is not running",
                    &[("Retry-After", "1")],
                )
            })
        }
        Route::Model(name) | Route::ModelReady(name) | Route::ModelConfig(name) => {
            let Some(s) = find(name) else {
                return discard_then(r, |r| send_error(r, 404, &unknown(name), &[]));
            };
            match route {
                Route::Model(_) => encode::model_metadata(name, &s.model.signature()),
                Route::ModelConfig(_) => encode::model_config(name, &s.model.signature()),
                _ if ready => serde_json::json!({}),
                _ => {
                    return discard_then(r, |r| {
                        send_error(r, 503, "the GPU thread is not running", &[])
                    })
                }
            }
        }
        Route::Stats(name) => {
            let zone = crate::metrics::zone();
            let stat = |s: &Served| {
                let blocks: Vec<_> = zone.iter().flat_map(|z| z.loc_all(s.key)).collect();
                extensions::model_stats(s.model.name(), &blocks)
            };
            let stats: Vec<serde_json::Value> = match name {
                None => mcf.served.iter().map(stat).collect(),
                Some(name) => match find(name) {
                    Some(s) => vec![stat(s)],
                    None => return discard_then(r, |r| send_error(r, 404, &unknown(name), &[])),
                },
            };
            serde_json::json!({ "model_stats": stats })
        }
        Route::NotFound(msg) => return discard_then(r, |r| send_error(r, 404, &msg, &[])),
        Route::Infer(_)
        | Route::RepositoryIndex
        | Route::RepositoryLoad(_)
        | Route::RepositoryUnload(_) => unreachable!("answered above"),
    };
    discard_then(r, |r| send_json(r, 200, &doc))
}

/// The most bytes of a repository request's body (`{"ready": true}`, load parameters).
const REPOSITORY_BODY_MAX: i64 = 64 * 1024;

/// Body post-handler of the repository routes: answers from the whole (small) body.
unsafe extern "C" fn repository_body_read(r: *mut ngx_http_request_t) {
    let rc = crate::http::handler::guard(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        repository(r)
    });
    ngx_http_finalize_request(r, rc);
}

unsafe fn repository(r: *mut ngx_http_request_t) -> ngx_int_t {
    // A body this small that nginx kept in a temp file (client_body_in_file_only) is read
    // here: one small read of a file nginx just wrote, as nginx reads small files itself.
    let body = match crate::http::body::take(r).and_then(|b| b.to_vec()) {
        Ok(b) if b.len() as i64 <= REPOSITORY_BODY_MAX => b,
        Ok(_) => {
            let msg = format!("a repository request's body is at most {REPOSITORY_BODY_MAX} bytes");
            return send_error(r, 413, &msg, &[]);
        }
        Err(e) => return send_error(r, 500, &format!("reading the request body: {e}"), &[]),
    };
    let uri = std::str::from_utf8((*r).uri.as_bytes()).unwrap_or("");
    let mcf = &*(*(*r).main_conf.add(ngx_http_gpu_module.ctx_index) as *const MainConf);
    let declared = |name: &str| mcf.served.iter().any(|s| s.model.name() == name);
    let answer = match route(uri) {
        Route::RepositoryIndex => {
            let running = worker::running();
            let entries: Vec<extensions::Entry> = mcf
                .served
                .iter()
                .map(|s| extensions::Entry {
                    name: s.model.name(),
                    unavailable: (!running).then_some("the GPU thread is not running"),
                })
                .collect();
            extensions::repository_index(&entries, &body)
        }
        Route::RepositoryLoad(name) => {
            extensions::load(name, declared(name), &body).map(|()| serde_json::json!({}))
        }
        Route::RepositoryUnload(name) => Err(extensions::unload_refused(name)),
        _ => Err(format!("no route {uri}")),
    };
    match answer {
        Ok(doc) => send_json(r, 200, &doc),
        Err(msg) => send_error(r, 400, &msg, &[]),
    }
}

unsafe fn discard_then(
    r: *mut ngx_http_request_t,
    f: impl FnOnce(*mut ngx_http_request_t) -> ngx_int_t,
) -> ngx_int_t {
    let rc = ngx_http_discard_request_body(r);
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    f(r)
}

unsafe fn send_json(
    r: *mut ngx_http_request_t,
    status: ngx_uint_t,
    doc: &serde_json::Value,
) -> ngx_int_t {
    let body = serde_json::to_vec(doc).expect("JSON of plain values");
    send(r, status, "application/json", body, &[])
}

/// The value of request header `name` (the first, case-insensitive).
unsafe fn header(r: *mut ngx_http_request_t, name: &str) -> Option<String> {
    let mut part: *const ngx_list_part_t = &(*r).headers_in.headers.part;
    while !part.is_null() {
        let elts = (*part).elts as *const ngx_table_elt_t;
        for i in 0..(*part).nelts {
            let h = &*elts.add(i);
            if h.key.as_bytes().eq_ignore_ascii_case(name.as_bytes()) {
                return Some(String::from_utf8_lossy(h.value.as_bytes()).into_owned());
            }
        }
        part = (*part).next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/v2"), Route::Server);
        assert_eq!(route("/v2/"), Route::Server);
        assert_eq!(route("/v2/health/live"), Route::Live);
        assert_eq!(route("/v2/health/ready"), Route::Ready);
        assert_eq!(route("/v2/models/m"), Route::Model("m"));
        assert_eq!(route("/v2/models/m/versions/1"), Route::Model("m"));
        assert_eq!(route("/v2/models/m/ready"), Route::ModelReady("m"));
        assert_eq!(route("/v2/models/m/config"), Route::ModelConfig("m"));
        assert_eq!(route("/v2/models/m/infer"), Route::Infer("m"));
        assert_eq!(route("/v2/models/m/versions/1/infer"), Route::Infer("m"));
        assert!(
            matches!(route("/v2/models/m/versions/2/infer"), Route::NotFound(m) if m.contains("no version \"2\""))
        );
        assert!(matches!(route("/v2/models"), Route::NotFound(_)));
        assert!(matches!(route("/v2/models//infer"), Route::NotFound(_)));
        assert!(matches!(route("/v2/models/m/explain"), Route::NotFound(_)));
        assert!(matches!(route("/v1/models/m"), Route::NotFound(_)));
        assert_eq!(route("/v2/models/stats"), Route::Stats(None));
        assert_eq!(route("/v2/models/m/stats"), Route::Stats(Some("m")));
        assert_eq!(
            route("/v2/models/m/versions/1/stats"),
            Route::Stats(Some("m"))
        );
        assert_eq!(route("/v2/repository/index"), Route::RepositoryIndex);
        assert_eq!(
            route("/v2/repository/models/m/load"),
            Route::RepositoryLoad("m")
        );
        assert_eq!(
            route("/v2/repository/models/m/unload"),
            Route::RepositoryUnload("m")
        );
        assert!(matches!(
            route("/v2/repository/models//load"),
            Route::NotFound(_)
        ));
        assert!(matches!(route("/v2/repository"), Route::NotFound(_)));
        assert_eq!(Route::RepositoryIndex.allow(), "POST");
        assert_eq!(Route::Stats(None).allow(), "GET, HEAD");
        assert_eq!(Route::Infer("m").allow(), "POST");
        assert_eq!(Route::Server.allow(), "GET, HEAD");
    }
}
