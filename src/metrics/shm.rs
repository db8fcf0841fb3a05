//! The metrics zone in nginx: added when the http block is read (the number of
//! `gpu_process` locations is known then), laid out by nginx's shared memory init.
//!
//! The zone's name is keyed on its layout (`ngx_gpu_metrics_<hash>` of the locations, their
//! ops, the worker count and the `gpu_devices` list): a reload with the same locations reuses the zone and its
//! counters; one with other locations gets a fresh zone, while the old workers keep
//! writing into the old one, which stays mapped in them until they exit.

use core::ffi::c_void;
use core::ptr;
use std::sync::atomic::Ordering::Relaxed;

use ngx::ffi::*;

use super::zone::{Layout, Zone, LAYOUT_VERSION};
use crate::ngx_http_gpu_module;

/// Slab allocator pages nginx takes from a zone before the module's block.
const SLAB_OVERHEAD: usize = 8 * 4096;

/// Worker slots to lay out: `worker_processes` when the http block comes after it (as
/// usual), else the number of CPUs (what `auto` gives; the default, 1, fits too).
pub unsafe fn worker_slots(cf: *mut ngx_conf_t) -> usize {
    let ccf = *(*(*cf).cycle).conf_ctx.add(ngx_core_module.index) as *const ngx_core_conf_t;
    let set = if ccf.is_null() {
        -1
    } else {
        (*ccf).worker_processes
    };
    if set > 0 {
        set as usize
    } else {
        ngx_ncpu.max(1) as usize
    }
}

/// `worker_processes` of the running configuration (1 for a single-process nginx).
pub unsafe fn workers_now() -> usize {
    if ngx_process == NGX_PROCESS_SINGLE as ngx_uint_t {
        return 1;
    }
    let ccf = *(*ngx_cycle).conf_ctx.add(ngx_core_module.index) as *const ngx_core_conf_t;
    if ccf.is_null() {
        return 1;
    }
    (*ccf).worker_processes.max(1) as usize
}

/// FNV-1a over the layout's inputs (`listed`: the `gpu_devices` list, None for `all`).
pub fn layout_key(workers: usize, locations: &[(String, String)], listed: Option<&[usize]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&LAYOUT_VERSION.to_le_bytes());
    eat(&(workers as u64).to_le_bytes());
    match listed {
        None => eat(b"all"),
        Some(ids) => {
            for id in ids {
                eat(&(*id as u64).to_le_bytes());
            }
        }
    }
    for (model, location) in locations {
        eat(model.as_bytes());
        eat(location.as_bytes());
    }
    h
}

/// Adds the zone for `locations` (model, location) over the devices `listed` (None:
/// `all`) to the configuration; null after an `[emerg]`. Its layout is returned beside.
pub unsafe fn add(
    cf: *mut ngx_conf_t,
    locations: &[(String, String)],
    listed: Option<&[usize]>,
) -> (*mut ngx_shm_zone_t, Layout) {
    let workers = worker_slots(cf);
    let layout = Layout::new(locations.len(), workers, listed);
    let key = layout_key(workers, locations, listed);
    (add_layout(cf, layout, key), layout)
}

unsafe fn add_layout(cf: *mut ngx_conf_t, layout: Layout, key: u64) -> *mut ngx_shm_zone_t {
    let name = format!("ngx_gpu_metrics_{key:016x}");
    let pool = (*cf).pool;
    let data = ngx_pnalloc(pool, name.len()) as *mut u8;
    let kept = ngx_palloc(pool, size_of::<Layout>()) as *mut Layout;
    if data.is_null() || kept.is_null() {
        return ptr::null_mut();
    }
    ptr::copy_nonoverlapping(name.as_ptr(), data, name.len());
    // SAFETY: kept is fresh pool memory, aligned for a plain struct of usizes.
    ptr::write(kept, layout);
    let mut name = ngx_str_t {
        len: name.len(),
        data,
    };
    let size = layout.size.div_ceil(4096) * 4096 + SLAB_OVERHEAD;
    let tag = ptr::addr_of_mut!(ngx_http_gpu_module) as *mut c_void;
    let zone = ngx_shared_memory_add(cf, &mut name, size, tag);
    if zone.is_null() {
        return ptr::null_mut();
    }
    (*zone).init = Some(init_zone);
    (*zone).data = kept.cast();
    zone
}

/// nginx's init of the zone, in the master (or the single process), once per
/// configuration load. `old` is the previous configuration's `data` where the zone is
/// reused: the same memory, laid out already.
unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, old: *mut c_void) -> ngx_int_t {
    let r = std::panic::catch_unwind(|| {
        let layout = *((*shm_zone).data as *const Layout);
        let sp = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
        let base = if !old.is_null() && !(*sp).data.is_null() {
            (*sp).data as *mut u8
        } else {
            let p = ngx_slab_calloc(sp, layout.size) as *mut u8;
            if p.is_null() {
                return false;
            }
            (*sp).data = p.cast();
            p
        };
        // SAFETY: base is the zone's block of layout.size bytes (page-aligned), mapped
        // in the master and in every worker forked from it.
        let zone = Zone::at(base, layout);
        if !zone.matches() {
            zone.init_fresh(super::now_ms());
        }
        zone.header().generation.fetch_add(1, Relaxed);
        (*shm_zone).data = base.cast();
        true
    });
    if matches!(r, Ok(true)) {
        NGX_OK as ngx_int_t
    } else {
        NGX_ERROR as ngx_int_t
    }
}

/// The zone of a running configuration, once nginx laid it out.
pub unsafe fn zone_of(shm_zone: *mut ngx_shm_zone_t, layout: Layout) -> Option<Zone> {
    if shm_zone.is_null() || (*shm_zone).data.is_null() || (*shm_zone).shm.addr.is_null() {
        return None;
    }
    let sp = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
    if (*sp).data != (*shm_zone).data {
        return None;
    }
    let z = Zone::at((*shm_zone).data as *mut u8, layout);
    z.matches().then_some(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_key_changes_with_any_location_op_worker_count_or_device_list() {
        let a = vec![("echo".to_string(), "/e".to_string())];
        let b = vec![("echo".to_string(), "/f".to_string())];
        let c = vec![("blake3".to_string(), "/e".to_string())];
        let k = layout_key(2, &a, None);
        assert_eq!(k, layout_key(2, &a.clone(), None));
        assert_ne!(k, layout_key(3, &a, None));
        assert_ne!(k, layout_key(2, &b, None));
        assert_ne!(k, layout_key(2, &c, None));
        // The devices: the same count in another order labels the blocks otherwise.
        let l01 = layout_key(2, &a, Some(&[0, 1]));
        assert_ne!(k, l01);
        assert_ne!(l01, layout_key(2, &a, Some(&[1, 0])));
        assert_ne!(l01, layout_key(2, &a, Some(&[0])));
        assert_eq!(l01, layout_key(2, &a, Some(&[0, 1])));
        // No ambiguity from where one name ends.
        let d = vec![("ab".to_string(), "c".to_string())];
        let e = vec![("a".to_string(), "bc".to_string())];
        assert_ne!(layout_key(1, &d, None), layout_key(1, &e, None));
    }
}
