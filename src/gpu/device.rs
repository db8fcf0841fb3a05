//! One worker's CUDA device: context, loaded kernels and reusable staging buffers.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::{no_panic, GpuError};

const THREADS: u32 = 256;
/// Buffers grow in steps of at least this, so small bodies never reallocate.
const MIN_BUFFER: usize = 1 << 20;

/// What the worker logs about its device at start.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gpu{} \"{}\", compute capability {}.{}, {} MiB",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_mem >> 20
        )
    }
}

pub struct Gpu {
    pub info: DeviceInfo,
    stream: Arc<CudaStream>,
    echo_copy: CudaFunction,
    blake3_chunks: CudaFunction,
    blake3_parents: CudaFunction,
    /// Pinned host input; bodies are read straight into it.
    staging_in: Option<PinnedHostSlice<u8>>,
    /// Pinned host output, allocated without write-combining so the CPU reads it fast.
    staging_out: Option<PinnedHostSlice<u8>>,
    dev_in: Option<CudaSlice<u8>>,
    dev_out: Option<CudaSlice<u8>>,
    cv_a: Option<CudaSlice<u32>>,
    cv_b: Option<CudaSlice<u32>>,
    ctx: Arc<CudaContext>,
}

fn grow(len: usize) -> usize {
    len.max(MIN_BUFFER).next_power_of_two()
}

fn launch_config(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as u64).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// Opens device 0 (as `CUDA_VISIBLE_DEVICES` shows it) and loads `ptx`.
    /// Must run on the thread that will use the device; never panics.
    pub fn open(ptx: &str) -> Result<Gpu, String> {
        no_panic("CUDA initialization", || {
            // SAFETY: only tries dlopen on candidate names.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("libcuda.so not found (no NVIDIA driver visible)".into());
            }
            let count = CudaContext::device_count().map_err(|e| format!("cuInit: {e}"))?;
            if count < 1 {
                return Err("no CUDA device visible".into());
            }
            let ctx = CudaContext::new(0).map_err(|e| format!("creating context: {e}"))?;
            ctx.set_blocking_synchronize().map_err(|e| format!("context flags: {e}"))?;
            // One stream, synchronised explicitly: cudarc's per-buffer events are not needed.
            // SAFETY: every buffer is used only on `stream`.
            unsafe { ctx.disable_event_tracking() };
            let info = DeviceInfo {
                ordinal: 0,
                name: ctx.name().map_err(|e| e.to_string())?,
                compute_capability: ctx.compute_capability().map_err(|e| e.to_string())?,
                total_mem: ctx.total_mem().map_err(|e| e.to_string())?,
            };
            let module = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(|e| format!("loading kernels: {e}"))?;
            let f = |name: &str| {
                module.load_function(name).map_err(|e| format!("kernel \"{name}\": {e}"))
            };
            Ok(Gpu {
                info,
                stream: ctx.new_stream().map_err(|e| format!("creating stream: {e}"))?,
                echo_copy: f("echo_copy")?,
                blake3_chunks: f("blake3_chunks")?,
                blake3_parents: f("blake3_parents")?,
                staging_in: None,
                staging_out: None,
                dev_in: None,
                dev_out: None,
                cv_a: None,
                cv_b: None,
                ctx,
            })
        })
    }

    /// The pinned input buffer, at least `len` bytes, for the caller to fill.
    pub fn input(&mut self, len: usize) -> Result<&mut [u8], GpuError> {
        let ctx = self.ctx.clone();
        let buf = pinned(&ctx, &mut self.staging_in, len, false)?;
        Ok(&mut buf.as_mut_slice()?[..len])
    }

    /// Copies the first `len` staged bytes to the device input buffer.
    pub fn upload(&mut self, len: usize) -> Result<(), GpuError> {
        let dev = device(&self.stream, &mut self.dev_in, len.max(16))?;
        if len > 0 {
            let src = &self.staging_in.as_ref().expect("input staged").as_slice()?[..len];
            self.stream.memcpy_htod(src, &mut dev.slice_mut(0..len))?;
        }
        Ok(())
    }

    pub fn echo(&mut self, len: usize) -> Result<Vec<u8>, GpuError> {
        self.upload(len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let out = device(&self.stream, &mut self.dev_out, len)?;
        let n = len as u64;
        let mut launch = self.stream.launch_builder(&self.echo_copy);
        launch.arg(self.dev_in.as_ref().expect("uploaded")).arg(&mut *out).arg(&n);
        // SAFETY: echo_copy(const u8*, u8*, u64) reads and writes `len` bytes; both
        // buffers hold at least that many.
        unsafe { launch.launch(launch_config(n.div_ceil(16))) }?;
        let ctx = self.ctx.clone();
        let host = pinned(&ctx, &mut self.staging_out, len, true)?;
        self.stream.memcpy_dtoh(&out.slice(0..len), &mut host.as_mut_slice()?[..len])?;
        self.stream.synchronize()?;
        Ok(host_copy(&host.as_slice()?[..len]))
    }

    pub fn blake3(&mut self, len: usize) -> Result<[u8; 32], GpuError> {
        self.upload(len)?;
        self.blake3_resident(len)
    }

    /// BLAKE3 of the first `len` bytes already in the device input buffer (the kernels
    /// alone, for benchmarks).
    pub fn blake3_resident(&mut self, len: usize) -> Result<[u8; 32], GpuError> {
        let n_chunks = (len as u64).div_ceil(1024).max(1);
        let cv_len = (n_chunks as usize) * 8;
        device(&self.stream, &mut self.cv_a, cv_len)?;
        device(&self.stream, &mut self.cv_b, cv_len.div_ceil(2).max(8))?;
        let (len64, base) = (len as u64, 0u64);
        let mut launch = self.stream.launch_builder(&self.blake3_chunks);
        launch
            .arg(self.dev_in.as_ref().expect("uploaded"))
            .arg(&len64)
            .arg(&n_chunks)
            .arg(&base)
            .arg(self.cv_a.as_mut().expect("allocated"));
        // SAFETY: blake3_chunks(const u8*, u64, u64, u64, u32*) reads `len` bytes and
        // writes 8 words per chunk into cv_a, sized for n_chunks.
        unsafe { launch.launch(launch_config(n_chunks)) }?;

        let mut n = n_chunks;
        let mut in_a = true;
        while n > 1 {
            let root = u32::from(n == 2);
            let (src, dst) = if in_a {
                (self.cv_a.as_ref().expect("allocated"), self.cv_b.as_mut().expect("allocated"))
            } else {
                (self.cv_b.as_ref().expect("allocated"), self.cv_a.as_mut().expect("allocated"))
            };
            let mut launch = self.stream.launch_builder(&self.blake3_parents);
            launch.arg(src).arg(&n).arg(dst).arg(&root);
            // SAFETY: blake3_parents(const u32*, u64, u32*, u32) reads n nodes of 8 words
            // and writes ceil(n/2) nodes; src and dst are distinct and large enough.
            unsafe { launch.launch(launch_config(n.div_ceil(2))) }?;
            n = n.div_ceil(2);
            in_a = !in_a;
        }
        let root = if in_a { self.cv_a.as_ref() } else { self.cv_b.as_ref() }.expect("allocated");
        let mut words = [0u32; 8];
        self.stream.memcpy_dtoh(&root.slice(0..8), &mut words[..])?;
        self.stream.synchronize()?;
        let mut digest = [0u8; 32];
        for (i, w) in words.iter().enumerate() {
            digest[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        Ok(digest)
    }
}

fn device<'a, T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>, GpuError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None;
        // SAFETY: the contents are always written before they are read.
        *slot = Some(unsafe { stream.alloc::<T>(grow(len)) }?);
    }
    Ok(slot.as_mut().expect("just allocated"))
}

