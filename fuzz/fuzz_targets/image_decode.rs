#![no_main]

// libjpeg's errors reach pio-image as unwinds started with resume_unwind, which skips the panic hook, so
// libfuzzer-sys's aborting hook sees only real panics: those are the crashes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pio_fuzz::image_decode(data));
