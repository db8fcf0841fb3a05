//! Configuration: the directive table, the main and location configuration, and the
//! directive handlers. The registry of what the http block declares by name (kernels) is
//! `Declared` in the main configuration; `gpu_kernel` is in `kernels.rs`, `gpu_model` in
//! `models.rs`, `gpu_metrics`, `gpu_health` and `gpu_status` in `endpoints.rs`.

mod endpoints;
mod kernels;
mod models;

use core::ffi::{c_char, c_void};
use core::mem::offset_of;
use core::ptr;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::{ngx_conf_log_error, ngx_string};

use std::sync::Arc;

use crate::engine::batch::OpKey;
use crate::engine::devices::DeviceList;
use crate::engine::job::Fallback;
use crate::gpu::Compiled;
use crate::http::handler::gpu_content_handler;
use crate::ngx_http_gpu_module;
use crate::ops::{Declared, Op};

pub const DEFAULT_QUEUE_SIZE: ngx_int_t = 1024;
pub const MAX_QUEUE_SIZE: usize = 1 << 24;
/// NGX_CONF_UNSET_MSEC, which bindgen does not export.
const UNSET_MSEC: ngx_msec_t = ngx_msec_t::MAX;
pub const DEFAULT_TIMEOUT_MS: ngx_msec_t = 60_000;
pub const DEFAULT_BATCH_SIZE: usize = 128;
pub const MAX_BATCH_SIZE: usize = 65536;
pub const DEFAULT_BATCH_BYTES: usize = 16 << 20;
pub const MAX_BATCH_BYTES: usize = 1 << 30;
/// `gpu_batch_tokens`' largest value (its default: `ops::embed::op::DEFAULT_BATCH_TOKENS`).
pub const MAX_BATCH_TOKENS: usize = 1 << 20;
const UNSET_SIZE: usize = usize::MAX;
/// Spinning saves the wake-ups of a lightly loaded worker's GPU thread (README,
/// `gpu_poll`); the default where there are cores to spare (see `poll_us`).
pub const DEFAULT_POLL_US: usize = 100;
pub const MAX_POLL_US: usize = 10_000;
pub const DEFAULT_PINNED_LIMIT: usize = 256 << 20;
pub const MIN_PINNED_LIMIT: usize = 4 << 20;
pub const MAX_PINNED_LIMIT: usize = 64 << 30;

/// http-level settings; one per configuration, shared by every worker.
#[repr(C)]
pub struct MainConf {
    /// `gpu_queue_size`: requests waiting for one worker's GPU thread.
    pub queue_size: ngx_int_t,
    /// `gpu_batch_bytes`: the most body bytes in one batch (and a piece's size).
    pub batch_bytes: usize,
    /// `gpu_poll`, in microseconds; unset (`usize::MAX`) until a worker knows its cores
    /// (see `poll_us`).
    pub poll_us: usize,
    /// `gpu_pinned_limit`: the most pinned host memory one worker's batches may hold.
    pub pinned_limit: usize,
    /// `gpu_devices`: the devices workers spread over (None: not set, every visible one).
    pub devices: Option<DeviceList>,
    /// Whether any location uses `gpu_process` (else no GPU thread is started).
    pub used: bool,
    /// The largest `gpu_batch_size` of a `gpu_process` location (for the memory bound).
    pub max_batch_size: usize,
    /// Every `gpu_process` location's op, by `OpKey`, and where it was configured
    /// (`file:line`, for messages about it after the whole configuration is read).
    pub ops: Vec<Arc<dyn Op>>,
    pub op_sites: Vec<String>,
    /// Each op's location (its URI prefix, the `location` label) and `gpu_fallback`, by
    /// `OpKey`.
    pub op_locations: Vec<String>,
    pub op_fallbacks: Vec<Fallback>,
    /// Whether a location serves `gpu_metrics`, `gpu_health` or `gpu_status`.
    pub endpoints: bool,
    /// The metrics zone (see `metrics::shm`) and its layout; null where none was added.
    pub metrics_zone: *mut ngx_shm_zone_t,
    pub metrics_layout: Option<crate::metrics::zone::Layout>,
    /// What the http block declares by name (`gpu_kernel`).
    pub declared: Declared,
    /// Whether a location has `gpu_process kserve;`, and then the declared models it
    /// serves, each with its own op instance (made once the configuration is read).
    pub kserve: bool,
    pub served: Vec<crate::http::kserve::Served>,
    /// The first `gpu_process kserve;` location (the served models' `location` label), and
    /// its `gpu_fallback` (the served models' fallback in the metrics' readiness).
    pub kserve_location: String,
    pub kserve_fallback: Fallback,
    /// The first `gpu_process kserve;` location's `gpu_batch_tokens` (the served embed
    /// models' batches).
    pub kserve_batch_tokens: usize,
    /// This configuration's compiled programs, or why there are none. Kept with the
    /// configuration, not in a process-wide variable: a reload that fails after compiling
    /// leaves the running configuration's kernels as they were, for workers the master
    /// starts later.
    pub kernels: Option<Result<Arc<Compiled>, String>>,
}

