//! ONNX Runtime's own com.microsoft GroupQueryAttention as a session of one node, for the calls
//! `ai.pio.GroupQueryAttention` hands on (prompts and chunks, caches that are not shared): the
//! operator's tensors are bound to the session as they are (no copy), and on the GPU the session
//! runs on a CUDA stream of its own, fenced against the calling kernel's stream with events (no
//! host wait).
//!
//! Why a session and not the C API's `InvokeOp`: an invoked operator gets no compute stream, and
//! ONNX Runtime's CUDA GroupQueryAttention reads its stream from the kernel context
//! (`context->GetComputeStream()->GetHandle()`), so only the CPU kernel could be invoked that way.
//! Sessions are shared by the nodes of a device with the same attributes and inputs (one or two
//! per model), each behind a lock.

use std::collections::HashMap;
use std::ffi::CString;
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock};

use ort::editor::{Graph, Model, Node, Opset};
use ort::environment::Environment;
use ort::operator::Attribute;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::sys::{OrtIoBinding, OrtStatusPtr, OrtValue};
use ort::value::{Outlet, Shape, SymbolicDimensions, TensorElementType, ValueType};
use ort::AsPointer;

use crate::driver::{fence_streams, OwnedStream, Stream};
use crate::error::{KernelError, Result};

/// An attribute of the node.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Int(i64),
    Float(f32),
    Str(String),
}

/// What a nested session is built for: the device (None: the CPU), the element type of the
/// 16-bit or f32 tensors, the node's attributes, and each input's element type and rank (None:
/// absent).
#[derive(Clone, Debug, PartialEq)]
pub struct NestedSpec {
    pub device: Option<i32>,
    pub attrs: Vec<(&'static str, AttrValue)>,
    pub inputs: Vec<Option<(TensorElementType, usize)>>,
    pub output_type: TensorElementType,
}

impl NestedSpec {
    fn key(&self) -> String {
        format!("{self:?}")
    }
}

/// A one-node GroupQueryAttention session.
pub struct NestedGqa {
    session: Mutex<Session>,
    /// The session's compute stream (GPU sessions).
    stream: Option<OwnedStream>,
    options: RunOptions,
}

// SAFETY: the session is used behind its lock; the stream is an opaque CUDA handle used only by
// that session and by event calls (thread-safe in CUDA); RunOptions is read-only after creation.
unsafe impl Send for NestedGqa {}
unsafe impl Sync for NestedGqa {}

fn sessions() -> &'static Mutex<HashMap<String, Arc<NestedGqa>>> {
    static SESSIONS: OnceLock<Mutex<HashMap<String, Arc<NestedGqa>>>> = OnceLock::new();
    SESSIONS.get_or_init(Default::default)
}

