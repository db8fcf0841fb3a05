//! `gpu_kernel <name> <file.cu> [params]`: declares a kernel in the http block. The file is
//! read here, at configuration time (relative paths from nginx's configuration prefix, as
//! nginx's own file directives); what the parameters mean is the kernel op's
//! (`ops/kernel/decl.rs`).

use core::ffi::{c_char, c_void};
use std::sync::Arc;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::ngx_conf_log_error;

use super::{args, MainConf};
use crate::ops::kernel;

/// Kernel sources larger than this are refused (a mistyped path to a large file).
const MAX_SOURCE: u64 = 4 << 20;

pub unsafe extern "C" fn cmd_gpu_kernel(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    // NGX_CONF_2MORE ensures a name and a file.
    let a = args(cf);
    let (name, file, params) = (a[0], a[1], &a[2..]);
    if let Some(k) = mcf.declared.kernels.iter().find(|k| k.name == name) {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpu_kernel\" directive: kernel \"{name}\" is already declared (from {})",
            k.file
        );
        return NGX_CONF_ERROR;
    }
    let Some(path) = full_name(cf, file) else {
        return NGX_CONF_ERROR;
    };
    let source = match read_source(&path) {
        Ok(s) => s,
        Err(e) => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"gpu_kernel\" directive: cannot read \"{path}\": {e}"
            );
            return NGX_CONF_ERROR;
        }
    };
    match kernel::declare(name, &path, source, params) {
        Ok(decl) => {
            mcf.declared.kernels.push(Arc::new(decl));
            NGX_CONF_OK
        }
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpu_kernel\" directive: {e}");
            NGX_CONF_ERROR
        }
    }
}

fn read_source(path: &str) -> std::io::Result<String> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_SOURCE {
        return Err(std::io::Error::other(format!(
            "{len} bytes, more than a kernel source may have ({MAX_SOURCE})"
        )));
    }
    let bytes = std::fs::read(path)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8 text"))
}

/// `file` from nginx's configuration prefix, unless absolute.
pub(super) unsafe fn full_name(cf: *mut ngx_conf_t, file: &str) -> Option<String> {
    let pool = (*cf).pool;
    let data = ngx_pnalloc(pool, file.len()) as *mut u8;
    if data.is_null() {
        return None;
    }
    core::ptr::copy_nonoverlapping(file.as_ptr(), data, file.len());
    let mut name = ngx_str_t {
        len: file.len(),
        data,
    };
    if ngx_conf_full_name((*cf).cycle, &mut name, 1) != NGX_OK as ngx_int_t {
        return None;
    }
    Some(String::from_utf8_lossy(name.as_bytes()).into_owned())
}
