//! Generation: prefill, then verification steps. Each step asks the draft stage for a token
//! tree (sized by the [`Policy`]), verifies the pending token plus the whole tree in one
//! forward, keeps the accepted path in the KV cache (rejected entries are dropped), and
//! streams the accepted tokens. With no drafter, or when drafts do not pay, a step is a
//! plain one-token decode, so plain generation is the same loop with empty trees.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use coordgen_interface::CostSample;

use super::ahead;
use super::emit::Emitter;
use super::policy::{class_of, Policy, CLASSES, REUSED_CLASS};
use super::reuse::Reuse;
use super::stage::DraftStage;
use super::tree::{self, Tree, HOST_NODE};
use crate::engine::{GenerateParams, Generation, Session, Timings, DEFAULT_PREFILL_CHUNK};
use crate::plugins::{Draft, Drafter, Feedback, Forward};
use crate::sampling::Sampler;
use crate::scheduler::{Budget, Fixed, Scheduler, StepInput};

/// What speculation did during one request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SpecStats {
    pub drafter: String,
    /// Verification forwards (each also produces the target's own token).
    pub steps: u64,
    /// Steps that verified a non-empty draft.
    pub draft_steps: u64,
    pub drafted: u64,
    /// Drafted tokens accepted.
    pub accepted: u64,
    /// Mean drafted tokens accepted per verification step.
    pub mean_accepted: f64,
    /// Mean tokens produced per verification step (accepted drafts + the target's token).
    pub tokens_per_step: f64,
    /// Per draft depth d (index d-1): steps whose draft reached depth d with depth d-1 accepted,
    /// and how many of those accepted depth d.
    pub offered_by_depth: Vec<u64>,
    pub accepted_by_depth: Vec<u64>,
    pub acceptance_by_depth: Vec<f64>,
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub accept_ms: f64,
    /// The scheduler that planned the steps, and the prefill chunk it chose.
    pub scheduler: String,
    pub prefill_chunk: usize,
    /// Prompt positions with the target's predictions handed to the drafter (calibration),
    /// and the stride between them.
    pub calibrated_positions: usize,
    pub calibration_stride: u32,
    /// Drafted tokens accepted from reused segments of earlier rejected drafts.
    pub reused: u64,
    /// Per draft confidence class (the drafter's score of its best first token in five
    /// buckets of [0, 1], then reused segments alone): verified drafts and accepted tokens.
    pub drafts_by_confidence: Vec<u64>,
    pub accepted_by_confidence: Vec<u64>,
    /// Drafts looked at (one-token proposals) but not verified, because the scheduler found
    /// a plain step better for drafts of their confidence.
    pub unverified_drafts: u64,
    /// Overlapped drafting: threads the target lends the drafter while it drafts ahead (0 =
    /// none), steps whose draft was drafted during the previous verification, and the time
    /// spent waiting for those drafts once verification was done.
    pub overlap_threads: u32,
    pub overlapped_steps: u64,
    pub overlap_wait_ms: f64,
    /// Set when the drafter failed and the request went on with plain decoding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drafter_error: Option<String>,
}

impl SpecStats {
    fn finish(&mut self) {
        if self.steps > 0 {
            self.mean_accepted = self.accepted as f64 / self.steps as f64;
            self.tokens_per_step = (self.accepted + self.steps) as f64 / self.steps as f64;
        }
        self.acceptance_by_depth =
            self.offered_by_depth.iter().zip(&self.accepted_by_depth).map(|(&o, &a)| if o > 0 { a as f64 / o as f64 } else { 0.0 }).collect();
    }
    fn record(&mut self, t: &Tree, class: Option<usize>, n_accepted: usize) {
        self.steps += 1;
        if t.is_empty() {
            return;
        }
        if let Some(c) = class {
            self.drafts_by_confidence.resize(CLASSES + 1, 0);
            self.accepted_by_confidence.resize(CLASSES + 1, 0);
            self.drafts_by_confidence[c] += 1;
            self.accepted_by_confidence[c] += n_accepted as u64;
        }
        self.draft_steps += 1;
        self.drafted += t.len() as u64;
        self.accepted += n_accepted as u64;
        let reached = (n_accepted as u32 + 1).min(t.max_depth()) as usize;
        if self.offered_by_depth.len() < reached {
            self.offered_by_depth.resize(reached, 0);
            self.accepted_by_depth.resize(reached, 0);
        }
        for d in 0..reached {
            self.offered_by_depth[d] += 1;
            if d < n_accepted {
                self.accepted_by_depth[d] += 1;
            }
        }
    }
}

