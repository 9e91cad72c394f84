//! Bad input to `pio-export`: each case must fail with a non-zero exit, an error naming the file
//! and what is wrong, and no output folder (nor temporary folder) left behind.

mod checkpoint_fixtures;

use std::path::{Path, PathBuf};
use std::process::Command;

use checkpoint_fixtures::{copy_fixture, edit_json, edit_safetensors_header, fixture, poison_weight};

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn run_export(args: &[&str], cwd: &Path) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_pio-export")).args(args).current_dir(cwd).output().unwrap();
    Outcome { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Runs an export of `checkpoint` into `<tmp>/out/model` that must fail with all of `needles` in
/// its error; checks nothing was left in `<tmp>/out`.
fn expect_failure(checkpoint: &Path, tmp: &Path, needles: &[&str]) {
    let out_parent = tmp.join("out");
    std::fs::create_dir_all(&out_parent).unwrap();
    let out_dir = out_parent.join("model");
    let o = run_export(
        &["--checkpoint", checkpoint.to_str().unwrap(), "--out", out_dir.to_str().unwrap(), "--context-length", "64"],
        tmp,
    );
    // A checkpoint that cannot be exported is not a usage error.
    assert_eq!(o.code, Some(1), "export should fail with 1; stderr: {}", o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "error should mention `{n}`; stderr: {}", o.stderr);
    }
    let left: Vec<_> = std::fs::read_dir(&out_parent).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "export left {left:?} behind in {}", out_parent.display());
}

#[test]
fn missing_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    edit_json(&ck.join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("num_attention_heads");
    });
    expect_failure(&ck, tmp.path(), &["config.json", "num_attention_heads"]);
}

#[test]
fn truncated_safetensors_is_reported_with_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    let path = ck.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_failure(&ck, tmp.path(), &["model.safetensors", "truncated or corrupt"]);
}

#[test]
fn corrupt_safetensors_header_is_reported_with_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    let path = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(8).take(64) {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    expect_failure(&ck, tmp.path(), &["model.safetensors"]);
}

#[test]
fn tensor_of_the_wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    edit_json(&ck.join("config.json"), |v| {
        v["intermediate_size"] = serde_json::json!(256);
    });
    expect_failure(&ck, tmp.path(), &["mlp.gate_proj.weight", "model.safetensors", "shape"]);
}

#[test]
fn missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-untied-rp", tmp.path());
    std::fs::remove_file(ck.join("model-00002-of-00002.safetensors")).unwrap();
    expect_failure(&ck, tmp.path(), &["model-00002-of-00002.safetensors", "missing shard"]);
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    // Untying the embeddings makes the exporter look for an lm_head the checkpoint lacks.
    edit_json(&ck.join("config.json"), |v| {
        v["tie_word_embeddings"] = serde_json::json!(false);
    });
    expect_failure(&ck, tmp.path(), &["lm_head.weight", "missing"]);
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run_export(&["--model", "llama-9000"], tmp.path());
    assert_eq!(o.code, Some(2), "a usage error: {}", o.stderr);
    assert!(o.stderr.contains("llama-9000") && o.stderr.contains("qwen3-4b-instruct-2507"), "{}", o.stderr);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing should be written");
}

#[test]
fn preset_without_checkpoint_says_where_to_put_one() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run_export(&["--model", "qwen3-4b-instruct-2507"], tmp.path());
    assert_ne!(o.code, Some(0));
    assert!(
        o.stderr.contains("checkpoints/qwen3-4b-instruct-2507") && o.stderr.contains("--synthetic"),
        "{}",
        o.stderr
    );
}

#[test]
fn unwritable_output_folder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where the output's parent folder should be: no user (root included) can
    // create a folder inside it.
    let blocker = tmp.path().join("not-a-folder");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("model");
    let o = run_export(
        &["--checkpoint", fixture("qwen3-tied-hub").to_str().unwrap(), "--out", out.to_str().unwrap()],
        tmp.path(),
    );
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("not-a-folder"), "{}", o.stderr);
    assert!(!out.exists());
}

#[test]
fn unknown_architecture_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    edit_json(&ck.join("config.json"), |v| {
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    });
    expect_failure(&ck, tmp.path(), &["MistralForCausalLM", "Qwen3ForCausalLM"]);
}

#[test]
fn fp16_graph_for_the_cpu_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = run_export(
        &[
            "--checkpoint",
            fixture("qwen3-tied-hub").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--precision",
            "fp16",
        ],
        tmp.path(),
    );
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("--ep cuda"), "{}", o.stderr);
    assert!(!out.exists());
}

