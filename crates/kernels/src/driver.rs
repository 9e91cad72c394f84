//! The CUDA driver API (through `cudarc`, loaded at run time): the device's primary context
//! (the one the CUDA runtime, and so ONNX Runtime, uses), compiled modules loaded into it once per
//! process, and kernel launches on a given stream. Device buffers, events and a stream for the
//! GPU check live here too.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};

use crate::error::{KernelError, Result};
use crate::nvrtc::Nvrtc;
use crate::source::KernelSet;

pub use sys::CUstream as Stream;

pub(crate) fn check(call: &'static str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Driver { call, code: format!("{r:?}") })
    }
}

/// Loads the driver library and initializes it once.
fn driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let r = INIT.get_or_init(|| {
        // SAFETY: only reports whether one of cudarc's names for libcuda loads.
        if !unsafe { sys::is_culib_present() } {
            return Err(String::new());
        }
        // SAFETY: cuInit has no preconditions.
        check("cuInit", unsafe { sys::cuInit(0) }).map_err(|e| e.to_string())
    });
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.is_empty() => Err(KernelError::NoDriver),
        Err(e) => Err(KernelError::Driver { call: "cuInit", code: e.clone() }),
    }
}

/// One GPU: its primary context (retained for the process's life) and the modules loaded in it.
pub struct Device {
    pub ordinal: i32,
    context: sys::CUcontext,
    /// Compute capability as `major * 10 + minor` (90 for H100 / H200).
    pub arch: i32,
    pub name: String,
    pub sm_count: i32,
    modules: Mutex<HashMap<KernelSet, Arc<Module>>>,
}

// SAFETY: CUDA contexts and modules may be used from any thread.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

fn attribute(dev: sys::CUdevice, a: CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    // SAFETY: writes one int.
    check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) })?;
    Ok(v)
}

impl Device {
    /// Device `ordinal` (as the CUDA execution provider numbers them), opened once per process.
    pub fn get(ordinal: i32) -> Result<&'static Device> {
        static DEVICES: OnceLock<Mutex<HashMap<i32, &'static Device>>> = OnceLock::new();
        let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d);
        }
        let device: &'static Device = Box::leak(Box::new(Self::open(ordinal)?));
        map.insert(ordinal, device);
        Ok(device)
    }

    fn open(ordinal: i32) -> Result<Device> {
        driver()?;
        let mut dev = 0;
        // SAFETY: plain driver queries writing to locals.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal) })?;
        let major = attribute(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attribute(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attribute(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let mut name = [0 as std::ffi::c_char; 256];
        check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 256, dev) })?;
        // SAFETY: NUL-terminated by the driver.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        let mut context = std::ptr::null_mut();
        check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut context, dev) })?;
        if major < 8 {
            return Err(KernelError::UnsupportedArch {
                version: "the kernels (mma.sync bf16/f16, sm_80+)".into(),
                arch: format!("sm_{major}{minor} ({name})"),
                supported: "sm_80 and newer".into(),
            });
        }
        Ok(Device { ordinal, context, arch: major * 10 + minor, name, sm_count, modules: Mutex::new(HashMap::new()) })
    }

    /// Runs `f` with this device's primary context current on the calling thread.
    pub fn with_context<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: push/pop of a retained context.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(self.context) })?;
        let out = f();
        let mut popped = std::ptr::null_mut();
        check("cuCtxPopCurrent", unsafe { sys::cuCtxPopCurrent_v2(&mut popped) })?;
        out
    }

    /// Makes the primary context current if it is not (ONNX Runtime's compute thread normally has
    /// it current already; the check is a thread-local read).
    pub fn make_current(&self) -> Result<()> {
        let mut current = std::ptr::null_mut();
        // SAFETY: reads the calling thread's current context.
        check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut current) })?;
        if current != self.context {
            check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.context) })?;
        }
        Ok(())
    }

    /// The module of `set`, compiled for this device (or taken from the disk cache) and loaded
    /// on first use.
    pub fn module(&self, set: KernelSet) -> Result<Arc<Module>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(&set) {
            return Ok(m.clone());
        }
        let cubin = Nvrtc::get()?.cubin(&set.name(), &set.source_to_compile()?, self.arch)?;
        let module = Arc::new(self.with_context(|| Module::load(&cubin, &set.kernel_names()))?);
        modules.insert(set, module.clone());
        Ok(module)
    }
}

/// A loaded module and its kernels.
pub struct Module {
    // Kept loaded for the process's life (sessions come and go; the code is small).
    _module: sys::CUmodule,
    functions: HashMap<String, Function>,
}

