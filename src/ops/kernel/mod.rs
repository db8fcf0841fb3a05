//! `kernel`: the operator's own CUDA kernel as an endpoint.
//!
//! `gpu_kernel <name> <file.cu> [entry=] [output=] [block=] [options=] [args=] [type=]`
//! declares a kernel in the http block; `gpu_process kernel <name> [<value> ...]` serves it
//! in a location, each value evaluated per request (nginx variables allowed) and handed to
//! the kernel typed as `args=` declares. The kernel receives a whole batch through the ABI
//! of `include/ngx_gpu_kernel.h` (served to NVRTC by name): bodies packed back to back,
//! output regions with their capacities, a length and a status per request, each request's
//! arguments. Sources come only from the configuration: nothing of a request is compiled or
//! used as a path. There is no CPU path: without a GPU these endpoints answer 503.

mod decl;

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

pub use decl::{declare, ArgType, Decl, OutputSize};

use super::{
    bytes, Configured, Declared, Decoded, Item, Layout, Op, OpOnDevice, Output, Params, Target,
    Value,
};
use crate::engine::job::JobError;
use crate::gpu::{host_copy, GpuError, Loader, Program};

/// The ABI header: served to NVRTC by this name, and shipped for editors and nvcc.
pub const ABI_HEADER: (&str, &str) = (
    "ngx_gpu_kernel.h",
    include_str!("../../../include/ngx_gpu_kernel.h"),
);

/// Bytes of `ngx_gpu_batch` (the kernel's one parameter): two u32, a u64, nine pointers.
pub const BATCH_PARAM_BYTES: usize = 4 + 4 + 8 + 9 * 8;

/// The most blocks a launch uses (loops stride over the rest).
const MAX_BLOCKS: u64 = 65535;

/// `gpu_process kernel <name> [<value> ...]`.
pub fn parse(args: &[&str]) -> Result<Configured, String> {
    let Some((name, values)) = args.split_first() else {
        return Err("op \"kernel\" needs the name of a kernel declared with gpu_kernel".into());
    };
    Ok(Configured {
        op: Arc::new(Kernel {
            kernel: name.to_string(),
            op_name: format!("kernel {name}"),
            values: values.iter().map(|v| v.to_string()).collect(),
            decl: OnceLock::new(),
            max_body: OnceLock::new(),
        }),
        values: values.iter().map(|v| v.to_string()).collect(),
    })
}

pub struct Kernel {
    kernel: String,
    op_name: String,
    /// The location's values as written (for the checks of literal ones).
    values: Vec<String>,
    decl: OnceLock<Arc<Decl>>,
    /// `gpu_batch_bytes`: bodies larger than a batch are refused (413).
    max_body: OnceLock<u64>,
}

impl Kernel {
    fn decl(&self) -> &Decl {
        self.decl.get().expect("resolved at configuration time")
    }
}

impl Op for Kernel {
    fn name(&self) -> &str {
        &self.op_name
    }

    fn resolve(&self, declared: &Declared) -> Result<(), String> {
        let Some(decl) = declared.kernels.iter().find(|k| k.name == self.kernel) else {
            let known: Vec<&str> = declared.kernels.iter().map(|k| k.name.as_str()).collect();
            return Err(format!(
                "unknown kernel \"{}\" (declare it with gpu_kernel in the http block{})",
                self.kernel,
                if known.is_empty() {
                    String::new()
                } else {
                    format!("; declared: {}", known.join(", "))
                }
            ));
        };
        decl.check_values(&self.values)?;
        let _ = self.decl.set(decl.clone());
        let _ = self.max_body.set(declared.max_body);
        Ok(())
    }

    fn programs(&self) -> Vec<Arc<Program>> {
        vec![self.decl().program.clone()]
    }

    fn check_compiled(&self, ptx: &dyn Fn(&Program) -> Option<Arc<str>>) -> Result<(), String> {
        self.decl().check_compiled(ptx)
    }

    fn worst_case(&self, n: usize, bytes: usize) -> (usize, usize) {
        let d = self.decl();
        let header = header_len(n);
        let desc = (4 + d.args.len()) * 8 * n + header;
        let regions = match d.output {
            OutputSize::Same => bytes,
            OutputSize::Times(f) => bytes * f as usize,
            OutputSize::Fixed(s) => n * bytes::align(s) as usize,
        };
        (
            desc,
            bytes::align(header as u64) as usize + regions + 64 * n,
        )
    }