#[test]
fn force_replaces_only_an_earlier_export() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let ck = fixture("qwen3-tied-hub");
    let args = ["--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--context-length", "64"];
    let mut forced = args.to_vec();
    forced.push("--force");
    let left = || -> Vec<_> { std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect() };

    let o = run_export(&args, tmp.path());
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("already exists (pass --force"), "{}", o.stderr);
    // A folder that is not an earlier export (no pio.json) survives --force.
    let o = run_export(&forced, tmp.path());
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("--force replaces only an earlier pio-export output"), "{}", o.stderr);
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(left(), ["out"], "no scratch folder left");

    // An empty folder holds nothing to lose: it takes the export without --force.
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::create_dir(&out).unwrap();
    let o = run_export(&args, tmp.path());
    assert_eq!(o.code, Some(0), "an empty folder takes the export: {}", o.stderr);
    std::fs::write(out.join("keep.txt"), b"inside an export").unwrap();
    let o = run_export(&forced, tmp.path());
    assert_eq!(o.code, Some(0), "an earlier export is replaced: {}", o.stderr);
    assert!(out.join("pio.json").is_file() && out.join("model.onnx").is_file() && !out.join("keep.txt").exists());
    assert_eq!(left(), ["out"], "the earlier export is gone too");
}

#[test]
fn checkpoint_without_tokenizer_exports_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = run_export(
        &[
            "--checkpoint",
            fixture("qwen3-tied-hub").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--context-length",
            "64",
        ],
        tmp.path(),
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("no tokenizer.json"), "{}", o.stderr);
    let manifest = pio_models::Manifest::load(&out).unwrap();
    assert!(manifest.tokenizer.is_none());
    assert_eq!(manifest.dims.context_length, 64);
    assert_eq!(manifest.eos_token_ids, vec![1, 2]);
}

/// Runs `pio-export` on fixture `name` with extra `flags`; returns the outcome and the output folder.
fn export_with_flags(name: &str, flags: &[&str], tmp: &Path) -> (Outcome, PathBuf) {
    let out = tmp.join("out");
    let ck = fixture(name);
    let mut args = vec!["--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--context-length", "64"];
    args.extend_from_slice(flags);
    (run_export(&args, tmp), out)
}

#[test]
fn no_sliding_window_is_refused_on_a_model_without_one_and_warns_on_one_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = export_with_flags("qwen3-tied-hub", &["--no-sliding-window"], tmp.path());
    let why = "qwen3-tied-hub (Qwen3ForCausalLM) has no sliding-window layers (use_sliding_window is false)";
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains(why), "{}", o.stderr);
    assert!(!out.exists());
    let (o, out) = export_with_flags("qwen3-sliding", &["--no-sliding-window"], tmp.path());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("WARN") && o.stderr.contains("8-token window"), "{}", o.stderr);
    assert_eq!(pio_models::Manifest::load(&out).unwrap().options.layer_windows, [None, None, None]);
}

#[test]
fn no_fused_attention_refuses_the_switches_of_group_query_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let refused: [&[&str]; 2] = [&["--kv-cache-int8"], &["--fused-qk-norm", "--ep", "cuda"]];
    for flags in refused {
        let flags = [&["--no-fused-attention"], flags].concat();
        let needles = ["--no-fused-attention", flags[1]];
        let (o, out) = export_with_flags("qwen3-tied-hub", &flags, tmp.path());
        assert_ne!(o.code, Some(0), "{flags:?} should be refused");
        assert!(needles.iter().all(|n| o.stderr.contains(n)), "{flags:?}: {}", o.stderr);
        assert!(!out.exists());
    }
    // Without an explicit --fused-qk-norm, a GPU graph's q/k norm default follows the attention.
    let (o, out) = export_with_flags("qwen3-tied-hub", &["--no-fused-attention", "--ep", "cuda"], tmp.path());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let options = pio_models::Manifest::load(&out).unwrap().options;
    assert!(!options.fused_attention && !options.fused_qk_norm);
}

#[test]
fn unsupported_vision_activation_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3vl-a", tmp.path());
    edit_json(&ck.join("config.json"), |v| {
        v["vision_config"]["hidden_act"] = serde_json::json!("relu");
    });
    expect_failure(&ck, tmp.path(), &["hidden_act", "vision_config", "relu"]);
}

#[test]
fn missing_vision_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3vl-a", tmp.path());
    // One more vision block than the checkpoint has.
    edit_json(&ck.join("config.json"), |v| {
        v["vision_config"]["depth"] = serde_json::json!(4);
    });
    expect_failure(&ck, tmp.path(), &["model.visual.blocks.3", "missing"]);
}

