//! minijinja 2.24 panics on a reversed slice of an empty string or list (`x[::-1]`), which a
//! template reaches with ordinary input: an empty message, or a filter that keeps nothing.
//! Rendering turns the panic into an error naming the template (found by fuzzing; the input is
//! kept in fuzz/regressions/chat_template/).

use pio_runtime::chat_template::{ChatTemplate, RenderOptions};
use serde_json::json;

fn render(source: &str, content: &str) -> Result<String, String> {
    let template = ChatTemplate::new(source, None, None).unwrap();
    let messages = [json!({"role": "user", "content": content})];
    template.render(&messages, &RenderOptions::default()).map_err(|e| e.to_string())
}

#[test]
fn reversed_slices_of_empty_values_are_errors() {
    let text = "{{ messages[0].content[::-1] }}";
    assert_eq!(render(text, "abc").unwrap(), "cba");
    let e = render(text, "").unwrap_err();
    assert!(e.contains("rendering chat template") && e.contains("the template engine failed"), "{e}");

    let tools_last_first =
        "{% for m in (messages | selectattr('role', 'eq', 'tool') | list)[::-1] %}{{ m }}{% endfor %}";
    let e = render(tools_last_first, "hi").unwrap_err();
    assert!(e.contains("the template engine failed"), "{e}");
}
