//! `coordgen bench --workload FILE --replay TRACES`: offline evaluation of drafters.
//!
//! Greedy output is deterministic, so each prompt's plain continuation, with the target's
//! top predictions at every prompt position, is computed once and kept in a trace file.
//! A drafter is then replayed against it without running the target: each step proposes
//! from the true sequence, the longest tree path that the continuation follows is what
//! verification would accept, and the step advances by that plus the target's own token.
//! This measures the drafter alone, at a fixed budget (no reuse, no scheduler), in seconds
//! instead of the minutes a live run takes, so drafting ideas can be compared on every
//! prompt; the live figures come from `--workload` and `--ablation`.
//!
//! Per prompt it reports tokens per step and a modelled speedup: the cost model's latency
//! of one token times the tokens, over the modelled latency of each step's batch (the
//! pending token plus the drafted nodes) plus the measured drafting time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use coordgen_interface::CostModel;

use crate::bench::median;
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::engine::{GenerateParams, Session};
use crate::plugins::{Draft, Drafter, Feedback, Predictions};
use crate::workload::{group_of, Prompt};

/// Top predictions kept per prompt position in a trace.
pub const TRACE_TOP_K: usize = 4;

/// One prompt's greedy continuation and the target's predictions over the prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trace {
    pub id: String,
    pub category: String,
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    /// Top-[`TRACE_TOP_K`] tokens and probabilities at every prompt position.
    pub top_tokens: Vec<u32>,
    pub top_probs: Vec<f32>,
}

/// What a trace file was made with; traces of another model or length are recomputed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    model: String,
    max_tokens: usize,
    top_k: usize,
}

/// Reads a trace file's text: the traces under its header when that header is `want` (or
/// any header, for `None`), none when it is another, and an error when the text is not a
/// trace file or a trace is malformed.
pub fn parse(text: &str, want: Option<&Header>, path: &Path) -> Result<BTreeMap<String, Trace>> {
    let mut have = BTreeMap::new();
    let mut lines = text.lines();
    // Only a trace file is ever replaced (one made for another model or length is).
    let found = match lines.next().map(serde_json::from_str::<Header>) {
        None => return Ok(have),
        Some(Ok(h)) => h,
        Some(Err(_)) => bail!("{} is not a trace file of `coordgen bench --replay` (its first line is not a trace header); name a new file", path.display()),
    };
    if want.is_some_and(|w| *w != found) {
        return Ok(have);
    }
    for (i, l) in lines.enumerate() {
        let t: Trace = serde_json::from_str(l).with_context(|| format!("{} line {}: not a trace", path.display(), i + 2))?;
        let k = t.prompt.len().saturating_mul(TRACE_TOP_K);
        if t.top_tokens.len() != k || t.top_probs.len() != k {
            bail!("{} line {}: {} predictions for a {}-token prompt (want {} per position)", path.display(), i + 2, t.top_tokens.len(), t.prompt.len(), TRACE_TOP_K);
        }
        have.insert(t.id.clone(), t);
    }
    Ok(have)
}

