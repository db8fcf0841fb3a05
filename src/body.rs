//! Taking a read request body out of nginx's buffers into an owned `job::Body`.
//!
//! A large memory buffer (nginx's body buffer is a "large" allocation of the request
//! pool, malloc'd on its own) is taken over without a copy: its entry in the pool's
//! large list is cleared, so the pool no longer frees it, and the GPU thread frees it
//! when the job is done. nginx's buffer is left empty (so `$request_body` is empty
//! afterwards). Small buffers are copied. A body nginx spilled to a temp file is passed
//! as a duplicated descriptor and ranges, so the GPU thread reads it and the event loop
//! never does.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use ngx::ffi::*;

use crate::job::{Body, Segment, TakenBuf};

/// Buffers at least this big are taken over instead of copied.
const TAKE_OVER: usize = 64 * 1024;

/// Clears `block`'s entry in `pool`'s large allocations; true if it was one (the caller
/// then owns the block).
unsafe fn detach_large(pool: *mut ngx_pool_t, block: *mut u8) -> bool {
    let mut l = (*pool).large;
    while !l.is_null() {
        if (*l).alloc == block.cast() {
            (*l).alloc = core::ptr::null_mut();
            return true;
        }
        l = (*l).next;
    }
    false
}

/// # Safety
/// `r` is a live request whose body has been read completely.
pub unsafe fn take(r: *mut ngx_http_request_t) -> io::Result<Body> {
    let rb = (*r).request_body;
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
        let b = &mut *b;
        let in_memory = b.temporary() != 0 || b.memory() != 0 || b.mmap() != 0;
        if in_memory {
            let len = b.last.offset_from(b.pos) as usize;
            if len >= TAKE_OVER
                && b.temporary() != 0
                && !b.start.is_null()
                && b.pos >= b.start
                && b.last <= b.end
                && detach_large((*r).pool, b.start)
            {
                body.push(Segment::Taken(TakenBuf::new(b.start, b.pos, len)));
                // nginx keeps the pointers but no bytes: nothing reads the block again.
                b.pos = b.last;
            } else if len > 0 {
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
