//! ngx_http_gpu_module: runs request-payload work on NVIDIA GPUs inside nginx.
//!
//! This file holds the module statics and the process hooks; the rest is split by
//! concern (see the README's "Code layout").

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut};

use ngx::ffi::*;
use ngx::ngx_log_error;

mod conf;
pub mod engine;
#[cfg(any(test, feature = "fault-injection"))]
pub mod faults;
pub mod gpu;
mod http;
mod metrics;
pub mod ops;
#[cfg(test)]
mod testing;

use engine::thread::{self as gpu_thread, Kernels};
use engine::worker;
use http::variables;

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
    exit_master: Some(exit_master),
    ..ngx_module_t::default()
};

// What `load_module` looks for in a dynamic module.
#[cfg(all(feature = "export-modules", not(test)))]
ngx::ngx_modules!(ngx_http_gpu_module);

unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    variables::add(cf)
}

/// Binds, checks and compiles what the configuration declares (`conf::finish`), once per
/// configuration load, before any worker starts: a kernel that does not compile stops
/// nginx here, with NVRTC's log. `nginx -s` reads the configuration too, but starts no
/// worker: nothing to do then.
unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    let mcf = conf::main_conf_of(cf);
    // The models served over KServe get their op instances first: the metrics zone has
    // series for them.
    conf::serve_models(mcf);
    if (mcf.used || mcf.endpoints) && ngx_process != NGX_PROCESS_SIGNALLER as ngx_uint_t {
        let labels = mcf.metric_labels();
        let listed = match &mcf.devices {
            Some(engine::devices::DeviceList::Ids(ids)) => Some(ids.clone()),
            _ => None,
        };
        let (zone, layout) = metrics::shm::add(cf, &labels, listed.as_deref());
        if zone.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        mcf.metrics_zone = zone;
        mcf.metrics_layout = Some(layout);
    }
    if mcf.used && add_log_handler(cf).is_none() {
        return NGX_ERROR as ngx_int_t;
    }
    let declared = !mcf.ops.is_empty() || !mcf.declared.kernels.is_empty() || mcf.kserve;
    if !declared || ngx_process == NGX_PROCESS_SIGNALLER as ngx_uint_t {
        return NGX_OK as ngx_int_t;
    }
    if conf::finish(cf) {
        NGX_OK as ngx_int_t
    } else {
        NGX_ERROR as ngx_int_t
    }
}

/// Registers the log-phase handler that counts nginx's own answers to `gpu_process`
/// locations.
unsafe fn add_log_handler(cf: *mut ngx_conf_t) -> Option<()> {
    let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
    let cmcf =
        *(*ctx).main_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_main_conf_t;
    let phase = &mut (*cmcf).phases[ngx_http_phases_NGX_HTTP_LOG_PHASE as usize].handlers;
    let h = ngx_array_push(phase) as *mut ngx_http_handler_pt;
    if h.is_null() {
        return None;
    }
    // SAFETY: the array holds ngx_http_handler_pt elements (ngx_http_core's init).
    *h = Some(http::handler::log_handler);
    Some(())
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
    attach_metrics(cycle, mcf);
    if !mcf.used {
        return NGX_OK as ngx_int_t;
    }
    // Where this nginx's workers meet to share device memory (gpu::shared): named after
    // the master, so respawned workers and those of a reload meet the live ones. Made by
    // the first worker that needs it; the master removes it at its exit.
    let master = if ngx_process == NGX_PROCESS_WORKER as ngx_uint_t {
        libc::getppid()
    } else {
        libc::getpid()
    };
    gpu::shared::set_dir(gpu::rendezvous::dir_for(master as u32));
    let kernels = match &mcf.kernels {
        Some(Ok(compiled)) => Kernels::Ptx(compiled.clone()),
        Some(Err(why)) => Kernels::Unavailable(why.clone()),
        None => Kernels::Unavailable("kernels were not compiled".into()),
    };
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The cores this worker may run on (its affinity, cgroup limits).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let poll = conf::poll_us(mcf.poll_us, worker_count(cycle), cores);
        let mut config = gpu_thread::Config::new(
            mcf.ops.clone(),
            mcf.batch_bytes as u64,
            std::time::Duration::from_micros(poll as u64),
            mcf.pinned_limit,
        );
        config.placement = engine::devices::Placement {
            devices: mcf.devices.clone().unwrap_or_default(),
            worker: ngx_worker,
            workers: worker_count(cycle),
        };
        config.fallbacks = mcf.op_fallbacks.clone();
        #[cfg(feature = "fault-injection")]
        let kernels = match fault_plan(cycle) {
            Ok(Some(plan)) => {
                let fake = plan.fake_device;
                config.faults = plan;
                if fake {
                    Kernels::Fake
                } else {
                    kernels
                }
            }
            Ok(None) => kernels,
            Err(e) => return Err(format!("NGX_GPU_FAULTS: {e}")),
        };
        worker::start(cycle, config, mcf.queue_size as usize, kernels)
    }));
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

