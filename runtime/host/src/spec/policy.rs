//! Online acceptance statistics for the scheduler: per draft depth, how often a depth that
//! was reached got accepted (decayed, with a hierarchical prior), and what the drafter costs
//! per drafted level. The scheduler turns these into each step's budget (see
//! [`crate::scheduler`]); the verify latencies it weighs them against live in its cost model.
//!
//! **Draft confidence.** How far a draft is accepted depends far more on the draft than on
//! the depth alone: on the shared prompts a prompt-lookup draft from a 4-gram match had its
//! first token accepted 90% of the time, one from a 1-gram match 27%. So statistics are
//! also kept per confidence class (the drafter's score of its best first token, in
//! [`CLASSES`] buckets, plus one class for drafts that are only a reused segment), and a
//! step planned for a known draft uses its class's estimates.

use crate::scheduler::StepInput;

/// Confidence buckets of drafter scores in [0, 1]: five of equal width.
pub const CLASSES: usize = 5;
/// The class of a draft that is only a reused segment (the drafter proposed nothing).
pub const REUSED_CLASS: usize = CLASSES;

/// The confidence class of a draft whose best first token has drafter score `score`.
pub fn class_of(score: f32) -> usize {
    if score.is_nan() {
        return 0;
    }
    ((score.clamp(0.0, 1.0) * CLASSES as f32) as usize).min(CLASSES - 1)
}

/// Decayed accepted / offered counts per depth (index 0 = depth 1).
#[derive(Clone, Debug)]
struct Counts {
    succ: Vec<f64>,
    trials: Vec<f64>,
}

impl Counts {
    fn new(n: usize) -> Counts {
        Counts { succ: vec![0.0; n], trials: vec![0.0; n] }
    }

    /// The counts scaled by `f`, then down to at most `cap` trials at any depth.
    fn scaled(&self, f: f64, cap: f64) -> Counts {
        let top = self.trials.iter().fold(0.0f64, |m, &t| m.max(t)) * f;
        let f = if top > cap { f * cap / top } else { f };
        Counts { succ: self.succ.iter().map(|x| x * f).collect(), trials: self.trials.iter().map(|x| x * f).collect() }
    }

    fn record(&mut self, reached: u32, accepted: u32) {
        for d in 1..=reached.min(self.succ.len() as u32) {
            let i = d as usize - 1;
            self.trials[i] = self.trials[i] * DECAY + 1.0;
            self.succ[i] = self.succ[i] * DECAY + if d <= accepted { 1.0 } else { 0.0 };
        }
    }

    /// `(succ + w prior) / (trials + w)` at depth index `i`.
    fn estimate(&self, i: usize, prior: f64, w: f64) -> f64 {
        (self.succ[i] + w * prior) / (self.trials[i] + w)
    }
}

#[derive(Clone, Debug)]
pub struct Policy {
    max_depth: u32,
    all: Counts,
    /// Per confidence class (index [`REUSED_CLASS`] = reused segments only).
    by_class: Vec<Counts>,
    /// Drafting time per drafted level, ms, smoothed.
    draft_ms_per_level: f64,
}

/// Weight of old observations per new one.
const DECAY: f64 = 0.93;
/// Most observations per depth a request inherits from the one before (see
/// [`Policy::carried`]).
pub const CARRY_CAP: f64 = 6.0;

impl Policy {
    pub fn new(max_depth: u32) -> Policy {
        let max_depth = max_depth.max(1);
        let n = max_depth as usize;
        Policy { max_depth, all: Counts::new(n), by_class: vec![Counts::new(n); CLASSES + 1], draft_ms_per_level: 0.0 }
    }

