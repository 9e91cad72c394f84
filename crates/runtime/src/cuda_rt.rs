//! Plain copies through the CUDA runtime library: host<->device for the buffers a CUDA-graph
//! decode step reads and writes at fixed addresses, strided device<->device copies of KV cache
//! rows (the engine's prefix cache), copies of hidden states between the devices of a staged
//! model (peer to peer: `crate::stages`), and the device's free memory (the engine's KV pool
//! size).
//!
//! `ort`'s `Tensor::copy_into` copies by running a cached one-node Identity session, which
//! costs a session run per copy; a decode step copies its token ids, positions and mask in
//! and its result out, so that overhead lands on every token. `cudaMemcpy` is one driver
//! call. The library used is the one ONNX Runtime's CUDA provider already loaded into the
//! process (found with `RTLD_NOLOAD`, never loaded anew, so it cannot be another CUDA), and only
//! if it answers `cudaGetDeviceCount`; otherwise the caller falls back to `copy_into`.

use std::ffi::c_void;
use std::sync::OnceLock;

pub use crate::model_error::CudaError;

type Result<T> = std::result::Result<T, CudaError>;

const CUDA_MEMCPY_HOST_TO_DEVICE: i32 = 1;
const CUDA_MEMCPY_DEVICE_TO_HOST: i32 = 2;
const CUDA_MEMCPY_DEVICE_TO_DEVICE: i32 = 3;
/// The legacy default stream: ordered after everything earlier on the device's blocking streams.
/// Copies on it are waited for with [`CudaRuntime::synchronize`] before the next session run.
const DEFAULT_STREAM: *mut c_void = std::ptr::null_mut();

type MemcpyFn = unsafe extern "C" fn(*mut c_void, *const c_void, usize, i32) -> i32;
/// `cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream)`.
type Memcpy2dAsyncFn =
    unsafe extern "C" fn(*mut c_void, usize, *const c_void, usize, usize, usize, i32, *mut c_void) -> i32;
/// `cudaMemGetInfo(free, total)`.
type MemGetInfoFn = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
type SetDeviceFn = unsafe extern "C" fn(i32) -> i32;
type SynchronizeFn = unsafe extern "C" fn() -> i32;
type DeviceCountFn = unsafe extern "C" fn(*mut i32) -> i32;
/// `cudaMemcpyPeerAsync(dst, dst_device, src, src_device, count, stream)`.
type MemcpyPeerAsyncFn = unsafe extern "C" fn(*mut c_void, i32, *const c_void, i32, usize, *mut c_void) -> i32;
/// `cudaDeviceCanAccessPeer(can_access, device, peer)`.
type CanAccessPeerFn = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
/// `cudaDeviceEnablePeerAccess(peer, flags)` (for the current device).
type EnablePeerAccessFn = unsafe extern "C" fn(i32, u32) -> i32;
/// `cudaErrorPeerAccessAlreadyEnabled`.
const PEER_ACCESS_ALREADY_ENABLED: i32 = 704;

/// One strided copy: `height` runs of `width` bytes, `src_pitch` apart at `src` and
/// `dst_pitch` apart at `dst` (cudaMemcpy2D's arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy2d {
    pub dst: usize,
    pub dst_pitch: usize,
    pub src: usize,
    pub src_pitch: usize,
    pub width: usize,
    pub height: usize,
}

impl Copy2d {
    /// Copies on the host (both sides host memory).
    ///
    /// # Safety
    /// Both regions must be live host memory of this extent, and must not overlap.
    pub unsafe fn run_on_host(&self) {
        for row in 0..self.height {
            std::ptr::copy_nonoverlapping(
                (self.src + row * self.src_pitch) as *const u8,
                (self.dst + row * self.dst_pitch) as *mut u8,
                self.width,
            );
        }
    }
}

pub struct CudaRuntime {
    memcpy: MemcpyFn,
    memcpy_2d_async: Memcpy2dAsyncFn,
    mem_get_info: MemGetInfoFn,
    set_device: SetDeviceFn,
    synchronize: SynchronizeFn,
    memcpy_peer_async: MemcpyPeerAsyncFn,
    can_access_peer: CanAccessPeerFn,
    enable_peer_access: EnablePeerAccessFn,
    // Keeps the symbols above valid.
    _lib: libloading::Library,
}