fn status(s: OrtStatusPtr, call: &'static str) -> Result<()> {
    if s.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from the C API: its message is copied before the status is
    // released once.
    let message = unsafe {
        let m = (api.GetErrorMessage)(s.0);
        let text = if m.is_null() {
            String::from("(no message)")
        } else {
            std::ffi::CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(s.0);
        text
    };
    Err(KernelError::NativeOp { call, op: "com.microsoft.GroupQueryAttention".into(), message })
}

fn outlet(name: String, ty: TensorElementType, rank: usize) -> Outlet {
    Outlet::new(
        name,
        ValueType::Tensor {
            ty,
            shape: Shape::new(vec![-1i64; rank]),
            dimension_symbols: SymbolicDimensions::new(vec![String::new(); rank]),
        },
    )
}

impl NestedGqa {
    /// The session for `spec`, built on first use.
    pub fn get(env: &Environment, spec: &NestedSpec) -> Result<Arc<NestedGqa>> {
        let key = spec.key();
        let mut all = sessions().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = all.get(&key) {
            return Ok(Arc::clone(s));
        }
        let built = Arc::new(NestedGqa::build(env, spec)?);
        all.insert(key, Arc::clone(&built));
        Ok(built)
    }

    fn build(env: &Environment, spec: &NestedSpec) -> Result<NestedGqa> {
        let mut graph = Graph::new()?;
        let mut names = Vec::with_capacity(spec.inputs.len());
        let mut inputs = Vec::new();
        for (i, input) in spec.inputs.iter().enumerate() {
            match input {
                Some((ty, rank)) => {
                    names.push(format!("i{i}"));
                    inputs.push(outlet(format!("i{i}"), *ty, *rank));
                }
                None => names.push(String::new()),
            }
        }
        while names.last().is_some_and(String::is_empty) {
            names.pop();
        }
        let outputs = ["o0", "o1", "o2"];
        graph.set_inputs(inputs)?;
        graph.set_outputs(
            [3usize, 4, 4].iter().zip(outputs).map(|(&r, n)| outlet(n.to_string(), spec.output_type, r)),
        )?;
        let attrs = spec
            .attrs
            .iter()
            .map(|(n, v)| match v {
                AttrValue::Int(x) => Attribute::new(n, *x),
                AttrValue::Float(x) => Attribute::new(n, *x),
                AttrValue::Str(x) => Attribute::new(n, x.clone()),
            })
            .collect::<ort::Result<Vec<_>>>()?;
        graph.add_node(Node::new("GroupQueryAttention", "com.microsoft", "gqa", &names, outputs, attrs)?)?;
        let mut model = Model::new([Opset::new("", 21)?, Opset::new("com.microsoft", 1)?])?;
        model.set_graph(graph)?;
        let mut builder = Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(ort::Error::from)?
            .with_intra_threads(1)
            .map_err(ort::Error::from)?;
        let mut options = RunOptions::new()?;
        let stream = match spec.device {
            Some(device) => {
                let stream = OwnedStream::new()?;
                // SAFETY: the stream lives in the NestedGqa beside the session, dropped after it.
                let ep =
                    unsafe { ort::ep::CUDA::default().with_device_id(device).with_compute_stream(stream.0.cast()) };
                builder =
                    builder.with_execution_providers([ep.build().error_on_failure()]).map_err(ort::Error::from)?;
                // The host does not wait for the stream after a run: the caller's stream is fenced.
                options.disable_device_sync()?;
                Some(stream)
            }
            None => None,
        };
        let session = model.into_session(&builder)?;
        Ok(NestedGqa { session: Mutex::new(session), stream, options })
    }

    /// Runs the node on `inputs` (null for absent ones, as in the spec) into `outputs`, after
    /// what `caller` (the calling kernel's CUDA stream; None on the CPU) has queued and before
    /// what it queues next.
    pub fn run(&self, caller: Option<Stream>, inputs: &[*const OrtValue], outputs: &[*mut OrtValue; 3]) -> Result<()> {
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let api = ort::api();
        let mut binding: *mut OrtIoBinding = ptr::null_mut();
        // SAFETY: a live session; the binding is released below.
        status(unsafe { (api.CreateIoBinding)(session.ptr().cast_mut(), &mut binding) }, "CreateIoBinding")?;
        let bound = (|| -> Result<()> {
            for (i, &v) in inputs.iter().enumerate() {
                if v.is_null() {
                    continue;
                }
                let name =
                    CString::new(format!("i{i}")).map_err(|_| KernelError::bad_input("nested session", "name"))?;
                // SAFETY: a live value of the calling kernel, bound for this run only.
                status(unsafe { (api.BindInput)(binding, name.as_ptr(), v) }, "BindInput")?;
            }
            for (i, &v) in outputs.iter().enumerate() {
                let name =
                    CString::new(format!("o{i}")).map_err(|_| KernelError::bad_input("nested session", "name"))?;
                // SAFETY: as above; the values are allocated, so the run writes into them.
                status(unsafe { (api.BindOutput)(binding, name.as_ptr(), v) }, "BindOutput")?;
            }
            let run = || {
                // SAFETY: a live session, run options and binding.
                status(
                    unsafe { (api.RunWithBinding)(session.ptr().cast_mut(), self.options.ptr(), binding) },
                    "RunWithBinding",
                )
            };
            match (caller, &self.stream) {
                // SAFETY: the calling kernel's stream and the session's own, both live.
                (Some(caller), Some(own)) => unsafe { fence_streams(caller, own.0, run) },
                _ => run(),
            }
        })();
        // SAFETY: created above, released once.
        unsafe { (api.ReleaseIoBinding)(binding) };
        bound
    }
}
