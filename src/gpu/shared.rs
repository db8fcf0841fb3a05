//! Device memory shared by the worker processes of one nginx: one copy per GPU of what
//! every worker would otherwise upload (a knn index), whatever the number of workers.
//!
//! The memory is a CUDA VMM allocation (cuMemCreate) made exportable as a POSIX file
//! descriptor, mapped into each worker's own address space (cuMemAddressReserve, cuMemMap,
//! cuMemSetAccess). The descriptor travels between workers over Unix sockets
//! (`rendezvous`): per (device UUID, content key) one worker, elected by a lock file,
//! allocates and fills; the others import and map. Every holder serves the fd, and the
//! allocation lives while any process holds a handle, a mapping or the fd, so a worker's
//! death, a respawn or a reload (new workers import from old ones before these exit, when
//! the content is unchanged) loses nothing and uploads nothing again.
//!
//! Why VMM and not legacy CUDA IPC (cuIpcGetMemHandle): IPC handles can only be opened
//! while the exporting process lives and cannot be re-exported by an importer, so the
//! first owner's death would end the sharing; VMM fds are plain fds, held and passed on by
//! any process. Anything that fails here (no VMM or fd handles on the device or driver,
//! MPS refusing, no meeting directory) is a reason returned to the caller, which then
//! loads a copy of its own and says why in one line.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUmemGenericAllocationHandle};
use cudarc::driver::CudaContext;

use super::rendezvous::{Rendezvous, Server};
use super::GpuError;

/// The meeting directory of this process's nginx, set once by the worker at start.
static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Sets the meeting directory (in `init_process`, before the GPU thread starts).
pub fn set_dir(dir: PathBuf) {
    let _ = DIR.set(dir);
}

pub use super::rendezvous::Origin;

/// Whether this process shares (it is a worker of nginx: `set_dir` was called).
pub fn enabled() -> bool {
    DIR.get().is_some()
}

/// A shared allocation mapped in this process, and this process's server of its fd.
pub struct SharedRegion {
    ptr: u64,
    size: usize,
    handle: CUmemGenericAllocationHandle,
    server: Option<Server>,
    ctx: Arc<CudaContext>,
}

impl SharedRegion {
    /// The device address of its first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Its size in bytes (rounded up to the allocation granularity).
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // Stop serving first: nobody may import from a holder that is letting go.
        drop(self.server.take());
        let _ = self.ctx.bind_to_thread();
        // SAFETY: ptr/size are the reservation mapped in `map`, handle the allocation
        // created or imported there; each is released once, here. Work reading the region
        // was finished by the owner (the index) before dropping it.
        unsafe {
            let _ = sys::cuMemUnmap(self.ptr, self.size);
            let _ = sys::cuMemAddressFree(self.ptr, self.size);
            let _ = sys::cuMemRelease(self.handle);
        }
    }
}

fn check(r: sys::CUresult, what: &str) -> Result<(), String> {
    r.result().map_err(|e| {
        let e = GpuError::from_driver(e, what);
        e.to_string()
    })
}

/// The key of a region: device UUID and content key hashed to 32 hex digits.
pub fn key(uuid: &[u8; 16], content: &[u8; 32]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"ngx-gpu-share v1");
    h.update(uuid);
    h.update(content);
    h.finalize().to_hex()[..32].to_string()
}

/// The allocation's properties on `ctx`'s device, exportable as a POSIX fd.
fn props(ctx: &CudaContext) -> sys::CUmemAllocationProp {
    // SAFETY: CUmemAllocationProp is plain data, all zeros a valid (unset) value.
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    p.requestedHandleTypes =
        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = ctx.ordinal() as i32;
    p
}

/// Why this device or driver cannot share, if it cannot.
fn unsupported(ctx: &CudaContext) -> Option<String> {
    use CUdevice_attribute::*;
    for (attr, what) in [
        (
            CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED,
            "virtual memory management",
        ),
        (
            CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
            "POSIX fd handles",
        ),
    ] {
        match ctx.attribute(attr) {
            Ok(1) => {}
            Ok(_) => return Some(format!("the device or driver has no {what}")),
            Err(e) => return Some(GpuError::from_driver(e, what).to_string()),
        }
    }
    None
}

