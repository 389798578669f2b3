//! The scheduler contract: decide how a request's phases are shaped (prefill chunk width,
//! draft budget per step) from measured costs and acceptance statistics.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, library::RootModule, package_version_strings};
use abi_stable::{sabi_types::VersionStrings, StableAbi};

use crate::PluginInfo;

/// Measured latency of one forward at a given width and context length.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct CostSample {
    pub width: u32,
    pub context: u32,
    pub micros: u64,
}

/// State the scheduler sees before a decoding step.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct StepState {
    pub context_len: u32,
    pub remaining_tokens: u32,
    /// Observed acceptance rate per draft depth (index 0 = first drafted token).
    pub acceptance_by_depth: RVec<f32>,
}

/// What the next step should do.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct StepPlan {
    /// Draft nodes to request (0 = plain decoding step).
    pub draft_nodes: u32,
    pub draft_depth: u32,
}

#[sabi_trait]
pub trait SchedulerFfi: Send {
    /// Feeds cost measurements (from calibration or live timing).
    fn observe_costs(&mut self, samples: RVec<CostSample>) -> RResult<(), RString>;

    /// Width of prefill chunks for a prompt of `n_prompt` tokens.
    fn prefill_chunk(&mut self, n_prompt: u32) -> RResult<u32, RString>;

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
