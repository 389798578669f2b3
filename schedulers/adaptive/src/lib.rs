//! The adaptive scheduler plugin (CoordGen's default): a cost model per backend and model
//! (calibration samples corrected by live verify timings) shapes every phase.
//! - Prefill runs in chunks of the calibrated width with the best tokens per ms.
//! - Each step's draft depth maximises expected tokens per ms: expected accepted tokens from
//!   the host's per-depth acceptance estimates, over the modelled verify latency of the
//!   tree's width plus the drafter's time. Depth 0 is a plain step; after a run of plain
//!   steps a small probe keeps the statistics fresh, and each probe that does not bring the
//!   drafts back doubles the run before the next one (up to eight times `probe_every`), so
//!   text with nothing to copy pays for few probes.
//! - With draft extension on, a draft of depth `d` may hold up to `free_width - 1` nodes,
//!   where `free_width` is the widest batch costing at most `free_factor` x one token.
//! - Static-graph backends get a progressive switching plan ([`switch`]).

pub mod switch;

use abi_stable::std_types::{RResult, RStr, RString, RVec};
use coordgen_interface::{
    guard, CostModel, CostSample, PluginInfo, PluginKind, SchedulerBox, SchedulerFfi, SchedulerFfi_TO, SchedulerMod, SchedulerModRef,
    StepPlan, StepState, SwitchPlan, SwitchProblem, INTERFACE_VERSION,
};
use serde::Deserialize;

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// A width is "nearly free" when it costs at most this many times one token.
    #[serde(default = "d_free_factor")]
    pub free_factor: f64,
    /// Plain steps before a probe draft.
    #[serde(default = "d_probe_every")]
    pub probe_every: u32,
}

fn d_free_factor() -> f64 {
    1.1
}
fn d_probe_every() -> u32 {
    12
}

pub struct Adaptive {
    opts: Options,
    /// Verification forwards (logits for every row).
    verify: CostModel,
    /// Prefill chunks (logits for one row).
    prefill: CostModel,
    plain_streak: u32,
    /// Plain steps before the next probe (grows while probes fail).
    probe_gap: u32,
    /// The last plan was a probe.
    probed: bool,
}

impl Adaptive {
    pub fn new(options: &str) -> Result<Adaptive, String> {
        let opts: Options = serde_json::from_str(if options.trim().is_empty() { "{}" } else { options })
            .map_err(|e| format!("adaptive scheduler options: {e}"))?;
        let probe_gap = opts.probe_every;
        Ok(Adaptive { opts, verify: CostModel::default(), prefill: CostModel::default(), plain_streak: 0, probe_gap, probed: false })
    }

    pub fn add_costs(&mut self, samples: &[CostSample]) {
        let (v, p): (Vec<CostSample>, Vec<CostSample>) = samples.iter().partition(|s| s.rows == s.width);
        self.verify.add_calibration(&v);
        self.prefill.add_calibration(&p.into_iter().filter(|s| s.rows == 1).collect::<Vec<_>>());
    }

    pub fn observe(&mut self, s: CostSample) {
        if s.rows == s.width {
            self.verify.observe(s.width, s.context, s.micros as f64 / 1e3);
        }
    }

    pub fn chunk(&self, n_prompt: u32, max_width: u32) -> u32 {
        // Without prefill samples, the verify model (all rows) still ranks the widths.
        let m = if self.prefill.is_empty() { &self.verify } else { &self.prefill };
        m.best_throughput_width(n_prompt / 2, max_width).unwrap_or(max_width.min(128)).clamp(1, max_width.max(1))
    }

    pub fn free(&self, context: u32, max_width: u32) -> u32 {
        if self.verify.is_empty() {
            return 1;
        }
        self.verify.free_width(context, self.opts.free_factor, max_width)
    }

    /// Nodes a draft of depth `d` may hold.
    fn nodes_for(&self, st: &StepState, d: u32) -> u32 {
        let cap = st.max_width.max(2) - 1;
        let free = if st.shared_tokens == 0 { self.free(st.context_len, st.max_width) } else { self.free_beside(st.shared_tokens, st.context_len, st.max_width) };
        let n = if st.extension { d.max(free - 1) } else { d };
        n.min(cap).max(d.min(cap))
    }

