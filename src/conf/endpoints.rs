//! `gpu_metrics`, `gpu_health` and `gpu_status`: locations that serve the metrics zone
//! (Prometheus text, health, status) instead of running an op.

use core::ffi::{c_char, c_void};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::ngx_conf_log_error;

use super::{args, main_conf_of, LocConf};
use crate::http::endpoints::{self, Endpoint};

/// Makes the location serve `what`; "is duplicate" where it serves something already.
unsafe fn serve(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    what: Endpoint,
    handler: ngx_http_handler_pt,
) -> *mut c_char {
    let lcf = &mut *(conf as *mut LocConf);
    if lcf.endpoint.is_some() || lcf.op.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    lcf.endpoint = Some(what);
    main_conf_of(cf).endpoints = true;
    let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
    let clcf =
        *(*ctx).loc_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
    (*clcf).handler = handler;
    NGX_CONF_OK
}

pub unsafe extern "C" fn cmd_gpu_metrics(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    serve(
        cf,
        conf,
        Endpoint::Metrics,
        Some(endpoints::metrics_handler),
    )
}

pub unsafe extern "C" fn cmd_gpu_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    serve(cf, conf, Endpoint::Status, Some(endpoints::status_handler))
}

pub unsafe extern "C" fn cmd_gpu_health(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // NGX_CONF_TAKE1 ensures that there is exactly one argument.
    match args(cf)[0] {
        "live" => serve(cf, conf, Endpoint::Live, Some(endpoints::live_handler)),
        "ready" => serve(cf, conf, Endpoint::Ready, Some(endpoints::ready_handler)),
        other => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{other}\" in \"gpu_health\" directive, it must be \"live\" or \"ready\""
            );
            NGX_CONF_ERROR
        }
    }
}