    fn admit(&self, body_len: u64, values: &[Vec<u8>]) -> Result<Params, JobError> {
        let max = *self.max_body.get().unwrap_or(&u64::MAX);
        if body_len > max {
            return Err(JobError::TooLarge(format!(
                "kernel \"{}\" takes bodies of up to {max} bytes (gpu_batch_bytes), got {body_len}",
                self.kernel
            )));
        }
        self.decl()
            .parse_values(values)
            .map(Params)
            .map_err(JobError::BadInput)
    }

    fn has_cpu(&self) -> bool {
        false
    }

    fn run_cpu(&self, _body: Vec<u8>, _: &Params, _: Option<&Decoded>) -> Result<Output, JobError> {
        Err(JobError::Unavailable(format!(
            "kernel \"{}\" runs on a GPU only, and this worker has none",
            self.kernel
        )))
    }

    fn finish(&self, result: &[u8], _: Option<&Decoded>) -> Output {
        Output::new(self.decl().content_type.clone(), host_copy(result))
    }

    fn load(&self, loader: &mut Loader) -> Result<Option<Box<dyn OpOnDevice>>, GpuError> {
        let Loader::Device(d) = loader else {
            return Ok(None);
        };
        let decl = self.decl.get().expect("resolved").clone();
        let function = d.function(&decl.program, &decl.entry)?;
        Ok(Some(Box::new(OnDevice { decl, function })))
    }
}

/// Bytes at the start of the output for the per-request lengths (u64) and statuses (i32,
/// padded to 8 bytes).
fn header_len(n: usize) -> usize {
    8 * n + (4 * n).div_ceil(8) * 8
}

/// The kernel's one parameter, as `ngx_gpu_batch` lays it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchParam {
    pub n: u32,
    pub nargs: u32,
    pub total: u64,
    pub input: u64,
    pub in_off: u64,
    pub in_len: u64,
    pub out: u64,
    pub out_off: u64,
    pub out_cap: u64,
    pub out_len: u64,
    pub status: u64,
    pub args: u64,
}

// SAFETY: plain data, laid out as the C struct the kernel takes by value.
unsafe impl DeviceRepr for BatchParam {}

/// Where the parts of a batch's descriptors are, from the start of the descriptors (and
/// of the output, for the lengths and statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescLayout {
    pub n: usize,
    pub nargs: usize,
    pub in_off: usize,
    pub in_len: usize,
    pub out_off: usize,
    pub out_cap: usize,
    pub args: usize,
    /// The initial lengths and statuses, copied to the start of the output.
    pub init: usize,
    pub header: usize,
    /// Where the output regions start in the output.
    pub regions: usize,
}

impl DescLayout {
    pub fn new(n: usize, nargs: usize) -> DescLayout {
        let header = header_len(n);
        DescLayout {
            n,
            nargs,
            in_off: 0,
            in_len: 8 * n,
            out_off: 16 * n,
            out_cap: 24 * n,
            args: 32 * n,
            init: (32 + 8 * nargs) * n,
            header,
            regions: bytes::align(header as u64) as usize,
        }
    }

    pub fn desc_len(&self) -> usize {
        self.init + self.header
    }

    /// The kernel's parameter for a batch whose descriptors are at `desc`, data at `data`
    /// (`total` bytes to the end of the last body) and output at `out`.
    pub fn param(&self, desc: u64, data: u64, total: u64, out: u64) -> BatchParam {
        BatchParam {
            n: self.n as u32,
            nargs: self.nargs as u32,
            total,
            input: data,
            in_off: desc + self.in_off as u64,
            in_len: desc + self.in_len as u64,
            out: out + self.regions as u64,
            out_off: desc + self.out_off as u64,
            out_cap: desc + self.out_cap as u64,
            out_len: out,
            status: out + 8 * self.n as u64,
            args: desc + self.args as u64,
        }
    }
}

struct OnDevice {
    decl: Arc<Decl>,
    function: CudaFunction,
}

