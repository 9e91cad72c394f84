//! One stage: an ONNX Runtime session over a graph of some decoder layers, on one device, and
//! one micro-step through it (a plain run, or a replay of a captured CUDA graph).

use std::ops::Range;
use std::path::Path;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, Tensor};
use pio_models::manifest::{IoSpec, KvCacheSpec, Manifest, GREEDY_TOKENS_OUTPUT};

use super::carried::{Carried, Held};
use super::pipeline::MicroStep;
use crate::cuda_rt::{CudaError, CudaRuntime};
use crate::ep::ExecutionProvider;
use crate::model::Fetch;
use crate::model::{
    bind_rows, builder_err, cache_memory, copy_to_host, device_tensor, empty_host_tensor, no_graph_options, ort_err,
    read_greedy, read_logits, Logits, SharedLayout, StepOutput, DEEPSTACK_EMBEDS_INPUT, IMAGE_EMBEDS_INPUT,
};
use crate::model_error::{ModelError, Result};

/// A stage's part of the KV cache for one micro-step.
pub(crate) enum StageKv<'a> {
    /// The shared buffer: every layer's buffers and memory (the stage binds its own layers).
    Shared { layout: &'a SharedLayout, memories: &'a [MemoryInfo<'static>] },
    /// The growing cache's tensors of the stage's layers, in order.
    Growing { keys: &'a mut [DynValue], values: &'a mut [DynValue] },
}

/// Inputs and outputs of a captured decode step of one micro-batch, at fixed device addresses.
/// A captured graph also holds the cache rows it ran on, so each (cache, first row, rows) gets
/// its own capture.
struct GraphState {
    /// The stage's layers' key and value buffers, the first row, the rows and the capacity.
    key: (Vec<(usize, usize)>, usize, usize, usize),
    graph_id: usize,
    input_ids: Option<Tensor<i64>>,
    position_ids: Tensor<i64>,
    attention_mask: Tensor<i64>,
    images: Vec<(String, DynValue)>,
    /// (name, tensor, address, bytes) of each carried input and output.
    carried_in: Vec<(String, DynValue, usize, usize)>,
    carried_out: Vec<(String, DynValue, usize, usize)>,
    logits: Option<Tensor<f32>>,
    greedy: Option<Tensor<i64>>,
}

pub(crate) struct StageSession {
    /// The stage's graph file (named in errors of its runs).
    file: std::path::PathBuf,
    /// The decoder layers this stage holds.
    pub(crate) layers: Range<usize>,
    pub(crate) ep: ExecutionProvider,
    session: Session,
    /// Device memory of a GPU session (None on the CPU).
    allocator: Option<Allocator>,
    kv: KvCacheSpec,
    position_axes: usize,
    vocab: usize,
    takes_ids: bool,
    image_inputs: Vec<IoSpec>,
    pub(crate) carried_in: Vec<IoSpec>,
    pub(crate) carried_out: Vec<IoSpec>,
    /// Outputs the logits (the last stage).
    ends: bool,
    has_greedy: bool,
    /// The carried values later stages still read (set once every stage is loaded).
    pub(crate) keep_after: Vec<String>,
    graph_states: Vec<GraphState>,
}

/// Step inputs every stage may take (the others are KV or carried from an earlier stage).
const STEP_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "position_ids"];

