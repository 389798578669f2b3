//! The Rust side of the C API: opening a session from a plugin config the way the CLI does
//! (backend, threads, model, drafter, scheduler), and one generation of a prompt or of a
//! chat, streamed to a callback. No FFI types here; `lib.rs` converts at the boundary.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use coordgen::chat::Message;
use coordgen::config::PluginsConfig;
use coordgen::engine::{GenerateParams, Generation, Session};
use coordgen::open::OpenSpec;

/// One model in one KV slot, behind a lock so `cancel` may come from another thread while
/// a generation runs.
pub struct Embedded {
    pub session: Mutex<Session>,
    pub cancel: Arc<AtomicBool>,
    pub techniques: coordgen::techniques::Techniques,
}

/// What `coordgen_session_open` asks for.
pub struct OpenArgs<'a> {
    pub config: Option<&'a Path>,
    pub model: &'a str,
    pub n_ctx: usize,
    pub threads: u32,
    /// `None`: the config's default drafter; `Some("none")`: plain decoding.
    pub drafter: Option<&'a str>,
}

pub fn open(a: &OpenArgs<'_>) -> Result<Embedded> {
    let cfg = PluginsConfig::load(a.config)?;
    let mut s = Session::from_config(&cfg, &OpenSpec { backend: None, model: a.model, threads: a.threads, n_ctx: a.n_ctx })?;
    if s.attach_drafter_from(&cfg, a.drafter)? {
        // The scheduler plans the drafts (and measures this machine's cost model once).
        s.attach_scheduler_from(&cfg, None)?;
    }
    Ok(Embedded { session: Mutex::new(s), cancel: Arc::new(AtomicBool::new(false)), techniques: cfg.techniques.clone() })
}

/// The prompt of one request: raw text, or messages for the model's chat template.
pub enum Input<'a> {
    Text(&'a str),
    Chat(&'a [Message]),
}

/// Runs one request; `on_text` gets each piece of text as it is decided and returns false
/// to stop (after the current step, as `cancel` does).
pub fn generate(e: &Embedded, input: Input<'_>, mut p: GenerateParams, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Generation> {
    let mut s = e.session.lock().map_err(|_| anyhow!("the session was poisoned by an earlier failure; free it and open another"))?;
    let text = match input {
        Input::Text(t) => t.to_string(),
        Input::Chat(m) => s.render_chat(m, true)?,
    };
    let prompt = s.tok().encode(&text, true)?;
    e.cancel.store(false, Ordering::SeqCst);
    p.cancel = Some(e.cancel.clone());
    p.techniques = e.techniques.clone();
    let cancel = e.cancel.clone();
    s.generate(&prompt, &p, &mut |piece| {
        if !on_text(piece) {
            cancel.store(true, Ordering::SeqCst);
        }
    })
}