    /// The policy a following request with the same drafter starts from (a warm start).
    /// It keeps the per-confidence-class statistics, which describe the drafter and the
    /// model (how often a one-token match, say, is right), at half weight and at most
    /// [`CARRY_CAP`] observations per depth, so the new request's own steps take over within
    /// a few verifications and knowledge that is never refreshed (a class the scheduler
    /// stopped verifying) fades back toward the prior over requests, which makes the
    /// scheduler try it again. The all-drafts mixture and the drafting cost start afresh:
    /// they depend on how much the new prompt offers to copy, and a drafter whose drafts
    /// are planned before their class is known (a draft model) would otherwise never be
    /// tried again after one prompt where it did not pay. Without the warm start every
    /// request relearnt that weak matches rarely pay: on short answers with nothing to
    /// copy, several failed verifications out of a few dozen steps.
    pub fn carried(&self) -> Policy {
        Policy { by_class: self.by_class.iter().map(|c| c.scaled(0.5, CARRY_CAP)).collect(), ..Policy::new(self.max_depth) }
    }

    /// The deepest draft this policy keeps statistics for.
    pub fn max_depth(&self) -> u32 {
        self.max_depth
    }

    /// Estimated probability that depth `d` (1-based, at most the policy's depth) is accepted
    /// given depth `d - 1` was, over all drafts (`class` None) or over drafts of one
    /// confidence class.
    pub fn acceptance(&self, class: Option<usize>, d: u32) -> f64 {
        self.estimates(class)[(d.max(1) as usize - 1).min(self.all.succ.len() - 1)]
    }

    /// [`acceptance`](Self::acceptance) at every depth, shallowest first, in one pass (each
    /// depth's prior is the estimate one level up).
    fn estimates(&self, class: Option<usize>) -> Vec<f64> {
        let counts = class.and_then(|c| self.by_class.get(c));
        let (mut all, mut own) = (0.5, 0.5);
        (0..self.all.succ.len())
            .map(|i| {
                // The prior for a depth is the estimate of the depth before it (one half for
                // the first), worth two observations: unexplored depths look as good as the
                // last explored one, so the scheduler tries them, and evidence takes over
                // quickly.
                all = self.all.estimate(i, all, 2.0);
                match counts {
                    // A class's first depth starts from the all-drafts estimate, its deeper
                    // ones from its own estimate one level up. (Starting from the bucket's
                    // centre instead made weak classes too shy to ever be tried on prompts
                    // where they do pay.)
                    Some(c) => {
                        own = c.estimate(i, if i == 0 { all } else { own }, 2.0);
                        own
                    }
                    None => all,
                }
            })
            .collect()
    }

    /// What the scheduler needs to plan the next step (for a draft of confidence `class`
    /// already in hand, or None before drafting).
    pub fn input(&self, class: Option<usize>, context_len: usize, remaining_tokens: usize, max_width: usize, extension: bool) -> StepInput {
        StepInput {
            context_len: context_len as u32,
            remaining_tokens: remaining_tokens as u32,
            acceptance_by_depth: self.estimates(class).into_iter().map(|a| a as f32).collect(),
            draft_ms_per_level: self.draft_ms_per_level as f32,
            max_depth: self.max_depth,
            max_width: max_width as u32,
            extension,
            shared_tokens: 0,
            shared_slots: 0,
        }
    }

    /// Records a verification: the drafted tree (of confidence `class`, if known) reached
    /// `tree_depth` and `accepted` of its levels were accepted.
    pub fn record(&mut self, class: Option<usize>, tree_depth: u32, accepted: u32) {
        let reached = (accepted + 1).min(tree_depth);
        self.all.record(reached, accepted);
        if let Some(c) = class.and_then(|c| self.by_class.get_mut(c)) {
            c.record(reached, accepted);
        }
    }

    /// Drafting time per level, ms (smoothed).
    pub fn draft_ms_per_level(&self) -> f64 {
        self.draft_ms_per_level
    }

