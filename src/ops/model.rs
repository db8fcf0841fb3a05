//! Models declared in the http block: `gpu_model <name> <kind> <path> [key=value ...]`.
//!
//! A model is data an op serves (a vector index, an encoder's weights), loaded and checked
//! when the configuration is read, so that a bad file fails `nginx -t` with an `[emerg]`
//! naming it. Each kind is one entry of `MODEL_KINDS`, implemented beside the op that
//! serves it (`ops/knn/`, `ops/embed/`). Locations refer to models by name (`gpu_process
//! kserve;` serves every declared model; other ops name theirs).

use std::any::Any;
use std::sync::Arc;

use super::Op;

/// A declared model, shared read-only by every worker.
pub trait Model: Send + Sync + 'static {
    /// The name `gpu_model` gave it (what requests and other directives use).
    fn name(&self) -> &str;
    /// The kind, as `gpu_model` names it (`knn`, `embed`).
    fn kind(&self) -> &'static str;
    /// For the op that serves this kind, to get at its own type.
    fn as_any(&self) -> &dyn Any;
    /// What it takes and answers, for protocols that describe models (KServe metadata).
    fn signature(&self) -> Signature;
    /// The op that serves it over a tensor protocol (`gpu_process kserve;`): one instance
    /// per model, so that requests of one model batch together and never with another's.
    /// `None`: no tensor protocol serves this kind (yet); KServe does not list it.
    fn serve(self: Arc<Self>) -> Option<Arc<dyn Op>>;
}

/// A model's inputs and outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    /// What KServe metadata calls the platform (`ngx_gpu_knn`).
    pub platform: &'static str,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// One named tensor: its KServe datatypes (the first is the one described) and shape, -1
/// for a dimension that varies.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub datatypes: &'static [&'static str],
    pub shape: Vec<i64>,
}

/// Loads and checks a model of one kind: `name`, the file or directory (already made
/// absolute from nginx's prefix), and the `key=value` parameters after it.
pub type Load = fn(name: &str, path: &str, params: &[&str]) -> Result<Arc<dyn Model>, String>;

/// The kinds `gpu_model` knows; its second argument names one.
pub const MODEL_KINDS: &[(&str, Load)] =
    &[("knn", super::knn::load), ("embed", super::embed::load)];

/// `gpu_model <name> <kind> <path> [params]`, with `path` already absolute.
pub fn declare(
    name: &str,
    kind: &str,
    path: &str,
    params: &[&str],
) -> Result<Arc<dyn Model>, String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(format!(
            "model name \"{name}\" may hold only letters, digits, '_', '-' and '.'"
        ));
    }
    match MODEL_KINDS.iter().find(|(k, _)| *k == kind) {
        Some((_, load)) => load(name, path, params),
        None => {
            let known: Vec<&str> = MODEL_KINDS.iter().map(|(k, _)| *k).collect();
            Err(format!(
                "unknown model kind \"{kind}\" (known kinds: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        }
    }
}

/// The `key=value` parameters of a directive, each key at most once and from `allowed`.
pub fn key_values<'a>(
    params: &[&'a str],
    allowed: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            return Err(format!("parameter \"{p}\" is not key=value"));
        };
        if !allowed.contains(&k) {
            return Err(format!(
                "unknown parameter \"{k}\" (known: {})",
                allowed.join(", ")
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("parameter \"{k}\" is given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kinds_and_bad_names_are_refused() {
        let e = declare("m", "resnet", "/x", &[]).err().unwrap();
        assert!(e.starts_with("unknown model kind \"resnet\""), "{e}");
        let e = declare("a b", "knn", "/x", &[]).err().unwrap();
        assert!(e.contains("may hold only"), "{e}");
        assert!(declare("", "knn", "/x", &[]).is_err());
    }

    #[test]
    fn key_values_are_checked() {
        let kv = key_values(&["k=10", "metric=ip"], &["k", "metric"]).unwrap();
        assert_eq!(kv, [("k", "10"), ("metric", "ip")]);
        let e = key_values(&["k"], &["k"]).err().unwrap();
        assert_eq!(e, "parameter \"k\" is not key=value");
        let e = key_values(&["x=1"], &["k"]).err().unwrap();
        assert_eq!(e, "unknown parameter \"x\" (known: k)");
        let e = key_values(&["k=1", "k=2"], &["k"]).err().unwrap();
        assert_eq!(e, "parameter \"k\" is given twice");
    }
}
