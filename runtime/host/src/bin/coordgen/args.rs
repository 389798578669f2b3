//! The options every model command shares (`ModelArgs`, `SampleArgs`) and what they set up:
//! a session on the configured backend with its drafter and scheduler.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use coordgen::config::{resolve_model, PluginsConfig};
use coordgen::engine::{GenerateParams, Session, Techniques};
use coordgen::open::OpenSpec;
use coordgen::sampling::SamplingParams;

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF file, Hugging Face directory, or a default model name (smollm2, qwen-0.5b, qwen-1.5b, gemma3-270m).
    #[arg(long, short)]
    pub model: String,
    /// Backend plugin to run the model (default: target_backend of plugins.toml).
    #[arg(long)]
    pub backend: Option<String>,
    /// Threads the backend may use (0 = the backend's default: one per physical core for the CPU backend).
    #[arg(long, short = 't', default_value_t = 0)]
    pub threads: u32,
    /// KV context size (0 = the model's, capped at 8192).
    #[arg(long, default_value_t = 0)]
    pub ctx_size: usize,
}

#[derive(Args, Clone)]
pub struct SampleArgs {
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Drafter plugin(s) for speculative decoding: a name from plugins.toml, several joined
    /// by ',' (asked in order), or 'none' (default: the `drafter` key of plugins.toml).
    #[arg(long)]
    pub drafter: Option<String>,
    /// Deepest draft to verify per step.
    #[arg(long, default_value_t = 8)]
    pub max_draft_depth: u32,
    /// Scheduler: a scheduler plugin of plugins.toml or the built-in 'fixed' (default: the
    /// `scheduler` key, else the 'adaptive' plugin).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Turn off context-aligned drafting (the target's predictions over the prompt).
    #[arg(long)]
    pub no_calibration: bool,
    /// Turn off reuse of rejected drafts' agreeing tails.
    #[arg(long)]
    pub no_reuse: bool,
    /// Turn off growing drafts into trees up to the nearly free width.
    #[arg(long)]
    pub no_extension: bool,
    /// Prompt positions between calibrated predictions (0 = from the cost model).
    #[arg(long)]
    pub calibration_stride: Option<u32>,
    /// Draft the next step while the target verifies (a drafter running a model gets
    /// `overlap_draft_threads` of the target's threads for it).
    #[arg(long)]
    pub overlap: bool,
}

impl SampleArgs {
    /// The plugin configuration with this command's technique switches applied to its
    /// `[techniques]` (one [`Techniques`] for the loaders and every request): `--no-*` turn
    /// techniques off, `--overlap` on (overlap also decides how a drafter running a model is
    /// loaded: its threads).
    pub fn config(&self, path: &Option<PathBuf>) -> Result<PluginsConfig> {
        let mut cfg = PluginsConfig::load(path.as_deref())?;
        let t: &mut Techniques = &mut cfg.techniques;
        t.calibration &= !self.no_calibration;
        t.reuse &= !self.no_reuse;
        t.extension &= !self.no_extension;
        if let Some(x) = self.calibration_stride {
            t.calibration_stride = x;
        }
        t.overlap |= self.overlap;
        Ok(cfg)
    }

    /// The request defaults: this command's sampling with `cfg`'s techniques (a config from
    /// [`SampleArgs::config`]).
    pub fn params_with(&self, cfg: &PluginsConfig) -> Result<GenerateParams> {
        Ok(GenerateParams { techniques: cfg.techniques.clone(), ..self.params()? })
    }

    pub fn params(&self) -> Result<GenerateParams> {
        if self.temp < 0.0 || !(0.0..=1.0).contains(&self.top_p) || !(0.0..=1.0).contains(&self.min_p) || self.repeat_penalty <= 0.0 {
            bail!("invalid sampling options: need temp >= 0, 0 <= top-p <= 1, 0 <= min-p <= 1, repeat-penalty > 0");
        }
        Ok(GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..Default::default()
            },
            stop: self.stop.clone(),
            stop_at_eos: !self.ignore_eos,
            max_draft_depth: self.max_draft_depth.max(1),
            ..Default::default()
        })
    }
}

/// Installs the scheduler (measuring the cost model first if this machine, model and backend
/// have no cached calibration).
pub fn attach_scheduler(cfg: &PluginsConfig, s: &mut Session, cli: Option<&str>) -> Result<()> {
    if !coordgen::calibrate::is_cached(s) {
        eprintln!("calibrating the cost model for this machine, model and backend (once; `coordgen calibrate` redoes it)...");
    }
    s.attach_scheduler_from(cfg, cli)
}

pub fn open_session(cfg: &PluginsConfig, m: &ModelArgs) -> Result<Session> {
    let pb = indicatif::ProgressBar::new_spinner();
    if std::io::stderr().is_terminal() {
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
    } else {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb.set_message(format!("loading {}", resolve_model(&m.model).display()));
    let spec = OpenSpec { backend: m.backend.as_deref(), model: &m.model, threads: m.threads, n_ctx: m.ctx_size };
    let s = Session::from_config(cfg, &spec);
    pb.finish_and_clear();
    s
}

