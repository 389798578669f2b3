//! What a request asks and gets back: [`GenerateParams`] in, [`Generation`] (text, tokens,
//! [`Timings`], speculation figures) out, and perplexity scoring. The decode loop that turns
//! one into the other is [`crate::spec::run`]; the session it runs on is [`crate::session`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::sampling::SamplingParams;
pub use crate::session::{check_same_vocab, Session, DEFAULT_PREFILL_CHUNK};
use crate::spec::SpecStats;
pub use crate::techniques::Techniques;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest came from the cache).
    pub prefill_tokens: usize,
    pub prefill_ms: f64,
    pub generated_tokens: usize,
    pub decode_ms: f64,
}

impl Timings {
    pub fn prefill_tps(&self) -> f64 {
        if self.prefill_ms > 0.0 {
            self.prefill_tokens as f64 / (self.prefill_ms / 1000.0)
        } else {
            0.0
        }
    }
    pub fn decode_tps(&self) -> f64 {
        if self.decode_ms > 0.0 {
            self.generated_tokens as f64 / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
    }
    pub fn summary(&self) -> String {
        format!(
            "prompt {} tokens ({} computed, {:.1} tok/s) | generated {} tokens, {:.2} tok/s",
            self.prompt_tokens,
            self.prefill_tokens,
            self.prefill_tps(),
            self.generated_tokens,
            self.decode_tps()
        )
    }
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
    /// Set to true (from any thread) to end the request after the current step.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Deepest draft the policy may ask for.
    pub max_draft_depth: u32,
    /// Widest verification batch (pending token + draft nodes).
    pub max_draft_width: usize,
    /// A fixed (nodes, depth) draft budget for every step instead of the scheduler's.
    pub draft_budget: Option<(u32, u32)>,
    /// Which of CoordGen's drafting techniques are on.
    pub techniques: Techniques,
    /// Longest a drafter may take over one proposal before it is abandoned and the request
    /// goes on with plain decoding (None: `COORDGEN_DRAFT_TIMEOUT_MS`, or 10 s).
    pub draft_timeout: Option<std::time::Duration>,
    /// Called once the prompt is in the KV cache, before the first token is decoded (the
    /// server then offers the slot's prompt to other slots; see `server::slots`).
    pub on_prefilled: Option<PrefillHook>,
}

/// A callback run once the session's slot holds the KV entries of the request's prompt.
#[derive(Clone)]
pub struct PrefillHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for PrefillHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrefillHook")
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_at_eos: true,
            cancel: None,
            max_draft_depth: 8,
            max_draft_width: 16,
            draft_budget: None,
            techniques: Techniques::default(),
            draft_timeout: None,
            on_prefilled: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: String,
    pub timings: Timings,
    /// Speculation statistics (when a drafter was used).
    pub spec: Option<SpecStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub n_scored: usize,
    pub n_windows: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<WindowScores>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WindowScores {
    pub logprob: Vec<f32>,
    pub argmax: Vec<u32>,
}

/// Log-softmax value of `target` in `logits` (computed in f64).
pub fn log_prob(logits: &[f32], target: u32) -> f64 {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - mx).exp()).sum();
    logits[target as usize] as f64 - mx - sum.ln()
}

impl Session {
    /// Perplexity over non-overlapping windows of `ctx` tokens; every token of a window but
    /// its first is scored from the logits of the position before it.
    pub fn perplexity(&mut self, tokens: &[u32], ctx: usize, per_token: bool) -> Result<Perplexity> {
        if ctx < 2 {
            bail!("--ctx must be at least 2");
        }
        if ctx > self.n_ctx() {
            bail!("--ctx {ctx} exceeds the KV slot of {} entries", self.n_ctx());
        }
        let n_windows = tokens.len() / ctx;
        if n_windows == 0 {
            bail!("the file has {} tokens, fewer than one window of {ctx}", tokens.len());
        }
        let mut nll = 0f64;
        let mut n_scored = 0usize;
        let mut windows = Vec::new();
        for w in 0..n_windows {
            let win = &tokens[w * ctx..(w + 1) * ctx];
            self.reset()?;
            let mut ws = WindowScores { logprob: Vec::new(), argmax: Vec::new() };
            let chunk_len = self.prefill_chunk();
            for (ci, chunk) in win.chunks(chunk_len).enumerate() {
                let base = ci * chunk_len;
                let rows: Vec<u32> = (0..chunk.len() as u32).collect();
                let logits = self.append(chunk, &rows)?;
                let nv = self.model().n_vocab;
                for r in 0..chunk.len() {
                    let i = base + r;
                    if i + 1 >= win.len() {
                        break;
                    }
                    let row = &logits[r * nv..(r + 1) * nv];
                    let lp = log_prob(row, win[i + 1]);
                    nll -= lp;
                    n_scored += 1;
                    if per_token {
                        ws.logprob.push(lp as f32);
                        ws.argmax.push(crate::sampling::argmax(row));
                    }
                }
            }
            if per_token {
                windows.push(ws);
            }
        }
        Ok(Perplexity { ppl: (nll / n_scored as f64).exp(), n_scored, n_windows, windows: per_token.then_some(windows) })
    }
}