#[repr(C)]
pub struct LocConf {
    /// `gpu_process`: the location's op, its key, and the values it evaluates per request.
    pub op: Option<Arc<dyn Op>>,
    pub op_key: OpKey,
    /// `gpu_process kserve;`: the location serves the KServe v2 routes (its requests go
    /// to their model's op, not to `op`).
    pub kserve: bool,
    pub values: Vec<*mut ngx_http_complex_value_t>,
    /// `gpu_queue_size` in a server or location: requests of this location one worker
    /// holds at most (the http-level one bounds the worker).
    pub queue_size: usize,
    pub fallback: Option<Fallback>,
    /// `gpu_timeout`, in ms.
    pub timeout: ngx_msec_t,
    /// `gpu_batch_size`: most requests in one launch.
    pub batch_size: usize,
    /// `gpu_batch_delay`, in ms: how long the oldest request may wait for a fuller batch.
    pub batch_delay: ngx_msec_t,
    /// `gpu_batch_tokens`: most tokens in one batch of an embed op.
    pub batch_tokens: usize,
    /// `gpu_client_eof`: what a client's end of input means while its job waits.
    pub client_eof: Option<ClientEof>,
    /// `gpu_metrics`, `gpu_health` or `gpu_status`: what the location serves instead.
    pub endpoint: Option<crate::http::endpoints::Endpoint>,
}

/// `gpu_client_eof`: whether a client that closes its sending side (while its request's
/// job waits) still gets the answer, or is taken as gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEof {
    Answer,
    Cancel,
}

/* directive table */

