//! Test harness: starts a real nginx (the one nginx-sys built) with the freshly built
//! module and a configuration written per test, and talks HTTP/1.1 to it.
//!
//! Paths can be overridden for runs away from the build tree (the GPU machine):
//! NGX_GPU_NGINX (nginx binary), NGX_GPU_MODULE (the module .so), NGX_GPU_CONF_DIR
//! (the example configs).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const MIB: usize = 1 << 20;

/// Whether this run must have a GPU (set on the GPU machine): tests then check that
/// answers came from the GPU path, not the CPU fallback.
pub fn gpu_required() -> bool {
    std::env::var("NGX_GPU_REQUIRE").as_deref() == Ok("1")
}

/// The device the module is expected to report for work that ran on the GPU path, as a
/// pattern for `is_expected_device`: `gpuN` on the GPU machine, `cpu` elsewhere.
pub fn expected_device() -> &'static str {
    if gpu_required() {
        "gpuN"
    } else {
        "cpu"
    }
}

/// Whether `dev` (a `$gpu_device` value) is where this run expects the work to have run:
/// any GPU on the GPU machine (the workers spread over every visible device, so the
/// second worker is on gpu1 where there are two), the CPU path elsewhere.
pub fn is_expected_device(dev: Option<&str>) -> bool {
    match dev {
        Some(d) if gpu_required() => is_gpu(d),
        Some(d) => d == "cpu",
        None => false,
    }
}

/// `gpu0`, `gpu1`, ...
pub fn is_gpu(dev: &str) -> bool {
    dev.strip_prefix("gpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn nginx_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NGX_GPU_NGINX") {
        return p.into();
    }
    // Built without nginx-sys's vendored nginx (the ./configure path), the tests are told
    // where nginx is with NGX_GPU_NGINX.
    match option_env!("NGX_GPU_NGINX_BUILD_DIR") {
        Some(dir) => Path::new(dir).join("nginx"),
        None => panic!("set NGX_GPU_NGINX: this build has no vendored nginx"),
    }
}

/// The module built with the `fault-injection` feature (`make fault-module`), for
/// t/faults.rs: NGX_GPU_FAULT_MODULE, or target/<profile>/fault-injection/.
pub fn fault_module_path() -> PathBuf {
    if let Ok(p) = std::env::var("NGX_GPU_FAULT_MODULE") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("fault-injection/libngx_http_gpu_module.so");
    assert!(
        p.exists(),
        "{} is missing: build it with `make fault-module` (make check does)",
        p.display()
    );
    p
}

