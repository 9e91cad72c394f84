//! The graph-building core every architecture file writes through.
//!
//! A [`Graph`] collects nodes, graph inputs/outputs and initializer *metadata*; initializer bytes
//! go straight to one external-data file as they are produced, so the protobuf stays small and
//! memory stays flat however large the model is (ONNX protobufs cannot exceed 2 GB).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use pio_models::manifest::{IoSpec, TensorDtype};
use prost::Message;

use super::proto::*;
use crate::error::{fs_error, BuildError, BuildResult as Result};

/// Opset of the default ONNX domain the graphs target (supported by ONNX Runtime 1.31).
pub const ONNX_OPSET: i64 = 21;
pub const MS_DOMAIN: &str = "com.microsoft";
/// External-data offsets are aligned so the runtime can map tensors without copying.
const EXTERNAL_ALIGNMENT: u64 = 64;
/// Initializers up to this size are stored inline in the protobuf.
const INLINE_LIMIT: usize = 256;

pub fn onnx_type(dtype: TensorDtype) -> i32 {
    match dtype {
        TensorDtype::Float32 => data_type::FLOAT,
        TensorDtype::Float16 => data_type::FLOAT16,
        TensorDtype::Bfloat16 => data_type::BFLOAT16,
        TensorDtype::Int64 => data_type::INT64,
        TensorDtype::Int32 => data_type::INT32,
        TensorDtype::Uint8 => data_type::UINT8,
        TensorDtype::Int8 => data_type::INT8,
    }
}

/// One dimension of a graph input/output: fixed or symbolic.
#[derive(Clone, Debug)]
pub enum Dim {
    Fixed(i64),
    Sym(&'static str),
}

impl Dim {
    fn to_proto(&self) -> Dimension {
        Dimension {
            value: Some(match self {
                Dim::Fixed(n) => DimensionValue::DimValue(*n),
                Dim::Sym(s) => DimensionValue::DimParam(s.to_string()),
            }),
        }
    }
    fn to_json(&self) -> serde_json::Value {
        match self {
            Dim::Fixed(n) => serde_json::json!(n),
            Dim::Sym(s) => serde_json::json!(s),
        }
    }
}

/// An attribute value of a node.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Str(String),
    Tensor(TensorProto),
}

impl From<i64> for Attr {
    fn from(v: i64) -> Self {
        Attr::Int(v)
    }
}
impl From<usize> for Attr {
    fn from(v: usize) -> Self {
        Attr::Int(v as i64)
    }
}
impl From<f32> for Attr {
    fn from(v: f32) -> Self {
        Attr::Float(v)
    }
}
impl From<Vec<i64>> for Attr {
    fn from(v: Vec<i64>) -> Self {
        Attr::Ints(v)
    }
}
impl From<&str> for Attr {
    fn from(v: &str) -> Self {
        Attr::Str(v.to_string())
    }
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto { name: name.to_string(), ..Default::default() };
    match value {
        Attr::Int(i) => {
            a.i = i;
            a.r#type = attribute_type::INT;
        }
        Attr::Float(f) => {
            a.f = f;
            a.r#type = attribute_type::FLOAT;
        }
        Attr::Ints(v) => {
            a.ints = v;
            a.r#type = attribute_type::INTS;
        }
        Attr::Floats(v) => {
            a.floats = v;
            a.r#type = attribute_type::FLOATS;
        }
        Attr::Str(s) => {
            a.s = s.into_bytes();
            a.r#type = attribute_type::STRING;
        }
        Attr::Tensor(t) => {
            a.t = Some(t);
            a.r#type = attribute_type::TENSOR;
        }
    }
    a
}

/// Appends initializer bytes to the external-data file, aligned.
pub struct WeightSink {
    writer: BufWriter<File>,
    path: PathBuf,
    file_name: String,
    offset: u64,
}

impl WeightSink {
    fn create(path: &Path) -> Result<Self> {
        let file_name =
            path.file_name().and_then(|n| n.to_str()).map(str::to_string).ok_or_else(|| {
                BuildError::Internal(format!("weight file {} has no UTF-8 file name", path.display()))
            })?;
        let file = File::create(path).map_err(fs_error("create", path))?;
        Ok(WeightSink {
            writer: BufWriter::with_capacity(8 << 20, file),
            path: path.to_path_buf(),
            file_name,
            offset: 0,
        })
    }

    /// Starts a tensor at an aligned offset; returns that offset.
    fn begin(&mut self) -> Result<u64> {
        let pad = (EXTERNAL_ALIGNMENT - self.offset % EXTERNAL_ALIGNMENT) % EXTERNAL_ALIGNMENT;
        if pad > 0 {
            self.write(&[0u8; EXTERNAL_ALIGNMENT as usize][..pad as usize])?;
        }
        Ok(self.offset)
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).map_err(fs_error("write", &self.path))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<u64> {
        let finishing = fs_error("finish", &self.path);
        let mut file = self.writer.into_inner().map_err(|e| finishing(e.into_error()))?;
        let end = file.stream_position().map_err(fs_error("finish", &self.path))?;
        // The first place a delayed write error shows (a full disk or quota on NFS, EIO), here
        // with the weight file's name.
        crate::scratch::sync_if_supported(&file).map_err(fs_error("finish", &self.path))?;
        Ok(end)
    }
}

