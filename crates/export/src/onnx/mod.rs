//! ONNX protobuf messages and the graph builder on top of them.
pub mod cuda_placement;
pub mod graph;
pub mod proto;
