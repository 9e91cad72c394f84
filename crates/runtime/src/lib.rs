//! pio-runtime: ONNX Runtime sessions over exported graph folders, the forward step through the KV
//! cache (`model`), the serving engine that runs many requests at once over it (`engine`: continuous
//! batching, KV slots, prefix caching), Rust-side sampling, chat templates and streaming
//! detokenization.

pub mod chat_template;
pub mod cuda_rt;
pub mod engine;
pub mod ep;
pub mod generate;
pub mod gpu_monitor;
pub mod kv_cache;
pub mod model;
pub mod model_error;
pub mod ort_lib;
pub mod plugin;
pub mod sampling;
pub mod stages;
pub mod step_inputs;
pub mod structured;
pub mod tokenizer;
pub mod vision;
