#![no_main]

use std::sync::OnceLock;

static TEMPLATES: OnceLock<pio_fuzz::Templates> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let templates = TEMPLATES.get_or_init(|| {
        // libfuzzer-sys aborts on every panic, even one caught. ChatTemplate::render catches the
        // panics minijinja 2.24 raises on some templates (reversed slices of empty values) and
        // returns them as errors: with the default hook back, only a panic that escapes render
        // still aborts (test_input_wrap's catch_unwind) and counts as a crash.
        let _ = std::panic::take_hook();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        pio_fuzz::Templates::load(&root).unwrap_or_else(|e| panic!("{e}"))
    });
    pio_fuzz::chat_template(templates, data)
});