/// How many workers this nginx runs: `worker_processes`, or 1 for a single-process nginx
/// (`master_process off`), whose one process is worker 0.
unsafe fn worker_count(cycle: *mut ngx_cycle_t) -> usize {
    if ngx_process == NGX_PROCESS_SINGLE as ngx_uint_t {
        return 1;
    }
    let ccf = *(*cycle).conf_ctx.add(ngx_core_module.index) as *const ngx_core_conf_t;
    match ccf.as_ref() {
        Some(ccf) if ccf.worker_processes > 0 => ccf.worker_processes as usize,
        _ => 1,
    }
}

/// Attaches this worker to the metrics zone, takes its slot by worker number, and in
/// worker 0 starts the NVML sampler. A failure here costs the metrics, never the worker.
unsafe fn attach_metrics(cycle: *mut ngx_cycle_t, mcf: &conf::MainConf) {
    let Some(layout) = mcf.metrics_layout else {
        return;
    };
    let Some(zone) = metrics::shm::zone_of(mcf.metrics_zone, layout) else {
        ngx_log_error!(
            NGX_LOG_ALERT,
            (*cycle).log,
            "gpu: the metrics zone is not laid out; no metrics in this worker"
        );
        return;
    };
    let worker = ngx_worker;
    if let Err(e) = metrics::attach(zone, Some(worker)) {
        ngx_log_error!(NGX_LOG_ALERT, (*cycle).log, "gpu: {e}");
        return;
    }
    if worker == 0 {
        let started = metrics::nvml::Sampler::start(zone, |f| {
            gpu_thread::with_signals_blocked(|| {
                std::thread::Builder::new()
                    .name("nginx-gpu-nvml".into())
                    .spawn(f)
            })
        });
        match started {
            Ok(s) => *SAMPLER.lock().unwrap_or_else(|e| e.into_inner()) = Some(s),
            Err(e) => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    (*cycle).log,
                    "gpu: cannot start the NVML sampler: {e}"
                );
            }
        }
    }
}

/// Worker 0's NVML sampling thread, stopped at exit.
static SAMPLER: std::sync::Mutex<Option<metrics::nvml::Sampler>> = std::sync::Mutex::new(None);

/// The fault plan of a fault-injection build, from `NGX_GPU_FAULTS` (kept with `env`).
#[cfg(feature = "fault-injection")]
unsafe fn fault_plan(cycle: *mut ngx_cycle_t) -> Result<Option<faults::Plan>, String> {
    let Ok(text) = std::env::var("NGX_GPU_FAULTS") else {
        return Ok(None);
    };
    let plan = faults::Plan::parse(&text)?;
    ngx_log_error!(
        NGX_LOG_WARN,
        (*cycle).log,
        "gpu: fault injection build, faults planned: {text}"
    );
    Ok(Some(plan))
}

/// The master's exit: removes the workers' meeting directory (gpu::shared). No CUDA here.
unsafe extern "C" fn exit_master(_cycle: *mut ngx_cycle_t) {
    let _ = std::panic::catch_unwind(|| {
        gpu::rendezvous::remove_dir(&gpu::rendezvous::dir_for(std::process::id()));
    });
}

unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    let _ = std::panic::catch_unwind(|| worker::stop());
    let _ = std::panic::catch_unwind(|| {
        drop(SAMPLER.lock().ok().and_then(|mut s| s.take()));
    });
}
