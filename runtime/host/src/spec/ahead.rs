//! Overlapped drafting: while the target verifies a step's draft, the drafter already drafts
//! the step after it, assuming the draft's main path (its best first token, then each
//! node's best child) is accepted. After verification the early draft is usable when the
//! whole main path was accepted and the target's own next token is one of the early draft's
//! first tokens: the subtree below that token is the next step's draft, so drafting leaves
//! the critical path. Otherwise the early draft is dropped and the next step drafts as usual.
//!
//! This pays for a drafter that runs a model (each drafted level costs a forward of it)
//! when the target and the draft model can run at the same time, on separate cores or
//! devices; on a CPU the host moves the drafter's threads off the target for it.

use super::tree::Tree;
use crate::plugins::Draft;

/// Node indices of `t`'s main path: its first root, then below each node its first child
/// (drafters list their best candidates first). Empty for an empty tree.
pub fn main_path(t: &Tree) -> Vec<usize> {
    let mut path = Vec::new();
    let mut parent = -1i32;
    while let Some(i) = (0..t.len()).find(|&i| t.parents[i] == parent) {
        path.push(i);
        parent = i as i32;
    }
    path
}

/// Whether a verification accepted exactly the main path (`accepted`: accepted node
/// indices, root to leaf).
pub fn accepted_whole(path: &[usize], accepted: &[usize]) -> bool {
    !path.is_empty() && path == accepted
}

/// The part of `d` below its root token `token`, re-rooted: that root's children become the
/// roots. None when no root of `d` is `token` or nothing hangs below it. Nodes keep their
/// scores; parents still precede children.
pub fn subtree(d: &Draft, token: u32) -> Option<Draft> {
    let root = (0..d.tokens.len()).find(|&i| d.parents.get(i) == Some(&-1) && d.tokens[i] == token)?;
    // New index of each node of `d` inside the subtree (None = outside it).
    let mut map: Vec<Option<i32>> = vec![None; d.tokens.len()];
    let mut out = Draft::default();
    for i in root + 1..d.tokens.len() {
        let p = d.parents.get(i).copied().unwrap_or(-1);
        let parent = if p == root as i32 {
            Some(-1)
        } else if p > root as i32 && (p as usize) < i {
            map[p as usize]
        } else {
            None
        };
        if let Some(par) = parent {
            map[i] = Some(out.tokens.len() as i32);
            out.tokens.push(d.tokens[i]);
            out.parents.push(par);
            if let Some(&s) = d.scores.get(i) {
                out.scores.push(s);
            }
        }
    }
    if out.scores.len() != out.tokens.len() {
        out.scores.clear();
    }
    (!out.tokens.is_empty()).then_some(out)
}

/// A draft for the coming step, drafted during the last verification: it continues the
/// cache's first `base` tokens and the pending token `pending`; `wait_ms` is how long the
/// host waited for it after verifying.
pub struct Early {
    pub base: usize,
    pub pending: u32,
    pub draft: Draft,
    /// Depth of the draft as the drafter made it (for the drafting-cost statistics).
    pub levels: u32,
    pub wait_ms: f64,
}

/// One request's overlap state: whether it is on, the threads lent to the drafter, the
/// early draft waiting for the next step, and the drafter's measured speed ahead.
pub struct Overlap {
    /// Overlapped drafting is on for this request (the technique is, and a drafter is there).
    pub on: bool,
    /// Threads the target lends the drafter while it drafts ahead (0 = none).
    pub lent: u32,
    target_threads: u32,
    threads_now: u32,
    early: Option<Early>,
    /// The drafter's time per level of the drafts it makes during verification (ms).
    ms_per_level: f64,
}

impl Overlap {
    /// `own_threads`: what the drafter's own model runs on; lent only when the target has
    /// more than that.
    pub fn new(on: bool, own_threads: u32, target_threads: u32) -> Overlap {
        let lent = if on && own_threads > 0 && target_threads > own_threads { own_threads } else { 0 };
        Overlap { on, lent, target_threads, threads_now: target_threads, early: None, ms_per_level: 0.0 }
    }

