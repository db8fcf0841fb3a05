//! Where worker processes meet to share one device allocation: a directory of lock files
//! and Unix sockets per content key, over which holders pass the allocation's file
//! descriptor (SCM_RIGHTS). Knows nothing of CUDA: any fd travels (tests use a memfd).
//!
//! For a key `K` the directory holds `K.lock` (flock elects the one process that allocates
//! and fills) and one `K.<pid>.<n>.sock` per live holder. Every process holding the
//! allocation serves its fd on a socket of its own from a small thread, so no holder is
//! special: the first one's death loses nothing while another holds it. A socket whose
//! process died (SIGKILL leaves the file) refuses connections and is removed by the next
//! process that finds it so. Used on the GPU thread only (flock and connects block
//! briefly), never on the event loop.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The header a holder sends with the fd: magic, then the allocation's size in bytes.
const MAGIC: &[u8; 8] = b"NGXGPUS1";
const HEADER: usize = 16;
/// How long a fetch waits for one holder's answer before trying the next.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The meeting directory, made by the first process that needs it (mode 0700).
#[derive(Clone, Debug)]
pub struct Rendezvous {
    dir: PathBuf,
}

/// An exclusive hold on a key's lock file; released on drop (and by the kernel when the
/// process dies).
pub struct KeyLock {
    _file: File,
}

/// An fd received from a holder, and the size the holder announced.
#[derive(Debug)]
pub struct Received {
    pub fd: OwnedFd,
    pub size: u64,
}

/// A holder's socket and the thread that answers it; dropping it stops the thread and
/// removes the socket file.
pub struct Server {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Rendezvous {
    /// Opens (or makes, mode 0700) the directory `dir`. Refuses one that is a symbolic
    /// link, not a directory, or owned by another user: its sockets would not be ours.
    pub fn open(dir: &Path) -> io::Result<Rendezvous> {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = fs::symlink_metadata(dir)?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a private directory of this user (uid {me})",
                    dir.display()
                ),
            ));
        }
        Ok(Rendezvous {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_key(key: &str) -> io::Result<()> {
        let ok = !key.is_empty()
            && key.len() <= 64
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad rendezvous key {key:?}"),
            ))
        }
    }

    /// Takes the key's lock, waiting for the process that holds it (it allocates and
    /// fills, then serves; a dead one's lock is released by the kernel).
    pub fn lock(&self, key: &str) -> io::Result<KeyLock> {
        Self::check_key(key)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(self.dir.join(format!("{key}.lock")))?;
        loop {
            // SAFETY: flock on an fd this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(KeyLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The sockets of the key's holders, by name.
    fn sockets(&self, key: &str) -> Vec<PathBuf> {
        let prefix = format!("{key}.");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                (name.starts_with(&prefix) && name.ends_with(".sock")).then(|| e.path())
            })
            .collect();
        v.sort();
        v
    }

    /// Asks the key's holders, one after another, for the fd; removes the sockets of dead
    /// holders on the way. `None` when no holder answered.
    pub fn fetch(&self, key: &str) -> Option<Received> {
        Self::check_key(key).ok()?;
        for path in self.sockets(key) {
            match UnixStream::connect(&path) {
                Ok(s) => match receive(&s) {
                    Ok(r) => return Some(r),
                    // A holder stopping as we asked: the next one may answer.
                    Err(_) => continue,
                },
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        || e.kind() == io::ErrorKind::NotFound =>
                {
                    // Nobody listens there: its process died without removing it.
                    let _ = fs::remove_file(&path);
                }
                Err(_) => continue,
            }
        }
        None
    }

    /// Serves `fd` (an allocation of `size` bytes) to whoever asks for `key`, from a thread
    /// of its own, until the returned `Server` is dropped. The fd is the server's.
    pub fn serve(&self, key: &str, fd: OwnedFd, size: u64) -> io::Result<Server> {
        Self::check_key(key)?;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = self.dir.join(format!(
            "{key}.{}.{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A file left by an earlier process of the same pid (pids are reused).
        let _ = fs::remove_file(&path);
        let listener = Arc::new(UnixListener::bind(&path)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (listener.clone(), stop.clone());
        let thread = spawn_quiet(move || {
            for conn in l.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                match conn {
                    Ok(c) => {
                        let _ = send(&c, fd.as_raw_fd(), size);
                    }
                    // Out of fds or the like: no busy loop while it lasts.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(Server {
            path,
            listener,
            stop,
            thread: Some(thread),
        })
    }
}

/// How a process came by what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Imported from a live holder.
    Imported,
    /// Made here (no holder answered), under the key's lock.
    Allocated,
}

impl Rendezvous {
    /// The election: the fd of `key` (an allocation of `size` bytes) from a live holder,
    /// opened with `import`; or, when none answers, under the key's lock (asking the
    /// holders again once it is taken: another process may have made it meanwhile), made
    /// with `create`, which returns what it made and its fd. Either way this process then
    /// serves the fd. Blocks while another process holds the lock.
    pub fn obtain<T>(
        &self,
        key: &str,
        size: u64,
        import: impl Fn(&OwnedFd) -> Result<T, String>,
        create: impl FnOnce() -> Result<(T, OwnedFd), String>,
    ) -> Result<(T, Server, Origin), String> {
        let take = || -> Option<Result<(T, Server, Origin), String>> {
            let got = self.fetch(key)?;
            if got.size != size {
                return Some(Err(format!(
                    "a holder offers {} bytes where {size} are expected",
                    got.size
                )));
            }
            Some(import(&got.fd).and_then(|held| {
                let server = self
                    .serve(key, got.fd, size)
                    .map_err(|e| format!("serving the fd: {e}"))?;
                Ok((held, server, Origin::Imported))
            }))
        };
        if let Some(r) = take() {
            return r;
        }
        let _lock = self
            .lock(key)
            .map_err(|e| format!("locking {}/{key}.lock: {e}", self.dir.display()))?;
        if let Some(r) = take() {
            return r;
        }
        let (made, fd) = create()?;
        let server = self
            .serve(key, fd, size)
            .map_err(|e| format!("serving the fd: {e}"))?;
        Ok((made, server, Origin::Allocated))
    }
}

impl Server {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Others stop finding this holder first, then its thread leaves accept(): shutdown
        // of a listening socket wakes a blocked accept on Linux.
        let _ = fs::remove_file(&self.path);
        self.stop.store(true, Ordering::Release);
        // SAFETY: the listener's fd stays open (the Arc) until the thread is joined.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Spawns a thread with every signal blocked: nginx's signals belong to the worker's main
/// thread.
fn spawn_quiet(f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask only write the sets
    // given, and the old mask is restored on this thread right after the spawn.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let t = std::thread::Builder::new()
            .name("nginx-gpu-share".into())
            .spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        t
    }
}

/// Sends the header and `fd` as SCM_RIGHTS on `s`.
fn send(s: &UnixStream, fd: RawFd, size: u64) -> io::Result<()> {
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&size.to_le_bytes());
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer set below points into locals that
    // outlive the sendmsg call; the control buffer holds one cmsg of one fd (CMSG_SPACE),
    // aligned for cmsghdr (u64 storage).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        let sent = libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != HEADER {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
        }
    }
    Ok(())
}

