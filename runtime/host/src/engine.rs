//! Plain generation on a backend: a loaded model with its tokenizer and one KV slot,
//! chunked prefill that reuses the cached prefix (so a chat keeps its cache between turns),
//! a decode loop with sampling, stop conditions and streaming, and perplexity scoring.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use coordgen_model::ModelFile;
use serde::Serialize;

use coordgen_interface::CostSample;

use crate::plugins::{Backend, Drafter, Forward, ModelInfo, Predictions};
use crate::scheduler::Scheduler;
use crate::spec::policy::Policy;
use crate::spec::SpecStats;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tok;

/// Tokens per prefill forward.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

pub struct Session {
    pub backend: Box<dyn Backend>,
    pub model: ModelInfo,
    pub tok: Tok,
    pub slot: u32,
    pub n_ctx: usize,
    /// Tokens whose KV entries are in the slot, in order.
    pub cached: Vec<u32>,
    pub prefill_chunk: usize,
    /// Drafter used by [`Session::generate`] (None = plain decoding).
    pub drafter: Option<Box<dyn Drafter>>,
    /// Shapes prefill chunks and draft budgets (None = the built-in fixed schedule).
    pub scheduler: Option<Box<dyn Scheduler>>,
    /// Calibration samples of this backend and model (empty until a scheduler is set).
    pub costs: Vec<CostSample>,
    /// The target's predictions at cached prompt positions (kept with the KV cache).
    pub predictions: Predictions,
    pub model_path: PathBuf,
    /// The acceptance statistics the last request ended with, and its drafter's name: the
    /// next request with that drafter starts from them (see [`Policy::carried`]).
    pub carried_policy: Option<(String, Policy)>,
}

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
}

/// Switches for the techniques of context-heavy decoding (scheduling is chosen by the
/// session's scheduler).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Techniques {
    /// Context-aligned drafting: the target's predictions over the prompt feed drafters
    /// that ask for them.
    pub calibration: bool,
    /// Offer the agreeing tail of rejected drafts again.
    pub reuse: bool,
    /// Grow drafts into trees up to the nearly free verify width.
    pub extension: bool,
    /// Predictions every this many prompt positions (0 = chosen from the cost model so the
    /// extra logits cost at most about 10% of the prefill).
    pub calibration_stride: u32,
    /// Overlapped drafting (see [`crate::spec::ahead`]): the drafter drafts the next step
    /// while the target verifies, and a drafter that runs a model of its own gets its
    /// threads from the target's for the request's decoding.
    pub overlap: bool,
}

impl Default for Techniques {
    fn default() -> Self {
        Techniques { calibration: true, reuse: true, extension: true, calibration_stride: 0, overlap: false }
    }
}

impl Techniques {
    pub fn none() -> Self {
        Techniques { calibration: false, reuse: false, extension: false, calibration_stride: 0, overlap: false }
    }

    /// What `[techniques]` of `plugins.toml` turns on.
    pub fn from_config(t: &crate::config::TechniquesConfig) -> Self {
        Techniques { calibration: t.calibration, reuse: t.reuse, extension: t.extension, calibration_stride: t.calibration_stride, overlap: t.overlap }
    }

    /// The calibration stride for session `s`: the configured one, or (0) the cost model's.
    pub fn stride(&self, s: &Session) -> u32 {
        match self.calibration_stride {
            0 => s.calibration_stride(0.10),
            x => x,
        }
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

/// Checks that two tokenizers map every id to the same token text.
pub fn check_same_vocab(ours: &Tok, theirs: &Tok) -> Result<()> {
    if ours.vocab_size() != theirs.vocab_size() {
        bail!("{} tokens vs {} in the target's", theirs.vocab_size(), ours.vocab_size());
    }
    for id in 0..ours.vocab_size() as u32 {
        let (a, b) = (ours.token_text(id), theirs.token_text(id));
        if a != b {
            bail!("token {id} is {:?} there but {:?} in the target's", b.unwrap_or_default(), a.unwrap_or_default());
        }
    }
    Ok(())
}

/// Log-softmax value of `target` in `logits` (computed in f64).
pub fn log_prob(logits: &[f32], target: u32) -> f64 {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - mx).exp()).sum();
    logits[target as usize] as f64 - mx - sum.ln()
}