    /// The early draft, if it continues exactly the `base` cached tokens and `pending`
    /// (it is dropped otherwise).
    pub fn prepared(&mut self, base: usize, pending: u32) -> Option<Early> {
        self.early.take().filter(|e| e.base == base && e.pending == pending)
    }

    /// Depth to draft ahead for a step of `step_depth`: one level more (its first level is
    /// matched against the target's next token), at most one level beyond what the drafter
    /// finishes within one verification, since an early draft that turns out unusable is
    /// still waited for before the next proposal.
    pub fn ahead_depth(&self, step_depth: u32, last_verify_ms: Option<f64>) -> u32 {
        let fits = match last_verify_ms {
            Some(v) if self.ms_per_level > 0.0 => (v / self.ms_per_level) as u32,
            _ => u32::MAX,
        };
        (step_depth.max(1) + 1).min(fits.saturating_add(1).max(2))
    }

    /// The target's thread count while the drafter is (or is not) drafting ahead, when that
    /// differs from what it has now.
    pub fn threads_to_set(&self, drafting_ahead: bool) -> Option<u32> {
        if self.lent == 0 {
            return None;
        }
        let want = if drafting_ahead { self.target_threads - self.lent } else { self.target_threads };
        (want != self.threads_now).then_some(want)
    }

    pub fn threads_set(&mut self, n: u32) {
        self.threads_now = n;
    }

    /// The target's own thread count, if it does not have it now (at the end of a request).
    pub fn threads_to_restore(&self) -> Option<u32> {
        (self.threads_now != self.target_threads).then_some(self.target_threads)
    }

    /// Keeps the early draft `d` (made in `ms` over `levels` levels, waited for `wait_ms`)
    /// for the next step, which continues the first `base` cached tokens with `next`.
    pub fn took(&mut self, d: &Draft, ms: f64, levels: u32, wait_ms: f64, base: usize, next: u32) {
        self.ms_per_level = match self.ms_per_level {
            x if x > 0.0 => 0.8 * x + 0.2 * ms / levels as f64,
            _ => ms / levels as f64,
        };
        self.early = subtree(d, next).map(|draft| Early { base, pending: next, draft, levels, wait_ms });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tree;

    fn draft(tokens: &[u32], parents: &[i32]) -> Draft {
        Draft { tokens: tokens.to_vec(), parents: parents.to_vec(), scores: (0..tokens.len()).map(|i| 1.0 - i as f32 / 10.0).collect() }
    }

    #[test]
    fn main_path_follows_first_children() {
        // 10 -> 11 -> 13, with siblings 12 (of 11) and 14 (of 10).
        let t = tree::check(&draft(&[10, 11, 12, 13, 14], &[-1, 0, 0, 1, -1]), 100, 8, 8).unwrap();
        assert_eq!(main_path(&t), vec![0, 1, 3]);
        assert!(accepted_whole(&[0, 1, 3], &[0, 1, 3]));
        assert!(!accepted_whole(&[0, 1, 3], &[0, 1]));
        assert!(!accepted_whole(&[0, 1, 3], &[0, 2]));
        assert!(main_path(&Tree::default()).is_empty());
        assert!(!accepted_whole(&[], &[]));
    }

    #[test]
    fn subtree_below_the_targets_token_is_rerooted() {
        // Roots 5 and 6; below 6: 7 (with child 8) and 9.
        let d = draft(&[5, 6, 7, 9, 8, 1], &[-1, -1, 1, 1, 2, 0]);
        let s = subtree(&d, 6).unwrap();
        assert_eq!(s.tokens, vec![7, 9, 8]);
        assert_eq!(s.parents, vec![-1, -1, 0]);
        assert_eq!(s.scores, vec![d.scores[2], d.scores[3], d.scores[4]]);
        // A valid tree for the next step.
        let t = tree::check(&s, 100, 8, 8).unwrap();
        assert_eq!(t.depths, vec![1, 1, 2]);
        // Below 5 only 1 hangs; nothing below a leaf root; no root 7.
        assert_eq!(subtree(&d, 5).unwrap().tokens, vec![1]);
        assert!(subtree(&draft(&[5], &[-1]), 5).is_none());
        assert!(subtree(&d, 7).is_none());
        assert!(subtree(&Draft::default(), 7).is_none());
    }
}
