//! One worker's CUDA device: context, loaded kernels, and the pipeline slots that let
//! several batches be in flight at once.
//!
//! A slot is one stream with its own pinned staging buffers (write-combined in, plain out)
//! and device buffers, sized to what batches need (see `buffers.rs`) and reused batch after
//! batch. A batch on a slot is one host->device copy, the op's kernels, one device->host
//! copy and a host function that tells the GPU thread the slot is done (over a channel, so
//! the thread can wait for new jobs and finished slots at once). While the GPU works on one
//! slot the thread packs the next.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DeviceRepr, DriverError, LaunchConfig, PinnedHostSlice,
};
use cudarc::nvrtc::Ptx;

use super::buffers::Held;
use super::compile::{Compiled, Program};
use super::{no_panic, GpuError};
use crate::ops::{Layout, Target};

/// Batches in flight per worker.
pub const SLOTS: usize = 2;
pub const THREADS: u32 = 256;
/// Device buffers start at a multiple of this; the staged data follows the descriptors at it.
pub const DESC_ALIGN: usize = 256;

/// What the worker logs about its device at start.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
    /// Whether the driver shares this device's contexts through MPS
    /// (CU_DEVICE_ATTRIBUTE_MPS_ENABLED); None where the driver could not say.
    pub mps: Option<bool>,
}

impl DeviceInfo {
    /// `on`, `off`, or `unknown`, for the worker's start line.
    pub fn mps_text(&self) -> &'static str {
        match self.mps {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        }
    }
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

/// Memory a device holds for the worker's batches now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub pinned: usize,
    pub device: usize,
}

/// What the GPU thread needs of a device: the real one (`Gpu`), or in tests the one in
/// `fake.rs`. Opened on a thread of its own, then used by the GPU thread alone.
pub trait Device: Send {
    fn info(&self) -> &DeviceInfo;
    fn slots(&self) -> usize;
    /// Slot numbers whose batches are done, as the device reports them.
    fn done(&self) -> &Receiver<usize>;
    /// Makes `slot`'s input hold `desc_len` bytes of descriptors and `data_len` bytes of
    /// data, and returns both regions for the caller to fill.
    fn stage(
        &mut self,
        slot: usize,
        desc_len: usize,
        data_len: usize,
    ) -> Result<(&mut [u8], &mut [u8]), GpuError>;
    /// Queues the staged batch on `slot`: the input copy, the op's kernels (`run`, given
    /// the slot's buffers sized to `layout`), the output copy and the done signal. Returns
    /// without waiting.
    fn launch(
        &mut self,
        slot: usize,
        layout: &Layout,
        run: &mut dyn FnMut(Target) -> Result<(), GpuError>,
    ) -> Result<(), GpuError>;
    /// Whether `slot`'s batch has finished; an error if the device failed.
    fn finished(&self, slot: usize) -> Result<bool, GpuError>;
    /// The result bytes of `slot`'s last batch; valid once it finished.
    fn output(&self, slot: usize) -> Result<&[u8], GpuError>;
    /// Frees `slot`'s buffers that were larger than needed since the last trim (the slot
    /// is idle); returns the bytes freed.
    fn trim(&mut self, slot: usize) -> usize;
    fn memory(&self) -> Memory;
    /// Waits for every slot's queued work (before the ops' modules may go).
    fn quiesce(&self);
    /// How the ops load their kernels and device memory on this device.
    fn loader<'a>(&'a self, compiled: &'a Compiled) -> Loader<'a>;
    /// Gives the device up without waiting for it: a hung kernel never finishes, and a
    /// failed context need not be cleaned up by a process that is about to be replaced.
    /// Everything is leaked.
    fn abandon(self: Box<Self>);
    /// Queues a real fault (an illegal address, a kernel that never ends) on `slot`'s
    /// stream, ahead of its next batch.
    #[cfg(any(test, feature = "fault-injection"))]
    fn inject(&mut self, slot: usize, fault: crate::faults::KernelFault) -> Result<(), GpuError>;
}

