//! One request's decode loop, as a [`Decoder`] that owns the request's state (draft stage,
//! acceptance policy, reused segments, overlap, sampler, text stream, statistics) and runs
//! each verification step in four parts:
//!
//! - [`Decoder::plan`]: ask the drafter (or take the draft made ahead) and size the step's
//!   draft tree with the scheduler; an empty tree is a plain one-token step.
//! - [`Decoder::verify`]: the pending token and the whole tree in one forward of the target.
//! - [`Decoder::accept`]: the accepted path stays in the KV cache, the rest is dropped, and
//!   the policy, statistics and reuse learn from the outcome.
//! - [`Decoder::feedback`]: stream the new tokens and tell the drafter what was accepted.
//!
//! A failing drafter never costs a wrong token: it is stopped, the error recorded, and the
//! request goes on with plain decoding ([`Decoder::drop_drafter`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Result;

use coordgen_interface::CostSample;

use super::ahead::{self, Overlap};
use super::emit::Emitter;
use super::policy::{class_of, Policy, REUSED_CLASS};
use super::reuse::Reuse;
use super::stage::DraftStage;
use super::stats::SpecStats;
use super::tree::{self, Tree, Verdict, HOST_NODE};
use crate::engine::{GenerateParams, Generation, Timings};
use crate::plugins::{Draft, Drafter, Feedback};
use crate::sampling::Sampler;
use crate::scheduler::{Budget, Scheduler, StepInput};
use crate::session::Session;

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

/// What [`Decoder::plan`] decided for one step.
struct Plan {
    tree: Tree,
    /// The draft's confidence class (see [`draft_class`]).
    class: Option<usize>,
    budget: Budget,
}

pub(super) struct Decoder<'a> {
    s: &'a mut Session,
    p: &'a GenerateParams,
    sched: Box<dyn Scheduler>,
    stage: Option<DraftStage>,
    pub stats: SpecStats,
    policy: Policy,
    reuse: Reuse,
    sampler: Sampler,
    em: Emitter,
    overlap: Overlap,
    last_verify_ms: Option<f64>,
    /// The drafter, once its stage was stopped (after a failure or at the end).
    returned: Option<Box<dyn Drafter>>,
    /// Top predictions per prompt position the drafter wants (0 = none, or calibration off).
    top_k: usize,
    n_vocab: usize,
    max_width: usize,
}