    /// Records the time the drafter took for a draft `levels` deep.
    pub fn record_draft(&mut self, levels: u32, ms: f64) {
        let per = ms / levels.max(1) as f64;
        self.draft_ms_per_level = 0.8 * self.draft_ms_per_level + 0.2 * per;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceptance_follows_evidence_from_a_hierarchical_prior() {
        let mut p = Policy::new(4);
        assert_eq!(p.acceptance(None, 1), 0.5);
        for _ in 0..30 {
            p.record(None, 4, 1);
        }
        assert!(p.acceptance(None, 1) > 0.9, "{}", p.acceptance(None, 1));
        assert!(p.acceptance(None, 2) < 0.15, "{}", p.acceptance(None, 2));
        // Depth 3 was never reached: it inherits depth 2's estimate.
        assert!((p.acceptance(None, 3) - p.acceptance(None, 2)).abs() < 1e-12);
        // A class never seen follows the all-drafts estimate.
        assert!((p.acceptance(Some(1), 1) - p.acceptance(None, 1)).abs() < 1e-12);
        assert!((p.acceptance(Some(REUSED_CLASS), 1) - p.acceptance(None, 1)).abs() < 1e-12);
        let s = p.input(None, 100, 10, 16, true);
        assert_eq!(s.acceptance_by_depth.len(), 4);
        assert!(s.extension);
    }

    #[test]
    fn confidence_classes_learn_their_own_acceptance() {
        let mut p = Policy::new(4);
        // Confident drafts are accepted in full, weak ones rejected at once.
        for _ in 0..20 {
            p.record(Some(class_of(1.0)), 4, 4);
            p.record(Some(class_of(0.25)), 4, 0);
        }
        let (hi, lo) = (p.acceptance(Some(class_of(1.0)), 1), p.acceptance(Some(class_of(0.25)), 1));
        assert!(hi > 0.85 && lo < 0.2, "confident {hi}, weak {lo}");
        // The mixture sits in between; drafts without a score use it.
        let all = p.acceptance(None, 1);
        assert!(lo < all && all < hi, "{all}");
        assert!(p.input(Some(class_of(1.0)), 10, 10, 16, false).acceptance_by_depth[3] > 0.85);
        assert_eq!(class_of(0.0), 0);
        assert_eq!(class_of(0.25), 1);
        assert_eq!(class_of(0.5), 2);
        assert_eq!(class_of(0.75), 3);
        assert_eq!(class_of(1.0), 4);
        assert_eq!(class_of(7.0), 4);
        assert_eq!(class_of(f32::NAN), 0);
    }

    #[test]
    fn a_carried_policy_keeps_the_direction_of_the_evidence_at_a_bounded_weight() {
        let mut p = Policy::new(4);
        p.record_draft(2, 3.0);
        for _ in 0..40 {
            p.record(Some(0), 4, 0);
            p.record(Some(4), 4, 4);
        }
        let c = p.carried();
        assert_eq!(c.max_depth(), 4);
        // The mixture over all drafts and the drafting cost are the new prompt's to learn.
        assert_eq!(c.acceptance(None, 1), 0.5);
        assert_eq!(c.draft_ms_per_level(), 0.0);
        // Still says weak drafts fail and confident ones pass...
        let (lo, hi) = (c.acceptance(Some(0), 1), c.acceptance(Some(4), 1));
        assert!(lo < 0.3 && hi > 0.7, "weak {lo}, confident {hi}");
        // ...but weighs at most CARRY_CAP observations, so fresh evidence moves it fast.
        for cl in [0, 4] {
            assert!(c.by_class[cl].trials.iter().all(|&t| t <= CARRY_CAP + 1e-9), "{:?}", c.by_class[cl].trials);
        }
        let mut d = c.clone();
        for _ in 0..6 {
            d.record(Some(0), 4, 4);
        }
        assert!(d.acceptance(Some(0), 1) > 0.5, "{}", d.acceptance(Some(0), 1));
        // Carried again and again without new evidence, it fades back toward the prior.
        let mut f = c;
        for _ in 0..8 {
            f = f.carried();
        }
        assert!((f.acceptance(Some(0), 1) - 0.5).abs() < 0.05, "{}", f.acceptance(Some(0), 1));
        // Statistics older than the cap are scaled, not cut: the ratio is kept.
        let ratio = |x: &Counts| x.succ[0] / x.trials[0];
        assert!((ratio(&p.by_class[4]) - ratio(&p.carried().by_class[4])).abs() < 1e-9);
    }
}
