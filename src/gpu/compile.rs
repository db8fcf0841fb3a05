//! NVRTC compilation of the ops' CUDA C programs, once per configuration load, in a
//! short-lived child of the master (see `compile_isolated`); each worker then loads the
//! PTX into its own context.
//!
//! A program is one NVRTC compilation unit: a source, its options, and headers served by
//! name from memory (no file on disk: `#include "ngx_gpu_kernel.h"`). Programs with the
//! same source, options and headers are compiled once, and the master keeps what it
//! compiled, so a reload that changes no kernel compiles nothing.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex};

use cudarc::nvrtc::{result, sys};

use super::no_panic;

/// One CUDA C compilation unit.
#[derive(Debug)]
pub struct Program {
    /// What NVRTC calls the source in its messages: a kernel file's path.
    pub name: String,
    pub source: String,
    pub options: Vec<String>,
    /// Headers NVRTC finds by name: (include name, text).
    pub headers: Vec<(&'static str, &'static str)>,
    /// Identifies the program by its content (FNV-1a over everything above but the name).
    pub key: u64,
}

impl Program {
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        options: Vec<String>,
        headers: Vec<(&'static str, &'static str)>,
    ) -> Program {
        let source = source.into();
        let mut h = Fnv::default();
        h.add(source.as_bytes());
        for o in &options {
            h.add(b"\0option\0");
            h.add(o.as_bytes());
        }
        for (name, text) in &headers {
            h.add(b"\0header\0");
            h.add(name.as_bytes());
            h.add(text.as_bytes());
        }
        Program {
            name: name.into(),
            source,
            options,
            headers,
            key: h.0,
        }
    }
}

#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The PTX of a configuration's programs, by program key.
#[derive(Debug, Default)]
pub struct Compiled {
    ptx: HashMap<u64, Arc<str>>,
}

impl Compiled {
    pub fn ptx(&self, program: &Program) -> Option<Arc<str>> {
        self.ptx.get(&program.key).cloned()
    }

    pub fn insert(&mut self, program: &Program, ptx: Arc<str>) {
        self.ptx.insert(program.key, ptx);
    }

    pub fn len(&self) -> usize {
        self.ptx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ptx.is_empty()
    }
}

/// Whether libnvrtc can be loaded; never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: is_culib_present only tries dlopen on candidate names.
    no_panic("loading libnvrtc", || {
        Ok(unsafe { sys::is_culib_present() })
    })
    .unwrap_or(false)
}

/// Compiles one program to PTX, in this process. The error carries NVRTC's log, whose
/// lines name the program's file and line.
pub fn compile(program: &Program) -> Result<String, String> {
    no_panic("NVRTC", || compile_inner(program))
}

