//! The per-step draft budget: how deep (and how many nodes) to ask the drafter for, chosen to
//! maximise expected tokens per millisecond from online acceptance statistics per depth and
//! the verify latency measured at each width. When drafts stop paying the best depth is 0,
//! which is a plain decoding step; an occasional small probe keeps the statistics fresh.

/// What to ask the drafter for this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub depth: u32,
    pub nodes: u32,
}

#[derive(Clone, Debug)]
pub struct Policy {
    max_depth: u32,
    max_width: usize,
    /// Decayed accepted / offered counts per depth (index 0 = depth 1).
    succ: Vec<f64>,
    trials: Vec<f64>,
    /// Verify latency per batch width (index = width), ms, smoothed.
    lat: Vec<Option<f64>>,
    /// Drafting time per drafted depth level, ms, smoothed.
    draft_ms_per_level: f64,
    plain_streak: u32,
}

/// Weight of old observations per new one.
const DECAY: f64 = 0.93;
/// Steps of plain decoding before a probe.
const PROBE_EVERY: u32 = 12;

impl Policy {
    pub fn new(max_depth: u32, max_width: usize) -> Policy {
        let max_depth = max_depth.max(1);
        Policy {
            max_depth,
            max_width: max_width.max(2),
            succ: vec![0.0; max_depth as usize],
            trials: vec![0.0; max_depth as usize],
            lat: vec![None; max_width.max(2) + 1],
            draft_ms_per_level: 0.0,
            plain_streak: 0,
        }
    }

    /// (max depth, max width) the policy was made for.
    pub fn shape(&self) -> (u32, usize) {
        (self.max_depth, self.max_width)
    }

    /// Starts a new request: acceptance and drafting cost are forgotten (they depend on the
    /// prompt and the drafter), measured verify latencies are kept.
    pub fn new_request(&mut self) {
        self.succ.iter_mut().for_each(|x| *x = 0.0);
        self.trials.iter_mut().for_each(|x| *x = 0.0);
        self.draft_ms_per_level = 0.0;
        self.plain_streak = 0;
    }

    /// Estimated probability that depth `d` (1-based) is accepted given depth `d - 1` was.
    pub fn acceptance(&self, d: u32) -> f64 {
        let i = (d as usize - 1).min(self.succ.len() - 1);
        // The prior for a depth is the estimate of the depth before it (one half for the
        // first), worth two observations: unexplored depths look as good as the last
        // explored one, so the policy tries them, and evidence takes over quickly.
        let prior = if i == 0 { 0.5 } else { self.acceptance(d - 1) };
        (self.succ[i] + 2.0 * prior) / (self.trials[i] + 2.0)
    }

    /// Estimated verify latency (ms) of a batch of `w` tokens.
    pub fn latency(&self, w: usize) -> f64 {
        let w = w.clamp(1, self.max_width);
        if let Some(v) = self.lat[w] {
            return v;
        }
        let below = (1..w).rev().find_map(|x| self.lat[x].map(|v| (x, v)));
        let above = (w + 1..=self.max_width).find_map(|x| self.lat[x].map(|v| (x, v)));
        match (below, above) {
            (Some((a, la)), Some((b, lb))) => la + (lb - la) * (w - a) as f64 / (b - a) as f64,
            (Some((a, la)), None) => {
                // Extrapolate with the slope of the two widest measurements, or, with only
                // one, assume each extra token costs 15% of a single-token step.
                let prev = (1..a).rev().find_map(|x| self.lat[x].map(|v| (x, v)));
                let slope = match prev {
                    Some((b, lb)) => ((la - lb) / (a - b) as f64).max(0.0),
                    None => 0.15 * la / a as f64,
                };
                la + slope * (w - a) as f64
            }
            (None, Some((b, lb))) => lb / (1.0 + 0.15 * (b - w) as f64),
            (None, None) => 1.0 + 0.15 * (w - 1) as f64,
        }
    }

    /// Nodes to request for a draft of depth `d`.
    fn nodes_for(&self, d: u32) -> u32 {
        d.min(self.max_width as u32 - 1)
    }

    /// Expected tokens produced by a step whose drafts go `d` deep (the target's own token
    /// included).
    pub fn expected_tokens(&self, d: u32) -> f64 {
        let mut e = 1.0;
        let mut reach = 1.0;
        for k in 1..=d {
            reach *= self.acceptance(k);
            e += reach;
        }
        e
    }

    /// The budget for the next step (`depth == 0` means a plain step).
    pub fn plan(&mut self) -> Budget {
        let mut best = (0u32, 1.0 / self.latency(1));
        for d in 1..=self.max_depth {
            let n = self.nodes_for(d);
            let cost = self.latency(n as usize + 1) + self.draft_ms_per_level * d as f64;
            let rate = self.expected_tokens(d) / cost;
            if rate > best.1 {
                best = (d, rate);
            }
        }
        let mut d = best.0;
        if d == 0 {
            self.plain_streak += 1;
            if self.plain_streak >= PROBE_EVERY {
                self.plain_streak = 0;
                d = 2.min(self.max_depth);
            }
        } else {
            self.plain_streak = 0;
        }
        Budget { depth: d, nodes: if d == 0 { 0 } else { self.nodes_for(d).max(d) } }
    }

    /// Records a verification: the drafted tree reached `tree_depth`, `accepted` of its
    /// levels were accepted, and the batch of `width` tokens took `verify_ms`.
    pub fn record(&mut self, tree_depth: u32, accepted: u32, width: usize, verify_ms: f64) {
        if width <= self.max_width {
            let v = &mut self.lat[width];
            *v = Some(match *v {
                Some(old) => 0.8 * old + 0.2 * verify_ms,
                None => verify_ms,
            });
        }
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
    fn goes_plain_when_drafts_fail_and_deep_when_they_pass() {
        let mut p = Policy::new(8, 16);
        for w in 1..=13 {
            p.record(0, 0, w, 10.0 + 3.0 * (w - 1) as f64);
        }
        for _ in 0..30 {
            p.record(4, 0, 7, 28.0);
        }
        assert_eq!(p.plan().depth, 0, "rejected drafts must lead to plain steps");
        let probes = (0..PROBE_EVERY * 2).filter(|_| p.plan().depth > 0).count();
        assert_eq!(probes, 2, "one probe per {PROBE_EVERY} plain steps");
        let mut q = Policy::new(8, 16);
        for w in 1..=13 {
            q.record(0, 0, w, 10.0 + 1.0 * (w - 1) as f64);
        }
        for _ in 0..30 {
            q.record(8, 8, 13, 22.0);
        }
        assert_eq!(q.plan().depth, 8, "always-accepted drafts should go to the maximum depth");
        assert!(q.expected_tokens(8) > 7.0);
    }

    #[test]
    fn latency_interpolates_between_measured_widths() {
        let mut p = Policy::new(4, 16);
        p.record(0, 0, 1, 10.0);
        p.record(0, 0, 5, 20.0);
        assert!((p.latency(3) - 15.0).abs() < 1e-9);
        // Beyond the widest measurement the measured slope continues.
        assert!((p.latency(9) - 30.0).abs() < 1e-9);
        // A new request keeps the latencies and forgets acceptance.
        p.record(3, 3, 4, 17.5);
        assert!(p.acceptance(1) > 0.6);
        p.new_request();
        assert_eq!(p.acceptance(1), 0.5);
        assert!((p.latency(4) - 17.5).abs() < 1e-9);
    }
}
