//! Schedulers as the engine sees them: a native trait with two implementations, a scheduler
//! plugin (the adaptive one by default, loaded through abi_stable) and the built-in `fixed`
//! schedule (a constant draft depth and prefill chunk: the baseline the ablation compares
//! against). FFI types stay in this module and the interface crate.

use abi_stable::std_types::RVec;
use coordgen_interface::{CostModel, CostSample, SchedulerBox, SchedulerModRef, StepState};

use crate::config::PluginsConfig;
use crate::plugins::{call, open_named, options_json, start, PResult};

/// What the engine asks before a step (native mirror of the interface's `StepState`).
#[derive(Clone, Debug)]
pub struct StepInput {
    pub context_len: u32,
    pub remaining_tokens: u32,
    pub acceptance_by_depth: Vec<f32>,
    pub draft_ms_per_level: f32,
    pub max_depth: u32,
    pub max_width: u32,
    pub extension: bool,
    /// Other requests' tokens in the same forward, and how many requests (see `StepState`).
    pub shared_tokens: u32,
    pub shared_slots: u32,
}

/// What to ask the drafter for this step (`depth == 0` means a plain step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub depth: u32,
    pub nodes: u32,
}

pub trait Scheduler: Send {
    fn name(&self) -> &str;
    fn observe_costs(&mut self, samples: &[CostSample]) -> PResult<()>;
    fn observe_step(&mut self, sample: CostSample) -> PResult<()>;
    fn prefill_chunk(&mut self, n_prompt: u32, max_width: u32) -> PResult<u32>;
    fn free_width(&mut self, context: u32, max_width: u32) -> PResult<u32>;
    fn plan_step(&mut self, s: &StepInput) -> PResult<Budget>;
}

/// The built-in fixed schedule: every step drafts `depth` tokens deep (with tree extension,
/// as many nodes as the calibrated nearly-free width allows), prefill uses a constant chunk.
pub struct Fixed {
    pub depth: u32,
    pub chunk: u32,
    pub free_factor: f64,
    costs: CostModel,
}

impl Fixed {
    pub fn new(depth: u32, chunk: u32) -> Fixed {
        Fixed { depth, chunk, free_factor: 1.1, costs: CostModel::default() }
    }
}

impl Scheduler for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }
    fn observe_costs(&mut self, samples: &[CostSample]) -> PResult<()> {
        let v: Vec<CostSample> = samples.iter().copied().filter(|s| s.rows == s.width).collect();
        self.costs.add_calibration(&v);
        Ok(())
    }
    fn observe_step(&mut self, s: CostSample) -> PResult<()> {
        if s.rows == s.width {
            self.costs.observe(s.width, s.context, s.micros as f64 / 1e3);
        }
        Ok(())
    }
    fn prefill_chunk(&mut self, _n: u32, max_width: u32) -> PResult<u32> {
        Ok(self.chunk.min(max_width).max(1))
    }
    fn free_width(&mut self, context: u32, max_width: u32) -> PResult<u32> {
        Ok(if self.costs.is_empty() { 1 } else { self.costs.free_width(context, self.free_factor, max_width) })
    }
    fn plan_step(&mut self, s: &StepInput) -> PResult<Budget> {
        let cap = s.max_width.max(2) - 1;
        let depth = self.depth.min(s.max_depth).min(cap);
        let nodes = if s.extension { depth.max(self.free_width(s.context_len, s.max_width)? - 1).min(cap) } else { depth };
        Ok(Budget { depth, nodes: if depth == 0 { 0 } else { nodes } })
    }
}

struct ForeignScheduler {
    name: String,
    obj: SchedulerBox,
}

impl Scheduler for ForeignScheduler {
    fn name(&self) -> &str {
        &self.name
    }
    fn observe_costs(&mut self, samples: &[CostSample]) -> PResult<()> {
        let r = self.obj.observe_costs(RVec::from_slice(samples));
        call(&self.name, r)
    }
    fn observe_step(&mut self, sample: CostSample) -> PResult<()> {
        let r = self.obj.observe_step(sample);
        call(&self.name, r)
    }
    fn prefill_chunk(&mut self, n_prompt: u32, max_width: u32) -> PResult<u32> {
        let r = self.obj.prefill_chunk(n_prompt, max_width);
        call(&self.name, r)
    }
    fn free_width(&mut self, context: u32, max_width: u32) -> PResult<u32> {
        let r = self.obj.free_width(context, max_width);
        call(&self.name, r)
    }
    fn plan_step(&mut self, s: &StepInput) -> PResult<Budget> {
        let st = StepState {
            context_len: s.context_len,
            remaining_tokens: s.remaining_tokens,
            acceptance_by_depth: RVec::from_slice(&s.acceptance_by_depth),
            draft_ms_per_level: s.draft_ms_per_level,
            max_depth: s.max_depth,
            max_width: s.max_width,
            extension: s.extension,
            shared_tokens: s.shared_tokens,
            shared_slots: s.shared_slots,
        };
        let r = self.obj.plan_step(&st);
        let p = call(&self.name, r)?;
        Ok(Budget { depth: p.draft_depth, nodes: p.draft_nodes })
    }
}

/// Loads the scheduler named `name`: `fixed` is built in, anything else must be a
/// `kind = "scheduler"` plugin of the config.
pub fn load_scheduler(cfg: &PluginsConfig, name: &str) -> PResult<Box<dyn Scheduler>> {
    if name == "fixed" && cfg.entry(name).is_none() {
        return Ok(Box::new(Fixed::new(4, crate::engine::DEFAULT_PREFILL_CHUNK as u32)));
    }
    let (entry, _, module, _) = open_named::<SchedulerModRef>(cfg, name, " (and it is not the built-in 'fixed')")?;
    let obj = start(&module, name, &options_json(entry))?;
    Ok(Box::new(ForeignScheduler { name: entry.name.clone(), obj }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_schedule_extends_to_the_free_width() {
        let mut f = Fixed::new(4, 64);
        let samples: Vec<CostSample> =
            (1..=16u32).map(|w| CostSample { width: w, context: 100, rows: w, micros: if w <= 7 { 10_000 } else { 30_000 } }).collect();
        f.observe_costs(&samples).unwrap();
        let mut s = StepInput { context_len: 100, remaining_tokens: 10, acceptance_by_depth: vec![0.5; 8], draft_ms_per_level: 0.0, max_depth: 8, max_width: 16, extension: false, shared_tokens: 0, shared_slots: 0 };
        assert_eq!(f.plan_step(&s).unwrap(), Budget { depth: 4, nodes: 4 });
        s.extension = true;
        assert_eq!(f.plan_step(&s).unwrap(), Budget { depth: 4, nodes: 6 });
        assert_eq!(f.prefill_chunk(1000, 32).unwrap(), 32);
    }
}
