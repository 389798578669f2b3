//! The context-retrieval drafter plugin. It keeps a suffix automaton over the prompt and the
//! text generated so far (grown as the sequence grows) and, optionally, a datastore of the
//! user's files (`coordgen index DIR -o FILE`). Each proposal finds the longest suffix of
//! the sequence seen before in either source and grows a token tree best-first by the
//! estimated probability that a path is accepted: a node's children are the tokens that
//! followed the matched text, each weighted by how often it did (sources weighted by match
//! length) times the estimated acceptance of a token proposed that way ([`confidence`]:
//! by match length, learned from verifications).
//!
//! **Context-aligned drafting.** With calibration on, the host hands over the target model's
//! top predictions at prompt positions, computed during its prefill. Where a node's match
//! last occurred at a calibrated position, the target's probability of each continuation
//! there refines its estimate (a copy the model itself expects is accepted far more often),
//! and a predicted token that never followed the match is added as a low-weight
//! alternative that continues from wherever it did occur (the automaton's suffix links).
//! Responses of earlier requests of the same session stay in the automaton as well.

pub mod confidence;
pub mod sam;

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::path::PathBuf;

use std::collections::HashMap;

use coordgen_interface::{Calibration, DraftBudget, DraftFeedback, DraftSource, DraftTree, TreeBuilder};
use serde::Deserialize;

use coordgen_drafter_store::datastore::{Datastore, Range};
use confidence::{Acceptance, Cell, Kind};
use sam::Sam;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// A datastore written by `coordgen index`.
    datastore: Option<PathBuf>,
    /// Shortest suffix match that may draft.
    #[serde(default = "d_min_match")]
    min_match: usize,
    /// Longest suffix looked up in the datastore.
    #[serde(default = "d_max_match")]
    max_match: usize,
    #[allow(dead_code)]
    cache_dir: Option<PathBuf>,
    /// Target predictions wanted per prompt position (0 = no calibration).
    #[serde(default = "d_top_k")]
    calibration_top_k: u32,
    /// Weight of tokens the model predicted at a matched prompt position that never
    /// followed it there (as alternatives beside the literal continuations).
    #[serde(default = "d_mix")]
    calibration_weight: f32,
    /// Earlier responses of the session kept for matching (tokens).
    #[serde(default = "d_history")]
    history_tokens: usize,
}

fn d_top_k() -> u32 {
    3
}
fn d_mix() -> f32 {
    1.0
}
fn d_history() -> usize {
    16384
}

/// Separates documents in the automaton (never a real token id).
const SEP: u32 = u32::MAX;

fn d_min_match() -> usize {
    1
}
fn d_max_match() -> usize {
    32
}

pub struct RetrievalDrafter {
    opts: Options,
    sam: Sam,
    store: Option<Datastore>,
    /// Earlier responses, each followed by [`SEP`]; the automaton's text starts with them.
    history: Vec<u32>,
    /// Length of the request's prompt (the automaton holds history, prompt, output).
    prompt_len: usize,
    /// Calibrated predictions: automaton text position -> (tokens, probabilities).
    preds: HashMap<u32, (Vec<u32>, Vec<f32>)>,
    /// Acceptance by match length and the model's view, learned from verifications.
    acceptance: Acceptance,
    /// Recent proposals, for learning from their verification: the length of the sequence
    /// each was proposed for, and its nodes' (parent, cell). A drafter asked to draft ahead
    /// (overlapped drafting) proposes for a longer, speculative sequence before the current
    /// step's feedback arrives, so the verified tree is found by its sequence length.
    proposals: Vec<(usize, Vec<(i32, Cell)>)>,
    /// Length of the sequence as the feedback so far confirms it (prompt + accepted tokens).
    confirmed: usize,
}

pub fn create(options: &str) -> Result<RetrievalDrafter, String> {
    let opts: Options = serde_json::from_str(if options.trim().is_empty() { "{}" } else { options })
        .map_err(|e| format!("retrieval drafter options: {e}"))?;
    let store = opts.datastore.as_deref().map(Datastore::load).transpose()?;
    Ok(RetrievalDrafter {
        opts,
        sam: Sam::default(),
        store,
        history: Vec::new(),
        prompt_len: 0,
        preds: HashMap::new(),
        acceptance: Acceptance::default(),
        proposals: Vec::new(),
        confirmed: 0,
    })
}