/// Maps `handle` (an allocation of `size` bytes) into a fresh reservation, readable and
/// writable by this device. Releases the handle on failure.
fn map(
    ctx: &Arc<CudaContext>,
    handle: CUmemGenericAllocationHandle,
    size: usize,
) -> Result<SharedRegion, String> {
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: reserves `size` bytes of this process's device address space; ptr is written.
    let r = unsafe { sys::cuMemAddressReserve(&mut ptr, size, 0, 0, 0) };
    if let Err(e) = check(r, "reserving addresses") {
        // SAFETY: the handle is ours and released once.
        unsafe { sys::cuMemRelease(handle) };
        return Err(e);
    }
    let region = SharedRegion {
        ptr,
        size,
        handle,
        server: None,
        ctx: ctx.clone(),
    };
    // SAFETY: maps the whole allocation at the start of the reservation (both `size`).
    // On failure `region`'s drop unmaps (a no-op error if never mapped), frees and releases.
    check(
        unsafe { sys::cuMemMap(ptr, size, 0, handle, 0) },
        "mapping the allocation",
    )?;
    let desc = sys::CUmemAccessDesc {
        location: props(ctx).location,
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: the range is the mapping just made; one access descriptor.
    check(
        unsafe { sys::cuMemSetAccess(ptr, size, &desc, 1) },
        "granting access",
    )?;
    Ok(region)
}

/// Imports the allocation behind `fd` and maps it.
fn import(ctx: &Arc<CudaContext>, fd: &OwnedFd, size: usize) -> Result<SharedRegion, String> {
    let mut handle: CUmemGenericAllocationHandle = 0;
    // SAFETY: for POSIX fd handles the OS handle is the fd's value passed as a pointer;
    // the fd stays open (ours) during the call; handle is written.
    let r = unsafe {
        sys::cuMemImportFromShareableHandle(
            &mut handle,
            fd.as_raw_fd() as isize as *mut std::ffi::c_void,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        )
    };
    check(r, "importing a shared allocation")?;
    map(ctx, handle, size)
}

/// Creates an exportable allocation of `size` bytes, maps it and exports its fd.
fn create(ctx: &Arc<CudaContext>, size: usize) -> Result<(SharedRegion, OwnedFd), String> {
    let prop = props(ctx);
    let mut handle: CUmemGenericAllocationHandle = 0;
    // SAFETY: prop is fully set for a pinned device allocation; handle is written.
    check(
        unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) },
        "allocating shared device memory",
    )?;
    let region = map(ctx, handle, size)?;
    let mut fd: std::ffi::c_int = -1;
    // SAFETY: for POSIX fd handles the driver writes an int (a new fd, ours) at the
    // pointer.
    check(
        unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut std::ffi::c_int).cast(),
                handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        },
        "exporting the allocation",
    )?;
    // SAFETY: the driver returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((region, fd))
}

/// A region of at least `bytes` bytes holding the content `content` (the caller's key of
/// what it stores, layout and precision included) on `ctx`'s device: imported from a live
/// holder, or allocated here and filled by `fill(device address)` (which must have
/// finished writing when it returns) while the key's lock keeps others waiting. The
/// region's fd is then served to others until the region is dropped. Blocks (GPU thread).
/// An `Err` is the reason sharing is not possible here; the caller loads its own copy.
pub fn obtain(
    ctx: &Arc<CudaContext>,
    content: &[u8; 32],
    bytes: usize,
    fill: impl FnOnce(u64) -> Result<(), GpuError>,
) -> Result<(SharedRegion, Origin), String> {
    let dir = DIR
        .get()
        .ok_or("no meeting directory (not a worker of nginx)")?;
    let rdv = Rendezvous::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    ctx.bind_to_thread()
        .map_err(|e| GpuError::from_driver(e, "binding the context").to_string())?;
    if let Some(why) = unsupported(ctx) {
        return Err(why);
    }
    let uuid = ctx
        .uuid()
        .map_err(|e| GpuError::from_driver(e, "asking the device's UUID").to_string())?;
    // SAFETY: CUuuid is 16 bytes of plain data.
    let uuid: [u8; 16] = unsafe { std::mem::transmute(uuid) };
    let key = key(&uuid, content);
    let prop = props(ctx);
    let mut gran = 0usize;
    // SAFETY: prop is set; gran is written.
    check(
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut gran,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
        },
        "asking the allocation granularity",
    )?;
    let size = bytes.max(1).div_ceil(gran.max(1)) * gran.max(1);
    let (mut region, server, origin) = rdv.obtain(
        &key,
        size as u64,
        |fd| import(ctx, fd, size),
        || {
            let (region, fd) = create(ctx, size)?;
            fill(region.ptr).map_err(|e| format!("filling the shared allocation: {e}"))?;
            Ok((region, fd))
        },
    )?;
    region.server = Some(server);
    Ok((region, origin))
}
