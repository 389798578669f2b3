//! The scheduler contract: decide how a request's phases are shaped from measured costs and
//! acceptance statistics: the prefill chunk width, the draft budget (tree depth and nodes) of
//! each verification step, the width that tree extension may grow drafts to, and, for
//! backends with static-shape graphs, when each layer block switches from its prefill graph
//! to its verify graph.
//!
//! Call order: `observe_costs` with calibration samples (before anything else, and again
//! when the host recalibrates), then per request `prefill_chunk`, then per step `plan_step`
//! followed by `observe_step` with the verify forward's measured time.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, library::RootModule, package_version_strings};
use abi_stable::{sabi_types::VersionStrings, StableAbi};

use crate::PluginInfo;

/// Measured latency of one forward of `width` tokens after `context` cached ones, returning
/// logits for `rows` of them (all of them for verification, one for a prefill chunk).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq)]
pub struct CostSample {
    pub width: u32,
    pub context: u32,
    pub rows: u32,
    pub micros: u64,
}

/// State the scheduler sees before a decoding step.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct StepState {
    pub context_len: u32,
    pub remaining_tokens: u32,
    /// Estimated probability that draft depth `d + 1` is accepted given depth `d` was
    /// (index 0 = the first drafted token); as long as `max_depth`.
    pub acceptance_by_depth: RVec<f32>,
    /// Time the drafter takes per drafted level, ms.
    pub draft_ms_per_level: f32,
    pub max_depth: u32,
    /// Widest verification batch allowed (pending token + draft nodes).
    pub max_width: u32,
    /// Whether drafts may grow into trees wider than their depth (draft extension).
    pub extension: bool,
    /// Tokens of other requests that share this step's forward (a server's merged slots;
    /// 0 when the request runs alone): the step's cost is that of the joint width.
    pub shared_tokens: u32,
    /// How many other requests share it: their tokens come out of the same forward, so
    /// a wider draft that slows it slows them too.
    pub shared_slots: u32,
}

/// What the next step should do.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Draft nodes to request (0 = plain decoding step).
    pub draft_nodes: u32,
    pub draft_depth: u32,
}

/// Progressive graph switching for a backend with static-shape graphs per layer block:
/// the prefill still has `chunks` chunks to run; block `b` takes `prefill_us[b]` per chunk
/// with its prefill graph and `verify_us[b]` per chunk if it already runs the verify graph
/// (several narrow calls); loading one block's verify graph takes `load_us` and a single
/// loader works while blocks compute. A block's verify graph replaces its prefill graph.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct SwitchProblem {
    pub chunks: u32,
    pub prefill_us: RVec<u64>,
    pub verify_us: RVec<u64>,
    pub load_us: u64,
}

/// For each block, the chunk index from which it runs its verify graph (`chunks` = only
/// after the prefill), with the simulated time until the first verification can start, for
/// this plan and for switching every block after the prefill.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct SwitchPlan {
    pub switch_at: RVec<u32>,
    pub ready_us: u64,
    pub naive_ready_us: u64,
}

#[sabi_trait]
pub trait SchedulerFfi: Send {
    /// Feeds calibration measurements (replacing none: repeated samples keep the fastest).
    fn observe_costs(&mut self, samples: RVec<CostSample>) -> RResult<(), RString>;

    /// Feeds one live verification forward.
    fn observe_step(&mut self, sample: CostSample) -> RResult<(), RString>;

    /// Width of prefill chunks for a prompt of `n_prompt` tokens (at most `max_width`).
    fn prefill_chunk(&mut self, n_prompt: u32, max_width: u32) -> RResult<u32, RString>;

    /// Widest verification batch that costs almost nothing over one token at `context`.
    fn free_width(&mut self, context: u32, max_width: u32) -> RResult<u32, RString>;

    /// Plans progressive graph switching (see [`SwitchProblem`]).
    fn switch_plan(&mut self, problem: &SwitchProblem) -> RResult<SwitchPlan, RString>;

    #[sabi(last_prefix_field)]
    fn plan_step(&mut self, state: &StepState) -> RResult<StepPlan, RString>;
}

pub type SchedulerBox = SchedulerFfi_TO<'static, RBox<()>>;

/// Root module of a scheduler plugin library.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = SchedulerModRef)))]
#[sabi(missing_field(panic))]
pub struct SchedulerMod {
    pub info: extern "C" fn() -> PluginInfo,
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(options_json: RStr<'_>) -> RResult<SchedulerBox, RString>,
}

impl RootModule for SchedulerModRef {
    declare_root_module_statics! {SchedulerModRef}
    const BASE_NAME: &'static str = "coordgen_scheduler";
    const NAME: &'static str = "coordgen_scheduler";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
