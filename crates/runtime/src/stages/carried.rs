//! The values stages hand on to later stages (the hidden states between them; Qwen3-VL's
//! deepstack features from the first stage), each where it was made: host memory on the CPU,
//! the producing stage's GPU otherwise. A stage on another GPU gets a peer copy (queued on
//! the CUDA runtime and waited for before its run); one on the same device binds the value
//! itself. Nothing passes through the host.

use crate::model_error::{CudaError, ModelError, Result};
use ort::memory::Allocator;
use ort::value::{DynTensorValueType, DynValue, TensorElementType};
use pio_models::manifest::TensorDtype;

use crate::cuda_rt::CudaRuntime;
use crate::model::{device_tensor, ort_err};

/// How a carried value is held.
pub(crate) enum Held {
    /// A tensor the producing stage's run returned (bound to its device's memory).
    Value(DynValue),
    /// A region of a CUDA-graph stage's fixed output buffer: `bytes` at `addr`, valid until
    /// that stage replays the same micro-batch again.
    Fixed { addr: usize, bytes: usize },
}

struct CarriedValue {
    name: String,
    held: Held,
    /// Where it lives (None: host memory).
    device: Option<i32>,
}

/// A stage's input as bound: the carried value itself, or a copy made on the stage's device.
pub(crate) enum Bound<'a> {
    Same(&'a DynValue),
    Copied(DynValue),
}

impl Bound<'_> {
    pub(crate) fn value(&self) -> &DynValue {
        match self {
            Bound::Same(v) => v,
            Bound::Copied(v) => v,
        }
    }
}

/// The values carried from one stage to the next for one micro-step.
#[derive(Default)]
pub(crate) struct Carried {
    values: Vec<CarriedValue>,
}

/// The KV-cache dtype of an ONNX element type (the dtypes hidden states take).
fn element_dtype(ty: TensorElementType) -> Result<TensorDtype> {
    Ok(match ty {
        TensorElementType::Float32 => TensorDtype::Float32,
        TensorElementType::Float16 => TensorDtype::Float16,
        TensorElementType::Bfloat16 => TensorDtype::Bfloat16,
        TensorElementType::Int8 => TensorDtype::Int8,
        other => return Err(ModelError::Pipeline(format!("no carried stage values of {other:?}"))),
    })
}

/// A tensor value's data address and size in bytes.
fn data_of(value: &DynValue) -> Result<(usize, usize)> {
    let tensor = value.view().downcast::<DynTensorValueType>().map_err(ort_err)?;
    Ok((
        tensor.data_ptr() as usize,
        tensor.size().ok_or_else(|| ModelError::Output("a carried tensor of unknown size".into()))?,
    ))
}

fn runtime() -> Result<&'static CudaRuntime> {
    CudaRuntime::get()
        .ok_or_else(|| CudaError::NotLoaded { needed_for: "copying hidden states between GPUs".into() }.into())
}

impl Carried {
    /// Adds (or replaces) `name`.
    pub(crate) fn put(&mut self, name: &str, held: Held, device: Option<i32>) {
        self.values.retain(|v| v.name != name);
        self.values.push(CarriedValue { name: name.to_string(), held, device });
    }

    /// Keeps only the values named in `needed` (what later stages still read).
    pub(crate) fn retain(&mut self, needed: &[String]) {
        self.values.retain(|v| needed.contains(&v.name));
    }

    fn get(&self, name: &str) -> Result<&CarriedValue> {
        self.values
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ModelError::Output(format!("no earlier stage output `{name}`")))
    }

    /// Input `name` for a stage on `device` (`alloc` its allocator): the value itself when it
    /// lives there, else a peer copy on `device`, complete on return.
    pub(crate) fn bound_on(&self, name: &str, device: Option<i32>, alloc: Option<&Allocator>) -> Result<Bound<'_>> {
        let v = self.get(name)?;
        let Held::Value(value) = &v.held else {
            return Err(ModelError::Pipeline(format!("`{name}` is a CUDA-graph buffer, not a value to bind")));
        };
        if v.device == device {
            return Ok(Bound::Same(value));
        }
        let (Some(src), Some(dst), Some(alloc)) = (v.device, device, alloc) else {
            return Err(ModelError::Pipeline(format!(
                "`{name}` is on {:?} and its stage on {device:?}: stages share the host or are all on GPUs",
                v.device
            )));
        };
        let shape: Vec<usize> = value.shape().iter().map(|&d| d as usize).collect();
        let (copy, addr) = device_tensor(alloc, element_dtype(*value.data_type())?, &shape)?;
        let (from, bytes) = data_of(value)?;
        let rt = runtime()?;
        // SAFETY: `value` is a live tensor of `bytes` on `src`, `copy` one just allocated on `dst`.
        unsafe { rt.device_to_device(dst, addr as *mut _, src, from as *const _, bytes)? };
        rt.synchronize(dst)?;
        Ok(Bound::Copied(copy))
    }

    /// Queues a copy of `name` into `bytes` at `dst` on `device` (a CUDA-graph stage's fixed
    /// input); the caller synchronizes `device` before its run.
    pub(crate) fn copy_into(&self, name: &str, device: i32, dst: usize, bytes: usize) -> Result<()> {
        let v = self.get(name)?;
        let (src, size) = match &v.held {
            Held::Fixed { addr, bytes } => (*addr, *bytes),
            Held::Value(value) => data_of(value)?,
        };
        if size != bytes {
            return Err(ModelError::Pipeline(format!("`{name}` holds {size} bytes, its input {bytes}")));
        }
        let src_device =
            v.device.ok_or_else(|| ModelError::Pipeline(format!("`{name}` is in host memory, not on a GPU")))?;
        // SAFETY: both regions are live device buffers of `bytes` (checked above) on their devices.
        Ok(unsafe { runtime()?.device_to_device(device, dst as *mut _, src_device, src as *const _, bytes) }?)
    }
}