fn pinned<'a>(
    ctx: &Arc<CudaContext>,
    slot: &'a mut Option<PinnedHostSlice<u8>>,
    len: usize,
    readable: bool,
) -> Result<&'a mut PinnedHostSlice<u8>, GpuError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None;
        // Write-combined memory is fast to fill and to copy to the device, but very slow
        // for the CPU to read: the output buffer is allocated without it.
        let flags = if readable { 0 } else { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED };
        // SAFETY: the contents are always written before they are read.
        *slot = Some(unsafe { ctx.alloc_pinned_with_flags::<u8>(grow(len), flags) }?);
    }
    Ok(slot.as_mut().expect("just allocated"))
}

/// An owned copy of `src` (an op's output, handed to nginx). Large outputs ask for
/// transparent huge pages before the copy touches them: faulting in fresh 4 KiB pages
/// can cost more than the copy itself.
pub fn host_copy(src: &[u8]) -> Vec<u8> {
    const HUGE: usize = 2 << 20;
    let mut v = Vec::<u8>::with_capacity(src.len());
    if src.len() >= 2 * HUGE {
        let p = v.as_mut_ptr() as usize;
        let (start, end) = ((p + HUGE - 1) & !(HUGE - 1), (p + src.len()) & !(HUGE - 1));
        if end > start {
            // SAFETY: advice on memory this Vec owns; failure only loses the hint.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v.extend_from_slice(src);
    v
}
