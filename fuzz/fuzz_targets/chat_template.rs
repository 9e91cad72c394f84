#![no_main]

use std::sync::OnceLock;

static TEMPLATES: OnceLock<pio_fuzz::Templates> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let templates = TEMPLATES.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        pio_fuzz::Templates::load(&root).unwrap_or_else(|e| panic!("{e}"))
    });
    pio_fuzz::chat_template(templates, data)
});