fn module_path() -> PathBuf {
    if let Ok(p) = std::env::var("NGX_GPU_MODULE") {
        return p.into();
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/libngx_http_gpu_module.so
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("libngx_http_gpu_module.so")
}

pub fn conf_dir() -> PathBuf {
    if let Ok(p) = std::env::var("NGX_GPU_CONF_DIR") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx-conf")
}

/// `rel` in the source tree: beside NGX_GPU_CONF_DIR's parent on a run away from the build
/// tree (the GPU machine, where the build path does not exist), else the crate's own.
pub fn source_path(rel: &str) -> PathBuf {
    match std::env::var_os("NGX_GPU_CONF_DIR") {
        Some(conf) => Path::new(&conf)
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            .join(rel),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(rel),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn fresh_prefix() -> PathBuf {
    fresh_prefix_with(&module_path())
}

fn fresh_prefix_with(module: &Path) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ngx-gpu-t-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["conf", "logs", "modules"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::os::unix::fs::symlink(module, dir.join("modules/ngx_http_gpu_module.so")).unwrap();
    // The example kernels, where the example configuration finds them (conf/kernels/).
    std::os::unix::fs::symlink(conf_dir().join("kernels"), dir.join("conf/kernels")).unwrap();
    // The example models, where the KServe example finds them (conf/models/).
    std::os::unix::fs::symlink(conf_dir().join("models"), dir.join("conf/models")).unwrap();
    dir
}

pub struct Nginx {
    pub prefix: PathBuf,
    pub port: u16,
    child: std::process::Child,
}

/// A configuration with the module loaded, `http` holding the given server-level text.
pub fn config(http: &str) -> String {
    format!(
        "load_module modules/ngx_http_gpu_module.so;\n\
         worker_processes 2;\n\
         error_log logs/error.log info;\n\
         env CUDA_VISIBLE_DEVICES;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
             access_log off;\n\
             client_body_temp_path body_temp;\n\
             {http}\n\
         }}\n"
    )
}

impl Nginx {
    /// Starts nginx in the foreground with `conf`, where `{PORT}` stands for a free port.
    pub fn start(conf: &str) -> Nginx {
        Self::start_with_env(conf, &[])
    }

    pub fn start_with_env(conf: &str, env: &[(&str, &str)]) -> Nginx {
        Self::start_module(conf, env, &module_path())
    }

    /// Starts nginx with `files` (path under conf/, text) written into its prefix first.
    pub fn start_with_files(conf: &str, files: &[(&str, &str)]) -> Nginx {
        Self::start_full(conf, &[], &module_path(), files)
    }

    /// Starts nginx with `module` (say, the fault-injection build) instead of the module.
    pub fn start_module(conf: &str, env: &[(&str, &str)], module: &Path) -> Nginx {
        Self::start_full(conf, env, module, &[])
    }

    fn start_full(
        conf: &str,
        env: &[(&str, &str)],
        module: &Path,
        files: &[(&str, &str)],
    ) -> Nginx {
        let prefix = fresh_prefix_with(module);
        write_files(&prefix, files);
        let port = free_port();
        let conf = conf.replace("{PORT}", &port.to_string());
        std::fs::write(prefix.join("conf/nginx.conf"), &conf).unwrap();
        let mut cmd = Command::new(nginx_bin());
        cmd.arg("-p")
            .arg(&prefix)
            .args(["-c", "conf/nginx.conf", "-e", "logs/error.log"]);
        cmd.args(["-g", "daemon off; pid logs/nginx.pid;"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start nginx");
        let n = Nginx {
            prefix,
            port,
            child,
        };
        n.wait_ready();
        n
    }

    /// Starts nginx with the example configuration from nginx-conf/, on a free port.
    pub fn example(name: &str) -> Nginx {
        let text = std::fs::read_to_string(conf_dir().join(name)).unwrap();
        assert!(
            text.contains("listen 127.0.0.1:8080;"),
            "example config listens on 8080"
        );
        let text = text.replace("listen 127.0.0.1:8080;", "listen 127.0.0.1:{PORT};");
        let text = text.replace("pid logs/nginx.pid;", "");
        Self::start(&text)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Each worker logs its device line once its device is open (or it knows it
                // has none): requests before that would take the CPU path.
                let log = self.error_log();
                let lines = log.matches("gpu: using").count()
                    + log.matches("gpu: no usable GPU in this worker").count();
                let workers = self.worker_pids().len();
                if workers > 0 && lines >= workers {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nginx did not come up; error log:\n{}", self.error_log());
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("logs/error.log")).unwrap_or_default()
    }

    /// A file under the prefix's logs/ (an access log the test configured).
    pub fn log_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.prefix.join("logs").join(name)).unwrap_or_default()
    }

    /// Waits until logs/`name` has at least `n` complete lines, and returns them. (A
    /// reader can see a long line while nginx's write of it is still going on: only lines
    /// that end in a newline count.)
    pub fn wait_log_lines(&self, name: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.log_file(name);
            let complete = text.rfind('\n').map_or("", |end| &text[..end + 1]);
            let lines: Vec<String> = complete.lines().map(str::to_string).collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the error log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.error_log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `nginx -s <signal>` against this nginx, with its configuration.
    pub fn signal(&self, signal: &str) -> Output {
        let conf = std::fs::read_to_string(self.prefix.join("conf/nginx.conf")).unwrap();
        // `nginx -s` finds the master through the pid file named in the configuration.
        let with_pid = self.prefix.join("conf/signal.conf");
        std::fs::write(&with_pid, format!("pid logs/nginx.pid;\n{conf}")).unwrap();
        Command::new(nginx_bin())
            .arg("-p")
            .arg(&self.prefix)
            .args([
                "-c",
                "conf/signal.conf",
                "-e",
                "logs/error.log",
                "-s",
                signal,
            ])
            .output()
            .unwrap()
    }

    /// The worker processes' ids (children of the master named "nginx: worker process").
    pub fn worker_pids(&self) -> Vec<u32> {
        children(self.child.id())
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains("worker process"))
            })
            .collect()
    }

    /// The master's process id.
    pub fn master_pid(&self) -> u32 {
        self.child.id()
    }

    /// The shared objects mapped into the master process.
    pub fn master_maps(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.child.id())).unwrap()
    }

    /// Whether this nginx runs under AddressSanitizer (t/asan/run.sh): it maps libasan.
    /// ASan holds freed memory in quarantine (256 MiB by default) to catch uses after
    /// free, so a process's RSS grows with what it frees: bounds on RSS growth mean
    /// nothing there.
    pub fn under_asan(&self) -> bool {
        self.master_maps().contains("/libasan.so")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// No worker crashed and nothing was logged at alert level or above (nor an
    /// AddressSanitizer report, which goes to the error log when ASan's log_path is unset).
    pub fn assert_healthy(&self) {
        let log = self.error_log();
        for bad in [
            "[alert]",
            "[emerg]",
            "[crit]",
            "exited on signal",
            "panicked",
            "AddressSanitizer",
        ] {
            assert!(!log.contains(bad), "error log has {bad}:\n{log}");
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.prefix);
        }
    }
}

