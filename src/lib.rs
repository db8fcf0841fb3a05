//! ngx_http_gpu_module: runs request-payload work on NVIDIA GPUs inside nginx.
//!
//! This file holds the module statics and the process hooks; the rest is split by
//! concern (see the README's "Code layout").

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut};
use std::sync::{Arc, Mutex};

use ngx::ffi::*;
use ngx::{ngx_conf_log_error, ngx_log_error};

pub mod batch;
pub mod body;
pub mod conf;
pub mod gpu;
pub mod gpu_thread;
pub mod handler;
pub mod job;
pub mod notify;
pub mod ops;
pub mod response;
pub mod stats;
#[cfg(test)]
mod testing;
pub mod variables;
pub mod worker;

use gpu_thread::Kernels;

static NGX_HTTP_GPU_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(preconfiguration),
    postconfiguration: Some(postconfiguration),
    create_main_conf: Some(conf::create_main_conf),
    init_main_conf: Some(conf::init_main_conf),
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(conf::create_loc_conf),
    merge_loc_conf: Some(conf::merge_loc_conf),
};

#[cfg_attr(all(feature = "export-modules", not(test)), used)]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static mut ngx_http_gpu_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_GPU_MODULE_CTX) as *mut c_void,
    commands: addr_of_mut!(conf::NGX_HTTP_GPU_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};

// What `load_module` looks for in a dynamic module.
#[cfg(all(feature = "export-modules", not(test)))]
ngx::ngx_modules!(ngx_http_gpu_module);

/// PTX compiled by the last configuration load, or why there is none. Set in the
/// master (or the single process) and inherited by the workers it forks.
static KERNELS: Mutex<Option<Result<Arc<str>, String>>> = Mutex::new(None);

unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    variables::add(cf)
}

/// Compiles the kernels once per configuration load, before any worker starts (in a
/// child process: see gpu::compile_isolated): a kernel that does not compile stops
/// nginx here, with NVRTC's log.
unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    if !conf::main_conf_of(cf).used {
        return NGX_OK as ngx_int_t;
    }
    let kernels = match gpu::compile_isolated(gpu::KERNEL_SOURCE) {
        gpu::Compiled::Ptx(ptx) => Ok(Arc::from(ptx)),
        gpu::Compiled::NoNvrtc(why) => {
            let why = format!("{why}, the GPU path is off (gpu_fallback applies)");
            ngx_conf_log_error!(NGX_LOG_WARN, cf, "gpu: {why}");
            Err(why)
        }
        gpu::Compiled::Failed(log) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "gpu: {log}");
            return NGX_ERROR as ngx_int_t;
        }
    };
    if let Ok(mut k) = KERNELS.lock() {
        *k = Some(kernels);
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // Cache manager and loader processes run init_process too: only workers (or a
    // single-process nginx) get a GPU thread, and CUDA is never touched in the master.
    if ngx_process != NGX_PROCESS_WORKER as ngx_uint_t
        && ngx_process != NGX_PROCESS_SINGLE as ngx_uint_t
    {
        return NGX_OK as ngx_int_t;
    }
    let Some(mcf) = conf::main_conf_of_cycle(cycle) else {
        return NGX_OK as ngx_int_t;
    };
    if !mcf.used {
        return NGX_OK as ngx_int_t;
    }
    let kernels = match KERNELS.lock().ok().and_then(|k| k.clone()) {
        Some(Ok(ptx)) => Kernels::Ptx(ptx),
        Some(Err(why)) => Kernels::Unavailable(why),
        None => Kernels::Unavailable("kernels were not compiled".into()),
    };
    let started = std::panic::catch_unwind(|| {
        let config = gpu_thread::Config {
            queue_size: mcf.queue_size as usize,
            batch_bytes: mcf.batch_bytes as u64,
            poll: std::time::Duration::from_micros(mcf.poll_us as u64),
        };
        worker::start(cycle, config, kernels)
    });
    match started {
        Ok(Ok(())) => NGX_OK as ngx_int_t,
        Ok(Err(e)) => {
            ngx_log_error!(NGX_LOG_EMERG, (*cycle).log, "gpu: {e}");
            NGX_ERROR as ngx_int_t
        }
        Err(_) => {
            ngx_log_error!(
                NGX_LOG_EMERG,
                (*cycle).log,
                "gpu: starting the worker's GPU thread panicked"
            );
            NGX_ERROR as ngx_int_t
        }
    }
}

unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    let _ = std::panic::catch_unwind(|| worker::stop());
}
