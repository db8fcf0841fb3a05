//! Reading a request body into an owned `job::Body`, leaving nginx's body as it was.
//!
//! nginx's body is nginx's: `$request_body`, `mirror` and other subrequests, and an
//! upstream proxying the same body read `r->request_body->bufs` after this handler, so no
//! buffer is changed or freed here. Small memory buffers are copied. The request's body
//! buffer (`rb->buf`, one malloc'd "large" block of the request pool, into which nginx's
//! chain buffers point) is shared instead of copied: its entry in the pool's large list is
//! replaced by a pool cleanup holding one reference, the job holds another, and the block
//! is freed when the last of them goes (the pool's destruction, or the job's end, whichever
//! is later). A subrequest shares its main request's pool and body, so a second job over
//! the same body finds the cleanup and shares the same block. A body nginx spilled to a
//! temp file goes over as a duplicated descriptor and ranges: the GPU thread reads the
//! file, the event loop never does.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use ngx::ffi::*;

use crate::engine::job::{Body, PoolBlock, Segment, SharedBuf};

/// Memory buffers at least this big are shared rather than copied (below it a copy is
/// cheaper than the bookkeeping).
const SHARE_MIN: usize = 16 * 1024;

/// # Safety
/// `r` is a live request whose body has been read completely.
pub unsafe fn take(r: *mut ngx_http_request_t) -> io::Result<Body> {
    let rb = (*r).request_body;
    let mut body = Body::default();
    if rb.is_null() {
        return Ok(body);
    }
    let mut shared: Option<Option<Shared>> = None;
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
            if len == 0 {
                continue;
            }
            let block = if len >= SHARE_MIN {
                shared
                    .get_or_insert_with(|| share_body_buffer(r))
                    .as_ref()
                    .filter(|s| s.holds(b.pos, b.last))
            } else {
                None
            };
            match block {
                // SAFETY: pos..last lies inside the shared block (checked by holds()).
                Some(s) => body.push(Segment::Shared(SharedBuf::new(s.block.clone(), b.pos, len))),
                None => body.push(Segment::Memory(
                    std::slice::from_raw_parts(b.pos, len).to_vec(),
                )),
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

/// The request's body buffer, shared between nginx and jobs.
struct Shared {
    start: *const u8,
    end: *const u8,
    block: Arc<PoolBlock>,
}

impl Shared {
    fn holds(&self, pos: *const u8, last: *const u8) -> bool {
        pos >= self.start && last <= self.end && pos <= last
    }
}

/// Shares `rb->buf`'s block if it is a large allocation of the request pool (or was
/// shared already by an earlier job of the same pool); None if it cannot be shared.
unsafe fn share_body_buffer(r: *mut ngx_http_request_t) -> Option<Shared> {
    let b = (*(*r).request_body).buf;
    if b.is_null() || (*b).start.is_null() || (*b).end <= (*b).start {
        return None;
    }
    let (start, end) = ((*b).start, (*b).end);
    let pool = (*r).pool;
    let block = match find_shared(pool, start) {
        Some(block) => block,
        None => {
            let cln = ngx_pool_cleanup_add(pool, size_of::<Arc<PoolBlock>>());
            if cln.is_null() || !detach_large(pool, start) {
                // Not one of the pool's large blocks: copy instead (the cleanup, if added,
                // has no handler and is skipped).
                return None;
            }
            // SAFETY: the block came from ngx_alloc (malloc) and the pool no longer frees
            // it; from here the Arc's last reference does.
            let block = Arc::new(PoolBlock::new(start));
            core::ptr::write((*cln).data as *mut Arc<PoolBlock>, block.clone());
            (*cln).handler = Some(release_block);
            block
        }
    };
    Some(Shared { start, end, block })
}

/// The pool's reference to a shared block, dropped when the pool is destroyed.
unsafe extern "C" fn release_block(data: *mut core::ffi::c_void) {
    // SAFETY: written by share_body_buffer; each cleanup runs once.
    core::ptr::drop_in_place(data as *mut Arc<PoolBlock>);
}

/// A block this pool already shares (a subrequest's job over its main request's body).
unsafe fn find_shared(pool: *mut ngx_pool_t, start: *mut u8) -> Option<Arc<PoolBlock>> {
    let mut c = (*pool).cleanup;
    while !c.is_null() {
        // A miss (the same function at another address) only costs a copy: detaching the
        // block again fails and the caller copies.
        let ours = (*c).handler.is_some_and(|h| {
            core::ptr::fn_addr_eq(
                h,
                release_block as unsafe extern "C" fn(*mut core::ffi::c_void),
            )
        });
        if ours {
            let block = &*((*c).data as *const Arc<PoolBlock>);
            if block.start() == start {
                return Some(block.clone());
            }
        }
        c = (*c).next;
    }
    None
}

/// Clears `block`'s entry in `pool`'s large allocations; true if it was one.
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
