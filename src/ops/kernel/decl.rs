//! `gpu_kernel <name> <file.cu> [entry=<function>] [output=same|<size>|x<factor>]
//! [block=<threads>] [options=<nvrtc options>] [args=<name:type,...>] [type=<mime>]`:
//! a kernel declared in the http block, and the checks of what `gpu_process kernel` and
//! each request hand it.

use std::sync::Arc;

use super::{ABI_HEADER, BATCH_PARAM_BYTES};
use crate::gpu::{entries, Program};
use crate::ops::Value;

/// How much output room each request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputSize {
    /// As many bytes as its body.
    Same,
    /// This many bytes.
    Fixed(u64),
    /// Its body's length times this.
    Times(u64),
}

impl OutputSize {
    pub fn capacity(self, body_len: u64) -> u64 {
        match self {
            OutputSize::Same => body_len,
            OutputSize::Fixed(n) => n,
            OutputSize::Times(f) => body_len.saturating_mul(f),
        }
    }
}

/// A kernel argument's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl ArgType {
    fn from_name(s: &str) -> Option<ArgType> {
        Some(match s {
            "i32" => ArgType::I32,
            "u32" => ArgType::U32,
            "i64" => ArgType::I64,
            "u64" => ArgType::U64,
            "f32" => ArgType::F32,
            "f64" => ArgType::F64,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            ArgType::I32 => "i32",
            ArgType::U32 => "u32",
            ArgType::I64 => "i64",
            ArgType::U64 => "u64",
            ArgType::F32 => "f32",
            ArgType::F64 => "f64",
        }
    }

    /// Parses one value; the error says what was expected.
    pub fn parse(self, text: &str) -> Result<Value, &'static str> {
        let t = text.trim();
        let int = |lo: i64, hi: i64| match t.parse::<i64>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(Value::I64(v)),
            _ => Err("is not an integer in range"),
        };
        let uint = |hi: u64| match t.parse::<u64>() {
            Ok(v) if v <= hi => Ok(Value::U64(v)),
            _ => Err("is not an unsigned integer in range"),
        };
        let float = |f32_range: bool| match t.parse::<f64>() {
            Ok(v) if v.is_finite() && (!f32_range || v.abs() <= f32::MAX as f64) => {
                Ok(Value::F64(v))
            }
            _ => Err("is not a finite number"),
        };
        match self {
            ArgType::I32 => int(i32::MIN as i64, i32::MAX as i64),
            ArgType::U32 => uint(u32::MAX as u64),
            ArgType::I64 => int(i64::MIN, i64::MAX),
            ArgType::U64 => uint(u64::MAX),
            ArgType::F32 => float(true),
            ArgType::F64 => float(false),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    pub name: String,
    pub ty: ArgType,
}

/// A kernel declared with `gpu_kernel`.
#[derive(Debug)]
pub struct Decl {
    pub name: String,
    /// The source's path (what NVRTC's messages name).
    pub file: String,
    pub entry: String,
    pub output: OutputSize,
    pub block: u32,
    pub args: Vec<ArgSpec>,
    pub content_type: Arc<str>,
    pub program: Arc<Program>,
}

/// The largest output a request may ask for with `output=<size>` or `x<factor>`.
const MAX_FACTOR: u64 = 64;
const MAX_FIXED: u64 = 1 << 30;

/// `gpu_kernel <name> <file> [params]`, with the file already read from `path` (resolved
/// against nginx's configuration prefix by the caller).
pub fn declare(name: &str, path: &str, source: String, params: &[&str]) -> Result<Decl, String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err(format!(
            "invalid kernel name \"{name}\": letters, digits, \"_\", \"-\" and \".\" only"
        ));
    }
    let mut entry = None;
    let mut output = OutputSize::Same;
    let mut block = 256u32;
    let mut options: Vec<String> = Vec::new();
    let mut args = Vec::new();
    let mut content_type = "application/octet-stream".to_string();
    for p in params {
        let Some((key, value)) = p.split_once('=') else {
            return Err(format!(
                "invalid parameter \"{p}\": expected entry=, output=, block=, options=, args= or type="
            ));
        };
        match key {
            "entry" => {
                if value.is_empty()
                    || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(format!("invalid entry \"{value}\": a C function name"));
                }
                entry = Some(value.to_string());
            }
            "output" => output = parse_output(value)?,
            "block" => {
                block = match value.parse::<u32>() {
                    Ok(b) if (1..=1024).contains(&b) => b,
                    _ => {
                        return Err(format!(
                            "invalid block \"{value}\": threads per block, from 1 to 1024"
                        ))
                    }
                }
            }
            "options" => options = value.split_whitespace().map(str::to_string).collect(),
            "args" => args = parse_args(value)?,
            "type" => {
                if value.is_empty() || value.contains(['\r', '\n']) {
                    return Err(format!("invalid type \"{value}\""));
                }
                content_type = value.to_string();
            }
            _ => {
                return Err(format!(
                    "unknown parameter \"{key}\": expected entry=, output=, block=, options=, args= or type="
                ))
            }
        }
    }
    let entry = entry.unwrap_or_else(|| name.replace(['-', '.'], "_"));
    let program = Arc::new(Program::new(path, source, options, vec![ABI_HEADER]));
    Ok(Decl {
        name: name.to_string(),
        file: path.to_string(),
        entry,
        output,
        block,
        args,
        content_type: Arc::from(content_type),
        program,
    })
}

