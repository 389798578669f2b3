//! A generator for an aarch64 phone or board (Android's shell, Termux, Linux): the CPU
//! backend plugin next to the binary (its NEON kernels, with the dot-product ones where the
//! core has them, chosen at run time), a GGUF model, and a prompt; streams the reply and
//! ends with one JSON line of figures and the token ids, which the tests compare between
//! this build under emulation and the x86 one.
//!
//! ```sh
//! phone-generate MODEL PROMPT [--chat] [--max-tokens N] [--threads N] [--drafter NAME|none]
//! ```

use std::io::Write;

use anyhow::{bail, Context, Result};
use coordgen::chat::Message;
use coordgen::config::PluginsConfig;
use coordgen::engine::{GenerateParams, Session};
use coordgen::open::OpenSpec;

struct Args {
    model: String,
    prompt: String,
    chat: bool,
    max_tokens: usize,
    threads: u32,
    drafter: Option<String>,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut pos = Vec::new();
    let mut a = Args { model: String::new(), prompt: String::new(), chat: false, max_tokens: 64, threads: 0, drafter: None };
    while let Some(x) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match x.as_str() {
            "--chat" => a.chat = true,
            "--max-tokens" => a.max_tokens = val("--max-tokens")?.parse()?,
            "--threads" => a.threads = val("--threads")?.parse()?,
            "--drafter" => a.drafter = Some(val("--drafter")?),
            _ if x.starts_with("--") => bail!("unknown option {x}"),
            _ => pos.push(x),
        }
    }
    let [model, prompt]: [String; 2] = pos.try_into().map_err(|_| anyhow::anyhow!("usage: phone-generate MODEL PROMPT [--chat] [--max-tokens N] [--threads N] [--drafter NAME|none]"))?;
    a.model = model;
    a.prompt = prompt;
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse()?;
    // $COORDGEN_CONFIG or ./plugins.toml if present; else the built-in default: the CPU
    // backend plugin (libcoordgen_backend_cpu.so) next to this binary, plain decoding.
    let cfg = PluginsConfig::load(None)?;
    let mut s = Session::from_config(&cfg, &OpenSpec { backend: None, model: &a.model, threads: a.threads, n_ctx: 2048 })?;
    let backend_facts: serde_json::Value = serde_json::from_str(&s.backend().stats_json()).unwrap_or_default();
    s.attach_drafter_from(&cfg, a.drafter.as_deref())?;
    let text = if a.chat { s.render_chat(&[Message::new("user", &a.prompt)], true)? } else { a.prompt.clone() };
    let prompt = s.tok().encode(&text, true)?;
    let params = GenerateParams { max_tokens: a.max_tokens, ..Default::default() };
    let mut out = std::io::stdout();
    let g = s.generate(&prompt, &params, &mut |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    println!();
    let figures = serde_json::json!({
        "isa": backend_facts["isa"],
        "prompt_tokens": g.timings.prompt_tokens,
        "generated_tokens": g.timings.generated_tokens,
        "decode_tokens_per_s": g.timings.decode_tps(),
        "tokens_per_step": g.spec.as_ref().map(|sp| sp.tokens_per_step).unwrap_or(1.0),
        "tokens": g.tokens,
    });
    eprintln!("{figures}");
    Ok(())
}