impl<'a> Decoder<'a> {
    /// Starts the request's draft stage (the drafter's `begin` runs on its own thread while
    /// the target prefills) and its state.
    pub fn new(s: &'a mut Session, prompt: &[u32], p: &'a GenerateParams, drafter: Option<Box<dyn Drafter>>, sched: Box<dyn Scheduler>) -> Decoder<'a> {
        let own_threads = drafter.as_ref().map(|d| d.own_threads()).unwrap_or(0);
        // Context-aligned drafting: the target's own predictions over the prompt, for
        // drafters that ask for them.
        let top_k = match &drafter {
            Some(d) if p.techniques.calibration => d.calibration_top_k().min(16) as usize,
            _ => 0,
        };
        let limit = p.draft_timeout.unwrap_or_else(super::stage::proposal_limit);
        let stage = drafter.map(|d| DraftStage::start(d, prompt, limit));
        // Overlapped drafting: a drafter running a model of its own takes its threads from
        // the target's while it drafts during a verification (the rest of the time, plain
        // steps included, the target has them all).
        let overlap = Overlap::new(p.techniques.overlap && stage.is_some(), own_threads, s.backend().capabilities().threads);
        let stats = SpecStats {
            drafter: stage.as_ref().map(|s| s.name().to_string()).unwrap_or_default(),
            scheduler: sched.name().to_string(),
            prefill_chunk: s.prefill_chunk(),
            overlap_threads: overlap.lent,
            ..Default::default()
        };
        Decoder {
            n_vocab: s.model().n_vocab,
            em: Emitter::new(s.shared_tok(), &p.stop, p.stop_at_eos, p.max_tokens),
            s,
            p,
            sched,
            stage,
            stats,
            // Replaced by the carried statistics once the prefill succeeds (see `prefill`).
            policy: Policy::new(p.max_draft_depth),
            reuse: Reuse::default(),
            sampler: Sampler::new(p.sampling.clone()),
            overlap,
            last_verify_ms: None,
            returned: None,
            top_k,
            max_width: p.max_draft_width.max(2),
        }
    }

    /// Prefills `prompt`, recording the target's predictions over it for a drafter that
    /// asks for them (context-aligned drafting) and handing them over; returns the logits
    /// after the prompt and the number of tokens computed.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        let top_k = self.top_k;
        let stride = self.p.techniques.stride(self.s);
        let out = {
            let _s = tracing::info_span!("prefill", chunk = self.s.prefill_chunk(), calibration_top_k = top_k).entered();
            self.s.prefill_with(prompt, (top_k > 0).then_some((top_k, stride)))?
        };
        // Acceptance per draft confidence starts from what the session's last request with
        // this drafter ended with, at a weight the new prompt's evidence soon outweighs; the
        // all-drafts mixture and the drafting cost start afresh (see `Policy::carried`); the
        // scheduler's cost model carries over in full. Taken only now, so a failed prefill
        // leaves the session's statistics where they were.
        if let Some((name, pol)) = self.s.take_carried_policy() {
            if name == self.stats.drafter && pol.max_depth() == self.p.max_draft_depth.max(1) {
                self.policy = pol.carried();
            }
        }
        if top_k > 0 {
            if let Some(st) = self.stage.as_mut() {
                let mut pr = self.s.predictions().clone();
                pr.truncate_positions(prompt.len() as u32);
                self.stats.calibrated_positions = pr.len();
                self.stats.calibration_stride = stride;
                // A lost stage shows up at the first proposal.
                let _ = st.calibrate(pr);
            }
        }
        Ok(out)
    }

    /// Decodes after the prompt (whose last logits are `logits`) until the output is
    /// complete, cancelled or the context is full.
    pub fn decode(&mut self, logits: &[f32], on_text: &mut dyn FnMut(&str)) -> Result<()> {
        let _s = tracing::info_span!("decode").entered();
        let mut pending = self.sampler.sample(logits, self.s.cached());
        if let Some(st) = self.stage.as_mut() {
            st.observe(Feedback { accepted: vec![pending], ..Default::default() });
        }
        if !self.em.push(pending, on_text)? {
            return Ok(());
        }
        loop {
            if self.p.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                self.em.finish = Some("cancelled");
                return Ok(());
            }
            let base = self.s.cached().len();
            if base + 1 >= self.s.n_ctx() {
                self.em.finish = Some("context_full");
                return Ok(());
            }
            let plan = self.plan(base, pending);
            let early_path = self.draft_ahead(base, pending, &plan);
            let logits = self.verify(base, pending, &plan.tree)?;
            let (v, new_tokens) = self.accept(base, &plan, &logits)?;
            if !self.feedback(&plan.tree, &early_path, &v, &new_tokens, on_text)? {
                return Ok(());
            }
            pending = v.next;
        }
    }

    /// Asks a scheduler for the step's draft budget; a failing scheduler gives a plain step.
    fn budget(&mut self, class: Option<usize>, base: usize) -> Budget {
        if let Some((nodes, depth)) = self.p.draft_budget {
            return Budget { depth, nodes };
        }
        let remaining = self.p.max_tokens.saturating_sub(self.em.tokens.len());
        // Other requests merged into the last forward (a server's slots): the step is
        // planned for the joint width.
        let (shared_tokens, shared_slots) = self.s.backend().merged_with().unwrap_or((0, 0));
        let input = StepInput { shared_tokens, shared_slots, ..self.policy.input(class, base + 1, remaining, self.max_width, self.p.techniques.extension) };
        self.sched.plan_step(&input).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "scheduler failed; plain step");
            Budget { depth: 0, nodes: 0 }
        })
    }

    /// The step's draft tree behind the pending token (empty: a plain step).
    fn plan(&mut self, base: usize, pending: u32) -> Plan {
        let mut plan = Plan { tree: Tree::default(), class: None, budget: Budget { depth: 0, nodes: 0 } };
        let prepared = self.overlap.prepared(base, pending);
        // Room for draft nodes behind the pending token.
        let room = (self.s.n_ctx() - base - 2) as u32;
        if self.stage.is_none() || room == 0 {
            return plan;
        }
        let mut seq = Vec::with_capacity(base + 1);
        seq.extend_from_slice(self.s.cached());
        seq.push(pending);
        // A reused segment fills the nodes the drafter leaves unused (it never displaces
        // the drafter's own, usually better, proposal).
        let offer: Vec<u32> = if self.p.techniques.reuse { self.reuse.offer().to_vec() } else { Vec::new() };
        match self.draft(&seq, &offer, prepared, room, &mut plan) {
            Ok(t) => plan.tree = t,
            Err(e) => self.drop_drafter(e),
        }
        plan
    }

    /// The drafting part of [`Decoder::plan`]: fills `plan`'s class and budget and returns
    /// the tree; an error fails the drafter.
    fn draft(&mut self, seq: &[u32], offer: &[u32], prepared: Option<ahead::Early>, room: u32, plan: &mut Plan) -> Result<Tree, String> {
        let base = seq.len() - 1;
        // A draft made while the last step was verified: the step is planned for its
        // confidence, and its drafting cost is what waiting for it took.
        let early_draft = prepared.map(|e| {
            self.policy.record_draft(e.levels, e.wait_ms);
            e.draft
        });
        // When drafting costs next to nothing, a one-token proposal first tells the draft's
        // confidence, and the step is planned for it.
        let cheap = early_draft.is_none()
            && self.p.draft_budget.is_none()
            && self.last_verify_ms.is_some_and(|v| self.policy.draft_ms_per_level() * self.p.max_draft_depth as f64 <= 0.05 * v);
        let stage = self.stage.as_mut().expect("plan checked the stage");
        if let Some(d) = &early_draft {
            plan.class = draft_class(d, offer);
        } else if cheap {
            let (d, ms) = stage.propose(seq, 1, 1).map_err(|e| e.to_string())?;
            self.stats.draft_ms += ms;
            if d.tokens.is_empty() && offer.is_empty() {
                return Ok(Tree::default());
            }
            plan.class = draft_class(&d, offer);
        }
        plan.budget = self.budget(plan.class, base);
        let budget = plan.budget;
        if budget.depth == 0 {
            self.stats.unverified_drafts += cheap as u64;
            return Ok(Tree::default());
        }
        let nodes = budget.nodes.max(1).min(room);
        let nv = self.n_vocab;
        let mut t = match early_draft {
            Some(d) => {
                self.stats.overlapped_steps += 1;
                tree::check(&d, nv, nodes as usize, budget.depth)?
            }
            None if plan.class == Some(REUSED_CLASS) => Tree::default(),
            None => {
                let stage = self.stage.as_mut().expect("plan checked the stage");
                let (d, ms) = stage.propose(seq, nodes, budget.depth).map_err(|e| e.to_string())?;
                self.stats.draft_ms += ms;
                let t = tree::check(&d, nv, nodes as usize, budget.depth)?;
                self.policy.record_draft(t.max_depth().max(1), ms);
                plan.class = plan.class.or(draft_class(&d, offer));
                t
            }
        };
        if !offer.is_empty() {
            t.add_branch(offer, nodes as usize, budget.depth);
        }
        Ok(t)
    }

    /// Overlap: the drafter drafts the step after this one, from the end of this draft's
    /// main path, while the target verifies; and the threads move to it meanwhile. Returns
    /// the main path the early draft continues (empty: none was asked for).
    fn draft_ahead(&mut self, base: usize, pending: u32, plan: &Plan) -> Vec<usize> {
        let mut early_path = Vec::new();
        if let (true, false, Some(st)) = (self.overlap.on, plan.tree.is_empty(), self.stage.as_mut()) {
            let path = ahead::main_path(&plan.tree);
            let mut seq = Vec::with_capacity(base + 1 + path.len());
            seq.extend_from_slice(self.s.cached());
            seq.push(pending);
            seq.extend(path.iter().map(|&i| plan.tree.tokens[i]));
            let depth = self.overlap.ahead_depth(plan.budget.depth, self.last_verify_ms);
            match st.propose_ahead(&seq, plan.budget.nodes.max(1) + 1, depth) {
                Ok(()) => early_path = path,
                Err(e) => self.drop_drafter(e.to_string()),
            }
        }
        let busy = self.stage.as_mut().is_some_and(|st| st.drafting_ahead());
        if let Some(want) = self.overlap.threads_to_set(busy) {
            match self.s.set_threads(want) {
                Ok(()) => self.overlap.threads_set(want),
                Err(e) => tracing::warn!(error = %e, "could not move threads between the target and the drafter"),
            }
        }
        early_path
    }

    /// One forward of the pending token and the tree; returns the logits of every row.
    fn verify(&mut self, base: usize, pending: u32, t: &Tree) -> Result<Vec<f32>> {
        let (tokens, positions, mask) = tree::batch(pending, base as u32, t);
        let w = tokens.len();
        let rows: Vec<u32> = (0..w as u32).collect();
        let tv = Instant::now();
        let logits = {
            let _s = tracing::debug_span!("verify", width = w).entered();
            let mask: &[u8] = if w == 1 { &[] } else { &mask };
            self.s.forward(&tokens, &positions, mask, &rows)?
        };
        let verify_us = tv.elapsed().as_micros() as u64;
        let verify_ms = verify_us as f64 / 1e3;
        self.stats.verify_ms += verify_ms;
        self.last_verify_ms = Some(verify_ms);
        // The forward's cost is that of its joint width when others shared it.
        let joint = w as u32 + self.s.backend().merged_with().map(|m| m.0).unwrap_or(0);
        if let Err(e) = self.sched.observe_step(CostSample { width: joint, context: base as u32, rows: joint, micros: verify_us }) {
            tracing::warn!(error = %e, "scheduler could not record a step");
        }
        Ok(logits)
    }

    /// Decides acceptance (lossless: [`tree::accept`]), keeps the accepted path in the KV
    /// cache, and updates statistics, policy and reuse. Returns the verdict and the new
    /// tokens (accepted drafts, then the target's own).
    fn accept(&mut self, base: usize, plan: &Plan, logits: &[f32]) -> Result<(Verdict, Vec<u32>)> {
        let ta = Instant::now();
        let t = &plan.tree;
        let v = {
            let _s = tracing::debug_span!("accept").entered();
            // The history is the cache up to and with the pending token.
            tree::accept(t, logits, self.n_vocab, &self.s.cached()[..base + 1], &mut self.sampler)
        };
        if !t.is_empty() {
            let keep: Vec<u32> = std::iter::once(0).chain(v.accepted.iter().map(|&i| i as u32 + 1)).collect();
            self.s.keep_entries(base, &keep)?;
        }
        let mut new_tokens: Vec<u32> = v.accepted.iter().map(|&i| t.tokens[i]).collect();
        new_tokens.push(v.next);
        self.stats.accept_ms += ta.elapsed().as_secs_f64() * 1e3;
        self.stats.record(t, plan.class, v.accepted.len());
        self.policy.record(plan.class, t.max_depth(), v.accepted.len() as u32);
        if self.p.techniques.reuse && self.stage.is_some() {
            self.reuse.after_step(t, logits, self.n_vocab, &v, &new_tokens, self.p.max_draft_depth as usize);
        }
        Ok((v, new_tokens))
    }

    /// Takes the early draft when the whole main path it continues was accepted (otherwise
    /// the next proposal drops it), streams the new tokens and tells the drafter. Returns
    /// false when the output is complete.
    fn feedback(&mut self, t: &Tree, early_path: &[usize], v: &Verdict, new_tokens: &[u32], on_text: &mut dyn FnMut(&str)) -> Result<bool> {
        if let (true, Some(st)) = (ahead::accepted_whole(early_path, &v.accepted), self.stage.as_mut()) {
            let tw = Instant::now();
            let nv = self.n_vocab;
            let taken = st.take_ahead().map_err(|e| e.to_string()).and_then(|(d, ms)| {
                // A malformed early draft fails the drafter as any other draft would.
                let levels = tree::check(&d, nv, usize::MAX, u32::MAX)?.max_depth().max(1);
                Ok((d, ms, levels))
            });
            match taken {
                Ok((d, ms, levels)) => {
                    let wait_ms = tw.elapsed().as_secs_f64() * 1e3;
                    self.stats.overlap_wait_ms += wait_ms;
                    self.stats.draft_ms += ms;
                    self.overlap.took(&d, ms, levels, wait_ms, self.s.cached().len(), v.next);
                }
                Err(e) => self.drop_drafter(e),
            }
        }
        let mut go = true;
        for &tok in new_tokens {
            if !self.em.push(tok, on_text)? {
                go = false;
                break;
            }
        }
        if let Some(st) = self.stage.as_mut() {
            st.observe(Feedback {
                accepted: new_tokens.to_vec(),
                n_accepted_draft: v.accepted.len() as u32,
                n_drafted: t.len() as u32,
                accepted_nodes: v.accepted.iter().map(|&i| t.origin[i]).take_while(|&o| o != HOST_NODE).collect(),
            });
        }
        Ok(go)
    }

    /// Stops a failed drafter, records the error, and goes on with plain decoding.
    fn drop_drafter(&mut self, e: String) {
        tracing::warn!(drafter = %self.stats.drafter, error = %e, "drafter failed; continuing with plain decoding");
        eprintln!("warning: drafter '{}' failed ({e}); continuing with plain decoding", self.stats.drafter);
        self.stats.drafter_error = Some(e);
        self.returned = self.stage.take().and_then(|s| s.stop().0);
    }

    /// Ends the request: the target gets its threads back, the drafter its `finish`, the
    /// session the acceptance statistics to carry; returns the drafter, the scheduler and
    /// the request's outcome (`r`, what prefill and decoding returned).
    pub fn finish(mut self, r: Result<()>, mut timings: Timings, t_decode: Instant, on_text: &mut dyn FnMut(&str)) -> (Option<Box<dyn Drafter>>, Box<dyn Scheduler>, Result<Generation>) {
        if let Some(n) = self.overlap.threads_to_restore() {
            if let Err(e) = self.s.set_threads(n) {
                tracing::warn!(error = %e, "could not give the target its threads back");
            }
        }
        self.stats.reused = self.reuse.accepted;
        self.em.flush(on_text);
        if let Some(st) = self.stage.take() {
            let (d, fin) = st.stop();
            if let Err(e) = fin {
                tracing::warn!(error = %e, "drafter reported an error");
                self.stats.drafter_error.get_or_insert(e.to_string());
            }
            self.returned = d;
        }
        if !self.stats.drafter.is_empty() && self.stats.drafter_error.is_none() {
            self.s.set_carried_policy(Some((self.stats.drafter.clone(), self.policy)));
        }
        if let Err(e) = r {
            return (self.returned, self.sched, Err(e));
        }
        timings.generated_tokens = self.em.tokens.len();
        timings.decode_ms = t_decode.elapsed().as_secs_f64() * 1e3;
        self.stats.finish();
        let spec = (!self.stats.drafter.is_empty()).then_some(self.stats);
        let em = self.em;
        let g = Generation { text: em.text, tokens: em.tokens, finish_reason: em.finish.unwrap_or("length").to_string(), timings, spec };
        (self.returned, self.sched, Ok(g))
    }

    /// Ends a request whose prefill failed: only the drafter's stage is stopped.
    pub fn abandon(mut self, e: anyhow::Error) -> (Option<Box<dyn Drafter>>, Box<dyn Scheduler>, Result<Generation>) {
        let d = self.stage.take().and_then(|s| s.stop().0);
        (d, self.sched, Err(e))
    }
}