/// How an op loads what it needs when a worker's device opens: its kernels from the
/// configuration's PTX (each program's module loaded once), and device memory of its own.
/// The test device has no CUDA: ops run their CPU version of the batch there, or decline.
pub enum Loader<'a> {
    Device(DeviceLoader<'a>),
    Host,
}

pub struct DeviceLoader<'a> {
    pub ctx: &'a Arc<CudaContext>,
    compiled: &'a Compiled,
    modules: HashMap<u64, Arc<CudaModule>>,
    /// Lines for the worker's log (notice level) from the ops' loads: how each shared
    /// region was come by, or why a copy of its own was loaded.
    pub notes: Vec<String>,
}

impl DeviceLoader<'_> {
    /// Kernel `name` of `program`.
    pub fn function(&mut self, program: &Program, name: &str) -> Result<CudaFunction, GpuError> {
        let module = match self.modules.get(&program.key) {
            Some(m) => m.clone(),
            None => {
                let ptx = self.compiled.ptx(program).ok_or_else(|| {
                    GpuError::Unavailable(format!("{} was not compiled", program.name))
                })?;
                let m = self
                    .ctx
                    .load_module(Ptx::from_src(ptx.as_ref()))
                    .map_err(|e| GpuError::opening(e, &format!("loading {}", program.name)))?;
                self.modules.insert(program.key, m.clone());
                m
            }
        };
        module
            .load_function(name)
            .map_err(|e| GpuError::opening(e, &format!("kernel \"{name}\" of {}", program.name)))
    }
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

struct Slot {
    stream: Arc<CudaStream>,
    event: CudaEvent,
    /// Pinned host input: descriptors, then the packed bodies. Write-combined: fast to
    /// fill and to copy to the device.
    host_in: HostBuf,
    /// Pinned host output, without write-combining so the CPU reads it fast.
    host_out: HostBuf,
    dev_in: Held<CudaSlice<u8>>,
    dev_out: Held<CudaSlice<u8>>,
    /// The op's scratch buffers for a batch (`Layout::scratch`).
    scratch: Vec<Held<CudaSlice<u8>>>,
    signal: Box<DoneSignal>,
    /// Bytes of descriptors before the data in `host_in`/`dev_in` for the staged batch.
    desc_len: usize,
    /// Bytes the batch's result takes in `host_out`.
    out_len: usize,
}

impl Slot {
    fn pinned(&self) -> usize {
        self.host_in.held.capacity() + self.host_out.held.capacity()
    }

    fn device(&self) -> usize {
        self.dev_in.capacity()
            + self.dev_out.capacity()
            + self.scratch.iter().map(Held::capacity).sum::<usize>()
    }
}

/// Device addresses of one launch's buffers, for the op's kernels.
pub struct Launch<'a> {
    pub stream: &'a Arc<CudaStream>,
    /// The descriptors (at the start of the device input buffer).
    pub desc: u64,
    /// The packed data (after the descriptors).
    pub data: u64,
    pub out: u64,
    /// The op's scratch buffers, as `Layout::scratch` asked.
    pub scratch: Vec<u64>,
    /// The staged (pinned) input, for ops that copy part of it elsewhere too.
    host_in: &'a [u8],
}

impl Launch<'_> {
    /// Queues a copy of staged input bytes `from` (offsets into the descriptors and data,
    /// as staged) to device address `to`, on this launch's stream.
    pub fn copy_in(&self, to: u64, from: std::ops::Range<usize>) -> Result<(), GpuError> {
        let src = &self.host_in[from];
        // SAFETY: the caller's `to` addresses one of this launch's buffers with room for
        // src; the staging stays untouched until the slot's done signal.
        unsafe { cudarc::driver::result::memcpy_htod_async(to, src, self.stream.cu_stream()) }
            .map_err(|e| GpuError::from_driver(e, "copying descriptors"))
    }
}

/// Kernels that fail on purpose, for the fault-injection build.
#[cfg(any(test, feature = "fault-injection"))]
struct FaultKernels {
    illegal_address: CudaFunction,
    hang: CudaFunction,
    flag: CudaSlice<u32>,
}

