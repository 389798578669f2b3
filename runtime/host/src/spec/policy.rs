//! Online acceptance statistics for the scheduler: per draft depth, how often a depth that
//! was reached got accepted (decayed, with a hierarchical prior), and what the drafter costs
//! per drafted level. The scheduler turns these into each step's budget (see
//! [`crate::scheduler`]); the verify latencies it weighs them against live in its cost model.

use crate::scheduler::StepInput;

#[derive(Clone, Debug)]
pub struct Policy {
    max_depth: u32,
    /// Decayed accepted / offered counts per depth (index 0 = depth 1).
    succ: Vec<f64>,
    trials: Vec<f64>,
    /// Drafting time per drafted depth level, ms, smoothed.
    draft_ms_per_level: f64,
}

/// Weight of old observations per new one.
const DECAY: f64 = 0.93;

impl Policy {
    pub fn new(max_depth: u32) -> Policy {
        let max_depth = max_depth.max(1);
        Policy { max_depth, succ: vec![0.0; max_depth as usize], trials: vec![0.0; max_depth as usize], draft_ms_per_level: 0.0 }
    }

    /// Estimated probability that depth `d` (1-based) is accepted given depth `d - 1` was.
    pub fn acceptance(&self, d: u32) -> f64 {
        let i = (d as usize - 1).min(self.succ.len() - 1);
        // The prior for a depth is the estimate of the depth before it (one half for the
        // first), worth two observations: unexplored depths look as good as the last
        // explored one, so the scheduler tries them, and evidence takes over quickly.
        let prior = if i == 0 { 0.5 } else { self.acceptance(d - 1) };
        (self.succ[i] + 2.0 * prior) / (self.trials[i] + 2.0)
    }

    /// What the scheduler needs to plan the next step.
    pub fn input(&self, context_len: usize, remaining_tokens: usize, max_width: usize, extension: bool) -> StepInput {
        StepInput {
            context_len: context_len as u32,
            remaining_tokens: remaining_tokens as u32,
            acceptance_by_depth: (1..=self.max_depth).map(|d| self.acceptance(d) as f32).collect(),
            draft_ms_per_level: self.draft_ms_per_level as f32,
            max_depth: self.max_depth,
            max_width: max_width as u32,
            extension,
        }
    }

    /// Records a verification: the drafted tree reached `tree_depth` and `accepted` of its
    /// levels were accepted.
    pub fn record(&mut self, tree_depth: u32, accepted: u32) {
        let reached = (accepted + 1).min(tree_depth);
        for d in 1..=reached.min(self.max_depth) {
            let i = d as usize - 1;
            self.trials[i] = self.trials[i] * DECAY + 1.0;
            self.succ[i] = self.succ[i] * DECAY + if d <= accepted { 1.0 } else { 0.0 };
        }
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
        assert_eq!(p.acceptance(1), 0.5);
        for _ in 0..30 {
            p.record(4, 1);
        }
        assert!(p.acceptance(1) > 0.9, "{}", p.acceptance(1));
        assert!(p.acceptance(2) < 0.15, "{}", p.acceptance(2));
        // Depth 3 was never reached: it inherits depth 2's estimate.
        assert!((p.acceptance(3) - p.acceptance(2)).abs() < 1e-12);
        let s = p.input(100, 10, 16, true);
        assert_eq!(s.acceptance_by_depth.len(), 4);
        assert!(s.extension);
    }
}
