//! Building responses: an op's output, or a JSON error, handed to nginx's filters.

use core::ptr;

use ngx::ffi::*;

pub use crate::ops::ErrorShape;

/// Sends `body` with `status` and `content_type`. The body's memory is handed to the
/// request pool (freed by a pool cleanup), so large outputs are not copied again.
/// Returns what the output filter returned, for ngx_http_finalize_request.
pub unsafe fn send(
    r: *mut ngx_http_request_t,
    status: ngx_uint_t,
    content_type: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> ngx_int_t {
    let pool = (*r).pool;
    // The type is read again after this (the access log's $sent_http_content_type): a
    // copy in the request pool.
    let ct = ngx_pnalloc(pool, content_type.len()) as *mut u8;
    if ct.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    ptr::copy_nonoverlapping(content_type.as_ptr(), ct, content_type.len());
    let out = &mut (*r).headers_out;
    out.status = status;
    out.content_length_n = body.len() as off_t;
    out.content_type = ngx_str_t {
        len: content_type.len(),
        data: ct,
    };
    out.content_type_len = content_type.len();
    out.content_type_lowcase = ptr::null_mut();
    for (k, v) in headers {
        if push_header(r, k, v).is_none() {
            return NGX_ERROR as ngx_int_t;
        }
    }

    let rc = ngx_http_send_header(r);
    if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
        return rc;
    }

    let b = ngx_pcalloc(pool, size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
    let cl = ngx_alloc_chain_link(pool);
    if b.is_null() || cl.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    if !body.is_empty() {
        let Some(data) = hand_to_pool(pool, body) else {
            return NGX_ERROR as ngx_int_t;
        };
        (*b).start = data.as_mut_ptr();
        (*b).pos = (*b).start;
        (*b).last = (*b).start.add(data.len());
        (*b).end = (*b).last;
        (*b).set_memory(1);
    }
    (*b).set_last_buf(u32::from(r == (*r).main));
    (*b).set_last_in_chain(1);
    (*cl).buf = b;
    (*cl).next = ptr::null_mut();
    ngx_http_output_filter(r, cl)
}

/// Sends `{"error": message}` as application/json, unless the location has an
/// `error_page` for `status`: then `headers` are set and `status` is returned, for nginx to
/// answer with that page when the request is finalized with it.
pub unsafe fn send_error(
    r: *mut ngx_http_request_t,
    status: ngx_uint_t,
    message: &str,
    headers: &[(&str, &str)],
) -> ngx_int_t {
    send_error_shaped(r, ErrorShape::Plain, status, message, headers)
}

/// `send_error` with the error in `shape` (the location's op's, `Op::error_shape`).
pub unsafe fn send_error_shaped(
    r: *mut ngx_http_request_t,
    shape: ErrorShape,
    status: ngx_uint_t,
    message: &str,
    headers: &[(&str, &str)],
) -> ngx_int_t {
    if has_error_page(r, status) {
        for (k, v) in headers {
            if push_header(r, k, v).is_none() {
                return NGX_ERROR as ngx_int_t;
            }
        }
        return status as ngx_int_t;
    }
    send(
        r,
        status,
        "application/json",
        error_body(shape, status, message).into_bytes(),
        headers,
    )
}

/// Whether an `error_page` of the request's location covers `status`.
unsafe fn has_error_page(r: *mut ngx_http_request_t, status: ngx_uint_t) -> bool {
    let clcf =
        *(*r).loc_conf.add(ngx_http_core_module.ctx_index) as *const ngx_http_core_loc_conf_t;
    if clcf.is_null() || (*clcf).error_pages.is_null() || (*r).uri_changes() == 0 {
        return false;
    }
    // SAFETY: error_pages is an array of ngx_http_err_page_t (ngx_http_core_error_page).
    let pages = (*(*clcf).error_pages).as_slice::<ngx_http_err_page_t>();
    pages.iter().any(|p| p.status == status as ngx_int_t)
}

unsafe fn push_header(r: *mut ngx_http_request_t, k: &str, v: &str) -> Option<()> {
    let out = &mut (*r).headers_out;
    let h = ngx_list_push(&mut out.headers) as *mut ngx_table_elt_t;
    if h.is_null() {
        return None;
    }
    add_to_ngx_table(h, (*r).pool, k, v)?;
    (*h).hash = 1;
    (*h).next = ptr::null_mut();
    Some(())
}

/// An error's JSON body in `shape`: `{"error": "message"}`, or OpenAI's
/// `{"error": {"message": "...", "type": "..."}}` (`invalid_request_error` for 4xx,
/// `server_error` for 5xx).
pub fn error_body(shape: ErrorShape, status: ngx_uint_t, message: &str) -> String {
    match shape {
        ErrorShape::Plain => json_error(message),
        ErrorShape::OpenAi => {
            let kind = if status < 500 {
                "invalid_request_error"
            } else {
                "server_error"
            };
            let mut s = String::from("{\"error\": {\"message\": \"");
            escape_into(&mut s, message);
            s.push_str("\", \"type\": \"");
            s.push_str(kind);
            s.push_str("\"}}\n");
            s
        }
    }
}

pub fn json_error(message: &str) -> String {
    let mut s = String::with_capacity(message.len() + 16);
    s.push_str("{\"error\": \"");
    escape_into(&mut s, message);
    s.push_str("\"}\n");
    s
}

/// Appends `message` as the inside of a JSON string.
fn escape_into(s: &mut String, message: &str) {
    for c in message.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if (c as u32) < 0x20 => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
}

/// Moves `body` under the pool's ownership; it is freed when the request is.
unsafe fn hand_to_pool(pool: *mut ngx_pool_t, body: Vec<u8>) -> Option<&'static mut [u8]> {
    let cln = ngx_pool_cleanup_add(pool, size_of::<*mut [u8]>());
    if cln.is_null() {
        return None;
    }
    let raw: *mut [u8] = Box::into_raw(body.into_boxed_slice());
    ptr::write((*cln).data as *mut *mut [u8], raw);
    (*cln).handler = Some(free_body);
    Some(&mut *raw)
}

unsafe extern "C" fn free_body(data: *mut core::ffi::c_void) {
    // SAFETY: data holds the pointer written by hand_to_pool, freed exactly once here.
    drop(Box::from_raw(*(data as *mut *mut [u8])));
}

#[cfg(test)]
mod tests {
    use super::json_error;

    #[test]
    fn json_error_escapes() {
        assert_eq!(
            json_error("a \"b\"\\\n\u{1}"),
            "{\"error\": \"a \\\"b\\\"\\\\\\n\\u0001\"}\n"
        );
    }
}
