//! A 1920x1080 JPEG to Qwen3-VL patches (issue 11's target: 15 ms on one core), and its parts.
//!
//! The JPEG is generated here: a photo-like 1080p frame (smooth gradients, texture, hard edges, sensor-like
//! noise) encoded baseline 4:2:0 at quality 90 by libjpeg-turbo, which comes out at a typical photo's size.
//! Everything runs on one thread, but for one case that spreads preprocessing over the machine's cores (at most
//! 8). Each pipeline benchmark runs twice: with wall time, and with the thread's CPU time, which is the number to
//! read on a machine shared with other jobs. JPEG decoding uses libjpeg-turbo's SIMD code only if `nasm` was
//! installed at build time (see crates/image/Cargo.toml).
//!
//! ```sh
//! cargo bench -p pio-image --bench preprocess
//! ```

use std::hint::black_box;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, Criterion};
use pio_image::{DecodeLimits, EncodedImage, ImageProcessor, ImageProcessorConfig, PixelBatch, RgbImage};

const WIDTH: usize = 1920;
const HEIGHT: usize = 1080;

/// Qwen/Qwen3-VL-2B-Instruct's preprocessor_config.json.
const QWEN3_VL: &str = r#"{"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#;

fn photo_like_rgb() -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 13) as f32 - 6.0
    };
    let mut rgb = Vec::with_capacity(WIDTH * HEIGHT * 3);
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            let (fx, fy) = (x as f32 / WIDTH as f32, y as f32 / HEIGHT as f32);
            let texture = ((fx * 90.0).sin() * (fy * 70.0).cos() + (fx * 13.0 + fy * 29.0).sin()) * 20.0;
            let building = (0.55..0.7).contains(&fx) && fy > 0.3 && (x / 12 + y / 18) % 3 != 0;
            let base = if fy < 0.5 {
                [110.0 + 80.0 * fy, 150.0 + 60.0 * fy, 235.0 - 40.0 * fy]
            } else {
                [90.0 + texture, 120.0 + texture * 0.8, 60.0 + texture * 0.5]
            };
            let base = if building { [85.0, 80.0, 90.0] } else { base };
            for channel in base {
                rgb.push((channel + noise()).clamp(0.0, 255.0) as u8);
            }
        }
    }
    rgb
}

fn encode_jpeg(rgb: &[u8]) -> Vec<u8> {
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    compress.set_fastest_defaults(); // baseline, Huffman tables as libjpeg-turbo writes them
    compress.set_size(WIDTH, HEIGHT);
    compress.set_quality(90.0);
    compress.set_chroma_sampling_pixel_sizes((2, 2), (2, 2));
    let mut started = compress.start_compress(Vec::new()).expect("compress starts");
    started.write_scanlines(rgb).expect("scanlines");
    started.finish().expect("compress finishes")
}

/// Time the benchmark thread spent on a CPU (`CLOCK_THREAD_CPUTIME_ID`). Unlike wall time it leaves out the
/// time the thread waited for a core, so it stays meaningful on a machine shared with other jobs.
struct ThreadCpuTime;

static WALL_TIME: WallTime = WallTime;

fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_nanos()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_nanos().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WALL_TIME.formatter() // nanoseconds, like wall time
    }
}

struct Inputs {
    jpeg: Vec<u8>,
    processor: ImageProcessor,
    decoded: RgbImage,
}

fn inputs() -> Inputs {
    let jpeg = encode_jpeg(&photo_like_rgb());
    let config =
        ImageProcessorConfig::from_json(QWEN3_VL, "qwen3-vl preprocessor_config.json".as_ref()).expect("config parses");
    let processor = ImageProcessor::new(config);
    let decoded = EncodedImage::from_bytes("bench.jpg", &jpeg).decode(&DecodeLimits::default()).expect("decodes");
    Inputs { jpeg, processor, decoded }
}

/// The 1080p pipeline and its parts, under the clock `clock` names.
fn jpeg_to_patches<M: Measurement>(c: &mut Criterion<M>, clock: &str) {
    let Inputs { jpeg, processor, decoded } = inputs();
    let limits = DecodeLimits::default();
    let encoded = EncodedImage::from_bytes("bench.jpg", &jpeg);
    let mut group = c.benchmark_group(format!("qwen3-vl 1920x1080 jpeg ({clock})"));
    // The target: what a runtime that keeps one PixelBatch pays per image.
    let mut reused = PixelBatch::default();
    group.bench_function("jpeg to patches, reused batch", |b| {
        b.iter(|| {
            let image = encoded.decode(&limits).expect("decodes");
            processor.preprocess_into(&[image], &mut reused).expect("preprocesses");
            black_box(reused.rows())
        })
    });
    group.bench_function("jpeg to patches, fresh batch", |b| {
        b.iter(|| {
            let image = encoded.decode(&limits).expect("decodes");
            black_box(processor.preprocess(&[image]).expect("preprocesses"))
        })
    });
    group.bench_function("decode", |b| b.iter(|| black_box(encoded.decode(&limits).expect("decodes"))));
    group.bench_function("preprocess, reused batch (resize 1080 -> 1088 rows, normalize, patchify)", |b| {
        b.iter(|| {
            processor.preprocess_into(std::slice::from_ref(&decoded), &mut reused).expect("preprocesses");
            black_box(reused.rows())
        })
    });
    group.finish();
}

fn wall_clock(c: &mut Criterion) {
    let Inputs { jpeg, processor, decoded } = inputs();
    eprintln!("1920x1080 JPEG: {} KiB", jpeg.len() / 1024);
    let batch = processor.preprocess(std::slice::from_ref(&decoded)).expect("preprocesses");
    eprintln!("pixel_values: {} x {}, grid {:?}", batch.rows(), batch.cols(), batch.grids()[0].as_array());
    jpeg_to_patches(c, "wall time");
    let encoded = EncodedImage::from_bytes("bench.jpg", &jpeg);
    c.bench_function("content hash of the 1080p jpeg", |b| b.iter(|| black_box(encoded.content_hash())));

    // What the engine runs by default: the same work over the machine's cores (at most 8), wall time only.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let threaded = processor.with_threads(std::num::NonZeroUsize::new(threads).expect("at least one"));
    let mut reused = PixelBatch::default();
    c.bench_function(&format!("preprocess 1080p, reused batch, {threads} threads"), |b| {
        b.iter(|| {
            threaded.preprocess_into(std::slice::from_ref(&decoded), &mut reused).expect("preprocesses");
            black_box(reused.rows())
        })
    });

    // A 12-megapixel phone photo under Qwen2-VL's default max_pixels (1003520): the antialiased downscale path.
    let large =
        RgbImage::from_fn(4032, 3024, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8]));
    let qwen2 = ImageProcessor::new(ImageProcessorConfig::default());
    let mut reused = PixelBatch::default();
    c.bench_function("qwen2-vl defaults: 4032x3024 rgb to patches (downscale to 1148x840)", |b| {
        b.iter(|| {
            qwen2.preprocess_into(std::slice::from_ref(&large), &mut reused).expect("preprocesses");
            black_box(reused.rows())
        })
    });
}

fn cpu_clock(c: &mut Criterion<ThreadCpuTime>) {
    jpeg_to_patches(c, "thread CPU time");
}

criterion_group!(wall, wall_clock);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = cpu_clock
}
criterion_main!(wall, cpu);