/// Runs `nginx -t` on `conf` and returns its output.
pub fn nginx_t(conf: &str) -> Output {
    nginx_t_with(conf, &[])
}

/// Runs `nginx -t` on `conf` with `files` (path under conf/, text) written first.
pub fn nginx_t_with(conf: &str, files: &[(&str, &str)]) -> Output {
    let prefix = fresh_prefix();
    write_files(&prefix, files);
    std::fs::write(
        prefix.join("conf/nginx.conf"),
        conf.replace("{PORT}", &free_port().to_string()),
    )
    .unwrap();
    let out = Command::new(nginx_bin())
        .arg("-p")
        .arg(&prefix)
        .args(["-c", "conf/nginx.conf", "-e", "logs/error.log", "-t"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&prefix);
    out
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How to send a request body.
pub enum Send<'a> {
    None,
    Length(&'a [u8]),
    /// Transfer-Encoding: chunked, in pieces of these sizes (cycled).
    Chunked(&'a [u8], &'a [usize]),
}

pub fn request(addr: &str, method: &str, path: &str, body: Send) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    match &body {
        Send::None => {}
        Send::Length(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Send::Chunked(..) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    match body {
        Send::None => {}
        Send::Length(b) => {
            // The server may answer early (413) and close: a failed write is fine then.
            let _ = s.write_all(b);
        }
        Send::Chunked(b, sizes) => {
            let mut at = 0;
            let mut i = 0;
            while at < b.len() {
                let n = sizes[i % sizes.len()].max(1).min(b.len() - at);
                let _ = s.write_all(format!("{n:x}\r\n").as_bytes());
                let _ = s.write_all(&b[at..at + n]);
                let _ = s.write_all(b"\r\n");
                at += n;
                i += 1;
            }
            let _ = s.write_all(b"0\r\n\r\n");
        }
    }
    read_response(&mut s, method == "HEAD")
}

pub fn post(addr: &str, path: &str, body: &[u8]) -> Response {
    request(addr, "POST", path, Send::Length(body))
}

fn read_response(s: &mut TcpStream, head_only: bool) -> Response {
    parse_response(s, head_only)
}

fn parse_response(s: &mut impl Read, head_only: bool) -> Response {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            )
        });
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    } else if head_only {
        assert!(body.is_empty(), "a HEAD response has no body");
    } else if let Some((_, v)) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        let n: usize = v.parse().unwrap();
        assert_eq!(body.len(), n, "body length matches Content-Length");
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// splitmix64 seeded from the clock: fresh data every run; the seed is printed.
pub struct Rng(pub u64);

