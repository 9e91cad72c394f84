//! Which values of a graph ONNX Runtime's CUDA execution provider keeps in host memory, and the
//! node inputs it would copy from there to the device. A copy is a Memcpy node, and a session
//! with one cannot capture CUDA graphs (ONNX Runtime 1.31: "This session cannot use the graph
//! capture feature as requested by the user as all compute graph nodes have not been
//! partitioned to the CUDAExecutionProvider"), so a decoder exported for CUDA must have none.
//!
//! The placement is ONNX Runtime 1.31's (`GetCpuPreferredNodes`,
//! onnxruntime/core/framework/fallback_cpu_capability.cc): the CUDA kernels of `Shape` and `Size`
//! write their output to host memory, and a node reading such a host value runs on the CPU when
//! each of its other inputs is a host value, a small initializer (at most 100 elements) or a
//! graph input, none of them 16-bit (or 8-bit float), and none read on the host by the node's own
//! CUDA kernel; its outputs are host values in turn. That is the shape arithmetic ONNX Runtime
//! warns about ("shape massaging nodes will execute on CPU"), and it is free where its results
//! end up read on the host by a CUDA kernel (a Reshape's shape, Range's bounds, a Slice's ends,
//! GroupQueryAttention's total_sequence_length). A host value that a node left on the device
//! reads as data is copied there, once per run.
//!
//! Every node is assumed to have a CUDA kernel for its types (the exporter writes only such
//! nodes; a node without one would run on the CPU and copy its device inputs too).

use std::collections::{HashMap, HashSet};

use super::graph::MS_DOMAIN;
use super::proto::{data_type, NodeProto, TensorProto, ValueInfoProto};

/// Initializers of at most this many elements may feed a node ONNX Runtime moves to the CPU.
const SMALL_INITIALIZER_ELEMENTS: i64 = 100;

/// A host value that a node on the device reads as data: ONNX Runtime copies it with a Memcpy
/// node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostToDeviceCopy {
    /// The value in host memory.
    pub value: String,
    /// The device node that reads it, its op type and the input it reads it at.
    pub consumer: String,
    pub op_type: String,
    pub input: usize,
}

impl std::fmt::Display for HostToDeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (host) feeds input {} of {} ({})", self.value, self.input, self.consumer, self.op_type)
    }
}

/// The inputs a node's CUDA kernel reads from host memory (`InputMemoryType(OrtMemTypeCPUInput,
/// i)` in its registration), for the ops the exporter writes, at the opsets it writes
/// ([`super::graph::ONNX_OPSET`], com.microsoft 1). Any other input is read on the device.
fn reads_on_host(node: &NodeProto, input: usize) -> bool {
    let host_inputs: &[usize] = match (node.domain.as_str(), node.op_type.as_str()) {
        ("" | "ai.onnx", "Reshape" | "Expand" | "Tile" | "Unsqueeze" | "Squeeze" | "Split" | "CumSum" | "TopK") => &[1],
        // The axes of ReduceSum (opset 13) and of the other reductions (opset 18).
        ("" | "ai.onnx", "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceMean") => &[1],
        ("" | "ai.onnx", "ConstantOfShape") => &[0],
        ("" | "ai.onnx", "Range") => &[0, 1, 2],
        ("" | "ai.onnx", "Slice") => &[1, 2, 3, 4],
        ("" | "ai.onnx", "Pad") => &[1, 2, 3],
        // ai.pio's GroupQueryAttention declares the same host input (it hands prompts to ONNX Runtime's).
        (MS_DOMAIN | pio_kernels::ops::DOMAIN, "GroupQueryAttention") => &[6],
        _ => &[],
    };
    host_inputs.contains(&input)
}

/// Whether a node's CUDA kernel writes output `output` to host memory.
fn writes_on_host(node: &NodeProto, output: usize) -> bool {
    matches!((node.domain.as_str(), node.op_type.as_str()), ("" | "ai.onnx", "Shape" | "Size")) && output == 0
}

/// The element types ONNX Runtime never moves to the CPU.
fn is_device_only_type(elem_type: i32) -> bool {
    // FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ.
    matches!(elem_type, data_type::FLOAT16 | data_type::BFLOAT16 | 17..=20)
}

