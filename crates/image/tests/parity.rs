//! pio-image against transformers: decoded pixels against Pillow (`load_image`), `pixel_values` and
//! `image_grid_thw` against transformers' Qwen2VLImageProcessor (torchvision backend), on the fixtures
//! `scripts/make_image_fixtures.py` writes under tests/fixtures/images/.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use pio_image::{decode, DecodeLimits, GridThw, ImageInput, ImageProcessor, ImageProcessorConfig, PixelBatch};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The accuracy bar after normalization (issue 11).
const TOLERANCE: f32 = 1e-2;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images")
}

#[derive(Deserialize)]
struct Summary {
    images: BTreeMap<String, DecodedReference>,
    configs: BTreeMap<String, ConfigReference>,
}

#[derive(Deserialize)]
struct DecodedReference {
    width: u32,
    height: u32,
    rgb_sha256: String,
}

#[derive(Deserialize)]
struct ConfigReference {
    patch_size: u32,
    temporal_patch_size: u32,
    merge_size: u32,
    images: BTreeMap<String, ProcessedReference>,
    batch: Batch,
}

#[derive(Deserialize)]
struct ProcessedReference {
    grid_thw: [u32; 3],
    rows: usize,
    cols: usize,
    pixel_values_sha256: String,
}

#[derive(Deserialize, Default)]
struct Batch {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    grid_thw: Vec<[u32; 3]>,
}

fn summary() -> Summary {
    let text =
        std::fs::read_to_string(fixtures().join("summary.json")).expect("summary.json (run make_image_fixtures.py)");
    serde_json::from_str(&text).expect("summary.json parses")
}