impl Rng {
    pub fn fresh() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("random seed: {seed:#x}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// What b3sum prints for `data` (without the file name): the reference, from the
/// `blake3` crate, independent of the module.
pub fn b3(data: &[u8]) -> String {
    format!("{}\n", blake3::hash(data).to_hex())
}

/// A tiny HTTP/1 upstream for proxy tests: answers every request with the BLAKE3 hex of
/// the body it received (as b3sum prints it) and records what it received.
/// What an upstream received: (path, body) per request.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

pub struct Upstream {
    pub port: u16,
    received: Received,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Received = Default::default();
        let rec = received.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { return };
                let rec = rec.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    if let Some((path, body)) = read_request(&mut s) {
                        let answer = b3(&body);
                        rec.lock().unwrap().push((path, body));
                        let _ = s.write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                                 Content-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                                answer.len()
                            )
                            .as_bytes(),
                        );
                    }
                });
            }
        });
        Upstream { port, received }
    }

    /// The requests received so far: (path, body).
    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` requests have arrived (or 20 s), and returns them.
    pub fn wait_for(&self, n: usize) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.received.lock().unwrap().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.received()
    }
}

/// Reads one HTTP/1 request (Content-Length or chunked body) from `s`.
fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let head_end = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut body = raw[head_end + 4..].to_vec();
    let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    if chunked {
        while !body.windows(5).any(|w| w == b"0\r\n\r\n") {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        return Some((path, dechunk(&body)));
    }
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(len);
    Some((path, body))
}

/// POSTs `body` with Content-Length, written in `parts` pieces with `pause` between them, so
/// that nginx reads it in several reads.
pub fn post_slowly(addr: &str, path: &str, body: &[u8], parts: usize, pause: Duration) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.set_nodelay(true).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let step = body.len().div_ceil(parts.max(1)).max(1);
    for part in body.chunks(step) {
        std::thread::sleep(pause);
        s.write_all(part).unwrap();
    }
    read_response(&mut s, false)
}

/// Random printable ASCII (letters), for bodies that are compared after passing through a
/// log file.
pub fn letters(rng: &mut Rng, n: usize) -> Vec<u8> {
    rng.bytes(n).into_iter().map(|b| b'a' + b % 26).collect()
}

/// An HTTP/2 (h2c, prior knowledge) POST through curl: (status, body).
pub fn post_h2(addr: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!(
        "ngx-gpu-h2-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (inp, out) = (dir.join("in"), dir.join("out"));
    std::fs::write(&inp, body).unwrap();
    let res = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--max-time", "60"])
        .arg("--data-binary")
        .arg(format!("@{}", inp.display()))
        .arg("-o")
        .arg(&out)
        .args(["-w", "%{http_code} %{http_version}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl is installed (t/deps.sh --tests)");
    let w = String::from_utf8_lossy(&res.stdout).into_owned();
    let (code, version) = w.split_once(' ').unwrap_or(("0", ""));
    assert_eq!(
        version, "2",
        "curl did not speak HTTP/2: {w} {:?}",
        res.stderr
    );
    let got = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (code.parse().unwrap_or(0), got)
}

/// Closes `s` with a reset (SO_LINGER 0), as an aborting client does.
pub fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Sends a whole POST, then shuts down the sending side (as `nc -N` does) and reads the
/// answer.
pub fn post_then_half_close(addr: &str, path: &str, body: &[u8]) -> Option<Response> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    if raw.is_empty() {
        return None;
    }
    let mut cursor = std::io::Cursor::new(raw);
    Some(parse_response(&mut cursor, false))
}

/// The ids of `pid`'s child processes.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A POST that reports connection failures instead of panicking (for tests where some
/// connections are expected to break, such as a killed worker's).
pub fn try_post(addr: &str, path: &str, body: &[u8]) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    s.write_all(body).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(format!("no response ({} bytes)", raw.len()));
    }
    let mut cursor = std::io::Cursor::new(raw);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_response(&mut cursor, false)
    }))
    .map_err(|_| "malformed or truncated response".to_string())
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Writes `files` (path under conf/, text) into a prefix.
fn write_files(prefix: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        let path = prefix.join("conf").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// Writes (or rewrites) a file under this nginx's conf/, for a reload to read.
impl Nginx {
    pub fn write_conf_file(&self, name: &str, text: &str) {
        write_files(&self.prefix, &[(name, text)]);
    }

    /// Rewrites conf/nginx.conf (`{PORT}` is this nginx's port) and sends SIGHUP; returns
    /// once the master has logged the reload's outcome (new workers, or a failure).
    pub fn reload_with(&self, conf: &str) {
        let conf = conf.replace("{PORT}", &self.port.to_string());
        std::fs::write(self.prefix.join("conf/nginx.conf"), conf).unwrap();
        let before = self
            .error_log()
            .matches("signal 1 (SIGHUP) received")
            .count();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .error_log()
            .matches("signal 1 (SIGHUP) received")
            .count()
            == before
        {
            assert!(Instant::now() < deadline, "no reload: {}", self.error_log());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether NVRTC can be loaded here (`make check` puts t/nvrtc.sh's copy on
/// LD_LIBRARY_PATH). Where it cannot, a test that needs it says so and passes, unless
/// NGX_GPU_REQUIRE_NVRTC=1 (set by make check) or NGX_GPU_REQUIRE=1.
pub fn nvrtc() -> bool {
    // SAFETY: dlopen of a library name; the handle is kept (never closed).
    let found = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
        .iter()
        .any(|name| {
            let c = std::ffi::CString::new(*name).unwrap();
            unsafe { !libc::dlopen(c.as_ptr(), libc::RTLD_NOW).is_null() }
        });
    if !found {
        let required =
            std::env::var("NGX_GPU_REQUIRE_NVRTC").as_deref() == Ok("1") || gpu_required();
        assert!(!required, "NVRTC is required here but cannot be loaded");
        eprintln!("skipped: no libnvrtc (make check fetches one: sh t/nvrtc.sh)");
    }
    found
}

/// Sends one request with extra `headers` and an optional body (Content-Length).
pub fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    read_response(&mut s, method == "HEAD")
}

#[path = "../npy.rs"]
mod npy;
// Not every suite that includes the harness writes .npy files.
#[allow(unused_imports)]
pub use npy::write_npy;

/// A fresh directory for a test's data files.
pub fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ngx-gpu-data-{}-{}-{name}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