pub struct Gpu {
    // Fields drop in order, after Drop::drop has waited for every stream: the slots
    // (streams, buffers, the callbacks' signals), then the kernels' module, then the
    // context. A module must not be unloaded while a stream may still run its kernels.
    slots: Vec<Slot>,
    #[cfg(any(test, feature = "fault-injection"))]
    faults: Option<FaultKernels>,
    pub info: DeviceInfo,
    done: Receiver<usize>,
    /// `gpu_pinned_limit`: the most pinned host memory the slots may hold together.
    pinned_limit: usize,
    ctx: Arc<CudaContext>,
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

impl From<DriverError> for GpuError {
    /// For an op's launches: the driver's error while queueing its kernels.
    fn from(e: DriverError) -> Self {
        GpuError::from_driver(e, "launching a kernel")
    }
}

impl Gpu {
    /// How many devices CUDA shows this process (`CUDA_VISIBLE_DEVICES` applied): 0 or
    /// more, or why CUDA cannot be asked. Initializes CUDA in this process. Never panics.
    pub fn visible() -> Result<usize, GpuError> {
        let counted = no_panic("CUDA initialization", || {
            // SAFETY: only tries dlopen on candidate names.
            if !unsafe { sys::is_culib_present() } {
                return Ok(Err(GpuError::Unavailable(
                    "libcuda.so not found (no NVIDIA driver visible)".into(),
                )));
            }
            Ok(CudaContext::device_count()
                .map(|n| n.max(0) as usize)
                .map_err(|e| GpuError::opening(e, "cuInit")))
        });
        counted.unwrap_or_else(|panic| Err(GpuError::Unavailable(panic)))
    }

    /// Opens device `ordinal` (as `CUDA_VISIBLE_DEVICES` numbers them): context and
    /// streams; the ops load their kernels through `Device::loader`. `faults` is the
    /// fault-injection program (test and fault-injection builds). Never panics.
    pub fn open(
        ordinal: usize,
        pinned_limit: usize,
        faults: Option<(&Program, &Compiled)>,
    ) -> Result<Gpu, GpuError> {
        let opened = no_panic("CUDA initialization", || {
            Ok(Self::open_inner(ordinal, pinned_limit, faults))
        });
        opened.unwrap_or_else(|panic| Err(GpuError::Unavailable(panic)))
    }

