//! A session: one loaded model on a backend, its tokenizer and one KV slot, and the
//! decoding it is set up with (drafter, scheduler, cost calibration).
//!
//! The session owns the invariant everything else relies on: `cached` lists exactly the
//! tokens whose KV entries the slot holds, in slot order. Only the methods here touch the
//! slot ([`Session::forward`], [`Session::keep_entries`], [`Session::truncate`]), and each
//! updates `cached` with it, so rolling back a rejected draft is lowering a length, and no
//! caller can forget to (the fields are private).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use coordgen_interface::CostSample;
use coordgen_model::ModelFile;

use crate::plugins::{Backend, Drafter, Forward, ModelInfo, PResult, Predictions};
use crate::scheduler::Scheduler;
use crate::spec::policy::Policy;
use crate::tokenizer::Tok;

/// Tokens per prefill forward.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

pub struct Session {
    backend: Box<dyn Backend>,
    model: ModelInfo,
    tok: Arc<Tok>,
    slot: u32,
    n_ctx: usize,
    /// Tokens whose KV entries are in the slot, in order (the invariant above).
    cached: Vec<u32>,
    prefill_chunk: usize,
    /// Drafter used by [`Session::generate`] (None = plain decoding).
    drafter: Option<Box<dyn Drafter>>,
    /// Shapes prefill chunks and draft budgets (None = the built-in fixed schedule).
    scheduler: Option<Box<dyn Scheduler>>,
    /// Calibration samples of this backend and model (empty until a scheduler is set).
    costs: Vec<CostSample>,
    /// The target's predictions at cached prompt positions (kept with the KV cache).
    predictions: Predictions,
    model_path: PathBuf,
    /// The acceptance statistics the last request ended with, and its drafter's name: the
    /// next request with that drafter starts from them (see [`Policy::carried`]).
    carried_policy: Option<(String, Policy)>,
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
    pub fn attach(mut backend: Box<dyn Backend>, model: ModelInfo, tok: impl Into<Arc<Tok>>, model_path: &Path, n_ctx: usize) -> Result<Session> {
        let tok = tok.into();
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

    /// Frees the slot and hands back the loaded model and its backend (the server then
    /// shares them between its slots' sessions).
    pub fn into_loaded(mut self) -> Result<(Box<dyn Backend>, ModelInfo, Arc<Tok>, PathBuf, usize)> {
        self.backend.free_slot(self.slot)?;
        Ok((self.backend, self.model, self.tok, self.model_path, self.n_ctx))
    }

    // ---- what the session is ----

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
    pub fn model(&self) -> &ModelInfo {
        &self.model
    }
    pub fn tok(&self) -> &Tok {
        &self.tok
    }
    /// The tokenizer, shared (the server's slots and a request's text stream hold it).
    pub fn shared_tok(&self) -> Arc<Tok> {
        self.tok.clone()
    }
    pub fn model_path(&self) -> &Path {
        &self.model_path
    }
    /// The backend's id of this session's KV slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }
    /// Entries the KV slot holds at most.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    /// The tokens whose KV entries the slot holds, in order.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }
    /// The target's predictions recorded at cached prompt positions (calibration).
    pub fn predictions(&self) -> &Predictions {
        &self.predictions
    }
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }
    pub fn set_prefill_chunk(&mut self, n: usize) {
        self.prefill_chunk = n.max(1);
    }
    /// Threads of the backend (moved between the target and a drafter while overlapping).
    pub fn set_threads(&mut self, n: u32) -> PResult<()> {
        self.backend.set_threads(n)
    }

    // ---- the KV slot: every change goes through these, and `cached` follows it ----