fn compile_inner(program: &Program) -> Result<String, String> {
    let cstr =
        |s: &str, what: &str| CString::new(s).map_err(|_| format!("{what} contains a NUL byte"));
    let src = cstr(&program.source, &program.name)?;
    let name = cstr(&program.name, "the program name")?;
    let header_texts = program
        .headers
        .iter()
        .map(|(_, text)| cstr(text, "a header"))
        .collect::<Result<Vec<_>, _>>()?;
    let header_names = program
        .headers
        .iter()
        .map(|(n, _)| cstr(n, "a header name"))
        .collect::<Result<Vec<_>, _>>()?;
    let text_ptrs: Vec<*const libc::c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
    let name_ptrs: Vec<*const libc::c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let mut prog = std::mem::MaybeUninit::uninit();
    // SAFETY: every pointer is to a NUL-terminated string alive across the call; NVRTC
    // copies what it keeps.
    unsafe {
        sys::nvrtcCreateProgram(
            prog.as_mut_ptr(),
            src.as_ptr(),
            name.as_ptr(),
            text_ptrs.len() as i32,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    }
    .result()
    .map_err(|e| format!("creating the NVRTC program: {e:?}"))?;
    // SAFETY: created above.
    let prog = unsafe { prog.assume_init() };
    let options: Vec<String> = std::iter::once("--std=c++17".to_string())
        .chain(program.options.iter().cloned())
        .collect();
    // SAFETY: prog is a live program; destroyed once below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let out = match compiled {
        Ok(()) => {
            // SAFETY: prog compiled.
            unsafe { result::get_ptx(prog) }
                .map_err(|e| format!("reading the PTX: {e:?}"))
                .map(|ptx| {
                    let end = ptx.iter().position(|c| *c == 0).unwrap_or(ptx.len());
                    ptx[..end]
                        .iter()
                        .map(|c| *c as u8 as char)
                        .collect::<String>()
                })
        }
        Err(_) => {
            // SAFETY: prog is live.
            let log = unsafe { result::get_program_log(prog) }
                .map(|log| {
                    let end = log.iter().position(|c| *c == 0).unwrap_or(log.len());
                    let bytes: Vec<u8> = log[..end].iter().map(|c| *c as u8).collect();
                    String::from_utf8_lossy(&bytes).trim_end().to_string()
                })
                .unwrap_or_default();
            Err(format!("{} does not compile:\n{log}", program.name))
        }
    };
    // SAFETY: destroyed once; nothing uses prog afterwards.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// What compiling at configuration time gave.
#[derive(Debug)]
pub enum Outcome {
    /// Every program's PTX, and how many of them came from the cache.
    Ptx { compiled: Compiled, cached: usize },
    /// No libnvrtc: the GPU path is off, not an error.
    NoNvrtc(String),
    /// A program does not compile (its NVRTC log), or the compiler process failed.
    Failed(String),
}

/// PTX the master compiled for earlier configuration loads, by program key. Only ever
/// added to from the master's configuration thread (and read by no worker: each worker
/// gets its configuration's own `Compiled`); kept to the most recent `CACHE_LIMIT`.
static CACHE: Mutex<Vec<(u64, Arc<str>)>> = Mutex::new(Vec::new());
const CACHE_LIMIT: usize = 256;

/// Compiles `programs` in a short-lived child process, taking what the master compiled
/// before from its cache.
///
/// Measured on the GPU machine: with libnvrtc loaded into the nginx master, workers it
/// forked failed cuInit ("initialization error") or crashed. A child keeps every CUDA
/// library out of the master; nginx is single-threaded while it reads its
/// configuration, so forking here is safe. Not for multi-threaded callers: the child
/// could inherit a lock another thread held. The integration tests cover it.
pub fn compile_isolated(programs: &[Arc<Program>]) -> Outcome {
    let mut compiled = Compiled::default();
    let mut todo: Vec<&Arc<Program>> = Vec::new();
    {
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        for p in programs {
            if compiled.ptx.contains_key(&p.key) || todo.iter().any(|t| t.key == p.key) {
                continue;
            }
            match cache.iter().find(|(k, _)| *k == p.key) {
                Some((_, ptx)) => compiled.insert(p, ptx.clone()),
                None => todo.push(p),
            }
        }
    }
    let cached = compiled.len();
    if todo.is_empty() {
        return Outcome::Ptx { compiled, cached };
    }
    match in_child(&todo) {
        Ok(ptxs) => {
            let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
            for (p, ptx) in todo.iter().zip(ptxs) {
                let ptx: Arc<str> = Arc::from(ptx);
                compiled.insert(p, ptx.clone());
                cache.retain(|(k, _)| *k != p.key);
                cache.push((p.key, ptx));
            }
            let over = cache.len().saturating_sub(CACHE_LIMIT);
            cache.drain(..over);
            Outcome::Ptx { compiled, cached }
        }
        Err(outcome) => outcome,
    }
}

/// Runs `compile` over `todo` in a forked child and reads back each program's PTX, in
/// order.
fn in_child(todo: &[&Arc<Program>]) -> Result<Vec<String>, Outcome> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: plain syscalls on descriptors this function owns.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(Outcome::Failed(format!(
                "pipe: {}",
                std::io::Error::last_os_error()
            )));
        }
        let pid = libc::fork();
        if pid < 0 {
            libc::close(fds[0]);
            libc::close(fds[1]);
            return Err(Outcome::Failed(format!(
                "fork: {}",
                std::io::Error::last_os_error()
            )));
        }
        if pid == 0 {
            libc::close(fds[0]);
            // Framing: a kind byte (N: no NVRTC, P: PTX, E: error log), a u64 length, the
            // bytes; one P record per program, or the first E.
            let mut msg = Vec::new();
            let mut record = |kind: u8, bytes: &[u8]| {
                msg.push(kind);
                msg.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                msg.extend_from_slice(bytes);
            };
            if !nvrtc_present() {
                record(b'N', b"libnvrtc not found");
            } else {
                for p in todo {
                    match compile(p) {
                        Ok(ptx) => record(b'P', ptx.as_bytes()),
                        Err(log) => {
                            record(b'E', log.as_bytes());
                            break;
                        }
                    }
                }
            }
            let mut w = std::fs::File::from_raw_fd(fds[1]);
            let ok = w.write_all(&msg).is_ok();
            // _exit: no atexit handlers or destructors of the nginx master's state.
            libc::_exit(if ok { 0 } else { 1 });
        }
        libc::close(fds[1]);
        let mut out = Vec::new();
        let read = std::fs::File::from_raw_fd(fds[0]).read_to_end(&mut out);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
        if let Err(e) = read {
            return Err(Outcome::Failed(format!(
                "reading from the kernel compiler process: {e}"
            )));
        }
        let mut ptxs = Vec::new();
        let mut rest = &out[..];
        while let Some((&kind, tail)) = rest.split_first() {
            if tail.len() < 8 {
                break;
            }
            let len = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes")) as usize;
            let Some(bytes) = tail.get(8..8 + len) else {
                break;
            };
            let text = String::from_utf8_lossy(bytes).into_owned();
            match kind {
                b'P' => ptxs.push(text),
                b'E' => return Err(Outcome::Failed(text)),
                b'N' => return Err(Outcome::NoNvrtc(text)),
                _ => break,
            }
            rest = &tail[8 + len..];
        }
        if ptxs.len() == todo.len() {
            Ok(ptxs)
        } else {
            Err(Outcome::Failed(format!(
                "the kernel compiler process failed (wait status {status:#x})"
            )))
        }
    }
}