/// Where a tree node stands in each source (`len`: how many tokens of the sequence, drafts
/// included, the source matches there).
#[derive(Clone, Copy, Debug)]
enum Handle {
    Local { state: u32, len: u32, weight: f32 },
    /// A predicted token that never occurred in the text: a leaf.
    Dead,
    Store { range: Range, weight: f32 },
}

/// A child of a tree node: its estimated acceptance `p` (given the node's), the feature cell
/// of its strongest source, and where it stands in each source.
struct Child {
    token: u32,
    p: f32,
    cell: Cell,
    cell_p: f32,
    handles: Vec<Handle>,
}

struct Candidate {
    /// Estimated probability that the whole path is accepted: the best-first order, and
    /// what the tree records as the node's score.
    score: f32,
    cell: Cell,
    parent: i32,
    token: u32,
    handles: Vec<Handle>,
}

impl PartialEq for Candidate {
    fn eq(&self, o: &Self) -> bool {
        self.score == o.score
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Candidate {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score)
    }
}

impl RetrievalDrafter {
    /// Brings the automaton up to history + `seq` (rebuilding it if `seq` is not a
    /// continuation of what it holds).
    fn sync(&mut self, seq: &[u32]) {
        let base = self.history.len();
        let have = self.sam.text().len() - base;
        if seq.len() < have || seq[..have] != self.sam.text()[base..] {
            self.rebuild(seq);
        } else {
            self.sam.extend(&seq[have..]);
        }
    }

    fn rebuild(&mut self, seq: &[u32]) {
        self.sam = Sam::default();
        self.sam.extend(&self.history);
        self.sam.extend(seq);
    }

    /// Children of a node, merged across sources.
    fn children(&self, handles: &[Handle]) -> Vec<Child> {
        let mut out: Vec<Child> = Vec::new();
        let total_w: f32 = handles
            .iter()
            .map(|h| match h {
                Handle::Local { weight, .. } | Handle::Store { weight, .. } => *weight,
                Handle::Dead => 0.0,
            })
            .sum();
        if total_w <= 0.0 {
            return out;
        }
        // Each source's share is its continuation frequency times the estimated acceptance
        // of its cell; the child keeps the cell of its largest share.
        let mut add = |tok: u32, p: f32, cell: Cell, h: Handle| match out.iter_mut().find(|x| x.token == tok) {
            // The document separator is not a token: a match ending a document has no child.
            _ if tok == SEP => {}
            Some(x) => {
                x.p += p;
                if p > x.cell_p {
                    (x.cell, x.cell_p) = (cell, p);
                }
                x.handles.push(h);
            }
            None => out.push(Child { token: tok, p, cell, cell_p: p, handles: vec![h] }),
        };
        let est = |c: Cell| self.acceptance.estimate(c);
        for &h in handles {
            match h {
                Handle::Local { state, len, weight } => {
                    let kids: Vec<(u32, u32, u32)> = self.sam.children(state).collect();
                    let n: u32 = kids.iter().map(|k| k.2).sum();
                    // The target's predictions where the matched text last occurred in the
                    // prompt (a calibrated position): how likely it found each continuation.
                    let pred = self.sam.latest_followed_end(state).and_then(|e| self.preds.get(&e));
                    let model_p = |tok: u32| pred.map(|(t, p)| t.iter().position(|&x| x == tok).map(|i| p[i]).unwrap_or(0.0));
                    for &(tok, next, c) in &kids {
                        let cell = Cell::new(Kind::Literal, len, model_p(tok));
                        add(tok, weight / total_w * c as f32 / n.max(1) as f32 * est(cell), cell, Handle::Local { state: next, len: len + 1, weight });
                    }
                    if let Some((toks, probs)) = pred {
                        for (&tok, &p) in toks.iter().zip(probs) {
                            if kids.iter().any(|k| k.0 == tok) {
                                continue;
                            }
                            let h = match self.sam.step(state, len, tok) {
                                Some((next, l)) => Handle::Local { state: next, len: l, weight },
                                None => Handle::Dead,
                            };
                            let cell = Cell::new(Kind::Predicted, len, Some(p));
                            add(tok, weight / total_w * self.opts.calibration_weight * est(cell), cell, h);
                        }
                    }
                }
                Handle::Dead => {}
                Handle::Store { range, weight } => {
                    if let Some(ds) = &self.store {
                        let n = (range.hi - range.lo) as f32;
                        let cell = Cell::new(Kind::Literal, range.len, None);
                        for (tok, r) in ds.children(range) {
                            add(tok, weight / total_w * (r.hi - r.lo) as f32 / n * est(cell), cell, Handle::Store { range: r, weight });
                        }
                    }
                }
            }
        }
        out
    }
}

