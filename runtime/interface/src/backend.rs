//! The compute backend contract: load model weights, run forwards over token batches with
//! explicit positions and attention masks, return logits for chosen rows, manage KV slots.
//!
//! The interface is deliberately coarse so very different hardware fits behind it:
//! - **CPU**: weights memory-mapped, KV cache in host memory.
//! - **GPU**: weights and KV cache resident in device memory; only token ids, positions,
//!   the mask and the requested logit rows cross per call, so nothing large moves.
//! - **NPU**: precompiled static-shape graphs of a few fixed token widths. Such a backend
//!   lists them in [`BackendCaps::widths`]; the host then pads every batch to a listed
//!   width with tokens no real row sees and drops their entries after the call (so a slot
//!   needs room for the widest pad), and splits a causal batch wider than the widest
//!   graph. Changing graphs costs time: the host's calibration times every width after a
//!   different one, so that cost is in the widths' measured latencies.
//!
//! KV cache model: a *slot* is one sequence's cache with a fill count `len`. A forward
//! appends its `W` tokens at cache entries `len..len+W` (whatever their positions are) and
//! each new token attends to every entry already in the slot plus the batch tokens its mask
//! row allows. Rolling back rejected drafts is `truncate`; keeping one path of a verified
//! token tree is `keep_entries`; sharing a prompt prefix is `copy_prefix`.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, library::RootModule, package_version_strings};
use abi_stable::{sabi_types::VersionStrings, StableAbi};

use crate::PluginInfo;

/// What a backend can do; the host plans batches from this.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct BackendCaps {
    /// Weight tensor types the backend can run, e.g. `q4_k`, `f16`.
    pub weight_types: RVec<RString>,
    /// KV cache element types it supports, e.g. `f32`, `f16`.
    pub kv_types: RVec<RString>,
    /// Token widths a forward may have, ascending. Empty means any width up to `max_width`.
    /// The host pads each batch to the smallest listed width that holds it (and splits a
    /// causal batch wider than the widest), so such a backend only ever sees listed widths.
    pub widths: RVec<u32>,
    /// Largest batch width of one forward.
    pub max_width: u32,
    /// Largest context (slot capacity) it can allocate; 0 means bounded only by memory.
    pub max_context: u32,
    /// Whether logits of a row are bit-identical whatever batch it is computed in.
    /// Lossless greedy speculative decoding relies on this.
    pub batch_invariant: bool,
    /// Threads the backend will use (CPU backends).
    pub threads: u32,
}

/// Request to load a model file or directory.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct LoadRequest {
    /// A GGUF file or a Hugging Face directory (config.json + *.safetensors).
    pub path: RString,
    /// Backend-specific options as a JSON object (may be empty).
    pub options_json: RString,
}

/// Facts about a loaded model.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ModelDesc {
    /// Handle used in later calls.
    pub handle: u64,
    pub arch: RString,
    pub n_vocab: u32,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_ctx_train: u32,
    /// Bytes of weights read by one forward (for bandwidth figures).
    pub weight_bytes: u64,
    /// Extra memory the backend allocated beyond the mapped file (repacking, etc.).
    pub extra_bytes: u64,
}

/// One forward pass over `tokens.len()` tokens appended to `slot`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ForwardBatch {
    pub slot: u32,
    pub tokens: RVec<u32>,
    /// Position (for rotary embeddings) of each token; tree siblings share positions.
    pub positions: RVec<u32>,
    /// Row-major `W x W` mask over the batch: `mask[i*W + j] != 0` lets token `i` attend to
    /// batch token `j`. Entries already in the slot are always visible. Empty = causal.
    pub mask: RVec<u8>,
    /// Batch rows whose logits are returned, in this order.
    pub logit_rows: RVec<u32>,
}

/// Logits of the requested rows, `rows x n_vocab`, row-major.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ForwardOutput {
    pub n_vocab: u32,
    pub logits: RVec<f32>,
}

/// The backend object a plugin hands out. Every method is called from one host thread at
/// a time; implementations wrap their bodies in [`crate::guard`].
#[sabi_trait]
pub trait BackendFfi: Send {
    fn capabilities(&self) -> RResult<BackendCaps, RString>;

    /// Sets how many threads the backend may use (0 = its default).
    fn set_threads(&mut self, n: u32) -> RResult<(), RString>;

    fn load_model(&mut self, req: &LoadRequest) -> RResult<ModelDesc, RString>;

    /// Allocates an empty KV slot of `n_ctx` entries for `model`.
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> RResult<u32, RString>;

    fn free_slot(&mut self, slot: u32) -> RResult<(), RString>;

    /// Number of filled entries of the slot.
    fn slot_len(&self, slot: u32) -> RResult<u32, RString>;

    /// Drops every entry at index `len` and beyond.
    fn truncate(&mut self, slot: u32, len: u32) -> RResult<(), RString>;

    /// Makes `dst` hold a copy of the first `len` entries of `src` (dst must be empty or is
    /// overwritten; both slots must belong to the same model).
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> RResult<(), RString>;

    /// Compacts after a tree verification: keeps entries `0..start`, then moves entries
    /// `start + keep[k]` to `start + k` for each k, and sets the length to `start + keep.len()`.
    /// `keep` must be increasing.
    fn keep_entries(&mut self, slot: u32, start: u32, keep: RSlice<'_, u32>) -> RResult<(), RString>;

    fn forward(&mut self, batch: &ForwardBatch) -> RResult<ForwardOutput, RString>;

    /// Free-form diagnostics (memory use, kernels chosen) as a JSON object.
    #[sabi(last_prefix_field)]
    fn stats_json(&self) -> RResult<RString, RString>;

    /// One forward over several slots of the same model at once (interface version 4): batch
    /// `i` is appended to its own slot exactly as [`BackendFfi::forward`] would append it,
    /// and output `i` holds its requested rows. The batches' tokens share the weight reads,
    /// which is what makes concurrent requests cheap on memory-bound hardware; attention
    /// stays within each slot. Every row's logits must be bit-identical to the same batch run
    /// alone (batch invariance across slots). Slots must be distinct. On an error no slot may
    /// be left partly written: either every batch was appended or none.
    ///
    /// The default runs the batches one after another (correct, with no sharing).
    fn forward_slots(&mut self, batches: RSlice<'_, ForwardBatch>) -> RResult<RVec<ForwardOutput>, RString> {
        let mut out = RVec::with_capacity(batches.len());
        for b in batches.iter() {
            match self.forward(b) {
                RResult::ROk(o) => out.push(o),
                RResult::RErr(e) => return RResult::RErr(e),
            }
        }
        RResult::ROk(out)
    }
}

pub type BackendBox = BackendFfi_TO<'static, RBox<()>>;

/// Root module of a backend plugin library.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = BackendModRef)))]
#[sabi(missing_field(panic))]
pub struct BackendMod {
    pub info: extern "C" fn() -> PluginInfo,
    /// Creates a backend from its `plugins.toml` options, serialized as JSON.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(options_json: RStr<'_>) -> RResult<BackendBox, RString>,
}

impl RootModule for BackendModRef {
    declare_root_module_statics! {BackendModRef}
    const BASE_NAME: &'static str = "coordgen_backend";
    const NAME: &'static str = "coordgen_backend";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
