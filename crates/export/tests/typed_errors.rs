//! pio-export's library boundary: `Checkpoint::open`, `export()`, `write_checkpoint` and the settings checks
//! return typed errors whose variants name the file and the tensor, field or flag, with the causes kept as
//! sources (the CLI's messages are checked in bad_input.rs).

mod checkpoint_fixtures;

use std::error::Error;
use std::path::{Path, PathBuf};

use checkpoint_fixtures::{copy_fixture, edit_json, poison_weight};
use pio_export::checkpoint::Checkpoint;
use pio_export::synthetic::{write_checkpoint, ShapeOverrides};
use pio_export::{
    export, BuildError, CheckpointError, ExportError, ExportRequest, ExportSettings, OutputError, QuantError,
    SettingsError,
};
use pio_models::error::ConfigError;
use pio_models::find_preset;
use pio_models::size::Precision;
use pio_models::TargetEp;

fn request(checkpoint: &Path, out_dir: PathBuf, precision: Precision) -> Result<ExportRequest, SettingsError> {
    let settings = ExportSettings::builder(precision, TargetEp::Cpu, 64, true).build()?;
    Ok(ExportRequest::builder(checkpoint, out_dir, settings).source("test").build())
}

/// The messages of `error` and of its sources, outermost first.
fn chain(error: &dyn Error) -> Vec<String> {
    let mut out = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        out.push(e.to_string());
        source = e.source();
    }
    out
}

#[test]
fn checkpoint_errors_name_the_file_and_keep_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    assert!(matches!(Checkpoint::open(&missing), Err(CheckpointError::NoFolder { dir }) if dir == missing));

    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    edit_json(&ck.join("config.json"), |v| v["num_key_value_heads"] = serde_json::json!(3));
    let Err(CheckpointError::Config(ConfigError::Invalid { file, field, value, .. })) = Checkpoint::open(&ck) else {
        panic!("a config error")
    };
    assert_eq!((file, field.as_str(), value.as_str()), (ck.join("config.json"), "num_key_value_heads", "3"));

    let ck = copy_fixture("qwen3-untied-rp", tmp.path());
    let shard = ck.join("model-00002-of-00002.safetensors");
    std::fs::write(&shard, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let err = Checkpoint::open(&ck).err().expect("a truncated header");
    assert!(matches!(&err, CheckpointError::Safetensors { file, .. } if *file == shard), "{err:?}");
    assert!(err.source().is_some_and(|s| s.is::<safetensors::SafeTensorError>()), "{:?}", chain(&err));
}

#[test]
fn export_errors_say_which_input_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    let out = tmp.path().join("out");

    // Settings that no target runs are refused when they are built, before any export.
    let err = request(&ck, out.clone(), Precision::Fp16).unwrap_err();
    assert!(matches!(err, SettingsError::PrecisionNeedsGpu { .. }), "{err:?}");

    edit_json(&ck.join("config.json"), |v| v["tie_word_embeddings"] = serde_json::json!(false));
    let err = export(&request(&ck, out.clone(), Precision::Fp32).unwrap()).unwrap_err();
    assert!(
        matches!(&err, ExportError::Checkpoint(CheckpointError::MissingTensor { tensor, dir }) if tensor == "lm_head.weight" && *dir == ck),
        "{err:?}"
    );
    edit_json(&ck.join("config.json"), |v| v["tie_word_embeddings"] = serde_json::json!(true));

    poison_weight(&ck.join("model.safetensors"), "model.layers.0.mlp.down_proj.weight", 7, 2);
    let err = export(&request(&ck, out.clone(), Precision::Int4).unwrap()).unwrap_err();
    let ExportError::Build { graph, source } = &err else { panic!("a build error: {err:?}") };
    let BuildError::Quantize { weight, source } = source.as_ref() else { panic!("a quantization error: {err:?}") };
    assert_eq!((graph, weight.as_str()), (&out.join("model.onnx"), "model.layers.0.mlp.down_proj"));
    assert!(matches!(source, QuantError::NotFinite { row: 7, column: 2, .. }), "{source:?}");
    assert_eq!(chain(&err).len(), 3, "{:?}", chain(&err));
    assert!(!out.exists(), "nothing is left behind");

    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    let err = export(&request(&ck, out.clone(), Precision::Fp32).unwrap()).unwrap_err();
    assert!(matches!(&err, ExportError::Output(OutputError::Exists { dest }) if *dest == out), "{err:?}");
}

#[test]
fn synthetic_checkpoint_errors_name_the_shape_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let preset = find_preset("qwen3-coder-30b").unwrap();
    let heads = ShapeOverrides { layers: Some(2), heads: Some(5), ..Default::default() };
    let err = write_checkpoint(preset, &heads, 0, None, &tmp.path().join("a")).unwrap_err();
    let ExportError::SyntheticShape { preset: "qwen3-coder-30b", source } = &err else { panic!("{err:?}") };
    assert_eq!(source.field(), Some("num_key_value_heads"), "{source}");

    let experts = ShapeOverrides { experts: Some(1 << 30), ..Default::default() };
    let err = write_checkpoint(preset, &experts, 0, None, &tmp.path().join("b")).unwrap_err();
    assert!(matches!(err, ExportError::SyntheticTooLarge { tensors, .. } if tensors > 1 << 30), "{err:?}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing is written");
}

#[test]
fn settings_errors_name_the_flag() {
    let config = find_preset("qwen3-4b-instruct-2507").unwrap().config().unwrap();
    let settings = ExportSettings::builder(Precision::Int4, TargetEp::Cpu, 4096, true);
    let block_48 = settings.clone().int4_block_size(48).build();
    assert_eq!(block_48.err(), Some(SettingsError::Int4BlockSize { block_size: 48 }));
    // The library's own check, for callers other than pio-export (whose flag clap limits to 0..=4).
    let level_7 = settings.clone().int4_accuracy_level(7).build();
    assert_eq!(level_7.err(), Some(SettingsError::Int4AccuracyLevel { level: 7 }));
    // The rotary table's size depends on the model: checked against it by the export.
    let longest = settings.context_length(usize::MAX).build().unwrap();
    let err = longest.check_model("m", &config.text).unwrap_err();
    assert!(matches!(err, SettingsError::ContextTooLong { .. }), "{err:?}");
    let err = pio_export::PioKernels::parse("linear,fastest", Precision::Int4).unwrap_err();
    assert_eq!(err, SettingsError::UnknownPioKernel { family: "fastest".into() });
}