#[test]
fn config_that_is_not_a_json_object_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    std::fs::write(ck.join("config.json"), "{\"architectures\": [").unwrap();
    expect_failure(&ck, tmp.path(), &["config.json is not valid JSON", "EOF while parsing"]);
    std::fs::write(ck.join("config.json"), "[1, 2]").unwrap();
    expect_failure(&ck, tmp.path(), &["config.json: the file must be a JSON object, got [1,2]"]);
}

#[test]
fn generation_config_field_of_the_wrong_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    edit_json(&ck.join("generation_config.json"), |v| v["temperature"] = serde_json::json!("hot"));
    expect_failure(&ck, tmp.path(), &["generation_config.json: field `temperature` must be a number, got \"hot\""]);
}

#[test]
fn index_naming_a_file_outside_the_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-untied-rp", tmp.path());
    edit_json(&ck.join("model.safetensors.index.json"), |v| {
        v["weight_map"]["lm_head.weight"] = serde_json::json!("../model-00002-of-00002.safetensors");
    });
    expect_failure(&ck, tmp.path(), &["model.safetensors.index.json", "lm_head.weight", "../model-00002"]);
}

#[test]
fn tensor_stored_in_two_shards_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-untied-rp", tmp.path());
    // A third shard holding the second one's tensors again.
    std::fs::copy(ck.join("model-00002-of-00002.safetensors"), ck.join("extra.safetensors")).unwrap();
    edit_json(&ck.join("model.safetensors.index.json"), |v| {
        v["weight_map"]["extra.tensor"] = serde_json::json!("extra.safetensors");
    });
    expect_failure(&ck, tmp.path(), &["is in both", "extra.safetensors", "model-00002-of-00002.safetensors"]);
}

#[test]
fn tensor_of_an_unsupported_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    // I16 has BF16's size, so the header stays consistent with the data.
    edit_safetensors_header(&ck.join("model.safetensors"), |h| {
        h["model.norm.weight"]["dtype"] = serde_json::json!("I16");
    });
    expect_failure(&ck, tmp.path(), &["model.norm.weight", "model.safetensors", "dtype I16"]);
}

#[test]
fn config_with_absurdly_many_experts_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3moe-a", tmp.path());
    // 4 billion experts: the checkpoint's tensor list would not fit in memory, so the count of tensors the
    // config needs is compared with the checkpoint's before the list is built.
    edit_json(&ck.join("config.json"), |v| v["num_experts"] = serde_json::json!(u32::MAX));
    expect_failure(&ck, tmp.path(), &["config.json in", "describes at least", "4294967295 experts", "holds"]);
}

#[test]
fn weight_that_cannot_be_quantized_is_named_with_its_row_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    poison_weight(&ck.join("model.safetensors"), "model.layers.1.self_attn.q_proj.weight", 3, 5);
    let out_parent = tmp.path().join("out");
    std::fs::create_dir_all(&out_parent).unwrap();
    let out = out_parent.join("model");
    let o = run_export(
        &["--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--precision", "int4"],
        tmp.path(),
    );
    assert_ne!(o.code, Some(0));
    let expected = "cannot quantize model.layers.1.self_attn.q_proj to int4: row 3: the weight in column 5 is NaN";
    assert!(o.stderr.contains(expected) && o.stderr.contains("model.onnx"), "{}", o.stderr);
    assert_eq!(std::fs::read_dir(&out_parent).unwrap().count(), 0, "nothing left behind");
}

/// A value within its flag's own range that the settings refuse (the flags' ranges are clap's:
/// `numeric_flags_out_of_range_name_the_flag_and_the_range`).
#[test]
fn settings_out_of_range_are_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = fixture("qwen3-tied-hub");
    let out = tmp.path().join("out");
    let o = run_export(
        &["--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--context-length", "100000000000"],
        tmp.path(),
    );
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("--context-length 100000000000 makes rotary tables of"), "{}", o.stderr);
    assert!(!out.exists());
}

/// A numeric flag out of range is refused by clap (exit code 2) with the flag and its range,
/// negative values included (clap would otherwise call `-1` an unexpected argument).
#[test]
fn numeric_flags_out_of_range_name_the_flag_and_the_range() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = fixture("qwen3-tied-hub");
    for (flag, value, range) in [
        ("--context-length", "0", "must be a whole number >= 1"),
        ("--context-length", "-1", "must be a whole number >= 1"),
        ("--int4-block-size", "24", "must be a power of two >= 16"),
        ("--int4-accuracy-level", "5", "must be a whole number in [0, 4]"),
        ("--int4-accuracy-level", "-1", "must be a whole number in [0, 4]"),
        ("--seed", "-3", "must be a whole number in [0, 18446744073709551615]"),
    ] {
        let o = run_export(&["--checkpoint", ck.to_str().unwrap(), flag, value], tmp.path());
        assert_eq!(o.code, Some(2), "{flag} {value}: {}", o.stderr);
        assert!(o.stderr.contains(flag) && o.stderr.contains(range), "{flag} {value}: {}", o.stderr);
    }
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing written");
}