fn parse_output(v: &str) -> Result<OutputSize, String> {
    let bad = || {
        format!(
            "invalid output \"{v}\": \"same\", a size (4096, 64k, 1m: at most 1g) or x<factor> (x2: at most x{MAX_FACTOR})"
        )
    };
    if v == "same" {
        return Ok(OutputSize::Same);
    }
    if let Some(f) = v.strip_prefix('x') {
        return match f.parse::<u64>() {
            Ok(f) if (1..=MAX_FACTOR).contains(&f) => Ok(OutputSize::Times(f)),
            _ => Err(bad()),
        };
    }
    let (digits, unit) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&v[..v.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    match digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit)) {
        Some(n) if (1..=MAX_FIXED).contains(&n) => Ok(OutputSize::Fixed(n)),
        _ => Err(bad()),
    }
}

/// `width:u32,height:u32 radius:f32` (commas or spaces between).
fn parse_args(v: &str) -> Result<Vec<ArgSpec>, String> {
    let mut out: Vec<ArgSpec> = Vec::new();
    for a in v.split([',', ' ']).filter(|s| !s.is_empty()) {
        let Some((name, ty)) = a.split_once(':') else {
            return Err(format!(
                "invalid argument \"{a}\": name:type, the type one of i32, u32, i64, u64, f32, f64"
            ));
        };
        let Some(ty) = ArgType::from_name(ty) else {
            return Err(format!(
                "invalid type \"{ty}\" of argument \"{name}\": one of i32, u32, i64, u64, f32, f64"
            ));
        };
        if name.is_empty() || out.iter().any(|s| s.name == name) {
            return Err(format!("argument name \"{name}\" is empty or used twice"));
        }
        out.push(ArgSpec {
            name: name.to_string(),
            ty,
        });
    }
    Ok(out)
}

impl Decl {
    /// "width:u32 height:u32".
    fn signature(&self) -> String {
        let s: Vec<String> = self
            .args
            .iter()
            .map(|a| format!("{}:{}", a.name, a.ty.name()))
            .collect();
        if s.is_empty() {
            "none".into()
        } else {
            s.join(" ")
        }
    }

    /// Checks a location's values: their number, and those without variables.
    pub fn check_values(&self, values: &[String]) -> Result<(), String> {
        let want = self.args.len();
        if values.len() < want {
            return Err(format!(
                "kernel \"{}\" takes {want} argument{} ({}), got {}: \"{}\" is missing",
                self.name,
                if want == 1 { "" } else { "s" },
                self.signature(),
                values.len(),
                self.args[values.len()].name
            ));
        }
        if values.len() > want {
            return Err(format!(
                "kernel \"{}\" takes {want} argument{} ({}), got {}: \"{}\" is one too many",
                self.name,
                if want == 1 { "" } else { "s" },
                self.signature(),
                values.len(),
                values[want]
            ));
        }
        for (spec, v) in self.args.iter().zip(values) {
            if !v.contains('$') {
                spec.ty.parse(v).map_err(|why| {
                    format!(
                        "argument \"{}\" ({}) of kernel \"{}\": \"{v}\" {why}",
                        spec.name,
                        spec.ty.name(),
                        self.name
                    )
                })?;
            }
        }
        Ok(())
    }

    /// A request's evaluated values, typed; the error names the argument (400).
    pub fn parse_values(&self, values: &[Vec<u8>]) -> Result<Vec<Value>, String> {
        self.args
            .iter()
            .zip(values)
            .map(|(spec, v)| {
                let text = String::from_utf8_lossy(v);
                spec.ty.parse(&text).map_err(|why| {
                    format!(
                        "argument \"{}\" ({}): \"{}\" {why}",
                        spec.name,
                        spec.ty.name(),
                        text.chars().take(64).collect::<String>()
                    )
                })
            })
            .collect()
    }

    /// After compiling: the entry point exists and takes one `ngx_gpu_batch`.
    pub fn check_compiled(&self, ptx: &dyn Fn(&Program) -> Option<Arc<str>>) -> Result<(), String> {
        let Some(ptx) = ptx(&self.program) else {
            return Ok(());
        };
        let found = entries(&ptx);
        match found.iter().find(|(n, _)| *n == self.entry) {
            Some((_, params)) if params.as_slice() == [BATCH_PARAM_BYTES] => Ok(()),
            Some((_, params)) => Err(format!(
                "kernel \"{}\": {} in {} must take one ngx_gpu_batch by value ({BATCH_PARAM_BYTES} bytes), it takes {} parameter{} of {:?} bytes",
                self.name,
                self.entry,
                self.file,
                params.len(),
                if params.len() == 1 { "" } else { "s" },
                params
            )),
            None => {
                let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
                Err(format!(
                    "kernel \"{}\": no kernel function \"{}\" in {} (found: {}); a kernel is extern \"C\" __global__, or name it with entry=",
                    self.name,
                    self.entry,
                    self.file,
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ))
            }
        }
    }
}
