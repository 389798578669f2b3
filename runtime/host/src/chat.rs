//! Chat templates: renders the model's `tokenizer.chat_template` (Jinja) with minijinja,
//! with Python-compatible string methods and the model's special tokens in scope.

use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Instructions a template may run per render. Real chat templates over long conversations
/// run tens of thousands; a hostile one (a huge loop, deep recursion) stops here with an
/// error instead of hanging the request.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Longest text a render may produce (a template that multiplies strings stops here).
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// Renders `template` over `messages`; `add_generation_prompt` opens the assistant turn.
pub fn render(template: &str, messages: &[Message], add_generation_prompt: bool, bos: &str, eos: &str) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function("raise_exception", raise_exception);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_template("chat", template).map_err(|e| anyhow!("the model's chat template does not parse: {e}"))?;
    let tmpl = env.get_template("chat")?;
    tmpl.render(context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
        tools => minijinja::Value::UNDEFINED,
    })
    .map_err(|e| match e.kind() {
        ErrorKind::OutOfFuel => anyhow!("the chat template ran more than {TEMPLATE_FUEL} instructions (a runaway loop?); rendering stopped"),
        _ => anyhow!("rendering the chat template failed: {e}"),
    })
    .and_then(|s| {
        if s.len() > MAX_RENDERED_BYTES {
            Err(anyhow!("the chat template produced {} bytes, more than the {MAX_RENDERED_BYTES} allowed", s.len()))
        } else {
            Ok(s)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runaway_templates_stop_with_an_error() {
        let e = render("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", &[], true, "", "").unwrap_err();
        assert!(e.to_string().contains("more than 5000000 instructions"), "{e}");
        let e = render("{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}", &[], true, "", "").unwrap_err();
        assert!(e.to_string().contains("rendering the chat template failed") || e.to_string().contains("instructions"), "{e}");
        let ok = render("{% for m in messages %}{{ m.content }}{% endfor %}", &[Message::new("user", "hi")], true, "", "").unwrap();
        assert_eq!(ok, "hi");
    }
}