/// A node under construction: `g.node("MatMul", "layers.0.attn.q_proj").inputs(&[..]).out()`.
pub struct NodeBuilder<'g> {
    graph: &'g mut Graph,
    proto: NodeProto,
}

impl<'g> NodeBuilder<'g> {
    pub fn inputs<S: AsRef<str>>(mut self, inputs: &[S]) -> Self {
        self.proto.input = inputs.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }
    /// Marks the node as a com.microsoft contrib op.
    pub fn ms(mut self) -> Self {
        self.proto.domain = MS_DOMAIN.to_string();
        self
    }
    /// Marks the node as an op of another domain (Inference-PIO's `ai.pio`).
    pub fn domain(mut self, domain: &str) -> Self {
        self.proto.domain = domain.to_string();
        self
    }
    pub fn attr(mut self, name: &str, value: impl Into<Attr>) -> Self {
        self.proto.attribute.push(attribute(name, value.into()));
        self
    }
    /// Finishes a node with one output and returns its name.
    pub fn out(self) -> String {
        self.outs(1).remove(0)
    }
    /// Finishes a node with `n` outputs named `<node>/out<i>`.
    pub fn outs(mut self, n: usize) -> Vec<String> {
        let outputs: Vec<String> = (0..n).map(|i| format!("{}/out{i}", self.proto.name)).collect();
        self.proto.output = outputs.clone();
        self.graph.nodes.push(self.proto);
        outputs
    }
    /// Finishes a node whose outputs have given names (graph outputs, KV cache), "" to omit one.
    pub fn named_outs<S: AsRef<str>>(mut self, names: &[S]) -> Vec<String> {
        self.proto.output = names.iter().map(|s| s.as_ref().to_string()).collect();
        let outputs = self.proto.output.clone();
        self.graph.nodes.push(self.proto);
        outputs
    }
}

pub struct Graph {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    io_inputs: Vec<IoSpec>,
    io_outputs: Vec<IoSpec>,
    node_names: HashSet<String>,
    /// Initializer names: a second one of the same name would shadow the first.
    initializer_names: HashSet<String>,
    weights: WeightSink,
    uses_ms_domain: bool,
}

impl Graph {
    /// A new graph whose initializer bytes stream into `weight_path`.
    pub fn new(name: &str, weight_path: &Path) -> Result<Self> {
        Ok(Graph {
            name: name.to_string(),
            nodes: vec![],
            initializers: vec![],
            inputs: vec![],
            outputs: vec![],
            io_inputs: vec![],
            io_outputs: vec![],
            node_names: HashSet::new(),
            initializer_names: HashSet::new(),
            weights: WeightSink::create(weight_path)?,
            uses_ms_domain: false,
        })
    }

