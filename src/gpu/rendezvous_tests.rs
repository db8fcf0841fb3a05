//! Tests of the fd-passing rendezvous without a GPU: real processes (this test binary run
//! again as a child), a memfd standing in for the CUDA allocation's fd.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::rendezvous::Rendezvous;

const SIZE: u64 = 4096;

/// A fresh private directory under the system's temp dir (not made: `open` makes it).
fn fresh_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::env::temp_dir().join(format!(
        "ngx-gpu-rdv-test.{tag}.{}.{nanos}",
        std::process::id()
    ))
}

/// A memfd of SIZE bytes starting with `text`.
fn memfd(text: &str) -> OwnedFd {
    // SAFETY: the name is NUL-terminated; the fd returned is new and ours.
    let fd = unsafe { libc::memfd_create(c"ngx-gpu-rdv-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.set_len(SIZE).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    fd
}

/// The text at the start of the memory behind `fd` (up to the first NUL).
fn read_fd(fd: &OwnedFd) -> Result<String, String> {
    let mut buf = vec![0u8; 256];
    // SAFETY: reads at most buf.len() bytes into buf from an fd we hold.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    buf.truncate(n as usize);
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

fn sockets(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sock"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The child's part: obtain the key's fd (making a memfd that names this process, after
/// `NGX_GPU_RDV_HOLD_MS` of pretended filling), print what it holds, then hold it and
/// serve until stdin closes. Does nothing outside a child run.
#[test]
#[ignore = "run by the other tests as a child process"]
fn child() {
    let Ok(dir) = std::env::var("NGX_GPU_RDV_DIR") else {
        return;
    };
    let key = std::env::var("NGX_GPU_RDV_KEY").unwrap();
    let hold: u64 = std::env::var("NGX_GPU_RDV_HOLD_MS")
        .unwrap()
        .parse()
        .unwrap();
    let rdv = Rendezvous::open(Path::new(&dir)).unwrap();
    let pid = std::process::id();
    let got = rdv.obtain(&key, SIZE, read_fd, || {
        std::thread::sleep(Duration::from_millis(hold));
        let fd = memfd(&format!("made by {pid}"));
        Ok((read_fd(&fd)?, fd))
    });
    let mut out = std::io::stdout().lock();
    match got {
        Ok((text, _server, origin)) => {
            writeln!(out, "RESULT {pid} {origin:?} {text}").unwrap();
            out.flush().unwrap();
            drop(out);
            // Hold and serve until the parent closes stdin (or kills this process).
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        Err(e) => {
            writeln!(out, "RESULT {pid} Error {e}").unwrap();
        }
    }
}

/// A child process holding the key's fd.
struct Holder {
    child: Child,
    pid: u32,
    origin: String,
    text: String,
}

fn spawn(dir: &Path, key: &str, hold_ms: u64) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "gpu::rendezvous_tests::child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NGX_GPU_RDV_DIR", dir)
        .env("NGX_GPU_RDV_KEY", key)
        .env("NGX_GPU_RDV_HOLD_MS", hold_ms.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints the test's name on the same line first.
            if let Some(at) = line.find("RESULT ") {
                let _ = tx.send(line[at + 7..].to_string());
            }
        }
    });
    (child, rx)
}

fn result(child: Child, rx: mpsc::Receiver<String>) -> Holder {
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the child said what it holds");
    let mut parts = line.splitn(3, ' ');
    let pid = parts.next().unwrap().parse().unwrap();
    let origin = parts.next().unwrap().to_string();
    let text = parts.next().unwrap_or("").to_string();
    Holder {
        child,
        pid,
        origin,
        text,
    }
}

fn holder(dir: &Path, key: &str, hold_ms: u64) -> Holder {
    let (c, rx) = spawn(dir, key, hold_ms);
    result(c, rx)
}

impl Holder {
    /// SIGKILL: no cleanup, its socket file stays behind.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// A clean exit: its server removes the socket.
    fn quit(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
    }
}

#[test]
fn concurrent_processes_elect_one_maker_and_all_hold_its_fd() {
    let dir = fresh_dir("elect");
    let rdv = Rendezvous::open(&dir).unwrap();
    // Started together; the maker pretends a 300 ms upload under the lock.
    let spawned: Vec<_> = (0..5).map(|_| spawn(&dir, "k1", 300)).collect();
    let holders: Vec<Holder> = spawned.into_iter().map(|(c, rx)| result(c, rx)).collect();
    let makers: Vec<&Holder> = holders.iter().filter(|h| h.origin == "Allocated").collect();
    assert_eq!(
        makers.len(),
        1,
        "one maker: {:?}",
        holders
            .iter()
            .map(|h| (&h.origin, &h.text))
            .collect::<Vec<_>>()
    );
    let want = format!("made by {}", makers[0].pid);
    for h in &holders {
        assert_eq!(h.text, want, "process {} ({})", h.pid, h.origin);
        assert!(
            h.origin == "Allocated" || h.origin == "Imported",
            "{}",
            h.origin
        );
    }
    assert_eq!(sockets(&dir).len(), 5, "every holder serves");
    // And this process can fetch it too.
    let got = rdv.fetch("k1").expect("a holder answers");
    assert_eq!(got.size, SIZE);
    assert_eq!(read_fd(&got.fd).unwrap(), want);
    for h in holders {
        h.quit();
    }
    assert!(
        sockets(&dir).is_empty(),
        "clean exits remove their sockets: {:?}",
        sockets(&dir)
    );
    super::rendezvous::remove_dir(&dir);
}

#[test]
fn the_makers_death_loses_nothing_and_a_respawn_allocates_when_none_is_left() {
    let dir = fresh_dir("death");
    Rendezvous::open(&dir).unwrap();
    let a = holder(&dir, "k2", 0);
    assert_eq!(a.origin, "Allocated");
    let want = format!("made by {}", a.pid);
    let b = holder(&dir, "k2", 0);
    assert_eq!(
        (b.origin.as_str(), b.text.as_str()),
        ("Imported", want.as_str())
    );
    // The maker dies with SIGKILL: its socket file stays, nobody listens on it.
    let a_pid = a.pid;
    a.kill();
    assert!(sockets(&dir)
        .iter()
        .any(|s| s.contains(&format!(".{a_pid}."))));
    // A respawned worker imports the same memory from the other holder.
    let c = holder(&dir, "k2", 0);
    assert_eq!(
        (c.origin.as_str(), c.text.as_str()),
        ("Imported", want.as_str())
    );
    // Every holder dies: the next one finds only stale sockets, removes them, makes anew.
    b.kill();
    c.kill();
    // (c may have removed a's already, if it asked a first.)
    let stale = sockets(&dir);
    assert!(stale.len() >= 2, "stale sockets left by SIGKILL: {stale:?}");
    let d = holder(&dir, "k2", 0);
    assert_eq!(d.origin, "Allocated");
    assert_eq!(d.text, format!("made by {}", d.pid));
    let left = sockets(&dir);
    assert_eq!(left.len(), 1, "stale sockets removed: {left:?}");
    assert!(left[0].contains(&format!(".{}.", d.pid)), "{left:?}");
    d.quit();
    super::rendezvous::remove_dir(&dir);
}

#[test]
fn keys_do_not_meet() {
    let dir = fresh_dir("keys");
    Rendezvous::open(&dir).unwrap();
    let a = holder(&dir, "ka", 0);
    let b = holder(&dir, "kb", 0);
    assert_eq!(
        (a.origin.as_str(), b.origin.as_str()),
        ("Allocated", "Allocated")
    );
    assert_ne!(a.text, b.text);
    a.quit();
    b.quit();
    super::rendezvous::remove_dir(&dir);
}

#[test]
fn in_process_serve_fetch_and_stop() {
    let dir = fresh_dir("inproc");
    let rdv = Rendezvous::open(&dir).unwrap();
    assert!(rdv.fetch("k3").is_none());
    let server = rdv.serve("k3", memfd("hello"), SIZE).unwrap();
    assert!(server.path().exists());
    let got = rdv.fetch("k3").unwrap();
    assert_eq!(
        (got.size, read_fd(&got.fd).unwrap().as_str()),
        (SIZE, "hello")
    );
    // Twice: the server answers more than once.
    assert!(rdv.fetch("k3").is_some());
    let path = server.path().to_path_buf();
    drop(server);
    assert!(!path.exists(), "the socket goes with its server");
    assert!(rdv.fetch("k3").is_none());
    super::rendezvous::remove_dir(&dir);
}

#[test]
fn a_stale_socket_is_removed_and_a_size_mismatch_refused() {
    let dir = fresh_dir("stale");
    let rdv = Rendezvous::open(&dir).unwrap();
    let stale = dir.join("k4.1.0.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "a closed listener leaves its file");
    assert!(rdv.fetch("k4").is_none());
    assert!(!stale.exists(), "removed by the fetch that found it dead");
    let _server = rdv.serve("k4", memfd("x"), SIZE).unwrap();
    let r = rdv.obtain(
        "k4",
        2 * SIZE,
        read_fd,
        || -> Result<(String, OwnedFd), String> { panic!("must not make: a holder answered") },
    );
    let e = r.err().expect("a size mismatch is an error");
    assert!(e.contains("expected"), "{e}");
    super::rendezvous::remove_dir(&dir);
}

#[test]
fn only_a_private_directory_of_ours_is_used_and_keys_are_checked() {
    let dir = fresh_dir("perm");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = Rendezvous::open(&dir).expect_err("a directory others can read is refused");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    let link = fresh_dir("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        Rendezvous::open(&link).is_err(),
        "a symbolic link is refused"
    );
    let rdv = Rendezvous::open(&dir).unwrap();
    for bad in ["", "../x", "a/b", "a.b", &"k".repeat(65)] {
        assert!(rdv.lock(bad).is_err(), "{bad:?}");
        assert!(rdv.serve(bad, memfd("x"), SIZE).is_err(), "{bad:?}");
        assert!(rdv.fetch(bad).is_none(), "{bad:?}");
    }
    std::fs::remove_file(&link).unwrap();
    super::rendezvous::remove_dir(&dir);
}

#[test]
fn the_lock_is_exclusive_between_processes() {
    // Two children of a fresh key with a 400 ms fill: the second waits for the first's
    // lock, then imports rather than making a second copy.
    let dir = fresh_dir("lock");
    Rendezvous::open(&dir).unwrap();
    let started = std::time::Instant::now();
    let (a, ra) = spawn(&dir, "k5", 400);
    std::thread::sleep(Duration::from_millis(100));
    let (b, rb) = spawn(&dir, "k5", 400);
    let (a, b) = (result(a, ra), result(b, rb));
    assert!(started.elapsed() >= Duration::from_millis(400));
    let origins = [a.origin.as_str(), b.origin.as_str()];
    assert!(
        origins.contains(&"Allocated") && origins.contains(&"Imported"),
        "{origins:?}"
    );
    assert_eq!(a.text, b.text);
    a.quit();
    b.quit();
    super::rendezvous::remove_dir(&dir);
}