// SAFETY: module and function handles may be used from any thread.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// A kernel of a loaded module.
#[derive(Clone, Copy, Debug)]
pub struct Function(sys::CUfunction);

// SAFETY: a function handle is an immutable driver object.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

impl Module {
    fn load(cubin: &[u8], names: &[String]) -> Result<Module> {
        let mut module = std::ptr::null_mut();
        // SAFETY: `cubin` is a complete ELF image (NVRTC's output); the driver copies it.
        check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut module, cubin.as_ptr().cast()) })?;
        let mut functions = HashMap::new();
        for name in names {
            let c = CString::new(name.as_str()).map_err(|_| KernelError::MissingKernel { name: name.clone() })?;
            let mut f = std::ptr::null_mut();
            // SAFETY: looks a symbol up in the module loaded above.
            check("cuModuleGetFunction", unsafe { sys::cuModuleGetFunction(&mut f, module, c.as_ptr()) })
                .map_err(|_| KernelError::MissingKernel { name: name.clone() })?;
            functions.insert(name.clone(), Function(f));
        }
        Ok(Module { _module: module, functions })
    }

    pub fn function(&self, name: &str) -> Result<Function> {
        self.functions.get(name).copied().ok_or_else(|| KernelError::MissingKernel { name: name.to_string() })
    }
}

/// Grid and block of a launch.
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: (u32, u32),
    pub block: u32,
    pub shared_bytes: u32,
}

/// Launches `f` on `stream` with one by-value argument struct (`#[repr(C)]`, the kernel's
/// parameter). Asynchronous; never synchronizes (safe inside a CUDA-graph capture).
///
/// # Safety
/// `args` must match the kernel's parameter layout, and every device pointer in it must be valid
/// for the kernel's accesses until the launch has run.
pub unsafe fn launch<A>(f: Function, config: LaunchConfig, stream: Stream, args: &A) -> Result<()> {
    let mut params = [args as *const A as *mut c_void];
    launch_raw(f, config, stream, &mut params)
}

/// Like [`launch`] with one pointer per kernel parameter.
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_raw(f: Function, config: LaunchConfig, stream: Stream, params: &mut [*mut c_void]) -> Result<()> {
    let (gx, gy) = config.grid;
    check(
        "cuLaunchKernel",
        sys::cuLaunchKernel(
            f.0,
            gx,
            gy,
            1,
            config.block,
            1,
            1,
            config.shared_bytes,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        ),
    )
}

/// A device allocation of the GPU check (freed on drop; the context must be current).
pub struct DeviceBuffer {
    pub ptr: u64,
    pub bytes: usize,
}

impl DeviceBuffer {
    pub fn new(bytes: usize) -> Result<DeviceBuffer> {
        let mut ptr = 0;
        // SAFETY: allocates in the current context.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) })?;
        Ok(DeviceBuffer { ptr, bytes })
    }

    pub fn from_host<T: Copy>(data: &[T]) -> Result<DeviceBuffer> {
        let b = DeviceBuffer::new(std::mem::size_of_val(data))?;
        // SAFETY: copies exactly the allocation's size from a live slice.
        check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(b.ptr, data.as_ptr().cast(), b.bytes) })?;
        Ok(b)
    }

    pub fn to_host<T: Copy + Default>(&self) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.bytes / std::mem::size_of::<T>()];
        // SAFETY: copies at most the allocation's size into a live buffer (synchronous).
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr, out.len() * std::mem::size_of::<T>())
        })?;
        Ok(out)
    }

    pub fn zero(&self) -> Result<()> {
        // SAFETY: within the allocation.
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(self.ptr, 0, self.bytes) })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: freed once; errors at teardown are ignored.
        unsafe {
            let _ = sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// Copies `len` elements at device address `src` to the host (synchronous).
///
/// # Safety
/// `src` must be device memory of the current context holding `len` elements of `T`.
pub unsafe fn copy_to_host<T: Copy + Default>(src: u64, len: usize) -> Result<Vec<T>> {
    let mut out = vec![T::default(); len];
    check("cuMemcpyDtoH", sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), src, len * std::mem::size_of::<T>()))?;
    Ok(out)
}

/// Copies `src` to device address `dst` (synchronous).
///
/// # Safety
/// `dst` must be device memory of the current context holding `src.len()` bytes.
pub unsafe fn copy_to_device(dst: u64, src: &[u8]) -> Result<()> {
    check("cuMemcpyHtoD", sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()))
}

/// Waits for all work of the current context.
pub fn synchronize() -> Result<()> {
    // SAFETY: no arguments.
    check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
}

/// The installed driver's CUDA version (13000 for 13.0).
pub fn driver_version() -> Result<i32> {
    driver()?;
    let mut v = 0;
    // SAFETY: writes one int.
    check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut v) })?;
    Ok(v)
}