impl Session {
    /// Loads `model_path` on `backend` with a KV slot of `n_ctx` entries (0 = the model's
    /// training context, capped at 8192).
    pub fn open(mut backend: Box<dyn Backend>, model_path: &Path, n_ctx: usize) -> Result<Session> {
        let file = ModelFile::open(model_path).with_context(|| format!("cannot load model {}", model_path.display()))?;
        let tok = Tok::for_model(model_path, &file)?;
        drop(file);
        let model = backend.load_model(model_path)?;
        Session::attach(backend, model, tok, model_path, n_ctx)
    }

    /// A session on a model `backend` has loaded already (the server's slots share one):
    /// checks the tokenizer against it and allocates this session's own KV slot.
    pub fn attach(mut backend: Box<dyn Backend>, model: ModelInfo, tok: Tok, model_path: &Path, n_ctx: usize) -> Result<Session> {
        if tok.vocab_size() > model.n_vocab {
            bail!("tokenizer has {} tokens but the model's output has only {}", tok.vocab_size(), model.n_vocab);
        }
        let n_ctx = if n_ctx == 0 { model.n_ctx_train.min(8192) } else { n_ctx };
        let n_ctx32 = u32::try_from(n_ctx).map_err(|_| anyhow::anyhow!("a context of {n_ctx} entries is more than a KV slot holds (at most {})", u32::MAX))?;
        let slot = backend.create_slot(model.handle, n_ctx32)?;
        Ok(Session {
            backend,
            model,
            tok,
            slot,
            n_ctx,
            cached: Vec::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            drafter: None,
            scheduler: None,
            costs: Vec::new(),
            predictions: Predictions::default(),
            carried_policy: None,
            model_path: model_path.to_path_buf(),
        })
    }

    /// Installs a scheduler, feeding it this backend and model's calibration (measured now
    /// if no cached calibration matches the machine, model and backend).
    pub fn set_scheduler(&mut self, mut s: Box<dyn Scheduler>) -> Result<()> {
        if self.costs.is_empty() {
            self.costs = crate::calibrate::cost_samples(self, false)?.0;
        }
        s.observe_costs(&self.costs)?;
        self.scheduler = Some(s);
        Ok(())
    }

    /// Installs the drafter [`Session::generate`] uses, after checking that its vocabulary
    /// (if it has one) is the target model's: same size and the same text for every id.
    pub fn set_drafter(&mut self, d: Option<Box<dyn Drafter>>) -> Result<()> {
        if let Some(d) = &d {
            if let Some(path) = d.vocabulary() {
                let file = ModelFile::open(&path).with_context(|| format!("drafter '{}': cannot open its model {}", d.name(), path.display()))?;
                let theirs = Tok::for_model(&path, &file)?;
                check_same_vocab(&self.tok, &theirs).map_err(|e| {
                    anyhow!("drafter '{}' uses {}, whose vocabulary is not compatible with the target model's: {e}", d.name(), path.display())
                })?;
            }
            if !self.backend.capabilities().batch_invariant {
                let msg = format!(
                    "backend '{}' does not promise batch invariance: with drafter '{}', greedy output may differ from plain decoding wherever a verification batch rounds differently",
                    self.backend.name(),
                    d.name()
                );
                tracing::warn!("{msg}");
                eprintln!("warning: {msg}");
            }
        }
        self.drafter = d;
        Ok(())
    }

    /// Drops the cache.
    pub fn reset(&mut self) -> Result<()> {
        self.backend.truncate(self.slot, 0)?;
        self.cached.clear();
        self.predictions = Predictions::default();
        Ok(())
    }

    /// Runs `tokens` appended after the cache; returns logits of the last row. With
    /// `calib = Some((k, stride))`, also records the target's top-`k` predictions at every
    /// `stride`-th position into `self.predictions`.
    fn feed(&mut self, tokens: &[u32], want_last: bool, calib: Option<(usize, u32)>) -> Result<Vec<f32>> {
        let mut last = Vec::new();
        let nv = self.model.n_vocab;
        for (ci, chunk) in tokens.chunks(self.prefill_chunk.max(1)).enumerate() {
            let start = self.cached.len() as u32;
            let positions: Vec<u32> = (start..start + chunk.len() as u32).collect();
            let is_last = (ci + 1) * self.prefill_chunk.max(1) >= tokens.len();
            let mut rows: Vec<u32> = match calib {
                Some((_, stride)) => (0..chunk.len() as u32).filter(|r| (start + r) % stride.max(1) == 0).collect(),
                None => vec![],
            };
            let last_row = chunk.len() as u32 - 1;
            if is_last && want_last && rows.last() != Some(&last_row) {
                rows.push(last_row);
            }
            let _span = tracing::debug_span!("forward", width = chunk.len(), start).entered();
            let out = self.backend.forward(&Forward { slot: self.slot, tokens: chunk, positions: &positions, mask: &[], logit_rows: &rows })?;
            self.cached.extend_from_slice(chunk);
            if let Some((k, _)) = calib {
                let pr = &mut self.predictions;
                pr.k = k;
                for (i, &r) in rows.iter().enumerate() {
                    let (t, p) = crate::sampling::top_k_probs(&out[i * nv..(i + 1) * nv], k);
                    pr.positions.push(start + r);
                    pr.tokens.extend(t);
                    pr.probs.extend(p);
                }
            }
            if is_last && want_last {
                last = out[(rows.len() - 1) * nv..].to_vec();
            }
        }
        Ok(last)
    }