    /// The nearly free width when `base` tokens of other requests share the forward: the
    /// widest `w` whose joint forward costs at most `free_factor` times the joint forward
    /// with one token of ours.
    fn free_beside(&self, base: u32, ctx: u32, max_width: u32) -> u32 {
        if self.verify.is_empty() {
            return 1;
        }
        let one = self.verify.latency(base + 1, ctx);
        (1..=max_width.max(1)).filter(|&w| self.verify.latency(base + w, ctx) <= self.opts.free_factor * one).max().unwrap_or(1)
    }

    /// Expected tokens of a step whose draft goes `d` deep (the target's own token included).
    fn expected_tokens(st: &StepState, d: u32) -> f64 {
        let (mut e, mut reach) = (1.0, 1.0);
        for k in 0..d as usize {
            reach *= st.acceptance_by_depth.get(k).copied().unwrap_or(0.0) as f64;
            e += reach;
        }
        e
    }

    /// The step's draft: the depth with the most tokens per ms of the forward. When other
    /// requests share the forward (a server's merged slots), it is the most tokens of all
    /// of them per ms of the joint forward, counting one token for each of the others: a
    /// draft only pays if what it adds is worth slowing everyone's step.
    pub fn plan(&mut self, st: &StepState) -> StepPlan {
        let ctx = st.context_len;
        let (base, others) = (st.shared_tokens, st.shared_slots as f64);
        let lat = |w: u32| self.verify.latency(base + w, ctx);
        let mut best = (0u32, (others + 1.0) / lat(1));
        let max_depth = st.max_depth.min(st.acceptance_by_depth.len() as u32).min(st.max_width.max(2) - 1);
        for d in 1..=max_depth {
            let n = self.nodes_for(st, d);
            let cost = lat(n + 1) + st.draft_ms_per_level as f64 * d as f64;
            let rate = (others + Self::expected_tokens(st, d)) / cost;
            if rate > best.1 {
                best = (d, rate);
            }
        }
        let mut d = best.0;
        let was_probe = std::mem::take(&mut self.probed);
        if d == 0 {
            if was_probe {
                // The probe did not make drafting pay: wait longer before the next one.
                self.probe_gap = (self.probe_gap * 2).min(self.opts.probe_every.max(1) * 8);
            }
            self.plain_streak += 1;
            if self.plain_streak >= self.probe_gap && max_depth > 0 {
                self.plain_streak = 0;
                self.probed = true;
                d = 2.min(max_depth);
            }
        } else {
            self.plain_streak = 0;
            self.probe_gap = self.opts.probe_every;
        }
        StepPlan { draft_depth: d, draft_nodes: if d == 0 { 0 } else { self.nodes_for(st, d) } }
    }
}

impl SchedulerFfi for Adaptive {
    fn observe_costs(&mut self, samples: RVec<CostSample>) -> RResult<(), RString> {
        guard(|| {
            self.add_costs(&samples);
            Ok(())
        })
    }
    fn observe_step(&mut self, sample: CostSample) -> RResult<(), RString> {
        guard(|| {
            self.observe(sample);
            Ok(())
        })
    }
    fn prefill_chunk(&mut self, n_prompt: u32, max_width: u32) -> RResult<u32, RString> {
        guard(|| Ok(self.chunk(n_prompt, max_width)))
    }
    fn free_width(&mut self, context: u32, max_width: u32) -> RResult<u32, RString> {
        guard(|| Ok(self.free(context, max_width)))
    }
    fn switch_plan(&mut self, problem: &SwitchProblem) -> RResult<SwitchPlan, RString> {
        guard(|| Ok(switch::plan(problem)))
    }
    fn plan_step(&mut self, state: &StepState) -> RResult<StepPlan, RString> {
        guard(|| Ok(self.plan(state)))
    }
}

extern "C" fn info() -> PluginInfo {
    PluginInfo {
        name: "adaptive".into(),
        kind: PluginKind::Scheduler,
        interface_version: INTERFACE_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        description: "cost-model scheduling: prefill chunk, per-step draft budget, free tree width, graph switching".into(),
    }
}

extern "C" fn create(options: RStr<'_>) -> RResult<SchedulerBox, RString> {
    guard(|| Ok(SchedulerFfi_TO::from_value(Adaptive::new(options.as_str())?, abi_stable::sabi_trait::TD_Opaque)))
}