    /// One forward of `tokens` at `positions` (with the tree `mask`, empty = causal), which
    /// appends their KV entries to the slot in batch order; returns the logits of
    /// `logit_rows`. On an error the slot and `cached` are as before (the backend's contract,
    /// checked with `slot_len` and restored if broken).
    pub fn forward(&mut self, tokens: &[u32], positions: &[u32], mask: &[u8], logit_rows: &[u32]) -> Result<Vec<f32>> {
        let _span = tracing::debug_span!("forward", width = tokens.len(), start = self.cached.len()).entered();
        match self.backend.forward(&Forward { slot: self.slot, tokens, positions, mask, logit_rows }) {
            Ok(out) => {
                self.cached.extend_from_slice(tokens);
                Ok(out)
            }
            Err(e) => {
                self.restore_after_failure();
                Err(e.into())
            }
        }
    }

    /// After a failed forward: a backend that broke its contract and kept some entries is
    /// truncated back to the host's record; one whose slot is shorter than the record, or
    /// cannot say, loses the record too (the next prefill recomputes from the start).
    fn restore_after_failure(&mut self) {
        let want = self.cached.len();
        match self.backend.slot_len(self.slot) {
            Ok(n) if n as usize == want => {}
            Ok(n) if n as usize > want && self.backend.truncate(self.slot, want as u32).is_ok() => {
                tracing::warn!(slot = self.slot, kept = n, record = want, "a failed forward left entries in the slot; truncated back");
            }
            _ => {
                tracing::warn!(slot = self.slot, "the slot no longer matches the host's record after a failed forward; dropping the cache");
                let _ = self.backend.truncate(self.slot, 0);
                self.cached.clear();
                self.predictions = Predictions::default();
            }
        }
    }

    /// [`Session::forward`] of `tokens` at the positions right after the cache.
    pub fn append(&mut self, tokens: &[u32], logit_rows: &[u32]) -> Result<Vec<f32>> {
        let start = self.cached.len() as u32;
        let positions: Vec<u32> = (start..start + tokens.len() as u32).collect();
        self.forward(tokens, &positions, &[], logit_rows)
    }

    /// Keeps, of the entries from `start` on, those at the offsets `keep` (ascending), in
    /// that order: a verified tree's accepted path.
    pub fn keep_entries(&mut self, start: usize, keep: &[u32]) -> Result<()> {
        self.backend.keep_entries(self.slot, start as u32, keep)?;
        let tail: Vec<u32> = keep.iter().map(|&k| self.cached[start + k as usize]).collect();
        self.cached.truncate(start);
        self.cached.extend(tail);
        Ok(())
    }