/// Receives the header and one fd from `s` (close-on-exec), within ANSWER_WAIT.
fn receive(s: &UnixStream) -> io::Result<Received> {
    s.set_read_timeout(Some(ANSWER_WAIT))?;
    let mut header = [0u8; HEADER];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    };
    // SAFETY: a pure size computation; room for up to 4 fds, so that extra ones sent by a
    // confused peer are received (and closed) rather than truncated.
    let space = unsafe { libc::CMSG_SPACE(4 * std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut fds = Vec::new();
    // SAFETY: as in send; recvmsg writes at most iov_len bytes and msg_controllen bytes of
    // control into the buffers given; the cmsgs walked are within msg_controllen.
    let got = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let got = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        got as usize
    };
    let mut rest = got;
    let mut stream = s;
    while rest < HEADER {
        let n = stream.read(&mut header[rest..])?;
        if n == 0 {
            break;
        }
        rest += n;
    }
    if rest != HEADER || &header[..8] != MAGIC || fds.len() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a holder answered {rest} bytes and {} fds, not a share header and one fd",
                fds.len()
            ),
        ));
    }
    let size = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    Ok(Received {
        fd: fds.pop().expect("one fd"),
        size,
    })
}

/// The meeting directory of this nginx: under /tmp, named after the master's pid, so that
/// workers of every configuration generation of one master (reloads) and its respawned
/// workers meet, and another nginx's never do. `master` is getppid() in a worker.
pub fn dir_for(master: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/ngx-gpu-share.{master}"))
}

/// Removes the meeting directory of this master (at its exit): the lock and stale socket
/// files; sockets of live holders are theirs to remove.
pub fn remove_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}