    #[cfg_attr(not(any(test, feature = "fault-injection")), allow(unused_variables))]
    fn open_inner(
        ordinal: usize,
        pinned_limit: usize,
        faults: Option<(&Program, &Compiled)>,
    ) -> Result<Gpu, GpuError> {
        let count = Self::visible()?;
        if count == 0 {
            return Err(GpuError::Unavailable("no CUDA device visible".into()));
        }
        if ordinal >= count {
            return Err(GpuError::Unavailable(format!(
                "there is no gpu{ordinal}: CUDA shows {count} device(s)"
            )));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| GpuError::opening(e, "creating a context"))?;
        ctx.set_blocking_synchronize()
            .map_err(|e| GpuError::opening(e, "setting context flags"))?;
        // Each slot's buffers are used only on its own stream, ordered explicitly:
        // cudarc's per-buffer events are not needed.
        // SAFETY: see above.
        unsafe { ctx.disable_event_tracking() };
        let query = |e| GpuError::opening(e, "querying the device");
        // Asked of the driver once the context exists: whether this context is one that
        // MPS shares. A driver too old to know the attribute leaves it unknown.
        let mps = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MPS_ENABLED)
            .ok()
            .map(|v| v != 0);
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(query)?,
            compute_capability: ctx.compute_capability().map_err(query)?,
            total_mem: ctx.total_mem().map_err(query)?,
            mps,
        };
        #[cfg(any(test, feature = "fault-injection"))]
        let faults = match faults {
            Some((program, compiled)) => {
                let mut loader = DeviceLoader {
                    ctx: &ctx,
                    compiled,
                    modules: HashMap::new(),
                    notes: Vec::new(),
                };
                Some(FaultKernels {
                    illegal_address: loader.function(program, "ngx_gpu_fault_illegal_address")?,
                    hang: loader.function(program, "ngx_gpu_fault_hang")?,
                    flag: ctx
                        .default_stream()
                        .alloc_zeros::<u32>(1)
                        .map_err(|e| GpuError::opening(e, "allocating"))?,
                })
            }
            None => None,
        };
        let (tx, done) = unbounded();
        let mut slots = Vec::with_capacity(SLOTS);
        for slot in 0..SLOTS {
            slots.push(Slot {
                stream: ctx
                    .new_stream()
                    .map_err(|e| GpuError::opening(e, "creating a stream"))?,
                event: ctx
                    .new_event(None)
                    .map_err(|e| GpuError::opening(e, "creating an event"))?,
                host_in: HostBuf::default(),
                host_out: HostBuf::default(),
                dev_in: Held::default(),
                dev_out: Held::default(),
                scratch: Vec::new(),
                signal: Box::new(DoneSignal {
                    tx: tx.clone(),
                    slot,
                }),
                desc_len: 0,
                out_len: 0,
            });
        }
        Ok(Gpu {
            slots,
            #[cfg(any(test, feature = "fault-injection"))]
            faults,
            info,
            done,
            pinned_limit,
            ctx,
        })
    }

    /// Pinned bytes that may still be allocated under the limit.
    fn pinned_budget(&self) -> usize {
        let held: usize = self.slots.iter().map(Slot::pinned).sum();
        self.pinned_limit.saturating_sub(held)
    }

    /// Plain pinned copies of `len` bytes, `reps` times each way, for the benchmark's
    /// PCIe reference: returns (host->device, device->host) seconds per copy (medians).
    pub fn memcpy_reference(&mut self, len: usize, reps: usize) -> Result<(f64, f64), GpuError> {
        let (_, data) = self.stage(0, 0, len)?;
        data.fill(0x5a);
        let ctx = self.ctx.clone();
        let budget = self.pinned_budget();
        let s = &mut self.slots[0];
        let stream = s.stream.clone();
        let d = |e| GpuError::from_driver(e, "copying");
        let dev = ptr_of(&stream, device(&stream, &mut s.dev_in, len)?);
        s.host_out.ensure(&ctx, len, true, budget)?;
        let src = s.host_in.bytes(len);
        let out = &mut s.host_out;
        let mut h2d = Vec::new();
        let mut d2h = Vec::new();
        for _ in 0..reps {
            let t = std::time::Instant::now();
            // SAFETY: both buffers hold len bytes; synchronized before the next use.
            unsafe { cudarc::driver::result::memcpy_htod_async(dev, src, stream.cu_stream()) }
                .map_err(d)?;
            stream.synchronize().map_err(d)?;
            h2d.push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            let dst = out.bytes_mut(len);
            // SAFETY: as above.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, dev, stream.cu_stream()) }
                .map_err(d)?;
            stream.synchronize().map_err(d)?;
            d2h.push(t.elapsed().as_secs_f64());
        }
        Ok((median(&mut h2d), median(&mut d2h)))
    }
}

impl Device for Gpu {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn done(&self) -> &Receiver<usize> {
        &self.done
    }

    fn stage(
        &mut self,
        slot: usize,
        desc_len: usize,
        data_len: usize,
    ) -> Result<(&mut [u8], &mut [u8]), GpuError> {
        let ctx = self.ctx.clone();
        // The slot's calls that follow are the driver's own, on this thread.
        ctx.bind_to_thread()
            .map_err(|e| GpuError::from_driver(e, "staging"))?;
        let budget = self.pinned_budget();
        let s = &mut self.slots[slot];
        s.desc_len = align_desc(desc_len);
        let total = s.desc_len + data_len;
        s.host_in.ensure(&ctx, total, false, budget)?;
        let (desc, data) = s.host_in.bytes_mut(total).split_at_mut(s.desc_len);
        Ok((&mut desc[..desc_len], data))
    }