/// Loads the traces of `prompts` from `path`, computing (and appending) the ones missing or
/// made from another text.
pub fn traces(s: &mut Session, prompts: &[Prompt], max_tokens: usize, path: &Path, progress: &mut dyn FnMut(&str)) -> Result<Vec<Trace>> {
    let header = Header { model: s.model_path().display().to_string(), max_tokens, top_k: TRACE_TOP_K };
    let have = match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, Some(&header), path)?,
        Err(_) => BTreeMap::new(),
    };
    let fresh = have.is_empty();
    let mut out = Vec::new();
    let mut added = Vec::new();
    for p in prompts {
        let text = s.render_chat(&[Message::new("user", &p.prompt)], true)?;
        let prompt = s.tok().encode(&text, true)?;
        // A trace of another text under the same id is stale (a later line replaces it).
        if let Some(t) = have.get(&p.id).filter(|t| t.prompt == prompt) {
            out.push(t.clone());
            continue;
        }
        progress(&format!("tracing {} ({})", p.id, p.category));
        let t = trace(s, p, prompt, max_tokens)?;
        added.push(t.clone());
        out.push(t);
    }
    if !added.is_empty() {
        // The whole file is rewritten (atomically) rather than appended to, so an interrupted
        // run never leaves a torn last line.
        let mut text = serde_json::to_string(&header)? + "\n";
        let kept: Vec<Trace> = if fresh { Vec::new() } else { have.values().filter(|t| !added.iter().any(|a| a.id == t.id)).cloned().collect() };
        for t in kept.iter().chain(&added) {
            text += &serde_json::to_string(t)?;
            text.push('\n');
        }
        coordgen_drafter_store::atomic::write_atomic(path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(out)
}

fn trace(s: &mut Session, p: &Prompt, prompt: Vec<u32>, max_tokens: usize) -> Result<Trace> {
    s.reset()?;
    s.prefill_with(&prompt, Some((TRACE_TOP_K, 1))).with_context(|| format!("prompt {}", p.id))?;
    let mut pr = s.predictions().clone();
    pr.truncate_positions(prompt.len() as u32);
    if pr.positions.len() != prompt.len() {
        bail!("prompt {}: predictions at {} of {} positions", p.id, pr.positions.len(), prompt.len());
    }
    let drafter = s.take_drafter();
    let g = s.generate(&prompt, &GenerateParams { max_tokens, ..Default::default() }, &mut |_| {});
    s.put_drafter(drafter);
    let g = g.with_context(|| format!("prompt {}", p.id))?;
    Ok(Trace { id: p.id.clone(), category: p.category.clone(), prompt, output: g.tokens, top_tokens: pr.tokens, top_probs: pr.probs })
}

/// How a drafter is replayed.
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub max_nodes: u32,
    pub max_depth: u32,
    /// Top-k and stride of the predictions handed to drafters that ask for calibration
    /// (None = no calibration).
    pub calibration: Option<(usize, u32)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayResult {
    pub id: String,
    pub category: String,
    pub mode: String,
    pub tokens: usize,
    pub steps: usize,
    /// Drafted tokens accepted per step.
    pub mean_accepted: f64,
    /// Nodes drafted per step.
    pub mean_nodes: f64,
    /// Modelled decode speedup over plain (see the module header).
    pub modelled_speedup: f64,
    pub draft_ms: f64,
}

/// The session's verify cost model (calibration samples with logits for every row), which
/// prices each replayed step's batch.
pub fn verify_costs(s: &Session) -> CostModel {
    let mut m = CostModel::default();
    m.add_calibration(&s.costs().iter().copied().filter(|c| c.rows == c.width).collect::<Vec<_>>());
    m
}

/// A mode's figures over a category or over the context-heavy or other group.
#[derive(Clone, Debug, Serialize)]
pub struct ReplaySummary {
    pub group: String,
    pub mode: String,
    pub prompts: usize,
    pub mean_accepted: f64,
    pub median_modelled_speedup: f64,
}

/// Per category and for the context-heavy group and the others.
pub fn summarize(results: &[ReplayResult]) -> Vec<ReplaySummary> {
    let mut groups: BTreeMap<(String, String), Vec<&ReplayResult>> = BTreeMap::new();
    for r in results {
        for g in [r.category.clone(), group_of(&r.category).into()] {
            groups.entry((g, r.mode.clone())).or_default().push(r);
        }
    }
    groups
        .into_iter()
        .map(|((group, mode), rs)| {
            let mut sp: Vec<f64> = rs.iter().map(|r| r.modelled_speedup).collect();
            let mean_accepted = rs.iter().map(|r| r.mean_accepted).sum::<f64>() / rs.len() as f64;
            ReplaySummary { group, mode, prompts: rs.len(), mean_accepted, median_modelled_speedup: median(&mut sp) }
        })
        .collect()
}

/// The draft nodes (root to leaf) that the continuation `truth` follows in `d`: what
/// greedy verification accepts.
pub fn accepted_path(d: &Draft, truth: &[u32]) -> Vec<u32> {
    let mut path = Vec::new();
    let mut at = -1i32;
    while path.len() < truth.len() {
        match (0..d.tokens.len()).find(|&i| d.parents[i] == at && d.tokens[i] == truth[path.len()]) {
            Some(i) => {
                at = i as i32;
                path.push(i as u32);
            }
            None => break,
        }
    }
    path
}

/// Replays `d` over trace `t` (see the module header).
pub fn replay(d: &mut dyn Drafter, mode: &str, t: &Trace, c: &ReplayConfig, costs: &CostModel) -> Result<ReplayResult> {
    let k = TRACE_TOP_K;
    d.begin(&t.prompt)?;
    if let Some((want_k, stride)) = c.calibration {
        if d.calibration_top_k() > 0 {
            let want_k = want_k.clamp(1, k);
            let mut pr = Predictions { k: want_k, ..Default::default() };
            for pos in (0..t.prompt.len()).filter(|p| p % stride.max(1) as usize == 0) {
                pr.positions.push(pos as u32);
                pr.tokens.extend_from_slice(&t.top_tokens[pos * k..pos * k + want_k]);
                pr.probs.extend_from_slice(&t.top_probs[pos * k..pos * k + want_k]);
            }
            d.calibrate(&pr)?;
        }
    }
    let out = &t.output;
    let mut r = ReplayResult { id: t.id.clone(), category: t.category.clone(), mode: mode.into(), tokens: out.len(), steps: 0, mean_accepted: 0.0, mean_nodes: 0.0, modelled_speedup: 1.0, draft_ms: 0.0 };
    if out.is_empty() {
        d.finish()?;
        return Ok(r);
    }
    d.observe(&Feedback { accepted: vec![out[0]], ..Default::default() })?;
    let mut seq: Vec<u32> = t.prompt.iter().chain(&out[..1]).copied().collect();
    let (mut pos, mut accepted, mut nodes, mut spec_ms, mut plain_ms) = (1usize, 0usize, 0usize, 0.0f64, 0.0f64);
    while pos < out.len() {
        let ctx = seq.len() as u32;
        let t0 = Instant::now();
        let draft = d.propose(&seq, c.max_nodes, c.max_depth)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        // The tree is walked below, so a malformed one is refused first (as a live run does).
        crate::spec::tree::check(&draft, usize::MAX, usize::MAX, u32::MAX).map_err(|e| anyhow::anyhow!("drafter of mode {mode}: {e}"))?;
        // The pending token is out[pos - 1] (already in `seq`); the batch verifies it and the
        // draft, and the target's own token follows the accepted path.
        // At the end of the output the accepted drafts may be all that is left (the target's
        // own token then falls past the limit, as in a live run).
        let path = accepted_path(&draft, &out[pos..]);
        let a = path.len();
        let n = (a + 1).min(out.len() - pos);
        r.draft_ms += ms;
        spec_ms += costs.latency(draft.tokens.len() as u32 + 1, ctx) + ms;
        for i in 0..n {
            plain_ms += costs.latency(1, ctx + i as u32);
        }
        accepted += a;
        nodes += draft.tokens.len();
        r.steps += 1;
        d.observe(&Feedback { accepted: out[pos..pos + n].to_vec(), n_accepted_draft: a as u32, n_drafted: draft.tokens.len() as u32, accepted_nodes: path })?;
        seq.extend_from_slice(&out[pos..pos + n]);
        pos += n;
    }
    d.finish()?;
    r.mean_accepted = accepted as f64 / r.steps.max(1) as f64;
    r.mean_nodes = nodes as f64 / r.steps.max(1) as f64;
    r.modelled_speedup = if spec_ms > 0.0 { plain_ms / spec_ms } else { 1.0 };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_length_follows_the_matching_branch() {
        // Roots 5 and 7; 7 -> 8 -> 9, 7 -> 3.
        let d = Draft { tokens: vec![5, 7, 8, 3, 9], parents: vec![-1, -1, 1, 1, 2], scores: vec![0.0; 5] };
        assert_eq!(accepted_path(&d, &[7, 8, 9, 1]), vec![1, 2, 4]);
        assert_eq!(accepted_path(&d, &[7, 3, 9]), vec![1, 3]);
        assert_eq!(accepted_path(&d, &[5, 8]), vec![0]);
        assert!(accepted_path(&d, &[6]).is_empty());
        assert!(accepted_path(&d, &[]).is_empty());
    }

    /// Proposes a tree with fewer parents than tokens (which indexing would panic on).
    struct Malformed;
    impl Drafter for Malformed {
        fn name(&self) -> &str {
            "malformed"
        }
        fn begin(&mut self, _: &[u32]) -> crate::plugins::PResult<()> {
            Ok(())
        }
        fn propose(&mut self, _: &[u32], _: u32, _: u32) -> crate::plugins::PResult<Draft> {
            Ok(Draft { tokens: vec![3, 4, 5], parents: vec![-1], scores: vec![] })
        }
        fn observe(&mut self, _: &Feedback) -> crate::plugins::PResult<()> {
            Ok(())
        }
        fn vocabulary(&self) -> Option<std::path::PathBuf> {
            None
        }
        fn finish(&mut self) -> crate::plugins::PResult<()> {
            Ok(())
        }
    }

    #[test]
    fn a_malformed_draft_is_an_error_not_a_panic() {
        let t = Trace { id: "a".into(), category: "rag".into(), prompt: vec![1, 2], output: vec![3, 4, 5, 6], top_tokens: vec![0; 8], top_probs: vec![0.0; 8] };
        let c = ReplayConfig { max_nodes: 8, max_depth: 4, calibration: None };
        let e = replay(&mut Malformed, "m", &t, &c, &CostModel::new(&[])).unwrap_err().to_string();
        assert!(e.contains("3 tokens but 1 parents"), "{e}");
    }
}