/// GPU time of `f`'s launches on `stream`, in milliseconds (events around it).
pub fn time_ms(stream: &OwnedStream, f: impl FnOnce() -> Result<()>) -> Result<f32> {
    let stream = stream.0;
    let (mut start, mut end) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: events created, recorded on `stream`, waited on and destroyed here.
    unsafe {
        check("cuEventCreate", sys::cuEventCreate(&mut start, 0))?;
        check("cuEventCreate", sys::cuEventCreate(&mut end, 0))?;
        check("cuEventRecord", sys::cuEventRecord(start, stream))?;
        let r = f();
        check("cuEventRecord", sys::cuEventRecord(end, stream))?;
        check("cuEventSynchronize", sys::cuEventSynchronize(end))?;
        let mut ms = 0f32;
        check("cuEventElapsedTime", sys::cuEventElapsedTime_v2(&mut ms, start, end))?;
        let _ = sys::cuEventDestroy_v2(start);
        let _ = sys::cuEventDestroy_v2(end);
        r.map(|()| ms)
    }
}

/// A stream of the GPU check (destroyed on drop).
pub struct OwnedStream(pub Stream);

impl OwnedStream {
    pub fn new() -> Result<OwnedStream> {
        let mut s = std::ptr::null_mut();
        // SAFETY: creates a non-blocking stream in the current context.
        check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, 1) })?;
        Ok(OwnedStream(s))
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        // SAFETY: destroyed once.
        unsafe {
            let _ = sys::cuStreamDestroy_v2(self.0);
        }
    }
}

/// Mean GPU time per call of `launch` (which enqueues on the stream it is given), in
/// microseconds: `calls` launches captured into one CUDA graph, replayed `replays` times, so the
/// kernels run back to back as in a CUDA-graph decode step, without CPU launch costs. `launch(i)`
/// is told the call index (to rotate weight copies past the L2 cache).
pub fn graph_time_us(calls: usize, replays: usize, launch: impl Fn(Stream, usize) -> Result<()>) -> Result<f64> {
    let stream = OwnedStream::new()?;
    let s = stream.0;
    let (mut graph, mut exec) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: capture on our own stream; the graph objects are destroyed below.
    unsafe {
        check(
            "cuStreamBeginCapture",
            sys::cuStreamBeginCapture_v2(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED),
        )?;
        let captured = (0..calls).try_for_each(|i| launch(s, i));
        check("cuStreamEndCapture", sys::cuStreamEndCapture(s, &mut graph))?;
        captured?;
        check("cuGraphInstantiate", sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0))?;
        let run = || -> Result<()> {
            check("cuGraphLaunch", sys::cuGraphLaunch(exec, s))?;
            check("cuStreamSynchronize", sys::cuStreamSynchronize(s))
        };
        run()?; // warm-up
        let ms =
            time_ms(&stream, || (0..replays).try_for_each(|_| check("cuGraphLaunch", sys::cuGraphLaunch(exec, s))));
        let _ = sys::cuGraphExecDestroy(exec);
        let _ = sys::cuGraphDestroy(graph);
        Ok(ms? as f64 * 1000.0 / (calls * replays) as f64)
    }
}

/// Runs `f`, which queues work on `other`, ordered after what `caller` has queued and before
/// what `caller` queues next (an event recorded on each stream and waited on by the other).
/// Asynchronous: the host does not wait. Not for use while `caller` is being captured into a
/// CUDA graph.
///
/// # Safety
/// `caller` and `other` must be live streams of the current context.
pub unsafe fn fence_streams<T>(caller: Stream, other: Stream, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
    let (mut before, mut after): (sys::CUevent, sys::CUevent) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: events created, recorded and waited on in order on the caller's live streams,
    // destroyed once (CUDA keeps a recorded event alive until its waits have resolved).
    unsafe {
        check("cuEventCreate", sys::cuEventCreate(&mut before, flags))?;
        let fenced = (|| {
            check("cuEventRecord", sys::cuEventRecord(before, caller))?;
            check("cuStreamWaitEvent", sys::cuStreamWaitEvent(other, before, 0))?;
            let out = f()?;
            check("cuEventCreate", sys::cuEventCreate(&mut after, flags))?;
            check("cuEventRecord", sys::cuEventRecord(after, other))?;
            check("cuStreamWaitEvent", sys::cuStreamWaitEvent(caller, after, 0))?;
            Ok(out)
        })();
        let _ = sys::cuEventDestroy_v2(before);
        if !after.is_null() {
            let _ = sys::cuEventDestroy_v2(after);
        }
        fenced
    }
}
