//! The $gpu_* variables, for access logs and headers: where and how a request's job ran.

use core::ptr;

use ngx::ffi::*;
use ngx::ngx_string;

use crate::engine::job::Device;
use crate::http::handler::{ctx_of, RequestCtx};

struct Var {
    name: ngx_str_t,
    get: unsafe extern "C" fn(
        *mut ngx_http_request_t,
        *mut ngx_http_variable_value_t,
        usize,
    ) -> ngx_int_t,
}

const VARS: [Var; 4] = [
    Var {
        name: ngx_string!("gpu_device"),
        get: var_get,
    },
    Var {
        name: ngx_string!("gpu_batch_size"),
        get: var_get,
    },
    Var {
        name: ngx_string!("gpu_queue_time"),
        get: var_get,
    },
    Var {
        name: ngx_string!("gpu_exec_time"),
        get: var_get,
    },
];

/// Registers the variables; called from preconfiguration.
pub unsafe fn add(cf: *mut ngx_conf_t) -> ngx_int_t {
    for (i, v) in VARS.iter().enumerate() {
        let mut name = v.name;
        let var = ngx_http_add_variable(cf, &mut name, NGX_HTTP_VAR_NOCACHEABLE as ngx_uint_t);
        if var.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*var).get_handler = Some(v.get);
        (*var).data = i;
    }
    NGX_OK as ngx_int_t
}

fn value(ctx: &RequestCtx, which: usize) -> Option<String> {
    let ms = |d: std::time::Duration| format!("{}.{:03}", d.as_millis(), d.as_micros() % 1000);
    Some(match which {
        0 => match ctx.device {
            Device::Gpu(n) => format!("gpu{n}"),
            Device::Cpu => "cpu".into(),
            Device::None => return None,
        },
        1 if ctx.batch_size > 0 => ctx.batch_size.to_string(),
        2 if ctx.device != Device::None => ms(ctx.queue_time),
        3 if ctx.device != Device::None => ms(ctx.exec_time),
        _ => return None,
    })
}

unsafe extern "C" fn var_get(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    data: usize,
) -> ngx_int_t {
    let s = ctx_of(r).and_then(|ctx| value(ctx, data));
    let Some(s) = s else {
        (*v).set_not_found(1);
        return NGX_OK as ngx_int_t;
    };
    let p = ngx_pnalloc((*r).pool, s.len()) as *mut u8;
    if p.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
    (*v).data = p;
    (*v).set_len(s.len() as u32);
    (*v).set_valid(1);
    (*v).set_no_cacheable(0);
    (*v).set_not_found(0);
    NGX_OK as ngx_int_t
}
