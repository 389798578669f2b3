//! Opening a session the way `plugins.toml` says (backend, threads, model, drafter,
//! scheduler), each choice overridable by the caller: the one path the CLI, the C API and
//! the example programs share, so they fail with the same messages.

use anyhow::{bail, Result};

use crate::config::{resolve_model, PluginsConfig};
use crate::plugins;
use crate::session::Session;

/// What to open. `None` fields take the config's choice.
#[derive(Clone, Copy, Debug)]
pub struct OpenSpec<'a> {
    /// Backend plugin name (None: `target_backend`).
    pub backend: Option<&'a str>,
    /// A GGUF file, a Hugging Face directory, or a default model name.
    pub model: &'a str,
    /// Compute threads (0: the backend's default).
    pub threads: u32,
    /// KV entries of the slot (0: the model's context length).
    pub n_ctx: usize,
}

/// A backend other than the CPU one that fails to start or to load the model: the error,
/// and how to run without it, unless the backend's message says so already.
fn with_fallback_hint(name: &str, e: anyhow::Error) -> anyhow::Error {
    let msg = format!("{e:#}");
    if name == "cpu" || msg.contains("target_backend") || msg.contains("--backend cpu") {
        e
    } else {
        e.context(format!("backend {name:?} failed; to run on the CPU instead use --backend cpu or target_backend = \"cpu\" in plugins.toml"))
    }
}

impl Session {
    /// Loads the backend plugin and the model on it, with no drafter or scheduler yet.
    pub fn from_config(cfg: &PluginsConfig, spec: &OpenSpec<'_>) -> Result<Session> {
        let name = spec.backend.unwrap_or(&cfg.target_backend);
        let (mut backend, _) = plugins::load_backend(cfg, name).map_err(|e| with_fallback_hint(name, e.into()))?;
        if spec.threads != 0 {
            backend.set_threads(spec.threads)?;
        }
        let path = resolve_model(spec.model);
        if !path.exists() {
            bail!("model {} not found (scripts/fetch_models.sh fetches the default models)", path.display());
        }
        let s = Session::open(backend, &path, spec.n_ctx).map_err(|e| with_fallback_hint(name, e))?;
        // Extra bytes: what the backend allocated beyond the mapped file (the CPU backend's
        // repacked weights, whose mapped pages it releases).
        tracing::info!(model = %path.display(), arch = %s.model().arch, weight_bytes = s.model().weight_bytes, extra_bytes = s.model().extra_bytes, "model loaded");
        Ok(s)
    }

    /// Installs the drafter `choice` names (None: the config's `drafter`; "none" or
    /// "plain": none). Returns whether one was installed.
    pub fn attach_drafter_from(&mut self, cfg: &PluginsConfig, choice: Option<&str>) -> Result<bool> {
        let spec = match choice {
            Some("none") | Some("plain") => None,
            Some(x) => Some(x.to_string()),
            None => cfg.drafter.clone(),
        };
        let Some(spec) = spec else { return Ok(false) };
        self.set_drafter(Some(plugins::load_drafters(cfg, &spec)?))?;
        Ok(true)
    }

    /// Installs the scheduler `choice` names (None: the config's default), which measures
    /// this machine's cost model first if none is cached for this model and backend.
    pub fn attach_scheduler_from(&mut self, cfg: &PluginsConfig, choice: Option<&str>) -> Result<()> {
        let name = choice.map(str::to_string).unwrap_or_else(|| cfg.default_scheduler());
        let sched = crate::scheduler::load_scheduler(cfg, &name)?;
        self.set_scheduler(sched)
    }
}