    fn value_info(name: &str, dtype: TensorDtype, shape: &[Dim]) -> ValueInfoProto {
        ValueInfoProto {
            name: name.to_string(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorTypeProto {
                    elem_type: onnx_type(dtype),
                    shape: Some(TensorShapeProto { dim: shape.iter().map(Dim::to_proto).collect() }),
                }),
            }),
        }
    }

    pub fn input(&mut self, name: &str, dtype: TensorDtype, shape: &[Dim]) -> String {
        self.inputs.push(Self::value_info(name, dtype, shape));
        self.io_inputs.push(IoSpec { name: name.to_string(), dtype, shape: shape.iter().map(Dim::to_json).collect() });
        name.to_string()
    }

    /// Declares a graph output. The producing node must name its output `name`.
    pub fn output(&mut self, name: &str, dtype: TensorDtype, shape: &[Dim]) {
        self.outputs.push(Self::value_info(name, dtype, shape));
        self.io_outputs.push(IoSpec { name: name.to_string(), dtype, shape: shape.iter().map(Dim::to_json).collect() });
    }

    pub fn io(&self) -> (&[IoSpec], &[IoSpec]) {
        (&self.io_inputs, &self.io_outputs)
    }

    /// Starts a node; `name` says what it computes (`layers.3.attn.q_proj`), made unique if needed.
    pub fn node(&mut self, op_type: &str, name: &str) -> NodeBuilder<'_> {
        let mut unique = name.to_string();
        let mut i = 1;
        while !self.node_names.insert(unique.clone()) {
            unique = format!("{name}_{i}");
            i += 1;
        }
        NodeBuilder {
            proto: NodeProto { name: unique, op_type: op_type.to_string(), ..Default::default() },
            graph: self,
        }
    }

    /// Claims an initializer name; a builder that asks for one twice has a bug.
    fn claim_initializer(&mut self, name: &str) -> Result<()> {
        if !self.initializer_names.insert(name.to_string()) {
            return Err(BuildError::Internal(format!("graph {}: initializer {name} is written twice", self.name)));
        }
        Ok(())
    }

    fn tensor_proto(name: &str, dtype: TensorDtype, dims: &[usize]) -> TensorProto {
        TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: onnx_type(dtype),
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Adds an initializer whose bytes are produced by `fill` writing into the weight file.
    /// `fill` must write exactly `numel(dims) * dtype size` bytes (checked).
    pub fn initializer_with(
        &mut self,
        name: &str,
        dtype: TensorDtype,
        dims: &[usize],
        fill: impl FnOnce(&mut WeightSink) -> Result<()>,
    ) -> Result<String> {
        self.claim_initializer(name)?;
        let expected = dims.iter().product::<usize>() as u64 * dtype.size_bytes() as u64;
        let offset = self.weights.begin()?;
        fill(&mut self.weights)?;
        let written = self.weights.offset - offset;
        if written != expected {
            let problem = format!("initializer {name}: wrote {written} bytes, expected {expected} for shape {dims:?}");
            return Err(BuildError::Internal(problem));
        }
        let mut t = Self::tensor_proto(name, dtype, dims);
        t.data_location = DATA_LOCATION_EXTERNAL;
        let file_name = self.weights.file_name.clone();
        t.external_data = vec![
            StringStringEntryProto { key: "location".into(), value: file_name },
            StringStringEntryProto { key: "offset".into(), value: offset.to_string() },
            StringStringEntryProto { key: "length".into(), value: expected.to_string() },
        ];
        self.initializers.push(t);
        Ok(name.to_string())
    }

    /// Adds an initializer from bytes already in memory (small ones inline, others external).
    pub fn initializer(&mut self, name: &str, dtype: TensorDtype, dims: &[usize], bytes: &[u8]) -> Result<String> {
        if bytes.len() <= INLINE_LIMIT {
            self.claim_initializer(name)?;
            let expected = dims.iter().product::<usize>() * dtype.size_bytes();
            if bytes.len() != expected {
                let problem =
                    format!("initializer {name}: {} bytes, expected {expected} for shape {dims:?}", bytes.len());
                return Err(BuildError::Internal(problem));
            }
            let mut t = Self::tensor_proto(name, dtype, dims);
            t.raw_data = bytes.to_vec();
            self.initializers.push(t);
            return Ok(name.to_string());
        }
        self.initializer_with(name, dtype, dims, |w| w.write(bytes))
    }

    pub fn const_i64(&mut self, name: &str, values: &[i64]) -> Result<String> {
        self.initializer(name, TensorDtype::Int64, &[values.len()], bytemuck::cast_slice(values))
    }

    pub fn scalar_i64(&mut self, name: &str, value: i64) -> Result<String> {
        self.initializer(name, TensorDtype::Int64, &[], bytemuck::bytes_of(&value))
    }

    pub fn const_f32(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<String> {
        self.initializer(name, TensorDtype::Float32, dims, bytemuck::cast_slice(values))
    }

    /// The host-to-device copies ONNX Runtime's CUDA execution provider would add to this graph
    /// ([`super::cuda_placement`]): none, or the session cannot capture CUDA graphs.
    pub fn cuda_host_to_device_copies(&self) -> Vec<super::cuda_placement::HostToDeviceCopy> {
        super::cuda_placement::host_to_device_copies(&self.nodes, &self.initializers, &self.inputs)
    }

    pub fn mark_ms_domain(&mut self) {
        self.uses_ms_domain = true;
    }

    /// Writes `<dir>/<file_name>` (the protobuf) and finishes the weight file.
    pub fn save(self, model_path: &Path, producer_version: &str, metadata: &[(&str, String)]) -> Result<u64> {
        let uses_ms = self.uses_ms_domain || self.nodes.iter().any(|n| n.domain == MS_DOMAIN);
        let mut opset_import = vec![OperatorSetIdProto { domain: String::new(), version: ONNX_OPSET }];
        if uses_ms {
            opset_import.push(OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1 });
        }
        // Custom domains (version 1 each), in order of first use.
        for node in &self.nodes {
            let d = &node.domain;
            if !d.is_empty() && d != MS_DOMAIN && !opset_import.iter().any(|o| &o.domain == d) {
                opset_import.push(OperatorSetIdProto { domain: d.clone(), version: 1 });
            }
        }
        let weight_bytes = self.weights.finish()?;
        let model = ModelProto {
            ir_version: 10,
            opset_import,
            producer_name: "pio-export".into(),
            producer_version: producer_version.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: self.name,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto { key: k.to_string(), value: v.clone() })
                .collect(),
            ..Default::default()
        };
        let bytes = model.encode_to_vec();
        std::fs::write(model_path, bytes).map_err(fs_error("write", model_path))?;
        Ok(weight_bytes)
    }
}
