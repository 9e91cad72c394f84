//! Workspace root: integration tests live in `tests/`, benchmarks in `benches/`; this library
//! holds what both use beyond the crates' public APIs.

pub mod vl;
