//! Configuration: the directive table, the main and location configuration, and the
//! directive handlers.

use core::ffi::{c_char, c_void};
use core::mem::offset_of;
use core::ptr;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::{ngx_conf_log_error, ngx_string};

use crate::handler::gpu_content_handler;
use crate::job::Fallback;
use crate::ngx_http_gpu_module;
use crate::ops::Op;

pub const DEFAULT_QUEUE_SIZE: ngx_int_t = 1024;
/// NGX_CONF_UNSET_MSEC, which bindgen does not export.
const UNSET_MSEC: ngx_msec_t = ngx_msec_t::MAX;
pub const DEFAULT_TIMEOUT_MS: ngx_msec_t = 60_000;
pub const DEFAULT_BATCH_SIZE: usize = 128;
pub const MAX_BATCH_SIZE: usize = 65536;
pub const DEFAULT_BATCH_BYTES: usize = 16 << 20;
pub const MAX_BATCH_BYTES: usize = 1 << 30;
const UNSET_SIZE: usize = usize::MAX;
pub const DEFAULT_POLL_US: usize = 0;
pub const MAX_POLL_US: usize = 10_000;

/// http-level settings; one per configuration, shared by every worker.
#[repr(C)]
pub struct MainConf {
    /// `gpu_queue_size`: requests waiting for one worker's GPU thread.
    pub queue_size: ngx_int_t,
    /// `gpu_batch_bytes`: the most body bytes in one batch (and a piece's size).
    pub batch_bytes: usize,
    /// `gpu_poll`, in microseconds.
    pub poll_us: usize,
    /// Whether any location uses `gpu_process` (else no GPU thread is started).
    pub used: bool,
}

#[repr(C)]
pub struct LocConf {
    pub op: Option<Op>,
    pub fallback: Option<Fallback>,
    /// `gpu_timeout`, in ms.
    pub timeout: ngx_msec_t,
    /// `gpu_batch_size`: most requests in one launch.
    pub batch_size: usize,
    /// `gpu_batch_delay`, in ms: how long the oldest request may wait for a fuller batch.
    pub batch_delay: ngx_msec_t,
}

/* directive table */

pub static mut NGX_HTTP_GPU_COMMANDS: [ngx_command_t; 9] = [
    ngx_command_t {
        name: ngx_string!("gpu_process"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_1MORE) as ngx_uint_t,
        set: Some(cmd_gpu_process),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_fallback"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(cmd_gpu_fallback),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_timeout"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(ngx_conf_set_msec_slot),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: offset_of!(LocConf, timeout),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_queue_size"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_gpu_queue_size),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_batch_size"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(cmd_gpu_batch_size),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_batch_delay"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(ngx_conf_set_msec_slot),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: offset_of!(LocConf, batch_delay),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_batch_bytes"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_gpu_batch_bytes),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_poll"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_gpu_poll),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

/* configuration constructors */

/// Allocates `value` in the configuration pool.
unsafe fn alloc_conf<T>(cf: *mut ngx_conf_t, value: T) -> *mut c_void {
    let p = ngx_pcalloc((*cf).pool, size_of::<T>()) as *mut T;
    if !p.is_null() {
        // SAFETY: p is fresh, aligned (pool allocations are NGX_ALIGNMENT-aligned) and
        // large enough. The types stored here need no drop.
        ptr::write(p, value);
    }
    p.cast()
}

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    alloc_conf(
        cf,
        MainConf {
            queue_size: NGX_CONF_UNSET as ngx_int_t,
            batch_bytes: UNSET_SIZE,
            poll_us: UNSET_SIZE,
            used: false,
        },
    )
}

pub unsafe extern "C" fn init_main_conf(_cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    if mcf.queue_size == NGX_CONF_UNSET as ngx_int_t {
        mcf.queue_size = DEFAULT_QUEUE_SIZE;
    }
    if mcf.batch_bytes == UNSET_SIZE {
        mcf.batch_bytes = DEFAULT_BATCH_BYTES;
    }
    if mcf.poll_us == UNSET_SIZE {
        mcf.poll_us = DEFAULT_POLL_US;
    }
    NGX_CONF_OK
}

pub unsafe extern "C" fn create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    alloc_conf(
        cf,
        LocConf {
            op: None,
            fallback: None,
            timeout: UNSET_MSEC,
            batch_size: UNSET_SIZE,
            batch_delay: UNSET_MSEC,
        },
    )
}

pub unsafe extern "C" fn merge_loc_conf(
    _cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    let prev = &*(prev as *const LocConf);
    let conf = &mut *(conf as *mut LocConf);
    if conf.fallback.is_none() {
        conf.fallback = Some(prev.fallback.unwrap_or(Fallback::Cpu));
    }
    let merge_msec = |v: &mut ngx_msec_t, prev: ngx_msec_t, default: ngx_msec_t| {
        if *v == UNSET_MSEC {
            *v = if prev == UNSET_MSEC { default } else { prev };
        }
    };
    merge_msec(&mut conf.timeout, prev.timeout, DEFAULT_TIMEOUT_MS);
    merge_msec(&mut conf.batch_delay, prev.batch_delay, 0);
    if conf.batch_size == UNSET_SIZE {
        conf.batch_size = if prev.batch_size == UNSET_SIZE {
            DEFAULT_BATCH_SIZE
        } else {
            prev.batch_size
        };
    }
    NGX_CONF_OK
}