fn source(name: &str) -> ImageInput {
    ImageInput::Path(fixtures().join("source").join(name))
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// transformers' `pixel_values` for one image, rebuilt from the stored 8-bit levels (frame 0, [rows, 3·P·P]) and
/// the processor's own level table (`rescale_and_normalize` of every level), which the fixture script checked
/// reproduce its output bit for bit.
fn reference_pixel_values(config: &str, image: &str, reference: &ConfigReference) -> Vec<f32> {
    let dir = fixtures().join("refs").join(config);
    let table_bytes = std::fs::read(dir.join("level_table.f32")).expect("level table");
    let table: Vec<f32> = table_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(table.len(), 3 * 256);
    let levels = image::open(dir.join(format!("{image}.png"))).expect("reference levels").into_luma8();
    let plane = (reference.patch_size * reference.patch_size) as usize;
    let frames = reference.temporal_patch_size as usize;
    assert_eq!(levels.width() as usize, 3 * plane);
    let mut values = Vec::with_capacity(levels.height() as usize * 3 * frames * plane);
    for row in levels.as_raw().chunks_exact(3 * plane) {
        for (channel, channel_levels) in row.chunks_exact(plane).enumerate() {
            for _ in 0..frames {
                values.extend(channel_levels.iter().map(|&level| table[channel * 256 + usize::from(level)]));
            }
        }
    }
    values
}

struct Diff {
    max: f32,
    mean: f64,
}

fn diff(ours: &[f32], reference: &[f32]) -> Diff {
    assert_eq!(ours.len(), reference.len(), "pixel_values sizes differ");
    let mut max = 0.0f32;
    let mut sum = 0.0f64;
    for (a, b) in ours.iter().zip(reference) {
        let d = (a - b).abs();
        max = max.max(d);
        sum += f64::from(d);
    }
    Diff { max, mean: sum / ours.len().max(1) as f64 }
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn decoding_matches_pillow_load_image() {
    let summary = summary();
    let mut failures = Vec::new();
    for (name, reference) in &summary.images {
        let image = match decode(&source(name), &DecodeLimits::default()) {
            Ok(image) => image,
            Err(error) => {
                failures.push(format!("{name}: {error}"));
                continue;
            }
        };
        let got_sha = hex_sha256(image.as_raw());
        let dims_ok = image.dimensions() == (reference.width, reference.height);
        println!(
            "{name:22} {}x{} {}",
            image.width(),
            image.height(),
            if got_sha == reference.rgb_sha256 { "identical" } else { "DIFFERS" }
        );
        if !dims_ok || got_sha != reference.rgb_sha256 {
            failures.push(format!(
                "{name}: {}x{} (Pillow {}x{}), RGB sha256 {got_sha} (Pillow {})",
                image.width(),
                image.height(),
                reference.width,
                reference.height,
                reference.rgb_sha256
            ));
        }
    }
    assert!(failures.is_empty(), "decoded pixels differ from Pillow's:\n{}", failures.join("\n"));
}

#[test]
fn pixel_values_match_transformers() {
    let summary = summary();
    let mut failures = Vec::new();
    let (mut worst, mut images) = (0.0f32, 0);
    for (config_name, reference) in &summary.configs {
        let config = ImageProcessorConfig::from_checkpoint_dir(fixtures().join("configs").join(config_name))
            .expect("fixture config loads");
        assert_eq!(
            (config.patch_size(), config.temporal_patch_size(), config.merge_size()),
            (reference.patch_size, reference.temporal_patch_size, reference.merge_size),
            "{config_name}: config read differently from transformers"
        );
        let processor = ImageProcessor::new(config);
        // Three threads (bands of rows each, on fixtures of a few bands) must give the one thread's values.
        let threaded = processor.clone().with_threads(NonZeroUsize::new(3).unwrap());
        // One batch reused across the images (and each image done twice), as a runtime would: the second pass
        // writes into memory written before, which takes the streaming-store path.
        let mut batch = PixelBatch::default();
        for (name, expected) in &reference.images {
            let image = decode(&source(name), &DecodeLimits::default()).expect("fixture decodes");
            let fresh = processor.preprocess(std::slice::from_ref(&image)).expect("fixture preprocesses");
            threaded.preprocess_into(std::slice::from_ref(&image), &mut batch).expect("fixture preprocesses");
            threaded.preprocess_into(std::slice::from_ref(&image), &mut batch).expect("fixture preprocesses");
            assert_eq!(batch, fresh, "{config_name}/{name}: three threads and a reused batch differ from one thread");
            let grid = batch.grids()[0];
            if grid.as_array() != expected.grid_thw || (batch.rows(), batch.cols()) != (expected.rows, expected.cols) {
                failures.push(format!(
                    "{config_name}/{name}: grid {:?} {}x{} (transformers {:?} {}x{})",
                    grid.as_array(),
                    batch.rows(),
                    batch.cols(),
                    expected.grid_thw,
                    expected.rows,
                    expected.cols
                ));
                continue;
            }
            let reference_values = reference_pixel_values(config_name, name, reference);
            let d = diff(batch.pixel_values(), &reference_values);
            let exact = hex_sha256(&le_bytes(batch.pixel_values())) == expected.pixel_values_sha256;
            println!(
                "{config_name:14} {name:22} grid {:?}: max |diff| {:.2e}, mean |diff| {:.2e}{}",
                grid.as_array(),
                d.max,
                d.mean,
                if exact { " (bit-exact)" } else { "" }
            );
            worst = worst.max(d.max);
            images += 1;
            if d.max > TOLERANCE {
                failures.push(format!("{config_name}/{name}: max |diff| {} over {TOLERANCE}", d.max));
            }
        }
    }
    println!("{images} images: worst max |diff| {worst:.2e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn batch_is_the_concatenation_with_one_grid_per_image() {
    let summary = summary();
    let (config_name, reference) =
        summary.configs.iter().find(|(_, c)| !c.batch.images.is_empty()).expect("a config with a batch reference");
    let config = ImageProcessorConfig::from_checkpoint_dir(fixtures().join("configs").join(config_name)).unwrap();
    // More threads than most images have bands: each image of the batch is split its own way.
    let processor = ImageProcessor::new(config).with_threads(NonZeroUsize::new(8).unwrap());
    let images: Vec<_> = reference
        .batch
        .images
        .iter()
        .map(|name| decode(&source(name), &DecodeLimits::default()).expect("fixture decodes"))
        .collect();
    let batch: PixelBatch = processor.preprocess(&images).expect("batch preprocesses");
    let grids: Vec<[u32; 3]> = batch.grids().iter().map(GridThw::as_array).collect();
    assert_eq!(grids, reference.batch.grid_thw);
    let mut expected = Vec::new();
    for name in &reference.batch.images {
        expected.extend(reference_pixel_values(config_name, name, reference));
    }
    let d = diff(batch.pixel_values(), &expected);
    assert!(d.max <= TOLERANCE, "batch max |diff| {}", d.max);
    assert_eq!(batch.rows(), grids.iter().map(|g| (g[0] * g[1] * g[2]) as usize).sum::<usize>());
    for (index, grid) in batch.grids().iter().enumerate() {
        let rows = batch.image_rows(index).expect("rows of each image");
        assert_eq!(rows.len(), grid.num_patches() * batch.cols());
        // <|image_pad|> count, as Qwen3VLProcessor.replace_image_token computes it: grid.prod() // merge_size**2.
        let merge = reference.merge_size as usize;
        assert_eq!(processor.image_pad_tokens(*grid), grid.num_patches() / (merge * merge));
    }
}

#[test]
fn path_bytes_and_data_uri_decode_and_hash_alike() {
    use base64::Engine;
    let path = fixtures().join("source").join("photo-small.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let uri = format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes));
    let limits = DecodeLimits::default();
    let inputs = [ImageInput::Path(path), ImageInput::Bytes(bytes), ImageInput::DataUri(uri)];
    let encoded: Vec<_> = inputs.iter().map(|input| input.read(&limits).expect("reads")).collect();
    let hashes: Vec<_> = encoded.iter().map(|e| e.content_hash()).collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    let decoded: Vec<_> = encoded.iter().map(|e| e.decode(&limits).expect("decodes")).collect();
    assert!(decoded.windows(2).all(|w| w[0] == w[1]));
    let other = ImageInput::Path(fixtures().join("source").join("photo-pano.jpg"));
    assert_ne!(other.read(&limits).unwrap().content_hash(), hashes[0]);
}