/// One line for humans: acceptance and time per stage.
pub fn summary(s: &SpecStats) -> String {
    let acc: Vec<String> = s.acceptance_by_depth.iter().map(|a| format!("{:.0}%", a * 100.0)).collect();
    let mut line = format!(
        "drafter {}: {} steps, {} drafted, {} accepted, {:.2} accepted per step ({:.2} tokens per step); acceptance by depth [{}]; draft {:.0} ms, verify {:.0} ms, accept {:.0} ms",
        s.drafter, s.steps, s.drafted, s.accepted, s.mean_accepted, s.tokens_per_step, acc.join(" "), s.draft_ms, s.verify_ms, s.accept_ms
    );
    line.push_str(&format!("; scheduler {}, prefill chunk {}", s.scheduler, s.prefill_chunk));
    if s.calibrated_positions > 0 {
        line.push_str(&format!(", {} calibrated prompt positions (every {})", s.calibrated_positions, s.calibration_stride));
    }
    if s.reused > 0 {
        line.push_str(&format!(", {} reused draft tokens accepted", s.reused));
    }
    if s.overlapped_steps > 0 || s.overlap_threads > 0 {
        line.push_str(&format!(
            ", {} steps drafted during the previous verification ({} ms waited; threads lent to the drafter: {})",
            s.overlapped_steps, s.overlap_wait_ms.round(), s.overlap_threads
        ));
    }
    if !s.drafts_by_confidence.is_empty() {
        let per: Vec<String> = s.drafts_by_confidence.iter().zip(&s.accepted_by_confidence).map(|(&d, &a)| format!("{a}/{d}")).collect();
        line.push_str(&format!("; accepted/drafts by confidence [{}], {} drafts not verified", per.join(" "), s.unverified_drafts));
    }
    if let Some(e) = &s.drafter_error {
        line.push_str(&format!("; drafter failed: {e}"));
    }
    line
}

/// The confidence class of a step's draft `d` (with `offer`, a reused segment, beside it):
/// from the best score among its first tokens; [`REUSED_CLASS`] when only the segment is
/// there; None when there is nothing to draft, or the drafter gives no scores.
fn draft_class(d: &Draft, offer: &[u32]) -> Option<usize> {
    if d.tokens.is_empty() {
        return (!offer.is_empty()).then_some(REUSED_CLASS);
    }
    if d.scores.len() != d.tokens.len() {
        return None;
    }
    d.parents.iter().zip(&d.scores).filter(|(&p, _)| p < 0).map(|(_, &s)| s).reduce(f32::max).map(class_of)
}

/// A failing drafter never costs a wrong token: it is stopped, the error recorded, and the
/// request goes on with plain decoding. Returns the drafter (if its thread survived).
fn drop_drafter(stage: &mut Option<DraftStage>, stats: &mut SpecStats, e: String) -> Option<Box<dyn Drafter>> {
    tracing::warn!(drafter = %stats.drafter, error = %e, "drafter failed; continuing with plain decoding");
    eprintln!("warning: drafter '{}' failed ({e}); continuing with plain decoding", stats.drafter);
    stats.drafter_error = Some(e);
    stage.take().and_then(|s| s.stop().0)
}

/// A draft for the coming step, drafted during the last verification ([`ahead`]): it
/// continues the cache's first `base` tokens and the pending token `pending`; `wait_ms` is
/// how long the host waited for it after verifying.
struct Early {
    base: usize,
    pending: u32,
    draft: Draft,
    /// Depth of the draft as the drafter made it (for the drafting-cost statistics).
    levels: u32,
    wait_ms: f64,
}

