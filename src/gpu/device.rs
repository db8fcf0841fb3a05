//! One worker's CUDA device: context, loaded kernels, and the pipeline slots that let
//! several batches be in flight at once.
//!
//! A slot is one stream with its own pinned staging buffers (write-combined in, plain out)
//! and device buffers, all grow-only and reused batch after batch. A batch on a slot is one
//! host->device copy, the op's kernels, one device->host copy and a host function that tells
//! the GPU thread the slot is done (over a channel, so the thread can wait for new jobs and
//! finished slots at once). While the GPU works on one slot the thread packs the next.

use std::ffi::c_void;
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice,
};
use cudarc::nvrtc::Ptx;

use super::{no_panic, GpuError};

/// Batches in flight per worker.
pub const SLOTS: usize = 2;
pub const THREADS: u32 = 256;
/// Buffers grow in steps of at least this, so small batches never reallocate.
const MIN_BUFFER: usize = 1 << 20;
/// Device buffers start at a multiple of this; the staged data follows the descriptors at it.
pub const DESC_ALIGN: usize = 256;

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

/// The kernels of every op, loaded from the configuration-time PTX.
pub struct Functions {
    pub echo_copy: CudaFunction,
    pub blake3_chunks: CudaFunction,
    pub blake3_parents: CudaFunction,
}

/// Told to the GPU thread by the driver's callback thread when a slot's batch is done.
struct DoneSignal {
    tx: Sender<usize>,
    slot: usize,
}

unsafe extern "C" fn slot_done(data: *mut c_void) {
    // Runs on a CUDA driver thread: no CUDA calls, no panics.
    let signal = &*(data as *const DoneSignal);
    let _ = signal.tx.send(signal.slot);
}

pub struct Slot {
    pub stream: Arc<CudaStream>,
    event: CudaEvent,
    /// Pinned host input: descriptors, then the packed bodies. Write-combined: fast to
    /// fill and to copy to the device.
    host_in: Option<PinnedHostSlice<u8>>,
    /// Pinned host output, without write-combining so the CPU reads it fast.
    host_out: Option<PinnedHostSlice<u8>>,
    dev_in: Option<CudaSlice<u8>>,
    dev_out: Option<CudaSlice<u8>>,
    cv_a: Option<CudaSlice<u32>>,
    cv_b: Option<CudaSlice<u32>>,
    signal: Box<DoneSignal>,
    /// Bytes of descriptors before the data in `host_in`/`dev_in` for the staged batch.
    desc_len: usize,
    /// Bytes the batch's result takes in `host_out`.
    out_len: usize,
}

/// Device addresses of one launch's buffers, for the op's kernels.
pub struct Launch<'a> {
    pub stream: &'a Arc<CudaStream>,
    /// The descriptors (at the start of the device input buffer).
    pub desc: u64,
    /// The packed data (after the descriptors).
    pub data: u64,
    pub out: u64,
    pub cv_a: u64,
    pub cv_b: u64,
}

pub struct Gpu {
    pub info: DeviceInfo,
    pub functions: Functions,
    slots: Vec<Slot>,
    done: Receiver<usize>,
    ctx: Arc<CudaContext>,
}

fn grow(len: usize) -> usize {
    len.max(MIN_BUFFER).next_power_of_two()
}

