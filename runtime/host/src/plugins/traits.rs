//! The native side of the plugin contracts: the [`Backend`] and [`Drafter`] traits the engine
//! calls, the plain data they exchange ([`Forward`], [`Draft`], [`Feedback`],
//! [`Predictions`], [`Capabilities`], [`ModelInfo`]) and [`PluginError`]. Nothing here is an
//! FFI type; the adapters in `foreign` translate.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin '{plugin}': {message}")]
    Load { plugin: String, message: String },
    #[error("{plugin}: {message}")]
    Call { plugin: String, message: String },
}

pub type PResult<T> = Result<T, PluginError>;

/// What a backend reports about itself (native mirror of the FFI struct).
#[derive(Clone, Debug)]
pub struct Capabilities {
    pub weight_types: Vec<String>,
    pub kv_types: Vec<String>,
    pub widths: Vec<u32>,
    pub max_width: u32,
    pub max_context: u32,
    pub batch_invariant: bool,
    pub threads: u32,
}

#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub handle: u64,
    pub arch: String,
    pub n_vocab: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ctx_train: usize,
    pub weight_bytes: u64,
    pub extra_bytes: u64,
}

/// One forward request (see the interface crate for the mask and slot semantics).
pub struct Forward<'a> {
    pub slot: u32,
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub mask: &'a [u8],
    pub logit_rows: &'a [u32],
}

/// The native backend trait the engine uses.
pub trait Backend: Send {
    fn name(&self) -> &str;
    /// What makes this backend's timings what they are beyond its name: the plugin library
    /// (path, size, modification time) and its options. Calibrations are keyed on it.
    fn identity(&self) -> String {
        self.name().to_string()
    }
    fn capabilities(&self) -> Capabilities;
    fn set_threads(&mut self, n: u32) -> PResult<()>;
    fn load_model(&mut self, path: &Path) -> PResult<ModelInfo>;
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> PResult<u32>;
    fn free_slot(&mut self, slot: u32) -> PResult<()>;
    fn slot_len(&self, slot: u32) -> PResult<u32>;
    fn truncate(&mut self, slot: u32, len: u32) -> PResult<()>;
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> PResult<()>;
    fn keep_entries(&mut self, slot: u32, start: u32, keep: &[u32]) -> PResult<()>;
    /// Returns `logit_rows.len() x n_vocab` logits.
    fn forward(&mut self, f: &Forward<'_>) -> PResult<Vec<f32>>;
    /// One forward over several distinct slots (see the interface's `forward_slots`):
    /// output `i` is what `forward(&fs[i])` would return.
    fn forward_slots(&mut self, fs: &[Forward<'_>]) -> PResult<Vec<Vec<f32>>> {
        fs.iter().map(|f| self.forward(f)).collect()
    }
    fn stats_json(&self) -> String;
    /// For a backend shared by several sessions whose forwards are merged: the other
    /// sessions' tokens and their number in this session's last forward (None = not shared).
    fn merged_with(&self) -> Option<(u32, u32)> {
        None
    }
}

/// A proposed token tree (see the interface crate for the parent-array form).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub parents: Vec<i32>,
    pub scores: Vec<f32>,
}

/// The outcome of one verification step, as drafters see it.
#[derive(Clone, Debug, Default)]
pub struct Feedback {
    /// Tokens appended to the sequence since the last feedback (accepted drafts, then the
    /// target's token; the first feedback of a request carries the first generated token).
    pub accepted: Vec<u32>,
    pub n_accepted_draft: u32,
    pub n_drafted: u32,
    /// Accepted draft node indices, root to leaf.
    pub accepted_nodes: Vec<u32>,
}

/// The native drafter trait the speculative engine uses.
pub trait Drafter: Send {
    fn name(&self) -> &str;
    fn begin(&mut self, prompt: &[u32]) -> PResult<()>;
    fn propose(&mut self, sequence: &[u32], max_nodes: u32, max_depth: u32) -> PResult<Draft>;
    fn observe(&mut self, feedback: &Feedback) -> PResult<()>;
    /// Model file whose vocabulary the drafter's ids come from (`None` = token-agnostic).
    fn vocabulary(&self) -> Option<PathBuf>;
    /// Top predictions per prompt position the drafter wants from the target (0 = none).
    fn calibration_top_k(&self) -> u32 {
        0
    }
    fn calibrate(&mut self, _c: &Predictions) -> PResult<()> {
        Ok(())
    }
    fn finish(&mut self) -> PResult<()>;
    /// Threads the drafter's own model runs on, taken from the target's while overlapping
    /// (0 = the drafter runs no model of its own, or was loaded without overlap).
    fn own_threads(&self) -> u32 {
        0
    }
}

/// The target's top-`k` predictions at some prompt positions (see the interface crate's
/// `Calibration`): entry `i` is position `positions[i]`, its tokens and probabilities at
/// `tokens[i*k..(i+1)*k]`, `probs[i*k..(i+1)*k]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Predictions {
    pub k: usize,
    pub positions: Vec<u32>,
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
}

impl Predictions {
    pub fn len(&self) -> usize {
        self.positions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
    /// Keeps only positions below `n`.
    pub fn truncate_positions(&mut self, n: u32) {
        let keep = self.positions.iter().take_while(|&&p| p < n).count();
        self.positions.truncate(keep);
        self.tokens.truncate(keep * self.k);
        self.probs.truncate(keep * self.k);
    }
}