    fn launch(
        &mut self,
        slot: usize,
        layout: &Layout,
        run: &mut dyn FnMut(Target) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let ctx = self.ctx.clone();
        let budget = self.pinned_budget();
        let out_len = layout.out_len;
        let s = &mut self.slots[slot];
        let in_len = s.desc_len + layout.data_len;
        s.out_len = out_len;
        let stream = s.stream.clone();
        let dev_in = ptr_of(&stream, device(&stream, &mut s.dev_in, in_len.max(16))?);
        let dev_out = ptr_of(&stream, device(&stream, &mut s.dev_out, out_len.max(16))?);
        if s.scratch.len() < layout.scratch.len() {
            s.scratch.resize_with(layout.scratch.len(), Held::default);
        }
        let mut scratch = Vec::with_capacity(layout.scratch.len());
        for (held, &bytes) in s.scratch.iter_mut().zip(&layout.scratch) {
            scratch.push(ptr_of(&stream, device(&stream, held, bytes.max(32))?));
        }
        s.host_out.ensure(&ctx, out_len.max(16), true, budget)?;
        let d = |what: &'static str| move |e| GpuError::from_driver(e, what);
        let staged = s.host_in.bytes(in_len);
        if in_len > 0 {
            // SAFETY: dev_in holds at least in_len bytes; the staging is pinned and stays
            // untouched until the slot's done signal (the thread does not stage a busy slot).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dev_in, staged, stream.cu_stream())
            }
            .map_err(d("copying the batch in"))?;
        }
        let launch = Launch {
            stream: &stream,
            desc: dev_in,
            data: dev_in + s.desc_len as u64,
            out: dev_out,
            scratch,
            host_in: staged,
        };
        run(Target::Device(&launch))?;
        if out_len > 0 {
            let dst = s.host_out.bytes_mut(out_len);
            // SAFETY: dev_out holds out_len bytes written by the kernels queued before; dst
            // is pinned and not read until the done signal.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, dev_out, stream.cu_stream()) }
                .map_err(d("copying the results out"))?;
        }
        s.event.record(&stream).map_err(d("recording an event"))?;
        let signal = &*s.signal as *const DoneSignal as *mut c_void;
        // SAFETY: the signal outlives every queued callback (Gpu::drop waits for the
        // streams first, and an abandoned Gpu is never freed); slot_done makes no CUDA call.
        unsafe { sys::cuLaunchHostFunc(stream.cu_stream(), Some(slot_done), signal) }
            .result()
            .map_err(d("queueing the done callback"))?;
        Ok(())
    }

    fn finished(&self, slot: usize) -> Result<bool, GpuError> {
        self.slots[slot]
            .event
            .try_is_complete()
            .map_err(|e| GpuError::from_driver(e, "waiting for a batch"))
    }

    fn output(&self, slot: usize) -> Result<&[u8], GpuError> {
        let s = &self.slots[slot];
        Ok(s.host_out.bytes(s.out_len))
    }

    fn trim(&mut self, slot: usize) -> usize {
        let s = &mut self.slots[slot];
        s.host_in.trim()
            + s.host_out.trim()
            + s.dev_in.trim()
            + s.dev_out.trim()
            + s.scratch.iter_mut().map(Held::trim).sum::<usize>()
    }

    fn memory(&self) -> Memory {
        Memory {
            pinned: self.slots.iter().map(Slot::pinned).sum(),
            device: self.slots.iter().map(Slot::device).sum(),
        }
    }

    fn quiesce(&self) {
        for s in &self.slots {
            let _ = s.stream.synchronize();
        }
    }

    fn loader<'a>(&'a self, compiled: &'a Compiled) -> Loader<'a> {
        Loader::Device(DeviceLoader {
            ctx: &self.ctx,
            compiled,
            modules: HashMap::new(),
            notes: Vec::new(),
        })
    }

    fn abandon(self: Box<Self>) {
        std::mem::forget(self);
    }

    #[cfg(any(test, feature = "fault-injection"))]
    fn inject(&mut self, slot: usize, fault: crate::faults::KernelFault) -> Result<(), GpuError> {
        use cudarc::driver::PushKernelArg;
        let Some(k) = &self.faults else {
            return Err(GpuError::BadLaunch(
                "injecting a fault: the module was built without fault kernels".into(),
            ));
        };
        let stream = &self.slots[slot].stream;
        let flag = ptr_of(stream, &k.flag);
        let f = match fault {
            crate::faults::KernelFault::IllegalAddress => &k.illegal_address,
            crate::faults::KernelFault::Hang => &k.hang,
        };
        let mut launch = stream.launch_builder(f);
        launch.arg(&flag);
        // SAFETY: both fault kernels take one u32 pointer (a zeroed device word).
        unsafe { launch.launch(launch_config(1)) }?;
        Ok(())
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // No callback may run after its signal is freed, and no kernel after its module is
        // unloaded: wait for every stream before any field goes. On a failed context this
        // returns at once with the error, and no callback runs any more. (A hung stream is
        // never dropped: the GPU thread abandons it.)
        self.quiesce();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ptr_of<T>(stream: &Arc<CudaStream>, s: &CudaSlice<T>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

fn device<'a, T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    held: &'a mut Held<CudaSlice<T>>,
    bytes: usize,
) -> Result<&'a mut CudaSlice<T>, GpuError> {
    held.ensure(
        bytes,
        None,
        |_| unreachable!("device buffers have no budget"),
        |cap| {
            // SAFETY: the contents are always written before they are read.
            unsafe { stream.alloc::<T>(cap / size_of::<T>()) }
                .map_err(|e| GpuError::from_driver(e, "allocating device memory"))
        },
    )
}

