//! Embedding CoordGen in a program: open a model on the backend and with the drafter a
//! `plugins.toml` names ($COORDGEN_CONFIG or ./plugins.toml; else the built-in default, the
//! CPU backend next to the binary and plain decoding), and stream a greedy chat answer to
//! stdout. Speculative decoding is lossless: the drafter changes the speed, not the text.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/cpu-generate models/SmolLM2-135M-Instruct.Q4_1.gguf "Name three primes."
//! ```

use std::io::Write;

use anyhow::{bail, Result};
use coordgen::chat::Message;
use coordgen::config::PluginsConfig;
use coordgen::engine::{GenerateParams, Session};
use coordgen::open::OpenSpec;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: {} MODEL PROMPT [THREADS]", args[0]);
    }
    let threads: u32 = args.get(3).map(|t| t.parse()).transpose()?.unwrap_or(0);

    // The same plugin configuration the `coordgen` binary reads, opened the same way.
    let cfg = PluginsConfig::load(None)?;
    let mut session = Session::from_config(&cfg, &OpenSpec { backend: None, model: &args[1], threads, n_ctx: 4096 })?;
    let drafting = session.attach_drafter_from(&cfg, None)?;
    eprintln!("backend '{}', {}", session.backend().name(), if drafting { "speculative decoding" } else { "plain decoding" });
    let prompt_text = session.render_chat(&[Message::new("user", &args[2])], true)?;
    let prompt = session.tok().encode(&prompt_text, true)?;
    let params = GenerateParams { max_tokens: 128, ..Default::default() };
    let mut out = std::io::stdout();
    let g = session.generate(&prompt, &params, &mut |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    println!();
    eprintln!("{}", g.timings.summary());
    Ok(())
}
