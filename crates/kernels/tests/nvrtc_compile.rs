//! Every kernel set compiles with NVRTC into an sm_90 (H100/H200) cubin, when a libnvrtc can be
//! found (PIO_NVRTC_PATH, /usr/local/cuda, the loader path, scripts/setup.sh's cache or pip's
//! `nvidia-cuda-nvrtc`); without one the test says so and passes. No GPU is needed.

use pio_kernels::nvrtc::{compile_options, Nvrtc};
use pio_kernels::source::KernelSet;

#[test]
fn every_kernel_set_compiles_for_hopper() {
    let nvrtc = match Nvrtc::get() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    eprintln!("{} at {}", nvrtc.version_string(), nvrtc.location.display());
    let arch = 90;
    for set in KernelSet::all() {
        let start = std::time::Instant::now();
        let cubin = nvrtc
            .compile(&set.name(), &set.source(), arch, &compile_options(arch))
            .unwrap_or_else(|e| panic!("{}: {e}", set.name()));
        assert!(cubin.starts_with(b"\x7fELF"), "{}: not an ELF cubin", set.name());
        for name in set.kernel_names() {
            let needle = name.as_bytes();
            assert!(cubin.windows(needle.len()).any(|w| w == needle), "{}: no symbol {name}", set.name());
        }
        eprintln!("{} sm_{arch}: {} bytes in {:.1}s", set.name(), cubin.len(), start.elapsed().as_secs_f64());
    }
}