/// Logs written to a pipe or a file carry no ANSI colour codes (stderr is not a terminal here,
/// and NO_COLOR is unset).
#[test]
fn piped_logs_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let out = Command::new(env!("CARGO_BIN_EXE_pio-export"))
        .args(["--checkpoint", missing.to_str().unwrap()])
        .current_dir(tmp.path())
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ERROR") && stderr.contains("config.json"), "{stderr}");
    assert!(!out.stderr.contains(&0x1b), "colour codes in piped logs: {stderr:?}");
}

#[test]
fn rope_and_norm_values_that_break_the_graph_are_named() {
    // Each exported before: NaN rotary tables (`pio run --greedy` gave token 0 forever), or an
    // ONNX Runtime error at load that did not name config.json.
    let cases = [
        ("rope_theta", serde_json::json!(0)),
        ("rope_theta", serde_json::json!(-10000)),
        ("rms_norm_eps", serde_json::json!(-1e-6)),
        ("rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 0.0})),
        ("max_position_embeddings", serde_json::json!(0)),
    ];
    for (field, value) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let ck = copy_fixture("qwen3-tied-hub", tmp.path());
        edit_json(&ck.join("config.json"), |v| v[field] = value.clone());
        expect_failure(&ck, tmp.path(), &["config.json", field, "must be positive"]);
    }
}

#[test]
fn zero_vision_position_embeddings_is_named_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3vl-a", tmp.path());
    edit_json(&ck.join("config.json"), |v| v["vision_config"]["num_position_embeddings"] = 0.into());
    expect_failure(&ck, tmp.path(), &["config.json", "num_position_embeddings", "must be positive"]);
}

#[test]
fn generation_config_sampling_out_of_range_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path());
    edit_json(&ck.join("generation_config.json"), |v| v["top_p"] = 1.5.into());
    expect_failure(&ck, tmp.path(), &["generation_config.json", "top_p", "(0, 1]"]);
}

#[test]
fn a_weight_beyond_float16_is_named_not_made_infinite() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("qwen3-tied-hub", tmp.path()); // bf16 weights
    let path = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let name = "model.layers.0.mlp.down_proj.weight";
    let entry = pio_export::checkpoint::read_tensor_entries(&bytes, &path)
        .unwrap()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap();
    bytes[entry.range.start..entry.range.start + 2].copy_from_slice(&half::bf16::from_f32(1e5).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let out_parent = tmp.path().join("out");
    std::fs::create_dir_all(&out_parent).unwrap();
    let out = out_parent.join("model");
    let args =
        ["--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--precision", "fp16", "--ep", "cuda"];
    let o = run_export(&args, tmp.path());
    assert_ne!(o.code, Some(0), "exported an infinite float16 weight: {}", o.stderr);
    assert!(o.stderr.contains(name) && o.stderr.contains("float16"), "{}", o.stderr);
    assert_eq!(std::fs::read_dir(&out_parent).unwrap().count(), 0, "nothing left behind");
    // bf16 holds it.
    let args =
        ["--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--precision", "bf16", "--ep", "cuda"];
    let o = run_export(&args, tmp.path());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

#[test]
fn flags_that_would_change_nothing_are_refused() {
    let ck = fixture("qwen3-tied-hub");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (ck, out) = (ck.to_str().unwrap(), out.to_str().unwrap());
    for (extra, needle) in [
        (&["--seed", "7"][..], "--synthetic"),
        (&["--checkpoint-out", "/tmp/never"][..], "--synthetic"),
        (&["--tokenizer", "/tmp/never"][..], "--synthetic"),
        (&["--int4-block-size", "64"][..], "--int4-block-size only applies with --precision int4"),
        (&["--int4-accuracy-level", "4"][..], "--int4-accuracy-level only applies with --precision int4"),
    ] {
        let o = run_export(&[&["--checkpoint", ck, "--out", out][..], extra].concat(), tmp.path());
        assert_eq!(o.code, Some(2), "{extra:?}: {}", o.stderr);
        assert!(o.stderr.contains(needle), "{extra:?}: {}", o.stderr);
        assert!(!tmp.path().join("out").exists(), "{extra:?} wrote an output");
    }
}