pub fn launch_config(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as u64).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub fn align_desc(n: usize) -> usize {
    n.div_ceil(DESC_ALIGN) * DESC_ALIGN
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
            ctx.set_blocking_synchronize()
                .map_err(|e| format!("context flags: {e}"))?;
            // Each slot's buffers are used only on its own stream, ordered explicitly:
            // cudarc's per-buffer events are not needed.
            // SAFETY: see above.
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
                module
                    .load_function(name)
                    .map_err(|e| format!("kernel \"{name}\": {e}"))
            };
            let kernels = Functions {
                echo_copy: f("echo_copy")?,
                blake3_chunks: f("blake3_chunks")?,
                blake3_parents: f("blake3_parents")?,
            };
            let (tx, done) = unbounded();
            let mut slots = Vec::with_capacity(SLOTS);
            for slot in 0..SLOTS {
                slots.push(Slot {
                    stream: ctx
                        .new_stream()
                        .map_err(|e| format!("creating stream: {e}"))?,
                    event: ctx
                        .new_event(None)
                        .map_err(|e| format!("creating event: {e}"))?,
                    host_in: None,
                    host_out: None,
                    dev_in: None,
                    dev_out: None,
                    cv_a: None,
                    cv_b: None,
                    signal: Box::new(DoneSignal {
                        tx: tx.clone(),
                        slot,
                    }),
                    desc_len: 0,
                    out_len: 0,
                });
            }
            Ok(Gpu {
                info,
                functions: kernels,
                slots,
                done,
                ctx,
            })
        })
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Slot numbers whose batches are done, as the driver reports them.
    pub fn done(&self) -> &Receiver<usize> {
        &self.done
    }

    /// Makes `slot`'s input hold `desc_len` bytes of descriptors and `data_len` bytes of
    /// data, and returns both regions for the caller to fill.
    pub fn stage(
        &mut self,
        slot: usize,
        desc_len: usize,
        data_len: usize,
    ) -> Result<(&mut [u8], &mut [u8]), GpuError> {
        let ctx = self.ctx.clone();
        let s = &mut self.slots[slot];
        s.desc_len = align_desc(desc_len);
        let total = s.desc_len + data_len;
        let buf = pinned(&ctx, &mut s.host_in, total, false)?;
        let (desc, data) = buf.as_mut_slice()?[..total].split_at_mut(s.desc_len);
        Ok((&mut desc[..desc_len], data))
    }

    /// Copies the staged input of `slot` to the device (one copy), sizes the output and the
    /// work buffers, and hands their addresses to `kernels`, which queues the op's
    /// launches on the slot's stream. Then queues the copy of `out_len` result bytes back
    /// and the done signal. Returns without waiting.
    pub fn launch(
        &mut self,
        slot: usize,
        data_len: usize,
        out_len: usize,
        cv_words: usize,
        kernels: impl FnOnce(&Functions, &Launch) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let ctx = self.ctx.clone();
        let s = &mut self.slots[slot];
        let in_len = s.desc_len + data_len;
        s.out_len = out_len;
        let stream = s.stream.clone();
        let dev_in = ptr_of(&stream, device(&stream, &mut s.dev_in, in_len.max(16))?);
        let dev_out = ptr_of(&stream, device(&stream, &mut s.dev_out, out_len.max(16))?);
        let cv_a = ptr_of(&stream, device(&stream, &mut s.cv_a, cv_words.max(8))?);
        let cv_b = ptr_of(&stream, device(&stream, &mut s.cv_b, cv_words.max(8))?);
        pinned(&ctx, &mut s.host_out, out_len.max(16), true)?;
        if in_len > 0 {
            let src = &s.host_in.as_ref().expect("staged").as_slice()?[..in_len];
            // SAFETY: dev_in holds at least in_len bytes; src is pinned and stays untouched
            // until the slot's done signal (the thread does not stage a busy slot).
            unsafe { cudarc::driver::result::memcpy_htod_async(dev_in, src, stream.cu_stream()) }?;
        }
        let launch = Launch {
            stream: &stream,
            desc: dev_in,
            data: dev_in + s.desc_len as u64,
            out: dev_out,
            cv_a,
            cv_b,
        };
        kernels(&self.functions, &launch)?;
        if out_len > 0 {
            let dst = &mut s.host_out.as_mut().expect("allocated").as_mut_slice()?[..out_len];
            // SAFETY: dev_out holds out_len bytes written by the kernels queued before; dst
            // is pinned and not read until the done signal.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, dev_out, stream.cu_stream()) }?;
        }
        s.event.record(&stream)?;
        let signal = &*s.signal as *const DoneSignal as *mut c_void;
        // SAFETY: the signal outlives every queued callback (Slot::drop synchronizes the
        // stream first); slot_done makes no CUDA call.
        unsafe { sys::cuLaunchHostFunc(stream.cu_stream(), Some(slot_done), signal) }.result()?;
        Ok(())
    }

    /// The result bytes of `slot`'s last batch; valid once the slot was reported done.
    pub fn output(&self, slot: usize) -> Result<&[u8], GpuError> {
        let s = &self.slots[slot];
        match &s.host_out {
            Some(h) => Ok(&h.as_slice()?[..s.out_len]),
            None => Ok(&[]),
        }
    }

    /// Whether `slot`'s batch has finished; an error if the device failed.
    pub fn finished(&self, slot: usize) -> Result<bool, GpuError> {
        Ok(self.slots[slot].event.try_is_complete()?)
    }

    /// Plain pinned copies of `len` bytes, `reps` times each way, for the benchmark's
    /// PCIe reference: returns (host->device, device->host) seconds per copy (medians).
    pub fn memcpy_reference(&mut self, len: usize, reps: usize) -> Result<(f64, f64), GpuError> {
        let (_, data) = self.stage(0, 0, len)?;
        data.fill(0x5a);
        let ctx = self.ctx.clone();
        let s = &mut self.slots[0];
        let stream = s.stream.clone();
        let dev = ptr_of(&stream, device(&stream, &mut s.dev_in, len)?);
        let out = pinned(&ctx, &mut s.host_out, len, true)?;
        let src = &s.host_in.as_ref().expect("staged").as_slice()?[..len];
        let mut h2d = Vec::new();
        let mut d2h = Vec::new();
        for _ in 0..reps {
            let t = std::time::Instant::now();
            // SAFETY: both buffers hold len bytes; synchronized before the next use.
            unsafe { cudarc::driver::result::memcpy_htod_async(dev, src, stream.cu_stream()) }?;
            stream.synchronize()?;
            h2d.push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            let dst = &mut out.as_mut_slice()?[..len];
            // SAFETY: as above.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, dev, stream.cu_stream()) }?;
            stream.synchronize()?;
            d2h.push(t.elapsed().as_secs_f64());
        }
        Ok((median(&mut h2d), median(&mut d2h)))
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Drop for Slot {
    fn drop(&mut self) {
        // No callback may run after its signal is freed. On a failed context this returns
        // at once with the error, and no callback runs any more.
        let _ = self.stream.synchronize();
    }
}

fn ptr_of<T>(stream: &Arc<CudaStream>, s: &CudaSlice<T>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
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
        let flags = if readable {
            0
        } else {
            cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
        };
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