fn put(desc: &mut [u8], at: usize, v: u64) {
    desc[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A request's result from a batch's output: its region cut to the length the kernel set,
/// unless the kernel rejected the input or claimed more than the capacity.
pub fn cut<'o>(
    kernel: &str,
    dl: &DescLayout,
    layout: &Layout,
    i: usize,
    out: &'o [u8],
) -> Result<&'o [u8], JobError> {
    let len_at = 8 * i;
    let len = u64::from_le_bytes(out[len_at..len_at + 8].try_into().expect("8 bytes"));
    let st_at = 8 * dl.n + 4 * i;
    let status = i32::from_le_bytes(out[st_at..st_at + 4].try_into().expect("4 bytes"));
    if status != 0 {
        return Err(JobError::BadInput(format!(
            "kernel \"{kernel}\" rejected the request (code {status})"
        )));
    }
    let p = &layout.items[i];
    if len > p.out_cap {
        return Err(JobError::Internal(format!(
            "kernel \"{kernel}\" reported {len} bytes of output for a request whose capacity is {}: refused",
            p.out_cap
        )));
    }
    let at = dl.regions + p.out_off as usize;
    Ok(&out[at..at + len as usize])
}

/// A batch's layout: bodies back to back, output regions by `output=`, descriptors and the
/// lengths-and-statuses header sized for its requests.
pub fn layout_for(decl: &Decl, items: &[Item]) -> Layout {
    let output = decl.output;
    let mut l = bytes::layout(items, Some(&|len| output.capacity(len)));
    let dl = DescLayout::new(items.len(), decl.args.len());
    l.desc_len = dl.desc_len();
    l.out_len += dl.regions;
    l
}

/// Writes a batch's descriptors (offsets, lengths, capacities, arguments, the initial
/// lengths and statuses) and its bodies.
pub fn pack_for(
    decl: &Decl,
    items: &[Item],
    layout: &Layout,
    desc: &mut [u8],
    data: &mut [u8],
) -> Vec<(usize, JobError)> {
    let dl = DescLayout::new(items.len(), decl.args.len());
    for (i, (it, p)) in items.iter().zip(&layout.items).enumerate() {
        put(desc, dl.in_off + 8 * i, p.data_off);
        put(desc, dl.in_len + 8 * i, p.len);
        put(desc, dl.out_off + 8 * i, p.out_off);
        put(desc, dl.out_cap + 8 * i, p.out_cap);
        for (k, v) in it.params.0.iter().enumerate() {
            let bits = match *v {
                Value::I64(x) => x as u64,
                Value::U64(x) => x,
                Value::F64(x) => x.to_bits(),
            };
            put(desc, dl.args + 8 * (i * dl.nargs + k), bits);
        }
        // Lengths start at the capacity, statuses at 0.
        put(desc, dl.init + 8 * i, p.out_cap);
    }
    let statuses = dl.init + 8 * dl.n;
    desc[statuses..dl.desc_len()].fill(0);
    bytes::pack(items, layout, data)
}

impl OpOnDevice for OnDevice {
    fn layout(&self, items: &[Item]) -> Layout {
        layout_for(&self.decl, items)
    }

    fn pack(
        &self,
        items: &[Item],
        layout: &Layout,
        desc: &mut [u8],
        data: &mut [u8],
    ) -> Vec<(usize, JobError)> {
        pack_for(&self.decl, items, layout, desc, data)
    }

    fn launch(&self, layout: &Layout, target: Target) -> Result<(), GpuError> {
        let Target::Device(l) = target else {
            return Err(GpuError::Unavailable(
                "user kernels run on a GPU only".into(),
            ));
        };
        let n = layout.items.len();
        let dl = DescLayout::new(n, self.decl.args.len());
        l.copy_in(l.out, dl.init..dl.desc_len())?;
        let total = layout.items.last().map_or(0, |p| p.data_off + p.len);
        let param = dl.param(l.desc, l.data, total, l.out);
        let block = self.decl.block;
        let blocks = total
            .div_ceil(block as u64)
            .max(n as u64)
            .clamp(1, MAX_BLOCKS) as u32;
        let mut launch = l.stream.launch_builder(&self.function);
        launch.arg(&param);
        // SAFETY: the kernel's one parameter is an ngx_gpu_batch (checked against the PTX
        // at configuration time: one parameter of BATCH_PARAM_BYTES); its pointers address
        // this slot's descriptors, data and output, sized by layout() for this batch.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    fn result<'o>(
        &self,
        layout: &Layout,
        i: usize,
        out: &'o [u8],
    ) -> Result<Cow<'o, [u8]>, JobError> {
        let dl = DescLayout::new(layout.items.len(), self.decl.args.len());
        cut(&self.decl.name, &dl, layout, i, out).map(Cow::Borrowed)
    }
}

#[cfg(test)]
mod tests;
