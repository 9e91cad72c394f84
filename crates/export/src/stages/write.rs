//! Writing the decoder: one graph (`model.onnx`), or one graph per stage
//! (`model.stage{i}.onnx`, each with its weights in `<file>.data`), the stages written in
//! parallel (each streams its own weight file), and what the manifest says about them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use indicatif::ProgressBar;
use pio_models::manifest::{IoSpec, StageSpec, TargetEp};
use pio_models::ModelConfig;

use super::plan::{decoder_bytes, StageScope};
use crate::arch;
use crate::checkpoint::Checkpoint;
use crate::decoder::DecoderBuilder;
use crate::error::{BuildError, ExportError};
use crate::export::MODEL_FILE;
use crate::onnx::graph::Graph;
use crate::settings::ExportSettings;

/// What writing the decoder produced, for the manifest.
#[derive(Debug)]
pub struct DecoderFiles {
    /// The manifest's `decoder`: the graph, or the first stage's.
    pub decoder: String,
    /// The whole decoder's inputs and outputs (a staged one's without what passes between stages).
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    /// The stages in order (empty: one graph).
    pub stages: Vec<StageSpec>,
    pub model_bytes: u64,
    pub weight_bytes: u64,
    /// The `--pio-kernels` families any graph uses.
    pub pio_families: Vec<String>,
}

/// One graph written.
struct GraphFiles {
    file: String,
    layers: std::ops::Range<usize>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    model_bytes: u64,
    weight_bytes: u64,
    families: Vec<String>,
}

/// The file of stage `index` (`model.onnx` for an unstaged decoder).
pub fn stage_file(scope: &StageScope) -> String {
    if scope.count == 1 {
        MODEL_FILE.to_string()
    } else {
        format!("model.stage{}.onnx", scope.index)
    }
}

type Result<T> = std::result::Result<T, ExportError>;

/// Writes `config`'s decoder into `dir` as `settings` say: one graph, or the stages of
/// `settings.stages` in parallel. `metadata` goes into every graph (with the stage and the
/// custom operators it needs added). Errors name the graph as it will be in `out_dir`.
#[allow(clippy::too_many_arguments)]
pub fn write_decoder(
    dir: &Path,
    out_dir: &Path,
    name: &str,
    ck: &Checkpoint,
    config: &ModelConfig,
    settings: &ExportSettings,
    progress: &ProgressBar,
    metadata: &[(&str, String)],
) -> Result<DecoderFiles> {
    let bytes = decoder_bytes(config, settings)?;
    let ranges = settings.stages.plan(&bytes)?;
    let count = ranges.len();
    let scopes: Vec<StageScope> =
        ranges.into_iter().enumerate().map(|(index, layers)| StageScope { index, count, layers }).collect();
    if count > 1 {
        for s in &scopes {
            tracing::info!(
                "stage {} of {count}: layers {}..{} ({})",
                s.index,
                s.layers.start,
                s.layers.end,
                pio_models::size::format_bytes(bytes.stage(s.layers.clone(), count))
            );
        }
    }
    let graphs = write_in_parallel(&scopes, |scope| {
        let graph_error = ExportError::build(out_dir.join(stage_file(scope)));
        write_graph(dir, name, ck, config, settings, progress, scope, metadata).map_err(graph_error)
    })?;
    Ok(decoder_files(graphs))
}