/// Sonames looked for in order: CUDA 13 (the ONNX Runtime build we ship for), then 12.
const SONAMES: &[&str] = &["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

impl CudaRuntime {
    /// The CUDA runtime already in the process, or None (then ONNX Runtime copies instead).
    pub fn get() -> Option<&'static CudaRuntime> {
        static RT: OnceLock<Option<CudaRuntime>> = OnceLock::new();
        RT.get_or_init(|| {
            let found = SONAMES.iter().find_map(|name| Self::open(name).ok());
            if found.is_none() {
                tracing::debug!("no loaded libcudart ({SONAMES:?}); device copies go through ONNX Runtime");
            }
            found
        })
        .as_ref()
    }

    #[cfg(unix)]
    fn open(name: &str) -> Result<CudaRuntime> {
        let library = |e: libloading::Error| CudaError::Library { library: name.to_string(), source: Box::new(e) };
        use libloading::os::unix::{Library, RTLD_NOW};
        // Succeed only if the library is already loaded (Linux's and macOS's RTLD_NOLOAD).
        const RTLD_NOLOAD: i32 = if cfg!(target_os = "macos") { 0x10 } else { 0x4 };
        // SAFETY: with RTLD_NOLOAD nothing new is loaded and no initializer runs: this only adds
        // a reference to the CUDA runtime that ONNX Runtime's provider loaded.
        let lib: libloading::Library =
            unsafe { Library::open(Some(name), RTLD_NOW | RTLD_NOLOAD).map_err(library)? }.into();
        // SAFETY: the signatures are the CUDA runtime API's (cudaError_t is a C enum, i32).
        let (memcpy, memcpy_2d_async, mem_get_info, set_device, synchronize, device_count) = unsafe {
            (
                *lib.get::<MemcpyFn>(b"cudaMemcpy\0").map_err(library)?,
                *lib.get::<Memcpy2dAsyncFn>(b"cudaMemcpy2DAsync\0").map_err(library)?,
                *lib.get::<MemGetInfoFn>(b"cudaMemGetInfo\0").map_err(library)?,
                *lib.get::<SetDeviceFn>(b"cudaSetDevice\0").map_err(library)?,
                *lib.get::<SynchronizeFn>(b"cudaDeviceSynchronize\0").map_err(library)?,
                *lib.get::<DeviceCountFn>(b"cudaGetDeviceCount\0").map_err(library)?,
            )
        };
        // SAFETY: as above.
        let (memcpy_peer_async, can_access_peer, enable_peer_access) = unsafe {
            (
                *lib.get::<MemcpyPeerAsyncFn>(b"cudaMemcpyPeerAsync\0").map_err(library)?,
                *lib.get::<CanAccessPeerFn>(b"cudaDeviceCanAccessPeer\0").map_err(library)?,
                *lib.get::<EnablePeerAccessFn>(b"cudaDeviceEnablePeerAccess\0").map_err(library)?,
            )
        };
        let mut devices = 0;
        // SAFETY: writes one int.
        Self::check(unsafe { device_count(&mut devices) }, "cudaGetDeviceCount")?;
        Ok(CudaRuntime {
            memcpy,
            memcpy_2d_async,
            mem_get_info,
            set_device,
            synchronize,
            memcpy_peer_async,
            can_access_peer,
            enable_peer_access,
            _lib: lib,
        })
    }

    #[cfg(not(unix))]
    fn open(name: &str) -> Result<CudaRuntime> {
        Err(CudaError::Library {
            library: name.to_string(),
            source: "copies through the CUDA runtime are implemented on Unix only".into(),
        })
    }

    fn check(code: i32, call: &'static str) -> Result<()> {
        if code != 0 {
            return Err(CudaError::Call { call, code });
        }
        Ok(())
    }

    /// Copies `src` into device memory at `dst` (which must hold `size_of_val(src)` bytes).
    ///
    /// # Safety
    /// `dst` must be a device allocation of `device` at least as large as `src`.
    pub unsafe fn host_to_device<T: Copy>(&self, device: i32, dst: *mut c_void, src: &[T]) -> Result<()> {
        Self::check((self.set_device)(device), "cudaSetDevice")?;
        let bytes = std::mem::size_of_val(src);
        Self::check(
            (self.memcpy)(dst, src.as_ptr().cast(), bytes, CUDA_MEMCPY_HOST_TO_DEVICE),
            "cudaMemcpy to the device",
        )
    }

    /// Waits until every copy and kernel on `device` is done. A copy from pageable host memory
    /// may still be in flight when `cudaMemcpy` returns, and ONNX Runtime's stream does not
    /// wait for the legacy stream the copy ran on.
    pub fn synchronize(&self, device: i32) -> Result<()> {
        // SAFETY: plain CUDA runtime calls without pointers.
        unsafe {
            Self::check((self.set_device)(device), "cudaSetDevice")?;
            Self::check((self.synchronize)(), "cudaDeviceSynchronize")
        }
    }

    /// Free and total memory of `device`, bytes (`cudaMemGetInfo`).
    pub fn memory_info(&self, device: i32) -> Result<(usize, usize)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: selects a device and writes two size_t.
        unsafe {
            Self::check((self.set_device)(device), "cudaSetDevice")?;
            Self::check((self.mem_get_info)(&mut free, &mut total), "cudaMemGetInfo")?;
        }
        Ok((free, total))
    }

    /// Queues strided device-to-device copies on the legacy default stream (one
    /// `cudaMemcpy2DAsync` each); call [`synchronize`](Self::synchronize) before the memory is
    /// used by the next session run.
    ///
    /// # Safety
    /// Every copy's regions must be live device memory of `device` of that extent, and must
    /// not overlap.
    pub unsafe fn device_copies_2d(&self, device: i32, copies: &[Copy2d]) -> Result<()> {
        Self::check((self.set_device)(device), "cudaSetDevice")?;
        for c in copies {
            if c.width > c.dst_pitch || c.width > c.src_pitch {
                return Err(CudaError::Pitch { width: c.width, dst_pitch: c.dst_pitch, src_pitch: c.src_pitch });
            }
            Self::check(
                (self.memcpy_2d_async)(
                    c.dst as *mut c_void,
                    c.dst_pitch,
                    c.src as *const c_void,
                    c.src_pitch,
                    c.width,
                    c.height,
                    CUDA_MEMCPY_DEVICE_TO_DEVICE,
                    DEFAULT_STREAM,
                ),
                "cudaMemcpy2DAsync on the device",
            )?;
        }
        Ok(())
    }

    /// Lets `device` read and write `peer`'s memory directly (NVLink or PCIe peer to peer), so
    /// copies between them do not stage through the host. Returns whether the devices can; an
    /// earlier call having enabled it counts as success.
    pub fn enable_peer_access(&self, device: i32, peer: i32) -> Result<bool> {
        let mut can = 0;
        // SAFETY: plain CUDA runtime calls; writes one int.
        unsafe {
            Self::check((self.can_access_peer)(&mut can, device, peer), "cudaDeviceCanAccessPeer")?;
            if can == 0 {
                return Ok(false);
            }
            Self::check((self.set_device)(device), "cudaSetDevice")?;
            let code = (self.enable_peer_access)(peer, 0);
            if code != PEER_ACCESS_ALREADY_ENABLED {
                Self::check(code, "cudaDeviceEnablePeerAccess")?;
            }
        }
        Ok(true)
    }

    /// Queues a copy of `bytes` from `src` on `src_device` to `dst` on `dst_device` on the
    /// destination's legacy default stream: a peer copy between two GPUs, a plain device copy
    /// on one. Call [`synchronize`](Self::synchronize) on `dst_device` before the data is used.
    ///
    /// # Safety
    /// `src` and `dst` must be live device allocations of their devices of at least `bytes`,
    /// not overlapping.
    pub unsafe fn device_to_device(
        &self,
        dst_device: i32,
        dst: *mut c_void,
        src_device: i32,
        src: *const c_void,
        bytes: usize,
    ) -> Result<()> {
        Self::check((self.set_device)(dst_device), "cudaSetDevice")?;
        if dst_device == src_device {
            return Self::check(
                (self.memcpy_2d_async)(dst, bytes, src, bytes, bytes, 1, CUDA_MEMCPY_DEVICE_TO_DEVICE, DEFAULT_STREAM),
                "cudaMemcpy2DAsync on the device",
            );
        }
        Self::check(
            (self.memcpy_peer_async)(dst, dst_device, src, src_device, bytes, DEFAULT_STREAM),
            "cudaMemcpyPeerAsync",
        )
    }

    /// Copies device memory at `src` into `dst`. Synchronous: the data is there on return.
    ///
    /// # Safety
    /// `src` must be a device allocation of `device` at least as large as `dst`.
    pub unsafe fn device_to_host<T: Copy>(&self, device: i32, dst: &mut [T], src: *const c_void) -> Result<()> {
        Self::check((self.set_device)(device), "cudaSetDevice")?;
        let bytes = std::mem::size_of_val(dst);
        Self::check(
            (self.memcpy)(dst.as_mut_ptr().cast(), src, bytes, CUDA_MEMCPY_DEVICE_TO_HOST),
            "cudaMemcpy to the host",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cuda_runtime_that_is_not_loaded_is_not_loaded_anew() {
        // This process has not loaded libcudart (no GPU session here), so nothing is found,
        // even where a libcudart file exists on the loader path.
        let loaded = std::fs::read_to_string("/proc/self/maps").map(|m| m.contains("libcudart")).unwrap_or(false);
        if !loaded {
            assert!(CudaRuntime::get().is_none());
        }
    }
}