pub static mut NGX_HTTP_GPU_COMMANDS: [ngx_command_t; 18] = [
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
        set: Some(cmd_gpu_timeout),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: offset_of!(LocConf, timeout),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_queue_size"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(cmd_gpu_queue_size),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_kernel"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE) as ngx_uint_t,
        set: Some(kernels::cmd_gpu_kernel),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_model"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE) as ngx_uint_t,
        set: Some(models::cmd_gpu_model),
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
        name: ngx_string!("gpu_batch_tokens"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(cmd_gpu_batch_tokens),
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
        name: ngx_string!("gpu_pinned_limit"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_gpu_pinned_limit),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_client_eof"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(cmd_gpu_client_eof),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_devices"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_gpu_devices),
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
    ngx_command_t {
        name: ngx_string!("gpu_metrics"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(endpoints::cmd_gpu_metrics),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_health"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(endpoints::cmd_gpu_health),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("gpu_status"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(endpoints::cmd_gpu_status),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

/* configuration constructors */

/// Allocates `value` in the configuration pool; it is dropped when the pool is destroyed
/// (the configuration's cycle ends).
unsafe fn alloc_conf<T>(cf: *mut ngx_conf_t, value: T) -> *mut c_void {
    let p = ngx_pcalloc((*cf).pool, size_of::<T>()) as *mut T;
    let cln = ngx_pool_cleanup_add((*cf).pool, 0);
    if p.is_null() || cln.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: p is fresh, aligned (pool allocations are NGX_ALIGNMENT-aligned) and large
    // enough.
    ptr::write(p, value);
    (*cln).handler = Some(drop_conf::<T>);
    (*cln).data = p.cast();
    p.cast()
}

unsafe extern "C" fn drop_conf<T>(data: *mut c_void) {
    // SAFETY: written by alloc_conf; pool cleanups run once.
    ptr::drop_in_place(data as *mut T);
}

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    alloc_conf(
        cf,
        MainConf {
            queue_size: NGX_CONF_UNSET as ngx_int_t,
            batch_bytes: UNSET_SIZE,
            poll_us: UNSET_SIZE,
            pinned_limit: UNSET_SIZE,
            devices: None,
            used: false,
            max_batch_size: 0,
            ops: Vec::new(),
            op_sites: Vec::new(),
            op_locations: Vec::new(),
            op_fallbacks: Vec::new(),
            endpoints: false,
            metrics_zone: ptr::null_mut(),
            metrics_layout: None,
            declared: Declared::default(),
            kserve: false,
            served: Vec::new(),
            kserve_location: String::new(),
            kserve_fallback: Fallback::Cpu,
            kserve_batch_tokens: crate::ops::embed::op::DEFAULT_BATCH_TOKENS,
            kernels: None,
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
    if mcf.pinned_limit == UNSET_SIZE {
        mcf.pinned_limit = DEFAULT_PINNED_LIMIT;
    }
    NGX_CONF_OK
}

pub unsafe extern "C" fn create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    alloc_conf(
        cf,
        LocConf {
            op: None,
            op_key: 0,
            kserve: false,
            values: Vec::new(),
            queue_size: UNSET_SIZE,
            fallback: None,
            timeout: UNSET_MSEC,
            batch_size: UNSET_SIZE,
            batch_delay: UNSET_MSEC,
            batch_tokens: UNSET_SIZE,
            client_eof: None,
            endpoint: None,
        },
    )
}

pub unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
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
    if conf.queue_size == UNSET_SIZE {
        conf.queue_size = prev.queue_size;
    }
    if conf.batch_tokens == UNSET_SIZE {
        conf.batch_tokens = if prev.batch_tokens == UNSET_SIZE {
            crate::ops::embed::op::DEFAULT_BATCH_TOKENS
        } else {
            prev.batch_tokens
        };
    }
    if let Some(op) = &conf.op {
        op.set_batch_tokens(conf.batch_tokens);
    }
    if conf.client_eof.is_none() {
        conf.client_eof = Some(prev.client_eof.unwrap_or(ClientEof::Answer));
    }
    if conf.op.is_some() || conf.kserve {
        let mcf = main_conf_of(cf);
        mcf.max_batch_size = mcf.max_batch_size.max(conf.batch_size);
        if conf.kserve {
            mcf.kserve_fallback = conf.fallback.unwrap_or(Fallback::Cpu);
            mcf.kserve_batch_tokens = conf.batch_tokens;
        } else if let Some(f) = mcf.op_fallbacks.get_mut(conf.op_key) {
            *f = conf.fallback.unwrap_or(Fallback::Cpu);
        }
    }
    NGX_CONF_OK
}

/* helpers */

/// The directive's arguments after its name, as UTF-8 (nginx passes bytes).
pub(crate) unsafe fn args<'a>(cf: *mut ngx_conf_t) -> Vec<&'a str> {
    // SAFETY: cf->args is an array of ngx_str_t that lives for the whole directive.
    let all = (*(*cf).args).as_slice::<ngx_str_t>();
    all[1..]
        .iter()
        .map(|s| core::str::from_utf8(s.as_bytes()).unwrap_or("\u{fffd}"))
        .collect()
}

impl MainConf {
    /// (model, location) of every op, by `OpKey`: the labels of its series.
    pub fn metric_labels(&self) -> Vec<(String, String)> {
        self.ops
            .iter()
            .zip(&self.op_locations)
            .map(|(op, loc)| (op.name().to_string(), loc.clone()))
            .collect()
    }
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
    if lcf.op.is_some() || lcf.endpoint.is_some() || lcf.kserve {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
    let clcf =
        *(*ctx).loc_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
    if args(cf).first() == Some(&"kserve") {
        if let Some(extra) = args(cf).get(1) {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"gpu_process\" directive: kserve takes no arguments, got \"{extra}\""
            );
            return NGX_CONF_ERROR;
        }
        let mcf = main_conf_of(cf);
        lcf.kserve = true;
        mcf.kserve = true;
        mcf.used = true;
        // The served models' series are labelled with the first kserve location.
        if mcf.kserve_location.is_empty() {
            mcf.kserve_location = String::from_utf8_lossy((*clcf).name.as_bytes()).into_owned();
        }
        (*clcf).handler = Some(gpu_content_handler);
        return NGX_CONF_OK;
    }
    let configured = match crate::ops::parse(&args(cf)) {
        Ok(c) => c,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpu_process\" directive: {e}");
            return NGX_CONF_ERROR;
        }
    };
    // Values evaluated per request: nginx variables allowed.
    for v in &configured.values {
        match compile_value(cf, v) {
            Some(cv) => lcf.values.push(cv),
            None => return NGX_CONF_ERROR,
        }
    }
    let mcf = main_conf_of(cf);
    lcf.op_key = mcf.ops.len();
    lcf.op = Some(configured.op.clone());
    mcf.ops.push(configured.op);
    mcf.op_sites.push(site(cf));
    mcf.used = true;
    mcf.op_locations
        .push(String::from_utf8_lossy((*clcf).name.as_bytes()).into_owned());
    mcf.op_fallbacks.push(Fallback::Cpu);
    (*clcf).handler = Some(gpu_content_handler);
    NGX_CONF_OK
}