/// The host-to-device copies ONNX Runtime 1.31's CUDA execution provider adds to the graph of
/// `nodes` (in the topological order ONNX requires), `initializers` and `inputs`; empty when the
/// graph can be captured as a CUDA graph.
pub fn host_to_device_copies(
    nodes: &[NodeProto],
    initializers: &[TensorProto],
    inputs: &[ValueInfoProto],
) -> Vec<HostToDeviceCopy> {
    // The element types known without shape inference: graph inputs', initializers' and those a
    // host node casts to (every other host node reads no 16-bit input, so writes none).
    let mut elem_types: HashMap<&str, i32> = inputs
        .iter()
        .map(|i| (i.name.as_str(), i.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).map_or(0, |t| t.elem_type)))
        .collect();
    elem_types.extend(initializers.iter().map(|t| (t.name.as_str(), t.data_type)));
    let graph_inputs: HashSet<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    let small: HashSet<&str> = initializers
        .iter()
        .filter(|t| t.dims.iter().product::<i64>() <= SMALL_INITIALIZER_ELEMENTS)
        .map(|t| t.name.as_str())
        .collect();

    let mut host_values: HashSet<&str> = HashSet::new();
    let mut on_host = vec![false; nodes.len()];
    for (k, node) in nodes.iter().enumerate() {
        let reads_host_value = node.input.iter().any(|x| host_values.contains(x.as_str()));
        on_host[k] = reads_host_value
            && node.input.iter().enumerate().filter(|(_, x)| !x.is_empty()).all(|(i, x)| {
                let x = x.as_str();
                if elem_types.get(x).is_some_and(|&t| is_device_only_type(t)) {
                    return false;
                }
                small.contains(x) || graph_inputs.contains(x) || (host_values.contains(x) && !reads_on_host(node, i))
            });
        for (o, out) in node.output.iter().enumerate() {
            if on_host[k] || writes_on_host(node, o) {
                host_values.insert(out.as_str());
            }
        }
        if on_host[k] && node.op_type == "Cast" {
            if let (Some(out), Some(to)) = (node.output.first(), node.attribute.iter().find(|a| a.name == "to")) {
                elem_types.insert(out.as_str(), to.i as i32);
            }
        }
    }

    let mut copies = Vec::new();
    for (node, _) in nodes.iter().zip(&on_host).filter(|(_, &host)| !host) {
        for (i, x) in node.input.iter().enumerate() {
            if host_values.contains(x.as_str()) && !reads_on_host(node, i) {
                copies.push(HostToDeviceCopy {
                    value: x.clone(),
                    consumer: node.name.clone(),
                    op_type: node.op_type.clone(),
                    input: i,
                });
            }
        }
    }
    copies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{TensorTypeProto, TypeProto};

    fn node(op: &str, name: &str, inputs: &[&str]) -> NodeProto {
        NodeProto {
            name: name.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.to_string()],
            ..Default::default()
        }
    }

    fn input(name: &str, elem_type: i32) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto { tensor_type: Some(TensorTypeProto { elem_type, shape: None }) }),
        }
    }

    fn scalar(name: &str) -> TensorProto {
        TensorProto { name: name.into(), data_type: data_type::INT64, ..Default::default() }
    }

    /// `rows` read off a shape on the host and compared on the device with device data (the
    /// image rows' check of the Qwen3-VL decoder before the fix): a copy.
    #[test]
    fn a_shape_value_compared_on_the_device_is_copied() {
        let nodes = [
            node("Shape", "rows_shape", &["image"]),
            node("Gather", "rows", &["rows_shape", "zero"]),
            node("CumSum", "rank", &["ids", "zero"]),
            node("LessOrEqual", "within", &["rank", "rows"]),
        ];
        let inputs = [input("image", data_type::BFLOAT16), input("ids", data_type::INT64)];
        let copies = host_to_device_copies(&nodes, &[scalar("zero")], &inputs);
        assert_eq!(
            copies,
            vec![HostToDeviceCopy {
                value: "rows".into(),
                consumer: "within".into(),
                op_type: "LessOrEqual".into(),
                input: 1
            }]
        );
    }

    /// The same value written to the device by Range, which reads its bounds on the host: no copy.
    #[test]
    fn a_shape_value_through_range_is_not_copied() {
        let nodes = [
            node("Shape", "rows_shape", &["image"]),
            node("Gather", "rows", &["rows_shape", "zero"]),
            node("Add", "rows_end", &["rows", "one"]),
            node("Range", "rows_on_device", &["rows", "rows_end", "one"]),
            node("CumSum", "rank", &["ids", "zero"]),
            node("LessOrEqual", "within", &["rank", "rows_on_device"]),
        ];
        let inputs = [input("image", data_type::BFLOAT16), input("ids", data_type::INT64)];
        let copies = host_to_device_copies(&nodes, &[scalar("zero"), scalar("one")], &inputs);
        assert_eq!(copies, vec![]);
    }

    /// A host node needs every input on the host: a shape value added to device data stays on
    /// the device (and the value is copied), and a 16-bit input keeps a node on the device.
    #[test]
    fn mixed_and_16_bit_inputs_keep_a_node_on_the_device() {
        let nodes = [
            node("Shape", "shape", &["x"]),
            node("Cast", "lengths", &["mask"]),
            node("Add", "mixed", &["shape", "lengths"]),
            node("Mul", "scaled", &["shape", "half_scale"]),
        ];
        let inputs = [input("x", data_type::BFLOAT16), input("mask", data_type::INT64)];
        let half_scale = TensorProto { name: "half_scale".into(), data_type: data_type::FLOAT16, ..Default::default() };
        let copies = host_to_device_copies(&nodes, &[half_scale], &inputs);
        let consumers: Vec<&str> = copies.iter().map(|c| c.consumer.as_str()).collect();
        assert_eq!(consumers, ["mixed", "scaled"]);
    }
}
