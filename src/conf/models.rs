//! `gpu_model <name> <kind> <path> [key=value ...]`: declares a model in the http block.
//! The path is made absolute here (from nginx's configuration prefix, as nginx's own file
//! directives); loading and checking the file is the model kind's (`ops/model.rs`).

use core::ffi::{c_char, c_void};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::ngx_conf_log_error;

use super::kernels::full_name;
use super::{args, MainConf};
use crate::ops::model;

pub unsafe extern "C" fn cmd_gpu_model(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let mcf = &mut *(conf as *mut MainConf);
    // NGX_CONF_2MORE ensures a name and a kind (nginx has no 3MORE).
    let a = args(cf);
    if a.len() < 3 {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpu_model\" directive: needs a name, a kind and a path"
        );
        return NGX_CONF_ERROR;
    }
    let (name, kind, file, params) = (a[0], a[1], a[2], &a[3..]);
    if mcf.declared.models.iter().any(|m| m.name() == name) {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpu_model\" directive: model \"{name}\" is already declared"
        );
        return NGX_CONF_ERROR;
    }
    let Some(path) = full_name(cf, file) else {
        return NGX_CONF_ERROR;
    };
    match model::declare(name, kind, &path, params) {
        Ok(m) => {
            mcf.declared.models.push(m);
            NGX_CONF_OK
        }
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpu_model\" directive: {e}");
            NGX_CONF_ERROR
        }
    }
}