/// `file:line` of the directive being read, for messages given after the whole
/// configuration is read.
unsafe fn site(cf: *mut ngx_conf_t) -> String {
    let f = (*cf).conf_file;
    if f.is_null() {
        return String::from("?");
    }
    format!(
        "{}:{}",
        String::from_utf8_lossy((*f).file.name.as_bytes()),
        (*f).line
    )
}

/// Compiles `text` (which may hold nginx variables) into a complex value in the
/// configuration pool; None after an `[emerg]`.
unsafe fn compile_value(cf: *mut ngx_conf_t, text: &str) -> Option<*mut ngx_http_complex_value_t> {
    let pool = (*cf).pool;
    let data = ngx_pnalloc(pool, text.len()) as *mut u8;
    let value = ngx_pcalloc(pool, size_of::<ngx_str_t>()) as *mut ngx_str_t;
    let cv =
        ngx_pcalloc(pool, size_of::<ngx_http_complex_value_t>()) as *mut ngx_http_complex_value_t;
    if data.is_null() || value.is_null() || cv.is_null() {
        return None;
    }
    ptr::copy_nonoverlapping(text.as_ptr(), data, text.len());
    *value = ngx_str_t {
        len: text.len(),
        data,
    };
    // SAFETY: zeroed is the documented initial state (no flags).
    let mut ccv: ngx_http_compile_complex_value_t = core::mem::zeroed();
    ccv.cf = cf;
    ccv.value = value;
    ccv.complex_value = cv;
    if ngx_http_compile_complex_value(&mut ccv) != NGX_OK as ngx_int_t {
        return None;
    }
    Some(cv)
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

/// nginx's time syntax (`ngx_conf_set_msec_slot`), more than zero: a zero timeout would
/// answer every request with 504.
unsafe extern "C" fn cmd_gpu_timeout(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let rv = ngx_conf_set_msec_slot(cf, cmd, conf);
    if rv != NGX_CONF_OK {
        return rv;
    }
    if (*(conf as *mut LocConf)).timeout == 0 {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "invalid value \"{}\" in \"gpu_timeout\" directive, it must be more than 0",
            args(cf)[0]
        );
        return NGX_CONF_ERROR;
    }
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_gpu_client_eof(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lcf = &mut *(conf as *mut LocConf);
    if lcf.client_eof.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // NGX_CONF_TAKE1 ensures that there is exactly one argument.
    lcf.client_eof = match args(cf)[0] {
        "answer" => Some(ClientEof::Answer),
        "cancel" => Some(ClientEof::Cancel),
        other => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{other}\" in \"gpu_client_eof\" directive, it must be \"answer\" or \"cancel\""
            );
            return NGX_CONF_ERROR;
        }
    };
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_gpu_pinned_limit(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    if mcf.pinned_limit != UNSET_SIZE {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: cf->args holds the directive's name and its one argument.
    let value = &mut (*(*cf).args).as_slice_mut::<ngx_str_t>()[1];
    let n = ngx_parse_offset(value);
    if n < 0 || (n as usize) < MIN_PINNED_LIMIT || n as usize > MAX_PINNED_LIMIT {
        let v = core::str::from_utf8(value.as_bytes()).unwrap_or("\u{fffd}");
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "invalid value \"{v}\" in \"gpu_pinned_limit\" directive, it must be a size from 4m to 64g"
        );
        return NGX_CONF_ERROR;
    }
    mcf.pinned_limit = n as usize;
    NGX_CONF_OK
}