/// The names of the kernels (`.entry` functions) in `ptx`, with each one's parameter
/// sizes in bytes, in order.
pub fn entries(ptx: &str) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut lines = ptx.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        let Some(rest) = t
            .strip_prefix(".visible .entry ")
            .or_else(|| t.strip_prefix(".entry "))
        else {
            continue;
        };
        let name = rest.split(['(', ' ']).next().unwrap_or("").to_string();
        let mut params = Vec::new();
        // Parameters follow, one a line, up to the closing parenthesis.
        let mut header = rest.to_string();
        while !header.contains(')') {
            let Some(next) = lines.next() else { break };
            header.push_str(next.trim());
            header.push(' ');
        }
        for p in header.split(".param").skip(1) {
            params.push(param_size(p));
        }
        out.push((name, params));
    }
    out
}

/// The size of one `.param` declaration: `.u64 name`, `.align 8 .b8 name[40]`.
fn param_size(decl: &str) -> usize {
    if let (Some(open), Some(close)) = (decl.find('['), decl.find(']')) {
        let n: usize = decl[open + 1..close].trim().parse().unwrap_or(0);
        let elem = if decl.contains(".b16") {
            2
        } else if decl.contains(".b32") {
            4
        } else if decl.contains(".b64") {
            8
        } else {
            1
        };
        return n * elem;
    }
    for (ty, n) in [("64", 8), ("32", 4), ("16", 2), ("8", 1)] {
        if decl.contains(&format!(".u{ty}"))
            || decl.contains(&format!(".s{ty}"))
            || decl.contains(&format!(".f{ty}"))
            || decl.contains(&format!(".b{ty}"))
        {
            return n;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_keyed_by_content_not_name() {
        let a = Program::new("a.cu", "x", vec![], vec![]);
        let b = Program::new("b.cu", "x", vec![], vec![]);
        let c = Program::new("a.cu", "x", vec!["-DX".into()], vec![]);
        let d = Program::new("a.cu", "x", vec![], vec![("h.h", "y")]);
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, c.key);
        assert_ne!(a.key, d.key);
    }

    #[test]
    fn entries_and_their_parameter_sizes_are_read_from_ptx() {
        let ptx = "\n.visible .entry blur(\n\t.param .align 8 .b8 blur_param_0[104]\n)\n{\n}\n\
                   .visible .entry two(\n\t.param .u64 two_param_0,\n\t.param .u32 two_param_1\n)\n{\n}\n\
                   .visible .func helper(\n)\n";
        assert_eq!(
            entries(ptx),
            vec![
                ("blur".to_string(), vec![104]),
                ("two".to_string(), vec![8, 4])
            ]
        );
    }
}