    /// Drops every entry past the first `len` (and the predictions recorded there).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.backend.truncate(self.slot, len as u32)?;
        self.cached.truncate(len);
        self.predictions.truncate_positions(len as u32);
        Ok(())
    }

    /// Makes the cache hold `tokens`, copying their KV entries from the first
    /// `tokens.len()` entries of `src`, another slot of this model on this backend that holds
    /// them (`copy_prefix`). The caller vouches for what `src` holds. On an error the cache
    /// is dropped (the next prefill recomputes).
    pub fn copy_prefix_from(&mut self, src: u32, tokens: &[u32]) -> Result<()> {
        let own = self.common_prefix(tokens);
        let n = u32::try_from(tokens.len()).map_err(|_| anyhow!("a prefix of {} tokens is more than a slot holds", tokens.len()))?;
        if tokens.len() >= self.n_ctx {
            bail!("a prefix of {} tokens does not fit a context of {}", tokens.len(), self.n_ctx);
        }
        match self.backend.copy_prefix(src, self.slot, n) {
            Ok(()) => {
                self.cached = tokens.to_vec();
                // Predictions past the tokens this cache shared with `tokens` were made for
                // other tokens; `src`'s own predictions stay with its session.
                self.predictions.truncate_positions(own as u32);
                Ok(())
            }
            Err(e) => {
                let _ = self.reset();
                Err(e.into())
            }
        }
    }

    /// Drops the cache.
    pub fn reset(&mut self) -> Result<()> {
        self.truncate(0)?;
        self.predictions = Predictions::default();
        Ok(())
    }

    // ---- the decoding it is set up with ----

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

    /// Puts `s` in place of the scheduler as it is (no calibration is fed to it), returning
    /// the one it had.
    pub fn replace_scheduler(&mut self, s: Option<Box<dyn Scheduler>>) -> Option<Box<dyn Scheduler>> {
        std::mem::replace(&mut self.scheduler, s)
    }

    /// The calibration samples a scheduler was fed (empty until one was set).
    pub fn costs(&self) -> &[CostSample] {
        &self.costs
    }
    /// Uses these calibration samples instead of measuring them (the server's slots share
    /// the first slot's).
    pub fn set_costs(&mut self, costs: Vec<CostSample>) {
        self.costs = costs;
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

    pub fn has_drafter(&self) -> bool {
        self.drafter.is_some()
    }
    pub fn drafter_mut(&mut self) -> Option<&mut (dyn Drafter + 'static)> {
        self.drafter.as_deref_mut()
    }
    /// Takes the drafter out (the session decodes plainly until one is set again).
    pub fn take_drafter(&mut self) -> Option<Box<dyn Drafter>> {
        self.drafter.take()
    }
    /// Puts a drafter back that came out of this session (no vocabulary check).
    pub(crate) fn put_drafter(&mut self, d: Option<Box<dyn Drafter>>) {
        self.drafter = d;
    }

    /// The acceptance statistics carried from the last request (see [`Policy::carried`]).
    pub fn take_carried_policy(&mut self) -> Option<(String, Policy)> {
        self.carried_policy.take()
    }
    pub fn set_carried_policy(&mut self, p: Option<(String, Policy)>) {
        self.carried_policy = p;
    }

    // ---- prefill ----

    /// Runs `tokens` appended after the cache; returns logits of the last row. With
    /// `calib = Some((k, stride))`, also records the target's top-`k` predictions at every
    /// `stride`-th position into `self.predictions`.
    fn feed(&mut self, tokens: &[u32], want_last: bool, calib: Option<(usize, u32)>) -> Result<Vec<f32>> {
        let mut last = Vec::new();
        let nv = self.model.n_vocab;
        let chunk_len = self.prefill_chunk.max(1);
        for (ci, chunk) in tokens.chunks(chunk_len).enumerate() {
            let start = self.cached.len() as u32;
            let is_last = (ci + 1) * chunk_len >= tokens.len();
            let mut rows: Vec<u32> = match calib {
                Some((_, stride)) => (0..chunk.len() as u32).filter(|r| (start + r) % stride.max(1) == 0).collect(),
                None => vec![],
            };
            let last_row = chunk.len() as u32 - 1;
            if is_last && want_last && rows.last() != Some(&last_row) {
                rows.push(last_row);
            }
            let out = self.append(chunk, &rows)?;
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
        // At least the last prompt token is recomputed so we get its logits.
        let mut common = self.common_prefix(prompt).min(prompt.len() - 1);
        if let Err(e) = self.truncate(common) {
            // A backend may be unable to roll back that far (a sliding-window layer's ring
            // no longer holds the keys before `common`): recompute from the start.
            tracing::debug!(common, error = %e, "cannot keep the cached prefix; prefilling from the start");
            self.reset()?;
            common = 0;
        }
        if let Some((k, _)) = calib {
            if self.predictions.k != k {
                self.predictions = Predictions { k, ..Default::default() };
            }
        }
        let logits = self.feed(&prompt[common..], true, calib)?;
        Ok((logits, prompt.len() - common))
    }

    /// How many leading tokens of `prompt` the cache holds already.
    pub fn common_prefix(&self, prompt: &[u32]) -> usize {
        self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count()
    }

    pub fn render_chat(&self, messages: &[crate::chat::Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.tok.chat_template.as_deref().ok_or_else(|| anyhow!("the model has no chat template"))?;
        crate::chat::render(t, messages, add_generation_prompt, &self.tok.bos_text, &self.tok.eos_text)
    }
}