#[abi_stable::export_root_module]
pub fn get_library() -> SchedulerModRef {
    use abi_stable::prefix_type::PrefixTypeTrait;
    SchedulerMod { info, create }.leak_into_prefix()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(per_extra: f64) -> Vec<CostSample> {
        // 10 ms for one token, `per_extra` ms per extra token, at two contexts.
        [64u32, 512]
            .iter()
            .flat_map(|&c| {
                (1..=16u32).map(move |w| CostSample { width: w, context: c, rows: w, micros: ((10.0 + per_extra * (w - 1) as f64) * 1e3) as u64 })
            })
            .collect()
    }

    fn state(acc: f32, extension: bool) -> StepState {
        StepState {
            context_len: 300,
            remaining_tokens: 100,
            acceptance_by_depth: vec![acc; 8].into(),
            draft_ms_per_level: 0.0,
            max_depth: 8,
            max_width: 16,
            extension,
            shared_tokens: 0,
            shared_slots: 0,
        }
    }

    #[test]
    fn drafts_less_when_other_requests_share_the_forward() {
        // 10 ms + 3 ms per extra token: alone, a draft accepted 60% of the time pays...
        let mut s = Adaptive::new("").unwrap();
        s.add_costs(&costs(3.0));
        assert!(s.plan(&state(0.6, false)).draft_depth > 0);
        // ...but beside 7 other requests' tokens it would slow 7 others for 0.6 of a token.
        let shared = StepState { shared_tokens: 7, shared_slots: 7, ..state(0.6, false) };
        assert_eq!(s.plan(&shared).draft_depth, 0, "a draft that slows every request must not be verified");
        // A nearly free forward (0.2 ms per extra token) still drafts beside them.
        let mut cheap = Adaptive::new("").unwrap();
        cheap.add_costs(&costs(0.2));
        assert!(cheap.plan(&shared).draft_depth > 0);
    }

    #[test]
    fn goes_plain_when_drafts_fail_and_deep_when_they_pass() {
        let mut s = Adaptive::new("").unwrap();
        s.add_costs(&costs(3.0));
        assert_eq!(s.plan(&state(0.05, false)).draft_depth, 0, "rejected drafts must lead to plain steps");
        // Probes 12 steps apart (the plan above was the first plain step), then 24, then 48
        // while they keep failing.
        let at: Vec<usize> = (1..=100).filter(|_| s.plan(&state(0.05, false)).draft_depth > 0).collect();
        assert_eq!(at, vec![11, 35, 83], "probes back off while drafts keep failing");
        // Drafts that pay again reset the gap.
        assert!(s.plan(&state(0.99, false)).draft_depth > 0);
        let next = (1..=30).find(|_| s.plan(&state(0.05, false)).draft_depth > 0);
        assert_eq!(next, Some(12));
        let mut q = Adaptive::new("").unwrap();
        q.add_costs(&costs(1.0));
        let p = q.plan(&state(0.99, false));
        assert_eq!(p, StepPlan { draft_depth: 8, draft_nodes: 8 });
        // A middling acceptance picks a middling depth.
        let d = q.plan(&state(0.7, false)).draft_depth;
        assert!((2..8).contains(&d), "{d}");
    }

    #[test]
    fn extension_fills_the_nearly_free_width() {
        let mut s = Adaptive::new("").unwrap();
        // Widths up to 5 cost at most 1.1x one token, wider ones much more.
        let samples: Vec<CostSample> = (1..=16u32)
            .map(|w| CostSample { width: w, context: 300, rows: w, micros: if w <= 5 { 10_000 + 200 * (w as u64 - 1) } else { 20_000 * w as u64 } })
            .collect();
        s.add_costs(&samples);
        assert_eq!(s.free(300, 16), 5);
        let plain = s.plan(&state(0.6, false));
        let ext = s.plan(&state(0.6, true));
        assert_eq!(plain.draft_depth, ext.draft_depth);
        assert_eq!(ext.draft_nodes, 4.max(ext.draft_depth));
        assert_eq!(plain.draft_nodes, plain.draft_depth);
    }

    #[test]
    fn prefill_chunk_is_the_best_throughput_width() {
        let mut s = Adaptive::new("").unwrap();
        let samples: Vec<CostSample> = [(16u32, 100.0), (32, 150.0), (64, 280.0), (128, 600.0)]
            .iter()
            .map(|&(w, ms)| CostSample { width: w, context: 64, rows: 1, micros: (ms * 1e3) as u64 })
            .collect();
        s.add_costs(&samples);
        assert_eq!(s.chunk(1000, 256), 64);
        assert_eq!(s.chunk(1000, 32), 32);
        assert!(Adaptive::new("{\"bogus\": 1}").is_err());
    }
}