/// Runs `write` for every scope on up to as many threads as there are cores (each stage's
/// graph streams into its own file); results in scope order. After a failure no further stage
/// starts; the first error is returned.
fn write_in_parallel(
    scopes: &[StageScope],
    write: impl Fn(&StageScope) -> Result<GraphFiles> + Sync,
) -> Result<Vec<GraphFiles>> {
    let writers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(scopes.len()).max(1);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<GraphFiles>>>> = Mutex::new((0..scopes.len()).map(|_| None).collect());
    std::thread::scope(|threads| {
        for _ in 0..writers {
            threads.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= scopes.len() || failed.load(Ordering::SeqCst) {
                    break;
                }
                let result = write(&scopes[i]);
                if result.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                if let Ok(mut slots) = results.lock() {
                    slots[i] = Some(result);
                }
            });
        }
    });
    // A writer that panicked has already made `thread::scope` panic: the lock is not poisoned here.
    let slots = results.into_inner().map_err(|_| internal("a stage writer panicked"))?;
    let mut graphs = Vec::with_capacity(scopes.len());
    let mut first_error = None;
    for slot in slots {
        match slot {
            Some(Ok(g)) => graphs.push(g),
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    match first_error {
        Some(e) => Err(e),
        None if graphs.len() != scopes.len() => Err(internal("a stage writer stopped without a result")),
        None => Ok(graphs),
    }
}

/// A broken invariant of the parallel writers (a bug), named after the decoder's first graph.
fn internal(what: &str) -> ExportError {
    ExportError::Build { graph: PathBuf::from(MODEL_FILE), source: Box::new(BuildError::Internal(what.to_string())) }
}

#[allow(clippy::too_many_arguments)]
fn write_graph(
    dir: &Path,
    name: &str,
    ck: &Checkpoint,
    config: &ModelConfig,
    settings: &ExportSettings,
    progress: &ProgressBar,
    scope: &StageScope,
    metadata: &[(&str, String)],
) -> std::result::Result<GraphFiles, BuildError> {
    let file = stage_file(scope);
    let graph_name = if scope.count == 1 { name.to_string() } else { format!("{name}-stage{}", scope.index) };
    let graph = Graph::new(&graph_name, &dir.join(format!("{file}.data")))?;
    let mut builder = DecoderBuilder::new(graph, ck, &config.text, settings, progress, scope.clone())?;
    arch::build_decoder(config, &mut builder)?;
    if settings.target_ep() == TargetEp::Cuda {
        // A graph that still runs, only slower: said, not refused (the tests hold every decoder
        // the exporter writes to none).
        for copy in builder.g.cuda_host_to_device_copies() {
            tracing::warn!(
                "{file}: {copy}: ONNX Runtime's CUDA execution provider copies it with a Memcpy node, \
                 and the session cannot capture CUDA graphs"
            );
        }
    }
    let (inputs, outputs) = {
        let (i, o) = builder.g.io();
        (i.to_vec(), o.to_vec())
    };
    let families = builder.pio_usage.families();
    let mut metadata = metadata.to_vec();
    if !families.is_empty() {
        // What a user loading this graph elsewhere sees next to ONNX Runtime's "not a registered op".
        metadata.push((
            "pio.custom_ops",
            format!(
                "domain {} ({}): Inference-PIO's own kernels; load this graph with pio / pio-runtime, which registers them",
                pio_kernels::ops::DOMAIN,
                families.join(", ")
            ),
        ));
    }
    if scope.count > 1 {
        metadata.push((
            "pio.stage",
            format!(
                "stage {} of {} (decoder layers {}..{}); run the stages in order with pio / pio-runtime",
                scope.index, scope.count, scope.layers.start, scope.layers.end
            ),
        ));
    }
    let path = dir.join(&file);
    let weight_bytes = builder.g.save(&path, env!("CARGO_PKG_VERSION"), &metadata)?;
    let model_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(GraphFiles { file, layers: scope.layers.clone(), inputs, outputs, model_bytes, weight_bytes, families })
}

/// The manifest's view of the graphs: for stages, the whole decoder's IO is every stage's
/// inputs and outputs without the values that pass between stages.
fn decoder_files(graphs: Vec<GraphFiles>) -> DecoderFiles {
    let mut pio_families: Vec<String> = graphs.iter().flat_map(|g| g.families.clone()).collect();
    pio_families.sort();
    pio_families.dedup();
    let model_bytes = graphs.iter().map(|g| g.model_bytes).sum();
    let weight_bytes = graphs.iter().map(|g| g.weight_bytes).sum();
    let decoder = graphs.first().map(|g| g.file.clone()).unwrap_or_else(|| MODEL_FILE.to_string());
    if let [single] = graphs.as_slice() {
        return DecoderFiles {
            decoder,
            inputs: single.inputs.clone(),
            outputs: single.outputs.clone(),
            stages: Vec::new(),
            model_bytes,
            weight_bytes,
            pio_families,
        };
    }
    let produced = |name: &str| graphs.iter().any(|g| g.outputs.iter().any(|o| o.name == name));
    let consumed = |name: &str| graphs.iter().any(|g| g.inputs.iter().any(|i| i.name == name));
    let mut inputs: Vec<IoSpec> = Vec::new();
    let mut outputs: Vec<IoSpec> = Vec::new();
    for g in &graphs {
        for i in g.inputs.iter().filter(|i| !produced(&i.name)) {
            if !inputs.iter().any(|known| known.name == i.name) {
                inputs.push(i.clone());
            }
        }
        outputs.extend(g.outputs.iter().filter(|o| !consumed(&o.name)).cloned());
    }
    let stages = graphs
        .into_iter()
        .map(|g| StageSpec {
            file: g.file,
            layers: g.layers,
            inputs: g.inputs,
            outputs: g.outputs,
            weight_bytes: g.weight_bytes,
        })
        .collect();
    DecoderFiles { decoder, inputs, outputs, stages, model_bytes, weight_bytes, pio_families }
}