/* helpers */

/// The directive's arguments after its name, as UTF-8 (nginx passes bytes).
unsafe fn args<'a>(cf: *mut ngx_conf_t) -> Vec<&'a str> {
    // SAFETY: cf->args is an array of ngx_str_t that lives for the whole directive.
    let all = (*(*cf).args).as_slice::<ngx_str_t>();
    all[1..]
        .iter()
        .map(|s| core::str::from_utf8(s.as_bytes()).unwrap_or("\u{fffd}"))
        .collect()
}

pub unsafe fn main_conf_of(cf: *mut ngx_conf_t) -> &'static mut MainConf {
    let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
    &mut *(*(*ctx).main_conf.add(ngx_http_gpu_module.ctx_index) as *mut MainConf)
}

/// The module's main configuration in a running cycle, if it has an http block.
pub unsafe fn main_conf_of_cycle(cycle: *mut ngx_cycle_t) -> Option<&'static MainConf> {
    let ctx = *(*cycle).conf_ctx.add(ngx_http_module.index) as *mut ngx_http_conf_ctx_t;
    if ctx.is_null() {
        return None;
    }
    (*(*ctx).main_conf.add(ngx_http_gpu_module.ctx_index) as *const MainConf).as_ref()
}

/* directive handlers */

unsafe extern "C" fn cmd_gpu_process(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lcf = &mut *(conf as *mut LocConf);
    if lcf.op.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    match Op::parse(&args(cf)) {
        Ok(op) => lcf.op = Some(op),
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpu_process\" directive: {e}");
            return NGX_CONF_ERROR;
        }
    }
    main_conf_of(cf).used = true;

    let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
    let clcf =
        *(*ctx).loc_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
    (*clcf).handler = Some(gpu_content_handler);
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_gpu_fallback(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lcf = &mut *(conf as *mut LocConf);
    if lcf.fallback.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // NGX_CONF_TAKE1 ensures that there is exactly one argument.
    lcf.fallback = match args(cf)[0] {
        "cpu" => Some(Fallback::Cpu),
        "off" => Some(Fallback::Off),
        other => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{other}\" in \"gpu_fallback\" directive, it must be \"cpu\" or \"off\""
            );
            return NGX_CONF_ERROR;
        }
    };
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_gpu_batch_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lcf = &mut *(conf as *mut LocConf);
    if lcf.batch_size != UNSET_SIZE {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let v = args(cf)[0];
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH_SIZE).contains(&n) => lcf.batch_size = n,
        _ => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{v}\" in \"gpu_batch_size\" directive, it must be a number from 1 to {MAX_BATCH_SIZE}"
            );
            return NGX_CONF_ERROR;
        }
    }
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_gpu_batch_bytes(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    if mcf.batch_bytes != UNSET_SIZE {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: cf->args holds the directive's name and its one argument.
    let value = &mut (*(*cf).args).as_slice_mut::<ngx_str_t>()[1];
    let n = ngx_parse_size(value);
    let min = crate::batch::MIN_BATCH_BYTES as usize;
    if n < 0 || (n as usize) < min || n as usize > MAX_BATCH_BYTES {
        let v = core::str::from_utf8(value.as_bytes()).unwrap_or("\u{fffd}");
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "invalid value \"{v}\" in \"gpu_batch_bytes\" directive, it must be a size from 64k to 1g"
        );
        return NGX_CONF_ERROR;
    }
    mcf.batch_bytes = n as usize;
    NGX_CONF_OK
}

/// `0`, or a number with `us` or `ms` (nginx's time syntax has no microseconds).
pub fn parse_poll(v: &str) -> Option<usize> {
    let us = if v == "0" {
        0
    } else if let Some(n) = v.strip_suffix("us") {
        n.parse::<usize>().ok()?
    } else if let Some(n) = v.strip_suffix("ms") {
        n.parse::<usize>().ok()?.checked_mul(1000)?
    } else {
        return None;
    };
    (us <= MAX_POLL_US).then_some(us)
}

unsafe extern "C" fn cmd_gpu_poll(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    if mcf.poll_us != UNSET_SIZE {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let v = args(cf)[0];
    match parse_poll(v) {
        Some(us) => mcf.poll_us = us,
        None => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{v}\" in \"gpu_poll\" directive, it must be 0 or a time in us or ms up to 10ms"
            );
            return NGX_CONF_ERROR;
        }
    }
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_gpu_queue_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    if mcf.queue_size != NGX_CONF_UNSET as ngx_int_t {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let v = args(cf)[0];
    match v.parse::<ngx_int_t>() {
        Ok(n) if (1..=1 << 24).contains(&n) => mcf.queue_size = n,
        _ => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{v}\" in \"gpu_queue_size\" directive, it must be a number from 1 to 16777216"
            );
            return NGX_CONF_ERROR;
        }
    }
    NGX_CONF_OK
}