impl StageSession {
    /// Loads the stage graph `file` (in `dir`) over `layers` with `inputs` and `outputs` on `ep`.
    pub(crate) fn load(
        dir: &Path,
        file: &str,
        layers: Range<usize>,
        (inputs, outputs): (&[IoSpec], &[IoSpec]),
        manifest: &Manifest,
        ep: &ExecutionProvider,
    ) -> Result<Self> {
        let path = dir.join(file);
        if !path.is_file() {
            return Err(ModelError::MissingFile { file: path, manifest: dir.join("pio.json") });
        }
        let env = crate::ort_lib::environment()?;
        let builder = Session::builder(env).map_err(ort_err)?;
        let mut builder = crate::ort_lib::profiled(ep.configure(builder)?, &path).map_err(ort_err)?;
        if !manifest.options.pio_kernels.is_empty() {
            // The graph uses Inference-PIO's own operators (pio-export --pio-kernels): CUDA kernels
            // compiled now for this GPU, or their CPU references.
            let domain = pio_kernels::ops::operator_domain(env).map_err(ort_err)?;
            builder = builder.with_operators(domain).map_err(builder_err)?;
        }
        let session =
            builder.commit_from_file(&path).map_err(|source| ModelError::Load { file: path.clone(), source })?;
        let allocator = match ep.device_id() {
            Some(id) => Some(
                Allocator::new(
                    &session,
                    MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)
                        .map_err(ort_err)?,
                )
                .map_err(|e| ModelError::ort(format!("cannot allocate on CUDA device {id}"), e))?,
            ),
            None => None,
        };
        let kv = manifest.kv_cache.clone();
        let is_kv_input = |name: &str| {
            layers
                .clone()
                .any(|l| name == KvCacheSpec::name(&kv.past_key, l) || name == KvCacheSpec::name(&kv.past_value, l))
        };
        let is_kv_output = |name: &str| {
            layers.clone().any(|l| {
                name == KvCacheSpec::name(&kv.present_key, l) || name == KvCacheSpec::name(&kv.present_value, l)
            })
        };
        let is_image = |name: &str| name == IMAGE_EMBEDS_INPUT || name == DEEPSTACK_EMBEDS_INPUT;
        let ends = outputs.iter().any(|o| o.name == "logits");
        Ok(StageSession {
            file: path,
            ep: ep.clone(),
            session,
            allocator,
            position_axes: manifest.position_axes(),
            vocab: manifest.dims.vocab_size,
            takes_ids: inputs.iter().any(|i| i.name == "input_ids"),
            image_inputs: inputs.iter().filter(|i| is_image(&i.name)).cloned().collect(),
            carried_in: inputs
                .iter()
                .filter(|i| !STEP_INPUTS.contains(&i.name.as_str()) && !is_image(&i.name) && !is_kv_input(&i.name))
                .cloned()
                .collect(),
            carried_out: outputs
                .iter()
                .filter(|o| o.name != "logits" && o.name != GREEDY_TOKENS_OUTPUT && !is_kv_output(&o.name))
                .cloned()
                .collect(),
            ends,
            has_greedy: outputs.iter().any(|o| o.name == GREEDY_TOKENS_OUTPUT),
            keep_after: Vec::new(),
            graph_states: Vec::new(),
            kv,
            layers,
        })
    }

    /// The CUDA device the session runs on (None on the CPU).
    pub(crate) fn device(&self) -> Option<i32> {
        self.allocator.as_ref().and(self.ep.device_id())
    }

    pub(crate) fn allocator(&self) -> Option<&Allocator> {
        self.allocator.as_ref()
    }

    /// Whether the stage takes the step's image rows (the first stage of a vision-language decoder).
    pub(crate) fn takes_images(&self) -> bool {
        !self.image_inputs.is_empty()
    }

    /// `position_ids` of a step: (batch, s), or for a multimodal rotary (3, batch, s).
    fn position_tensor(&self, step: &MicroStep) -> Result<Tensor<i64>> {
        let (rows, s) = (step.inputs.rows() as i64, step.inputs.seq_len() as i64);
        if self.position_axes == 1 {
            return Ok(Tensor::from_array((vec![rows, s], step.inputs.position_ids()))?);
        }
        Ok(Tensor::from_array((vec![self.position_axes as i64, rows, s], step.inputs.axis_position_ids()))?)
    }

    /// `position_ids`' shape in a decode step of `rows` sequences: (rows, 1), or (3, rows, 1).
    fn decode_position_shape(&self, rows: usize) -> Vec<usize> {
        match self.position_axes {
            1 => vec![rows, 1],
            axes => vec![axes, rows, 1],
        }
    }

    /// The image inputs with no rows (a step without image tokens), on the host or from `device`.
    fn empty_images(&self, device: Option<&Allocator>) -> Result<Vec<(String, DynValue)>> {
        let mut out = Vec::new();
        for io in &self.image_inputs {
            // The symbolic dimension is the number of image rows: 0.
            let shape: Vec<i64> = io.shape.iter().map(|d| d.as_i64().unwrap_or(0)).collect();
            let value = match device {
                None => empty_host_tensor(io.dtype, shape)?,
                Some(alloc) => {
                    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                    device_tensor(alloc, io.dtype, &shape)?.0
                }
            };
            out.push((io.name.clone(), value));
        }
        Ok(out)
    }

    /// One session run of `step`'s rows over this stage's layers: the step's inputs, the
    /// cache of its layers, and the carried values of earlier stages in; its carried outputs
    /// into `carried` (on this stage's device), its cache out; the logits or greedy tokens from
    /// the last stage.
    pub(crate) fn run(
        &mut self,
        step: &MicroStep,
        kv: &mut StageKv,
        carried: &mut Carried,
    ) -> Result<Option<StepOutput>> {
        let inputs = &step.inputs;
        let (rows, s) = (inputs.rows() as i64, inputs.seq_len() as i64);
        let width = inputs.total_len();
        let attention_mask =
            Tensor::from_array((vec![rows, width as i64], inputs.attention_mask(width))).map_err(ort_err)?;
        let position_ids = self.position_tensor(step)?;
        let input_ids = match self.takes_ids {
            true => Some(Tensor::from_array((vec![rows, s], inputs.input_ids())).map_err(ort_err)?),
            false => None,
        };
        let empty_images = match (self.takes_images(), inputs.images()) {
            (true, None) => self.empty_images(None)?,
            _ => Vec::new(),
        };
        let device = self.device();
        let memory = cache_memory(device)?;
        let host = MemoryInfo::default();
        let greedy_output = self.ends && step.fetch == Fetch::Greedy && self.has_greedy;

        // Carried inputs as bound (copies from other devices): they must outlive the run.
        let bound = self
            .carried_in
            .iter()
            .map(|io| carried.bound_on(&io.name, device, self.allocator.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let mut binding = self.session.create_binding().map_err(ort_err)?;
        if let Some(ids) = &input_ids {
            binding.bind_input("input_ids", ids).map_err(ModelError::bind("input_ids"))?;
        }
        binding.bind_input("attention_mask", &attention_mask).map_err(ModelError::bind("attention_mask"))?;
        binding.bind_input("position_ids", &position_ids).map_err(ModelError::bind("position_ids"))?;
        for (name, value) in &empty_images {
            binding.bind_input(name, value).map_err(ModelError::bind(name))?;
        }
        if let (true, Some(images)) = (self.takes_images(), inputs.images()) {
            binding.bind_input(IMAGE_EMBEDS_INPUT, images.embeds()).map_err(ModelError::bind(IMAGE_EMBEDS_INPUT))?;
            if self.image_inputs.iter().any(|i| i.name == DEEPSTACK_EMBEDS_INPUT) {
                binding
                    .bind_input(DEEPSTACK_EMBEDS_INPUT, images.deepstack())
                    .map_err(ModelError::bind(DEEPSTACK_EMBEDS_INPUT))?;
            }
        }
        for (io, value) in self.carried_in.iter().zip(&bound) {
            binding.bind_input(&io.name, value.value()).map_err(ModelError::bind(&io.name))?;
        }
        // Cache views bound as inputs: they must outlive the run.
        let mut held_views = Vec::new();
        match kv {
            StageKv::Shared { layout, memories } => {
                held_views = bind_rows(
                    &mut binding,
                    &self.kv,
                    layout,
                    memories,
                    self.layers.clone(),
                    step.first,
                    inputs.rows(),
                )?;
            }
            StageKv::Growing { keys, values } => {
                for (i, (k, v)) in keys.iter().zip(values.iter()).enumerate() {
                    let layer = self.layers.start + i;
                    for (past, value) in [(&self.kv.past_key, k), (&self.kv.past_value, v)] {
                        let name = KvCacheSpec::name(past, layer);
                        binding.bind_input(&name, value).map_err(ModelError::bind(&name))?;
                    }
                    for present in [&self.kv.present_key, &self.kv.present_value] {
                        let name = KvCacheSpec::name(present, layer);
                        binding.bind_output_to_device(&name, &memory).map_err(ModelError::bind(&name))?;
                    }
                }
            }
        }
        for io in &self.carried_out {
            binding.bind_output_to_device(&io.name, &memory).map_err(ModelError::bind(&io.name))?;
        }
        if self.ends {
            if greedy_output {
                // The logits stay where they were computed; rows x positions token ids come back.
                binding.bind_output_to_device("logits", &memory).map_err(ModelError::bind("logits"))?;
                binding
                    .bind_output_to_device(GREEDY_TOKENS_OUTPUT, &host)
                    .map_err(ModelError::bind(GREEDY_TOKENS_OUTPUT))?;
            } else {
                binding.bind_output_to_device("logits", &host).map_err(ModelError::bind("logits"))?;
            }
        }
        let mut options = no_graph_options()?;
        let shrink = self.ep.cuda_options().filter(|o| o.shrink_arena && s > 1);
        if let Some(o) = shrink {
            // After a prefill, hand the arena's free regions back to the device.
            options.set("memory.enable_memory_arena_shrinkage", format!("gpu:{}", o.device_id)).map_err(ort_err)?;
        }
        let mut outputs = self
            .session
            .run_binding_with_options(&binding, &options)
            .map_err(|source| ModelError::Run { graph: self.file.clone(), what: "decoder step", source })?;
        drop(held_views);
        drop(bound);
        for io in &self.carried_out {
            let value =
                outputs.remove(&io.name).ok_or_else(|| ModelError::Output(format!("missing output {}", io.name)))?;
            carried.put(&io.name, Held::Value(value), device);
        }
        if let StageKv::Growing { keys, values } = kv {
            for i in 0..keys.len() {
                let layer = self.layers.start + i;
                let name_k = KvCacheSpec::name(&self.kv.present_key, layer);
                let name_v = KvCacheSpec::name(&self.kv.present_value, layer);
                keys[i] =
                    outputs.remove(&name_k).ok_or_else(|| ModelError::Output(format!("missing output {name_k}")))?;
                values[i] =
                    outputs.remove(&name_v).ok_or_else(|| ModelError::Output(format!("missing output {name_v}")))?;
            }
        }
        if !self.ends {
            return Ok(None);
        }
        Ok(Some(if greedy_output {
            StepOutput::Greedy(read_greedy(outputs.remove(GREEDY_TOKENS_OUTPUT))?)
        } else {
            StepOutput::Logits(read_logits(outputs.remove("logits"), self.vocab)?)
        }))
    }

    /// The fixed buffers of a carried input or output of `rows` decode rows: (batch, 1, ...).
    fn fixed_carried(alloc: &Allocator, io: &IoSpec, rows: usize) -> Result<(String, DynValue, usize, usize)> {
        let shape = io
            .shape
            .iter()
            .map(|d| match (d.as_u64(), d.as_str()) {
                (Some(n), _) => Ok(n as usize),
                (None, Some("batch_size")) => Ok(rows),
                (None, Some("sequence_length")) => Ok(1),
                _ => Err(ModelError::Graph(format!(
                    "carried value {} has a dimension {d} a decode step cannot size",
                    io.name
                ))),
            })
            .collect::<Result<Vec<usize>>>()?;
        let bytes = shape.iter().product::<usize>() * io.dtype.size_bytes();
        let (value, addr) = device_tensor(alloc, io.dtype, &shape)?;
        Ok((io.name.clone(), value, addr, bytes))
    }

    /// The captured step of `step`'s rows, made (with its fixed buffers) the first time.
    fn graph_state(&mut self, step: &MicroStep, layout: &SharedLayout) -> Result<usize> {
        let rows = step.inputs.rows();
        let key = (layout.layers[self.layers.clone()].to_vec(), step.first, rows, layout.capacity);
        if let Some(i) = self.graph_states.iter().position(|g| g.key == key) {
            return Ok(i);
        }
        let alloc = self
            .allocator
            .as_ref()
            .ok_or_else(|| ModelError::Graph("CUDA-graph decode needs a CUDA session".into()))?;
        // New rows or a new cache: new fixed inputs and a new capture. Graph ids start at 1.
        let graph_id = 1 + self.graph_states.iter().map(|g| g.graph_id).max().unwrap_or(0);
        let tensor = |shape: Vec<usize>| Tensor::<i64>::new(alloc, shape).map_err(ort_err);
        let state = GraphState {
            key,
            graph_id,
            input_ids: if self.takes_ids { Some(tensor(vec![rows, 1])?) } else { None },
            position_ids: tensor(self.decode_position_shape(rows))?,
            attention_mask: tensor(vec![rows, layout.capacity])?,
            images: self.empty_images(Some(alloc))?,
            carried_in: self.carried_in.iter().map(|io| Self::fixed_carried(alloc, io, rows)).collect::<Result<_>>()?,
            carried_out: self
                .carried_out
                .iter()
                .map(|io| Self::fixed_carried(alloc, io, rows))
                .collect::<Result<_>>()?,
            logits: if self.ends {
                Some(Tensor::<f32>::new(alloc, [rows, 1, self.vocab]).map_err(ort_err)?)
            } else {
                None
            },
            greedy: if self.ends && self.has_greedy { Some(tensor(vec![rows, 1])?) } else { None },
        };
        self.graph_states.push(state);
        Ok(self.graph_states.len() - 1)
    }

    /// One decode micro-step (one token per row, each after its own past) over this stage's
    /// layers of a shared-buffer cache on the GPU, replayed from the stage's captured CUDA
    /// graph of these rows: the step's inputs and the carried values are copied into the fixed
    /// buffers, and the carried outputs are handed on from theirs.
    pub(crate) fn run_graph(
        &mut self,
        step: &MicroStep,
        layout: &SharedLayout,
        memories: &[MemoryInfo<'static>],
        carried: &mut Carried,
    ) -> Result<Option<StepOutput>> {
        let index = self.graph_state(step, layout)?;
        let device = self.device().unwrap_or(0);
        let rows = step.inputs.rows();
        let capacity = layout.capacity;
        let inputs = &step.inputs;
        let position_shape = self.position_axes_shape(rows);
        let state = &mut self.graph_states[index];
        let (ids, mask) = (inputs.input_ids(), inputs.attention_mask(capacity));
        let positions = if self.position_axes == 3 { inputs.axis_position_ids() } else { inputs.position_ids() };
        match CudaRuntime::get() {
            Some(rt) => {
                // SAFETY: the tensors are device allocations of exactly these sizes.
                unsafe {
                    if let Some(t) = state.input_ids.as_mut() {
                        rt.host_to_device(device, t.data_ptr_mut(), &ids)?;
                    }
                    rt.host_to_device(device, state.position_ids.data_ptr_mut(), &positions)?;
                    rt.host_to_device(device, state.attention_mask.data_ptr_mut(), &mask)?;
                }
                for (name, _, addr, bytes) in &state.carried_in {
                    carried.copy_into(name, device, *addr, *bytes)?;
                }
                rt.synchronize(device)?;
            }
            None if !state.carried_in.is_empty() => {
                return Err(CudaError::NotLoaded {
                    needed_for: "handing hidden states on in a staged CUDA-graph step".into(),
                }
                .into())
            }
            None => {
                let host = |shape: Vec<i64>, data: Vec<i64>| Tensor::from_array((shape, data)).map_err(ort_err);
                if let Some(t) = state.input_ids.as_mut() {
                    host(vec![rows as i64, 1], ids)?.copy_into(t).map_err(ort_err)?;
                }
                host(position_shape, positions)?.copy_into(&mut state.position_ids).map_err(ort_err)?;
                host(vec![rows as i64, capacity as i64], mask)?
                    .copy_into(&mut state.attention_mask)
                    .map_err(ort_err)?;
            }
        }
        let state = &mut self.graph_states[index];
        let mut binding = self.session.create_binding().map_err(ort_err)?;
        if let Some(t) = &state.input_ids {
            binding.bind_input("input_ids", t).map_err(ModelError::bind("input_ids"))?;
        }
        binding.bind_input("position_ids", &state.position_ids).map_err(ModelError::bind("position_ids"))?;
        binding.bind_input("attention_mask", &state.attention_mask).map_err(ModelError::bind("attention_mask"))?;
        for (name, value) in &state.images {
            binding.bind_input(name, value).map_err(ModelError::bind(name))?;
        }
        for (name, value, _, _) in &state.carried_in {
            binding.bind_input(name, value).map_err(ModelError::bind(name))?;
        }
        let held_views = bind_rows(&mut binding, &self.kv, layout, memories, self.layers.clone(), step.first, rows)?;
        for (name, value, _, _) in state.carried_out.iter_mut() {
            binding.bind_output(name.as_str(), value).map_err(ModelError::bind(name))?;
        }
        if let Some(logits) = state.logits.as_mut() {
            binding.bind_output("logits", logits).map_err(ModelError::bind("logits"))?;
        }
        if let Some(greedy) = state.greedy.as_mut() {
            binding.bind_output(GREEDY_TOKENS_OUTPUT, greedy).map_err(ModelError::bind(GREEDY_TOKENS_OUTPUT))?;
        }
        let mut options = RunOptions::new().map_err(ort_err)?;
        options.set("gpu_graph_id", state.graph_id.to_string()).map_err(ort_err)?;
        self.session.run_binding_with_options(&binding, &options).map_err(|source| ModelError::Run {
            graph: self.file.clone(),
            what: "decode step (CUDA graph)",
            source,
        })?;
        drop(held_views);
        for (name, _, addr, bytes) in &state.carried_out {
            carried.put(name, Held::Fixed { addr: *addr, bytes: *bytes }, Some(device));
        }
        let out = match (&state.logits, &state.greedy, step.fetch) {
            (None, ..) => None,
            (Some(_), Some(greedy), Fetch::Greedy) => {
                let mut tokens = vec![0i64; rows];
                copy_to_host(device, greedy, &mut tokens)?;
                Some(StepOutput::Greedy(tokens.into_iter().map(|t| t as u32).collect()))
            }
            (Some(logits), ..) => {
                let mut data = vec![0f32; rows * self.vocab];
                copy_to_host(device, logits, &mut data)?;
                Some(StepOutput::Logits(Logits { data, batch: rows, rows: 1, vocab: self.vocab }))
            }
        };
        Ok(out)
    }

    fn position_axes_shape(&self, rows: usize) -> Vec<i64> {
        self.decode_position_shape(rows).iter().map(|&d| d as i64).collect()
    }
}