/// The most pinned host memory one worker's batches can take with these settings, over
/// the configured ops (see `gpu::buffers::pinned_worst_case`).
pub fn pinned_worst_case(ops: &[Arc<dyn Op>], batch_bytes: usize, max_batch_size: usize) -> usize {
    let worst = |n: usize, data: usize| {
        ops.iter()
            .map(|op| op.worst_case(n, data))
            .fold((0, 0), |(d, o), (d2, o2)| (d.max(d2), o.max(o2)))
    };
    crate::gpu::buffers::pinned_worst_case(
        crate::gpu::SLOTS,
        batch_bytes,
        max_batch_size.max(1),
        |n| worst(n, batch_bytes).0,
        |n, data| worst(n, data).1,
    )
}

/// The check that spans directives: the batches the configuration allows fit in
/// `gpu_pinned_limit` (false, with an `[emerg]`, if not). Called from postconfiguration.
pub unsafe fn check_pinned(cf: *mut ngx_conf_t) -> bool {
    let mcf = main_conf_of(cf);
    let need = pinned_worst_case(&mcf.ops, mcf.batch_bytes, mcf.max_batch_size);
    if need > mcf.pinned_limit {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "gpu: \"gpu_batch_bytes\" {}k with \"gpu_batch_size\" up to {} needs up to {} MiB of pinned memory per worker, more than \"gpu_pinned_limit\" {} MiB: lower gpu_batch_bytes or raise gpu_pinned_limit",
            mcf.batch_bytes >> 10,
            mcf.max_batch_size,
            need >> 20,
            mcf.pinned_limit >> 20
        );
        return false;
    }
    true
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

unsafe extern "C" fn cmd_gpu_batch_tokens(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lcf = &mut *(conf as *mut LocConf);
    if lcf.batch_tokens != UNSET_SIZE {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let v = args(cf)[0];
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH_TOKENS).contains(&n) => lcf.batch_tokens = n,
        _ => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{v}\" in \"gpu_batch_tokens\" directive, it must be a number from 1 to {MAX_BATCH_TOKENS}"
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
    let n = ngx_parse_offset(value);
    let min = crate::engine::batch::MIN_BATCH_BYTES as usize;
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

/// A worker's `gpu_poll` in microseconds: as set, or by default `DEFAULT_POLL_US` where
/// every worker's GPU thread has a core to spare beside the workers (`workers` x 2 <=
/// `cores`, the cores this worker may run on), else 0: spinning GPU threads would take
/// the cores the workers need (`worker_processes auto`, `worker_cpu_affinity`).
pub fn poll_us(set: usize, workers: usize, cores: usize) -> usize {
    match set {
        UNSET_SIZE if workers.saturating_mul(2) <= cores => DEFAULT_POLL_US,
        UNSET_SIZE => 0,
        us => us,
    }
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

/// Which devices the workers spread over. Only the syntax is checked here: which ids
/// exist is known only in the workers (CUDA is never touched in the master).
unsafe extern "C" fn cmd_gpu_devices(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    if mcf.devices.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // NGX_CONF_TAKE1 ensures that there is exactly one argument.
    match DeviceList::parse(args(cf)[0]) {
        Ok(list) => mcf.devices = Some(list),
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{e}");
            return NGX_CONF_ERROR;
        }
    }
    NGX_CONF_OK
}

/// In the http block, the bound of a worker's queue; in a server or a location, the bound
/// of that location's requests in it (one slow endpoint cannot fill the worker's queue).
unsafe extern "C" fn cmd_gpu_queue_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let v = args(cf)[0];
    let n = match v.parse::<usize>() {
        Ok(n) if (1..=MAX_QUEUE_SIZE).contains(&n) => n,
        _ => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{v}\" in \"gpu_queue_size\" directive, it must be a number from 1 to {MAX_QUEUE_SIZE}"
            );
            return NGX_CONF_ERROR;
        }
    };
    if (*cf).cmd_type == NGX_HTTP_MAIN_CONF as ngx_uint_t {
        let mcf = main_conf_of(cf);
        if mcf.queue_size != NGX_CONF_UNSET as ngx_int_t {
            return c"is duplicate".as_ptr().cast_mut();
        }
        mcf.queue_size = n as ngx_int_t;
    } else {
        let lcf = &mut *(conf as *mut LocConf);
        if lcf.queue_size != UNSET_SIZE {
            return c"is duplicate".as_ptr().cast_mut();
        }
        lcf.queue_size = n;
    }
    NGX_CONF_OK
}