impl Session {
    /// Generates after `prompt` (with the session's drafter, if any), calling `on_text` with
    /// each new piece of text as soon as its tokens are accepted.
    pub fn generate(&mut self, prompt: &[u32], p: &GenerateParams, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        let drafter = self.drafter.take();
        let sched = self.scheduler.take().unwrap_or_else(|| Box::new(Fixed::new(4, DEFAULT_PREFILL_CHUNK as u32)));
        let (back, sched, r) = self.run(prompt, p, drafter, sched, on_text);
        if r.is_err() {
            // A failed forward may have left the slot holding more (or other) than the
            // host's record of it; start the next request from an empty cache.
            if let Err(e) = self.reset() {
                tracing::warn!(error = %e, "could not clear the KV slot after a failed request");
            }
        }
        self.drafter = back;
        self.scheduler = Some(sched);
        r
    }

    fn run(
        &mut self,
        prompt: &[u32],
        p: &GenerateParams,
        drafter: Option<Box<dyn Drafter>>,
        mut sched: Box<dyn Scheduler>,
        on_text: &mut dyn FnMut(&str),
    ) -> (Option<Box<dyn Drafter>>, Box<dyn Scheduler>, Result<Generation>) {
        let _span = tracing::info_span!("generate", prompt_tokens = prompt.len()).entered();
        let t0 = Instant::now();
        let max_fwd = match self.backend.capabilities().max_width {
            0 => 512,
            w => w.min(512),
        };
        match sched.prefill_chunk(prompt.len() as u32, max_fwd) {
            Ok(c) => self.prefill_chunk = c.max(1) as usize,
            Err(e) => tracing::warn!(error = %e, "scheduler could not size the prefill chunk"),
        }
        // Context-aligned drafting: the target's own predictions over the prompt, for
        // drafters that ask for them.
        let top_k = match &drafter {
            Some(d) if p.techniques.calibration => d.calibration_top_k().min(16) as usize,
            _ => 0,
        };
        let stride = p.techniques.stride(self);
        let own_threads = drafter.as_ref().map(|d| d.own_threads()).unwrap_or(0);
        // The drafter's begin (indexing the prompt, or a draft model's prefill) runs on its
        // own thread while the target prefills.
        let limit = p.draft_timeout.unwrap_or_else(super::stage::proposal_limit);
        let mut stage = drafter.map(|d| DraftStage::start(d, prompt, limit));
        let mut stats = SpecStats {
            drafter: stage.as_ref().map(|s| s.name().to_string()).unwrap_or_default(),
            scheduler: sched.name().to_string(),
            prefill_chunk: self.prefill_chunk,
            ..Default::default()
        };
        let prefill = {
            let _s = tracing::info_span!("prefill", chunk = self.prefill_chunk, calibration_top_k = top_k).entered();
            self.prefill_with(prompt, (top_k > 0).then_some((top_k, stride)))
        };
        let (logits, computed) = match prefill {
            Ok(x) => x,
            Err(e) => return (stage.and_then(|s| s.stop().0), sched, Err(e)),
        };
        if top_k > 0 {
            if let Some(s) = stage.as_mut() {
                let mut pr = self.predictions.clone();
                pr.truncate_positions(prompt.len() as u32);
                stats.calibrated_positions = pr.len();
                stats.calibration_stride = stride;
                // A lost stage shows up at the first proposal.
                let _ = s.calibrate(pr);
            }
        }
        let mut timings = Timings { prompt_tokens: prompt.len(), prefill_tokens: computed, prefill_ms: t0.elapsed().as_secs_f64() * 1e3, ..Default::default() };
        let mut sampler = Sampler::new(p.sampling.clone());
        let mut em = Emitter::new(&self.tok, &p.stop, p.stop_at_eos, p.max_tokens);
        let t1 = Instant::now();
        let mut returned: Option<Box<dyn Drafter>> = None;
        // Acceptance per draft confidence starts from what the session's last request with
        // this drafter ended with, at a weight the new prompt's evidence soon outweighs; the
        // all-drafts mixture and the drafting cost start afresh (see `Policy::carried`); the
        // scheduler's cost model carries over in full.
        let mut policy = match self.carried_policy.take() {
            Some((name, pol)) if name == stats.drafter && pol.max_depth() == p.max_draft_depth.max(1) => pol.carried(),
            _ => Policy::new(p.max_draft_depth),
        };
        let mut reuse = Reuse::default();
        let mut last_verify_ms: Option<f64> = None;
        let max_width = p.max_draft_width.max(2);
        // Overlapped drafting: a drafter running a model of its own takes its threads from
        // the target's while it drafts during a verification (the rest of the time, plain
        // steps included, the target has them all).
        let overlap = p.techniques.overlap && stage.is_some();
        let target_threads = self.backend.capabilities().threads;
        if overlap && own_threads > 0 && target_threads > own_threads {
            stats.overlap_threads = own_threads;
        }
        let mut threads_now = target_threads;
        let mut early: Option<Early> = None;
        // The drafter's time per level of the drafts it makes during verification (ms).
        let mut ahead_ms_per_level = 0.0f64;
        let r = (|| -> Result<()> {
            let _s = tracing::info_span!("decode").entered();
            let mut pending = sampler.sample(&logits, &self.cached);
            if let Some(s) = stage.as_mut() {
                s.observe(Feedback { accepted: vec![pending], ..Default::default() });
            }
            if !em.push(pending, on_text)? {
                return Ok(());
            }
            let nv = self.model.n_vocab;
            loop {
                if p.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                    em.finish = Some("cancelled");
                    return Ok(());
                }
                let base = self.cached.len();
                if base + 1 >= self.n_ctx {
                    em.finish = Some("context_full");
                    return Ok(());
                }
                // Room for draft nodes behind the pending token.
                let room = (self.n_ctx - base - 2) as u32;
                let remaining = p.max_tokens.saturating_sub(em.tokens.len());
                let ext = p.techniques.extension;
                // Other requests merged into the last forward (a server's slots): the step
                // is planned for the joint width.
                let (shared_tokens, shared_slots) = self.backend.merged_with().unwrap_or((0, 0));
                let mut plan = |class: Option<usize>, policy: &Policy| match p.draft_budget {
                    Some((nodes, depth)) => Budget { depth, nodes },
                    None => sched.plan_step(&StepInput { shared_tokens, shared_slots, ..policy.input(class, base + 1, remaining, max_width, ext) }).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "scheduler failed; plain step");
                        Budget { depth: 0, nodes: 0 }
                    }),
                };
                let mut tree = Tree::default();
                let mut class = None;
                let mut budget = Budget { depth: 0, nodes: 0 };
                let prepared = early.take().filter(|e| e.base == base && e.pending == pending);
                if let (Some(s), true) = (stage.as_mut(), room > 0) {
                    let mut seq = Vec::with_capacity(base + 1);
                    seq.extend_from_slice(&self.cached);
                    seq.push(pending);
                    // A reused segment fills the nodes the drafter leaves unused (it never
                    // displaces the drafter's own, usually better, proposal).
                    let offer: &[u32] = if p.techniques.reuse { reuse.offer() } else { &[] };
                    let drafted = (|| -> Result<Tree, String> {
                        // A draft made while the last step was verified: the step is planned
                        // for its confidence, and its drafting cost is what waiting for it took.
                        let early_draft = prepared.map(|e| {
                            policy.record_draft(e.levels, e.wait_ms);
                            e.draft
                        });
                        // When drafting costs next to nothing, a one-token proposal first
                        // tells the draft's confidence, and the step is planned for it.
                        let cheap = early_draft.is_none()
                            && p.draft_budget.is_none()
                            && last_verify_ms.is_some_and(|v| policy.draft_ms_per_level() * p.max_draft_depth as f64 <= 0.05 * v);
                        if let Some(d) = &early_draft {
                            class = draft_class(d, offer);
                        } else if cheap {
                            let (d, ms) = s.propose(&seq, 1, 1).map_err(|e| e.to_string())?;
                            stats.draft_ms += ms;
                            if d.tokens.is_empty() && offer.is_empty() {
                                return Ok(Tree::default());
                            }
                            class = draft_class(&d, offer);
                        }
                        budget = plan(class, &policy);
                        if budget.depth == 0 {
                            stats.unverified_drafts += cheap as u64;
                            return Ok(Tree::default());
                        }
                        let nodes = budget.nodes.max(1).min(room);
                        let mut t = match early_draft {
                            Some(d) => {
                                stats.overlapped_steps += 1;
                                tree::check(&d, nv, nodes as usize, budget.depth)?
                            }
                            None if class == Some(REUSED_CLASS) => Tree::default(),
                            None => {
                                let (d, ms) = s.propose(&seq, nodes, budget.depth).map_err(|e| e.to_string())?;
                                stats.draft_ms += ms;
                                let t = tree::check(&d, nv, nodes as usize, budget.depth)?;
                                policy.record_draft(t.max_depth().max(1), ms);
                                class = class.or(draft_class(&d, offer));
                                t
                            }
                        };
                        if !offer.is_empty() {
                            t.add_branch(offer, nodes as usize, budget.depth);
                        }
                        Ok(t)
                    })();
                    match drafted {
                        Ok(t) => tree = t,
                        Err(e) => returned = drop_drafter(&mut stage, &mut stats, e),
                    }
                }
                // Overlap: the drafter drafts the step after this one, from the end of this
                // draft's main path, while the target verifies.
                let mut early_path = Vec::new();
                if let (true, false, Some(s)) = (overlap, tree.is_empty(), stage.as_mut()) {
                    let path = ahead::main_path(&tree);
                    let mut seq = Vec::with_capacity(base + 1 + path.len());
                    seq.extend_from_slice(&self.cached);
                    seq.push(pending);
                    seq.extend(path.iter().map(|&i| tree.tokens[i]));
                    // One level more than this step's draft (its first level is matched
                    // against the target's next token), at most one level beyond what the
                    // drafter finishes within one verification: an early draft that turns
                    // out unusable is still waited for before the next proposal.
                    let fits = match last_verify_ms {
                        Some(v) if ahead_ms_per_level > 0.0 => (v / ahead_ms_per_level) as u32,
                        _ => u32::MAX,
                    };
                    let depth = (budget.depth.max(1) + 1).min(fits.saturating_add(1).max(2));
                    match s.propose_ahead(&seq, budget.nodes.max(1) + 1, depth) {
                        Ok(()) => early_path = path,
                        Err(e) => returned = drop_drafter(&mut stage, &mut stats, e.to_string()),
                    }
                }
                if stats.overlap_threads > 0 {
                    let busy = stage.as_mut().is_some_and(|s| s.drafting_ahead());
                    let want = if busy { target_threads - stats.overlap_threads } else { target_threads };
                    if want != threads_now {
                        match self.backend.set_threads(want) {
                            Ok(()) => threads_now = want,
                            Err(e) => tracing::warn!(error = %e, "could not move threads between the target and the drafter"),
                        }
                    }
                }
                let tree_depth = tree.max_depth();
                let (tokens, positions, mask) = tree::batch(pending, base as u32, &tree);
                let w = tokens.len();
                let rows: Vec<u32> = (0..w as u32).collect();
                let tv = Instant::now();
                let logits = {
                    let _s = tracing::debug_span!("verify", width = w).entered();
                    let mask: &[u8] = if w == 1 { &[] } else { &mask };
                    self.backend.forward(&Forward { slot: self.slot, tokens: &tokens, positions: &positions, mask, logit_rows: &rows })?
                };
                let verify_us = tv.elapsed().as_micros() as u64;
                let verify_ms = verify_us as f64 / 1e3;
                stats.verify_ms += verify_ms;
                last_verify_ms = Some(verify_ms);
                // The forward's cost is that of its joint width when others shared it.
                let joint = w as u32 + self.backend.merged_with().map(|m| m.0).unwrap_or(0);
                if let Err(e) = sched.observe_step(CostSample { width: joint, context: base as u32, rows: joint, micros: verify_us }) {
                    tracing::warn!(error = %e, "scheduler could not record a step");
                }
                let ta = Instant::now();
                self.cached.push(pending);
                let v = {
                    let _s = tracing::debug_span!("accept").entered();
                    tree::accept(&tree, &logits, nv, &self.cached, &mut sampler)
                };
                if !tree.is_empty() {
                    let keep: Vec<u32> = std::iter::once(0).chain(v.accepted.iter().map(|&i| i as u32 + 1)).collect();
                    self.backend.keep_entries(self.slot, base as u32, &keep)?;
                }
                let mut new_tokens: Vec<u32> = v.accepted.iter().map(|&i| tree.tokens[i]).collect();
                self.cached.extend_from_slice(&new_tokens);
                new_tokens.push(v.next);
                stats.accept_ms += ta.elapsed().as_secs_f64() * 1e3;
                stats.record(&tree, class, v.accepted.len());
                policy.record(class, tree_depth, v.accepted.len() as u32);
                if p.techniques.reuse && stage.is_some() {
                    reuse.after_step(&tree, &logits, nv, &v, &new_tokens, p.max_draft_depth as usize);
                }
                // The early draft is usable only if the whole main path it continues was
                // accepted; otherwise the next proposal drops it.
                if let (true, Some(s)) = (ahead::accepted_whole(&early_path, &v.accepted), stage.as_mut()) {
                    let tw = Instant::now();
                    let taken = s.take_ahead().map_err(|e| e.to_string()).and_then(|(d, ms)| {
                        // A malformed early draft fails the drafter as any other draft would.
                        let levels = tree::check(&d, nv, usize::MAX, u32::MAX)?.max_depth().max(1);
                        Ok((d, ms, levels))
                    });
                    match taken {
                        Ok((d, ms, levels)) => {
                            let wait_ms = tw.elapsed().as_secs_f64() * 1e3;
                            stats.overlap_wait_ms += wait_ms;
                            stats.draft_ms += ms;
                            ahead_ms_per_level = match ahead_ms_per_level {
                                x if x > 0.0 => 0.8 * x + 0.2 * ms / levels as f64,
                                _ => ms / levels as f64,
                            };
                            early = ahead::subtree(&d, v.next).map(|draft| Early { base: self.cached.len(), pending: v.next, draft, levels, wait_ms });
                        }
                        Err(e) => returned = drop_drafter(&mut stage, &mut stats, e),
                    }
                }
                let mut go = true;
                for &t in &new_tokens {
                    if !em.push(t, on_text)? {
                        go = false;
                        break;
                    }
                }
                if let Some(s) = stage.as_mut() {
                    s.observe(Feedback {
                        accepted: new_tokens.clone(),
                        n_accepted_draft: v.accepted.len() as u32,
                        n_drafted: tree.len() as u32,
                        accepted_nodes: v.accepted.iter().map(|&i| tree.origin[i]).take_while(|&o| o != HOST_NODE).collect(),
                    });
                }
                if !go {
                    return Ok(());
                }
                pending = v.next;
            }
        })();
        if threads_now != target_threads {
            if let Err(e) = self.backend.set_threads(target_threads) {
                tracing::warn!(error = %e, "could not give the target its threads back");
            }
        }
        stats.reused = reuse.accepted;
        em.flush(on_text);
        if let Some(s) = stage.take() {
            let (d, fin) = s.stop();
            if let Err(e) = fin {
                tracing::warn!(error = %e, "drafter reported an error");
                stats.drafter_error.get_or_insert(e.to_string());
            }
            returned = d;
        }
        if !stats.drafter.is_empty() && stats.drafter_error.is_none() {
            self.carried_policy = Some((stats.drafter.clone(), policy));
        }
        if let Err(e) = r {
            return (returned, sched, Err(e));
        }
        timings.generated_tokens = em.tokens.len();
        timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        stats.finish();
        let spec = (!stats.drafter.is_empty()).then_some(stats);
        let g = Generation { text: em.text.clone(), tokens: em.tokens.clone(), finish_reason: em.finish.unwrap_or("length").to_string(), timings, spec };
        (returned, sched, Ok(g))
    }
}
