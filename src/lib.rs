//! Workspace root: integration tests live in `tests/`, benchmarks in `benches/`.