/// Each model served over KServe gets an op instance of its own (its own queue and
/// series), after the `gpu_process` locations' ops. Idempotent.
pub fn serve_models(mcf: &mut MainConf) {
    if !mcf.kserve || !mcf.served.is_empty() {
        return;
    }
    for model in mcf.declared.models.clone() {
        let Some(op) = model.clone().serve() else {
            continue;
        };
        op.set_batch_tokens(mcf.kserve_batch_tokens);
        mcf.served.push(crate::http::kserve::Served {
            model: model.clone(),
            op: op.clone(),
            key: mcf.ops.len(),
        });
        mcf.ops.push(op);
        mcf.op_sites.push(format!("gpu_model {}", model.name()));
        mcf.op_locations.push(mcf.kserve_location.clone());
        mcf.op_fallbacks.push(mcf.kserve_fallback);
    }
}

/// Once the whole configuration is read: binds the ops to what the http block declares,
/// checks the memory bound, and compiles every program (the ops' and every declared
/// kernel's, used or not) in the compile child, then checks what only compiled code
/// tells. The result is kept with this configuration. False after an `[emerg]`.
pub unsafe fn finish(cf: *mut ngx_conf_t) -> bool {
    let mcf = main_conf_of(cf);
    mcf.declared.max_body = mcf.batch_bytes as u64;
    serve_models(mcf);
    for (op, site) in mcf.ops.iter().zip(&mcf.op_sites) {
        if let Err(e) = op.resolve(&mcf.declared) {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                (*cf).log,
                "\"gpu_process\" directive: {e} in {site}"
            );
            return false;
        }
    }
    if !check_pinned(cf) {
        return false;
    }
    let mut programs: Vec<Arc<crate::gpu::Program>> =
        mcf.ops.iter().flat_map(|op| op.programs()).collect();
    programs.extend(mcf.declared.kernels.iter().map(|k| k.program.clone()));
    #[cfg(feature = "fault-injection")]
    programs.push(Arc::new(crate::gpu::Program::new(
        crate::faults::program().name.clone(),
        crate::faults::program().source.clone(),
        Vec::new(),
        Vec::new(),
    )));
    let compiled = match crate::gpu::compile_isolated(&programs) {
        crate::gpu::Outcome::Ptx { compiled, cached } => {
            ngx_conf_log_error!(
                NGX_LOG_INFO,
                cf,
                "gpu: {} kernel programs ready, {} compiled and {cached} from earlier loads",
                compiled.len(),
                compiled.len() - cached
            );
            compiled
        }
        crate::gpu::Outcome::NoNvrtc(why) => {
            let why = format!("{why}, the GPU path is off (gpu_fallback applies)");
            ngx_conf_log_error!(NGX_LOG_WARN, cf, "gpu: {why}");
            mcf.kernels = Some(Err(why));
            return true;
        }
        crate::gpu::Outcome::Failed(log) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "gpu: {log}");
            return false;
        }
    };
    let ptx = |p: &crate::gpu::Program| compiled.ptx(p);
    let checks = mcf
        .ops
        .iter()
        .map(|op| op.check_compiled(&ptx))
        .chain(mcf.declared.kernels.iter().map(|k| k.check_compiled(&ptx)));
    for check in checks {
        if let Err(e) = check {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpu_kernel\" directive: {e}");
            return false;
        }
    }
    mcf.kernels = Some(Ok(Arc::new(compiled)));
    true
}

#[cfg(test)]
mod poll_tests {
    use super::*;

    #[test]
    fn the_default_spins_only_with_a_core_to_spare_per_worker() {
        assert_eq!(poll_us(UNSET_SIZE, 4, 16), DEFAULT_POLL_US);
        assert_eq!(poll_us(UNSET_SIZE, 4, 8), DEFAULT_POLL_US);
        assert_eq!(poll_us(UNSET_SIZE, 4, 7), 0);
        assert_eq!(poll_us(UNSET_SIZE, 16, 16), 0);
        assert_eq!(poll_us(UNSET_SIZE, 1, 1), 0);
        // Set: as set, whatever the cores.
        assert_eq!(poll_us(0, 1, 64), 0);
        assert_eq!(poll_us(250, 16, 16), 250);
    }
}