    /// Prompt positions between two calibrated predictions, so that the extra logits cost
    /// about `budget` (a fraction) of the prefill: from the calibration, one logits row costs
    /// `(L(128 tokens, 64 rows) - L(128 tokens, 1 row)) / 63` against `L(128, 1) / 128` per
    /// prompt token.
    ///
    /// Both samples come from the same context length. The stride is at least 2: the host's
    /// own work per row (copying the logits, the softmax for the top-k) is not in the model.
    pub fn calibration_stride(&self, budget: f64) -> u32 {
        // Prefer the sample taken the way the prefill asks (128 tokens, every 2nd row's
        // logits); older calibrations have only the 32-token ones.
        let pair = |w: u32, rows: u32| {
            let one = self.costs.iter().find(|c| c.width == w && c.rows == 1)?;
            let many = self.costs.iter().find(|c| c.width == w && c.rows == rows && c.context == one.context)?;
            Some((many, one, rows))
        };
        match pair(128, 64).or_else(|| pair(32, 32)) {
            Some((all, one, rows)) if one.micros > 0 => {
                let per_row = ((all.micros as f64 - one.micros as f64) / (rows - 1) as f64).max(0.0);
                let per_token = one.micros as f64 / one.width as f64;
                ((per_row / (budget * per_token)).ceil() as u32).clamp(2, 64)
            }
            _ => 4,
        }
    }

    /// Makes the cache hold exactly `prompt`, reusing the longest cached prefix, and returns
    /// the logits after its last token and the number of tokens computed.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        self.prefill_with(prompt, None)
    }

    /// As [`Session::prefill`], with calibrated predictions (`Some((k, stride))`) recorded
    /// for the computed positions (cached positions keep theirs).
    pub fn prefill_with(&mut self, prompt: &[u32], calib: Option<(usize, u32)>) -> Result<(Vec<f32>, usize)> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= self.n_ctx {
            bail!("the prompt has {} tokens, but the context holds {} (use --ctx to enlarge it)", prompt.len(), self.n_ctx);
        }
        let mut common = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least the last prompt token is recomputed so we get its logits.
        common = common.min(prompt.len() - 1);
        self.backend.truncate(self.slot, common as u32)?;
        self.cached.truncate(common);
        self.predictions.truncate_positions(common as u32);
        if let Some((k, _)) = calib {
            if self.predictions.k != k {
                self.predictions = Predictions { k, ..Default::default() };
            }
        }
        let logits = self.feed(&prompt[common..], true, calib)?;
        Ok((logits, prompt.len() - common))
    }

    /// Perplexity over non-overlapping windows of `ctx` tokens; every token of a window but
    /// its first is scored from the logits of the position before it.
    pub fn perplexity(&mut self, tokens: &[u32], ctx: usize, per_token: bool) -> Result<Perplexity> {
        if ctx < 2 {
            bail!("--ctx must be at least 2");
        }
        if ctx > self.n_ctx {
            bail!("--ctx {ctx} exceeds the KV slot of {} entries", self.n_ctx);
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
            for (ci, chunk) in win.chunks(self.prefill_chunk).enumerate() {
                let base = ci * self.prefill_chunk;
                let positions: Vec<u32> = (base as u32..(base + chunk.len()) as u32).collect();
                let rows: Vec<u32> = (0..chunk.len() as u32).collect();
                let logits = self.backend.forward(&Forward { slot: self.slot, tokens: chunk, positions: &positions, mask: &[], logit_rows: &rows })?;
                self.cached.extend_from_slice(chunk);
                let nv = self.model.n_vocab;
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

    pub fn render_chat(&self, messages: &[crate::chat::Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.tok.chat_template.as_deref().ok_or_else(|| anyhow!("the model has no chat template"))?;
        crate::chat::render(t, messages, add_generation_prompt, &self.tok.bos_text, &self.tok.eos_text)
    }
}