impl DraftSource for RetrievalDrafter {
    fn begin(&mut self, prompt: &[u32]) -> Result<(), String> {
        self.preds.clear();
        self.proposals.clear();
        self.confirmed = prompt.len();
        self.prompt_len = prompt.len();
        self.rebuild(prompt);
        Ok(())
    }

    fn calibration_top_k(&self) -> u32 {
        self.opts.calibration_top_k
    }

    fn calibrate(&mut self, c: &Calibration) -> Result<(), String> {
        let k = c.k as usize;
        if k == 0 || c.tokens.len() != c.positions.len() * k || c.probs.len() != c.tokens.len() {
            return Err(format!("malformed calibration: {} positions, k {}, {} tokens, {} probabilities", c.positions.len(), k, c.tokens.len(), c.probs.len()));
        }
        let base = self.history.len() as u32;
        for (i, &p) in c.positions.iter().enumerate() {
            if (p as usize) < self.prompt_len {
                self.preds.insert(base + p, (c.tokens[i * k..(i + 1) * k].to_vec(), c.probs[i * k..(i + 1) * k].to_vec()));
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        // The response joins the session's history, so later requests can copy from it.
        let start = self.history.len() + self.prompt_len;
        if self.sam.text().len() > start && self.opts.history_tokens > 0 {
            let response = self.sam.text()[start..].to_vec();
            self.history.extend(response);
            self.history.push(SEP);
            if self.history.len() > self.opts.history_tokens {
                let cut = self.history.len() - self.opts.history_tokens;
                // Drop whole responses from the front.
                let at = self.history[cut..].iter().position(|&t| t == SEP).map(|i| cut + i + 1).unwrap_or(self.history.len());
                self.history.drain(..at);
            }
        }
        self.preds.clear();
        Ok(())
    }

    fn propose(&mut self, seq: &[u32], budget: DraftBudget) -> Result<DraftTree, String> {
        self.sync(seq);
        let mut roots = Vec::new();
        if let Some((state, len)) = self.sam.longest_repeat() {
            if len as usize >= self.opts.min_match {
                roots.push(Handle::Local { state, len, weight: len as f32 });
            }
        }
        if let Some(ds) = &self.store {
            if let Some(r) = ds.longest_suffix(seq, self.opts.min_match, self.opts.max_match) {
                roots.push(Handle::Store { range: r, weight: r.len as f32 });
            }
        }
        let mut tb = TreeBuilder::new(budget);
        // A later proposal for the same sequence replaces an earlier one (the host may ask
        // for one token first, to learn the draft's confidence, then for the whole tree).
        self.proposals.retain(|p| p.0 != seq.len());
        if self.proposals.len() >= 2 {
            self.proposals.remove(0);
        }
        if roots.is_empty() {
            return Ok(tb.build());
        }
        let mut nodes: Vec<(i32, Cell)> = Vec::new();
        // Best-first by the estimated probability that the path is accepted: the tree holds
        // the paths most likely to be verified. The host plans the step by the first tokens'
        // scores, which are these estimates too.
        let mut heap = BinaryHeap::new();
        for c in self.children(&roots) {
            heap.push(Candidate { score: c.p, cell: c.cell, parent: -1, token: c.token, handles: c.handles });
        }
        while let Some(c) = heap.pop() {
            if tb.is_full() {
                break;
            }
            let Some(idx) = tb.add(c.parent, c.token, c.score) else { continue };
            if nodes.len() <= idx {
                nodes.resize(idx + 1, (-1, c.cell));
            }
            nodes[idx] = (c.parent, c.cell);
            for k in self.children(&c.handles) {
                heap.push(Candidate { score: c.score * k.p, cell: k.cell, parent: idx as i32, token: k.token, handles: k.handles });
            }
        }
        self.proposals.push((seq.len(), nodes));
        Ok(tb.build())
    }

    fn observe(&mut self, f: &DraftFeedback) -> Result<(), String> {
        // Learn from the verification of the tree proposed for the confirmed sequence (none
        // when the step drafted nothing).
        let at = self.confirmed;
        self.confirmed += f.accepted.len();
        if let Some(i) = self.proposals.iter().position(|p| p.0 == at) {
            let (_, nodes) = self.proposals.remove(i);
            if f.n_drafted > 0 && !nodes.is_empty() {
                let accepted: Vec<u32> = f.accepted_nodes.iter().copied().take_while(|&i| (i as usize) < nodes.len()).collect();
                self.acceptance.record(&nodes, &accepted);
            }
        }
        self.proposals.retain(|p| p.0 > at);
        Ok(())
    }

    fn vocabulary(&self) -> String {
        self.store.as_ref().map(|s| s.model.display().to_string()).unwrap_or_default()
    }
}

coordgen_interface::export_drafter!("retrieval", "suffix-automaton retrieval over the context and a local datastore", create);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_the_most_frequent_continuation_first() {
        let mut d = create("{}").unwrap();
        // After "1 2", 3 followed twice and 4 once.
        d.begin(&[1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2]).unwrap();
        let t = d.propose(&[1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2], DraftBudget { max_nodes: 3, max_depth: 4 }).unwrap();
        assert_eq!(t.tokens[0], 3);
        assert_eq!(t.parents[0], -1);
        assert_eq!(t.tokens.len(), 3);
        // Nothing repeats: no draft.
        let t = d.propose(&[5, 6], DraftBudget { max_nodes: 3, max_depth: 4 }).unwrap();
        assert!(t.tokens.is_empty());
    }

    #[test]
    fn calibration_scores_literal_continuations_and_adds_the_models_alternatives() {
        // Prompt: "1 2 3 4 | 7 8 9 | 1 2"; after "1 2" the text continued with 3.
        let prompt = [1, 2, 3, 4, 7, 8, 9, 1, 2];
        let root_score = |d: &mut RetrievalDrafter, tok: u32| {
            let t = d.propose(&prompt, DraftBudget { max_nodes: 6, max_depth: 3 }).unwrap();
            (0..t.tokens.len()).find(|&i| t.tokens[i] == tok && t.parents[i] == -1).map(|i| t.scores[i])
        };
        let mut plain = create("{}").unwrap();
        plain.begin(&prompt).unwrap();
        let t = plain.propose(&prompt, DraftBudget { max_nodes: 3, max_depth: 3 }).unwrap();
        assert_eq!(&t.tokens[..], &[3, 4, 7]);
        let base = root_score(&mut plain, 3).unwrap();
        // The model, at position 1 (after "1 2"), agrees with the text: the copy scores higher.
        let mut agree = create("{}").unwrap();
        agree.begin(&prompt).unwrap();
        agree.calibrate(&Calibration { k: 2, positions: vec![1].into(), tokens: vec![3, 7].into(), probs: vec![0.9, 0.05].into() }).unwrap();
        assert!(root_score(&mut agree, 3).unwrap() > base);
        // It predicts 7 instead: the copy scores lower, and 7 becomes a second root that
        // continues from where 7 occurred (8 9).
        let mut differ = create("{}").unwrap();
        differ.begin(&prompt).unwrap();
        differ.calibrate(&Calibration { k: 2, positions: vec![1].into(), tokens: vec![7, 3].into(), probs: vec![0.9, 0.05].into() }).unwrap();
        assert!(root_score(&mut differ, 3).unwrap() < base);
        let wide = differ.propose(&prompt, DraftBudget { max_nodes: 6, max_depth: 3 }).unwrap();
        assert_eq!(wide.tokens[0], 3, "the literal copy still leads");
        let i7 = (0..wide.tokens.len()).find(|&i| wide.tokens[i] == 7 && wide.parents[i] == -1).expect("a root 7");
        assert!((0..wide.tokens.len()).any(|i| wide.tokens[i] == 8 && wide.parents[i] == i7 as i32), "{:?} {:?}", wide.tokens, wide.parents);
        assert!(differ.calibrate(&Calibration { k: 2, positions: vec![1].into(), tokens: vec![7].into(), probs: vec![0.9].into() }).is_err());
    }

    #[test]
    fn verifications_teach_the_drafter_how_far_copies_are_accepted() {
        let prompt = [1, 2, 3, 4, 7, 8, 9, 1, 2];
        let mut d = create("{}").unwrap();
        d.begin(&prompt).unwrap();
        let b = DraftBudget { max_nodes: 3, max_depth: 3 };
        let first = d.propose(&prompt, b).unwrap().scores[0];
        // Request after request, the first drafted token (3) is rejected: the target says 5.
        for _ in 0..30 {
            d.begin(&prompt).unwrap();
            let t = d.propose(&prompt, b).unwrap();
            d.observe(&DraftFeedback { accepted: vec![5].into(), n_accepted_draft: 0, n_drafted: t.tokens.len() as u32, accepted_nodes: vec![].into() }).unwrap();
        }
        d.begin(&prompt).unwrap();
        let after = d.propose(&prompt, b).unwrap().scores[0];
        assert!(after < 0.5 * first, "{first} -> {after}");
    }

    #[test]
    fn a_tree_drafted_ahead_does_not_take_the_verified_trees_feedback() {
        let prompt = [1, 2, 3, 4, 7, 8, 9, 1, 2];
        let mut d = create("{}").unwrap();
        let b = DraftBudget { max_nodes: 3, max_depth: 3 };
        d.begin(&prompt).unwrap();
        let first = d.propose(&prompt, b).unwrap().scores[0];
        for _ in 0..30 {
            d.begin(&prompt).unwrap();
            // The verified tree (3 4 7 after "1 2"), then one drafted ahead from the end of
            // its main path ("... 1 2 3 4" matches 4 tokens), then the verification's
            // feedback: 3 accepted, the target's own token 5.
            let t = d.propose(&prompt, b).unwrap();
            assert_eq!(t.tokens[0], 3);
            let ahead: Vec<u32> = prompt.iter().copied().chain([3, 4]).collect();
            d.propose(&ahead, b).unwrap();
            d.observe(&DraftFeedback { accepted: vec![3, 5].into(), n_accepted_draft: 1, n_drafted: 3, accepted_nodes: vec![0].into() }).unwrap();
        }
        d.begin(&prompt).unwrap();
        let after = d.propose(&prompt, b).unwrap().scores[0];
        assert!(after > first + 0.2, "the verified tree's first token was accepted every time: {first} -> {after}");
    }

    #[test]
    fn earlier_responses_of_the_session_are_matched() {
        let mut d = create("{}").unwrap();
        d.begin(&[1, 2]).unwrap();
        d.sync(&[1, 2, 40, 41, 42, 43]);
        d.finish().unwrap();
        d.begin(&[5, 6, 40, 41]).unwrap();
        let t = d.propose(&[5, 6, 40, 41], DraftBudget { max_nodes: 2, max_depth: 2 }).unwrap();
        assert_eq!(&t.tokens[..], &[42, 43]);
        // The end of an earlier response is followed by the separator, never drafted.
        let t = d.propose(&[5, 6, 40, 41, 42, 43], DraftBudget { max_nodes: 4, max_depth: 4 }).unwrap();
        assert!(!t.tokens.contains(&SEP), "{:?}", t.tokens);
    }
}
