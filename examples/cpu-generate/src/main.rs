//! Embedding CoordGen in a program: load the plugins named in a `plugins.toml` (or the
//! built-in default, the CPU backend next to the binary), open a model, and stream a chat
//! answer to stdout.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/cpu-generate models/SmolLM2-135M-Instruct.Q4_1.gguf "Name three primes."
//! ```

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Result};
use coordgen::chat::Message;
use coordgen::config::PluginsConfig;
use coordgen::engine::{GenerateParams, Session};
use coordgen::plugins;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: {} MODEL PROMPT [THREADS]", args[0]);
    }
    let threads: u32 = args.get(3).map(|t| t.parse()).transpose()?.unwrap_or(0);

    // The same plugin configuration the `coordgen` binary reads.
    let cfg = PluginsConfig::load(None)?;
    let (mut backend, info) = plugins::load_backend(&cfg, &cfg.target_backend)?;
    eprintln!("backend '{}' from {}", info.info_name, info.path.display());
    if threads > 0 {
        backend.set_threads(threads)?;
    }

    let mut session = Session::open(backend, Path::new(&args[1]), 4096)?;
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
