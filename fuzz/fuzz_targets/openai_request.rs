#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pio_fuzz::openai_request(data));
