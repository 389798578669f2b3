//! The drafter contract: propose a token tree continuing the current sequence, and learn
//! from which drafted tokens the target model accepted.
//!
//! A draft is a tree in parent-array form: node `i` has token `tokens[i]` and parent
//! `parents[i]` (`-1` = attached to the last accepted token; otherwise an earlier node
//! index, so parents always precede children). A linear draft is the one-branch case.
//! Sibling tokens should be distinct (the host ignores repeated siblings).
//!
//! Call order per request: `begin(prompt)`, then (if the drafter asked for it with
//! `calibration_top_k` and the host has calibration on) one `calibrate` with the target
//! model's own predictions over the prompt, then any number of `propose` / `observe` pairs
//! (`propose` may also be followed by another `propose` when the host skipped verification),
//! then `finish`. `propose` returns an empty tree when the drafter has nothing to offer.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, library::RootModule, package_version_strings};
use abi_stable::{sabi_types::VersionStrings, StableAbi};

use crate::PluginInfo;

/// Limits the host puts on one proposal.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct DraftBudget {
    /// Most nodes in the tree.
    pub max_nodes: u32,
    /// Deepest path.
    pub max_depth: u32,
}

/// A proposed token tree.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct DraftTree {
    pub tokens: RVec<u32>,
    pub parents: RVec<i32>,
    /// The drafter's confidence per node (may be empty).
    pub scores: RVec<f32>,
}

/// What happened to the last proposal.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct DraftFeedback {
    /// Tokens appended to the sequence since the last feedback: the accepted drafts plus the
    /// target's own token. The first feedback of a request carries the first generated token
    /// (sampled after prefill, with nothing drafted), so prompt + all `accepted` in order is
    /// exactly the sequence.
    pub accepted: RVec<u32>,
    /// How many drafted tokens were accepted.
    pub n_accepted_draft: u32,
    /// How many nodes were drafted.
    pub n_drafted: u32,
    /// Indices of the accepted draft nodes, root to leaf (so position `d` of the accepted
    /// path is `accepted_nodes[d]`; per-depth acceptance follows from its length).
    pub accepted_nodes: RVec<u32>,
}

/// The target model's own predictions at some prompt positions, computed during prefill
/// (in-context distribution calibration). Entry `i` is about position `positions[i]`: the
/// `k` most likely tokens to follow `prompt[..=positions[i]]`, most likely first, with their
/// probabilities, at `tokens[i*k..(i+1)*k]` and `probs[i*k..(i+1)*k]`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct Calibration {
    pub k: u32,
    pub positions: RVec<u32>,
    pub tokens: RVec<u32>,
    pub probs: RVec<f32>,
}

#[sabi_trait]
pub trait DrafterFfi: Send {
    /// Starts a request whose prompt is `prompt`.
    fn begin(&mut self, prompt: RSlice<'_, u32>) -> RResult<(), RString>;

    /// Proposes a continuation of `sequence` (prompt + accepted output so far).
    fn propose(&mut self, sequence: RSlice<'_, u32>, budget: DraftBudget) -> RResult<DraftTree, RString>;

    /// Reports the outcome of the last proposal.
    fn observe(&mut self, feedback: &DraftFeedback) -> RResult<(), RString>;

    /// Path of the model file whose tokenizer this drafter's token ids come from, or an
    /// empty string when the drafter is token-agnostic (it only copies ids it was given).
    /// The host refuses a drafter whose vocabulary differs from the target model's.
    fn vocabulary(&self) -> RResult<RString, RString>;

    /// How many of the target's top predictions per prompt position the drafter wants
    /// (0 = it does not use calibration, and the host computes none).
    fn calibration_top_k(&self) -> RResult<u32, RString>;

    /// Delivers the target's predictions over the prompt (after `begin`, before `propose`).
    fn calibrate(&mut self, calibration: &Calibration) -> RResult<(), RString>;

    /// Ends the request (drafters may persist what they learned).
    #[sabi(last_prefix_field)]
    fn finish(&mut self) -> RResult<(), RString>;
}

pub type DrafterBox = DrafterFfi_TO<'static, RBox<()>>;

/// Root module of a drafter plugin library.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = DrafterModRef)))]
#[sabi(missing_field(panic))]
pub struct DrafterMod {
    pub info: extern "C" fn() -> PluginInfo,
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(options_json: RStr<'_>) -> RResult<DrafterBox, RString>,
}

impl RootModule for DrafterModRef {
    declare_root_module_statics! {DrafterModRef}
    const BASE_NAME: &'static str = "coordgen_drafter";
    const NAME: &'static str = "coordgen_drafter";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
