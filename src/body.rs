//! Taking a read request body out of nginx's buffers into an owned `job::Body`.
//!
//! Memory buffers are copied (they are at most client_body_buffer_size); a body nginx
//! spilled to a temp file is passed as a duplicated descriptor and ranges, so the GPU
//! thread reads it and the event loop never does.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use ngx::ffi::*;

use crate::job::{Body, Segment};

pub unsafe fn take(rb: *mut ngx_http_request_body_t) -> io::Result<Body> {
    let mut body = Body::default();
    if rb.is_null() {
        return Ok(body);
    }
    let mut files: Vec<(ngx_fd_t, Arc<File>)> = Vec::new();
    let mut cl = (*rb).bufs;
    while !cl.is_null() {
        let b = (*cl).buf;
        cl = (*cl).next;
        if b.is_null() {
            continue;
        }
        let b = &*b;
        let in_memory = b.temporary() != 0 || b.memory() != 0 || b.mmap() != 0;
        if in_memory {
            let len = b.last.offset_from(b.pos) as usize;
            if len > 0 {
                body.push(Segment::Memory(
                    std::slice::from_raw_parts(b.pos, len).to_vec(),
                ));
            }
        } else if b.in_file() != 0 && !b.file.is_null() {
            let len = (b.file_last - b.file_pos) as u64;
            if len == 0 {
                continue;
            }
            let fd = (*b.file).fd;
            let file = match files.iter().find(|(f, _)| *f == fd) {
                Some((_, file)) => file.clone(),
                None => {
                    let dup = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
                    if dup < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: dup is a new descriptor owned by nothing else.
                    let file = Arc::new(File::from_raw_fd(dup));
                    files.push((fd, file.clone()));
                    file
                }
            };
            body.push(Segment::File {
                file,
                offset: b.file_pos as u64,
                len,
            });
        }
    }
    Ok(body)
}