/// A slot's pinned host buffer, and its address, taken once when it is allocated.
/// `PinnedHostSlice`'s accessors synchronize on an event of its own at every access (two
/// driver calls each, four per batch), for copies cudarc orders itself; this module orders
/// a slot's work itself (nothing touches a busy slot's buffers), so it skips them.
#[derive(Default)]
struct HostBuf {
    held: Held<PinnedHostSlice<u8>>,
    /// The buffer's address (0: none), valid while `held` holds it.
    addr: usize,
}

impl HostBuf {
    /// Makes room for `len` bytes (see `pinned`).
    fn ensure(
        &mut self,
        ctx: &Arc<CudaContext>,
        len: usize,
        readable: bool,
        budget: usize,
    ) -> Result<(), GpuError> {
        // Always through `Held::ensure`, which notes the need for trimming; the address
        // is taken anew only when it allocated.
        let fresh = self.addr == 0 || self.held.capacity() < len;
        if fresh {
            self.addr = 0;
        }
        let buf = pinned(ctx, &mut self.held, len, readable, budget)?;
        if fresh {
            self.addr = buf
                .as_mut_ptr()
                .map_err(|e| GpuError::from_driver(e, "staging"))? as usize;
        }
        Ok(())
    }

    /// The buffer's first `len` bytes (none where nothing was allocated and none asked).
    fn bytes(&self, len: usize) -> &[u8] {
        if len == 0 {
            return &[];
        }
        assert!(self.addr != 0 && len <= self.held.capacity());
        // SAFETY: addr is the start of the pinned allocation `held` owns, of at least len
        // bytes (checked above); `&self` keeps it from being freed or written meanwhile.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, len) }
    }

    fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        if len == 0 {
            return &mut [];
        }
        assert!(self.addr != 0 && len <= self.held.capacity());
        // SAFETY: as in `bytes`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, len) }
    }

    fn trim(&mut self) -> usize {
        let freed = self.held.trim();
        if self.held.buf.is_none() {
            self.addr = 0;
        }
        freed
    }
}

fn pinned<'a>(
    ctx: &Arc<CudaContext>,
    held: &'a mut Held<PinnedHostSlice<u8>>,
    len: usize,
    readable: bool,
    budget: usize,
) -> Result<&'a mut PinnedHostSlice<u8>, GpuError> {
    held.ensure(
        len,
        Some(budget),
        |cap| {
            GpuError::OutOfMemory(format!(
                "staging a batch: {} MiB more pinned memory would pass gpu_pinned_limit",
                cap >> 20
            ))
        },
        |cap| {
            // Write-combined memory is fast to fill and to copy to the device, but very slow
            // for the CPU to read: the output buffer is allocated without it.
            let flags = if readable {
                0
            } else {
                sys::CU_MEMHOSTALLOC_WRITECOMBINED
            };
            // SAFETY: the contents are always written before they are read.
            unsafe { ctx.alloc_pinned_with_flags::<u8>(cap, flags) }
                .map_err(|e| GpuError::from_driver(e, "allocating pinned memory"))
        },
    )
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
