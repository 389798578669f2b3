//! Host-side adapters: [`ForeignBackend`] and [`ForeignDrafter`] implement the native traits
//! over the plugins' FFI objects, so the FFI types stay here and in the loader. They check
//! what comes back (logit lengths against the model's vocabulary) rather than trust it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use abi_stable::std_types::{RResult, RSlice, RString, RVec};
use coordgen_interface::{BackendBox, BackendCaps, DraftBudget, DraftFeedback, DrafterBox, ForwardBatch, ForwardOutput, LoadRequest};

use super::traits::{Backend, Capabilities, Draft, Drafter, Feedback, Forward, ModelInfo, PResult, PluginError, Predictions};

pub(super) struct ForeignBackend {
    name: String,
    identity: String,
    obj: BackendBox,
    /// The last capabilities the plugin reported (kept for when a later call fails).
    caps: std::sync::Mutex<Capabilities>,
    /// Vocabulary size per loaded model, and the model of each slot: the host checks every
    /// forward's logits against them rather than trusting the plugin's lengths.
    models: HashMap<u64, usize>,
    slots: HashMap<u32, u64>,
}

pub(super) fn caps_of(c: BackendCaps) -> Capabilities {
    Capabilities {
        weight_types: c.weight_types.iter().map(|s| s.to_string()).collect(),
        kv_types: c.kv_types.iter().map(|s| s.to_string()).collect(),
        widths: c.widths.to_vec(),
        max_width: c.max_width,
        max_context: c.max_context,
        batch_invariant: c.batch_invariant,
        threads: c.threads,
    }
}

/// Converts a plugin call's result, naming the plugin in the error.
pub(crate) fn call<T>(plugin: &str, r: RResult<T, RString>) -> PResult<T> {
    r.into_result().map_err(|e| PluginError::Call { plugin: plugin.to_string(), message: e.into_string() })
}

impl ForeignBackend {
    pub(super) fn new(name: String, identity: String, obj: BackendBox, caps: Capabilities) -> ForeignBackend {
        ForeignBackend { name, identity, obj, caps: std::sync::Mutex::new(caps), models: HashMap::new(), slots: HashMap::new() }
    }

    fn call<T>(&self, r: RResult<T, RString>) -> PResult<T> {
        call(&self.name, r)
    }

    /// Checks that a forward returned `rows x n_vocab` logits for the slot's model.
    fn check_logits(&self, f: &Forward<'_>, out: &ForwardOutput) -> PResult<()> {
        let n_vocab = self.slots.get(&f.slot).and_then(|m| self.models.get(m)).copied();
        let want = n_vocab.map(|v| v * f.logit_rows.len());
        if want.is_some_and(|w| w != out.logits.len()) || n_vocab.is_some_and(|v| v != out.n_vocab as usize) {
            return Err(PluginError::Call {
                plugin: self.name.clone(),
                message: format!(
                    "forward returned {} logits of vocabulary {} for {} rows, but the model's vocabulary is {}",
                    out.logits.len(),
                    out.n_vocab,
                    f.logit_rows.len(),
                    n_vocab.unwrap_or_default()
                ),
            });
        }
        Ok(())
    }
}

impl Backend for ForeignBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn identity(&self) -> String {
        self.identity.clone()
    }
    fn capabilities(&self) -> Capabilities {
        let mut cached = self.caps.lock().unwrap_or_else(|p| p.into_inner());
        match self.call(self.obj.capabilities()) {
            Ok(c) => *cached = caps_of(c),
            // Reported each time it happens; the last good answer stands in.
            Err(e) => tracing::warn!("{e}; using its last reported capabilities"),
        }
        cached.clone()
    }
    fn set_threads(&mut self, n: u32) -> PResult<()> {
        let r = self.obj.set_threads(n);
        self.call(r)
    }
    fn load_model(&mut self, path: &Path) -> PResult<ModelInfo> {
        let req = LoadRequest { path: path.to_string_lossy().as_ref().into(), options_json: RString::new() };
        let r = self.obj.load_model(&req);
        let d = self.call(r)?;
        self.models.insert(d.handle, d.n_vocab as usize);
        Ok(ModelInfo {
            handle: d.handle,
            arch: d.arch.into_string(),
            n_vocab: d.n_vocab as usize,
            n_layer: d.n_layer as usize,
            n_embd: d.n_embd as usize,
            n_ctx_train: d.n_ctx_train as usize,
            weight_bytes: d.weight_bytes,
            extra_bytes: d.extra_bytes,
        })
    }
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> PResult<u32> {
        let r = self.obj.create_slot(model, n_ctx);
        let slot = self.call(r)?;
        self.slots.insert(slot, model);
        Ok(slot)
    }
    fn free_slot(&mut self, slot: u32) -> PResult<()> {
        let r = self.obj.free_slot(slot);
        self.slots.remove(&slot);
        self.call(r)
    }
    fn slot_len(&self, slot: u32) -> PResult<u32> {
        self.call(self.obj.slot_len(slot))
    }
    fn truncate(&mut self, slot: u32, len: u32) -> PResult<()> {
        let r = self.obj.truncate(slot, len);
        self.call(r)
    }
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> PResult<()> {
        let r = self.obj.copy_prefix(src, dst, len);
        self.call(r)
    }
    fn keep_entries(&mut self, slot: u32, start: u32, keep: &[u32]) -> PResult<()> {
        let r = self.obj.keep_entries(slot, start, RSlice::from_slice(keep));
        self.call(r)
    }
    fn forward(&mut self, f: &Forward<'_>) -> PResult<Vec<f32>> {
        let r = self.obj.forward(&ffi_batch(f));
        let out = self.call(r)?;
        self.check_logits(f, &out)?;
        Ok(out.logits.into_vec())
    }
    fn forward_slots(&mut self, fs: &[Forward<'_>]) -> PResult<Vec<Vec<f32>>> {
        let batches: Vec<ForwardBatch> = fs.iter().map(ffi_batch).collect();
        let r = self.obj.forward_slots(RSlice::from_slice(&batches));
        let outs = self.call(r)?;
        if outs.len() != fs.len() {
            return Err(PluginError::Call { plugin: self.name.clone(), message: format!("forward_slots returned {} outputs for {} batches", outs.len(), fs.len()) });
        }
        for (f, o) in fs.iter().zip(outs.iter()) {
            self.check_logits(f, o)?;
        }
        Ok(outs.into_iter().map(|o| o.logits.into_vec()).collect())
    }
    fn stats_json(&self) -> String {
        match self.call(self.obj.stats_json()) {
            Ok(s) => s.into_string(),
            Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
        }
    }
}

fn ffi_batch(f: &Forward<'_>) -> ForwardBatch {
    ForwardBatch {
        slot: f.slot,
        tokens: RVec::from_slice(f.tokens),
        positions: RVec::from_slice(f.positions),
        mask: RVec::from_slice(f.mask),
        logit_rows: RVec::from_slice(f.logit_rows),
    }
}

pub(super) struct ForeignDrafter {
    name: String,
    obj: DrafterBox,
    own_threads: u32,
    /// Asked once at load (a failure there is a load error).
    vocabulary: Option<PathBuf>,
    calibration_top_k: u32,
}

impl ForeignDrafter {
    pub(super) fn new(name: String, obj: DrafterBox, own_threads: u32, vocabulary: Option<PathBuf>, calibration_top_k: u32) -> ForeignDrafter {
        ForeignDrafter { name, obj, own_threads, vocabulary, calibration_top_k }
    }

    fn call<T>(&self, r: RResult<T, RString>) -> PResult<T> {
        call(&self.name, r)
    }
}

impl Drafter for ForeignDrafter {
    fn name(&self) -> &str {
        &self.name
    }
    fn own_threads(&self) -> u32 {
        self.own_threads
    }
    fn begin(&mut self, prompt: &[u32]) -> PResult<()> {
        let r = self.obj.begin(RSlice::from_slice(prompt));
        self.call(r)
    }
    fn propose(&mut self, sequence: &[u32], max_nodes: u32, max_depth: u32) -> PResult<Draft> {
        let r = self.obj.propose(RSlice::from_slice(sequence), DraftBudget { max_nodes, max_depth });
        let t = self.call(r)?;
        Ok(Draft { tokens: t.tokens.into_vec(), parents: t.parents.into_vec(), scores: t.scores.into_vec() })
    }
    fn observe(&mut self, f: &Feedback) -> PResult<()> {
        let fb = DraftFeedback {
            accepted: RVec::from_slice(&f.accepted),
            n_accepted_draft: f.n_accepted_draft,
            n_drafted: f.n_drafted,
            accepted_nodes: RVec::from_slice(&f.accepted_nodes),
        };
        let r = self.obj.observe(&fb);
        self.call(r)
    }
    fn vocabulary(&self) -> Option<PathBuf> {
        self.vocabulary.clone()
    }
    fn calibration_top_k(&self) -> u32 {
        self.calibration_top_k
    }
    fn calibrate(&mut self, c: &Predictions) -> PResult<()> {
        let cal = coordgen_interface::Calibration {
            k: c.k as u32,
            positions: RVec::from_slice(&c.positions),
            tokens: RVec::from_slice(&c.tokens),
            probs: RVec::from_slice(&c.probs),
        };
        let r = self.obj.calibrate(&cal);
        self.call(r)
    }
    fn finish(&mut self) -> PResult<()> {
        let r = self.obj.finish();
        self.call(r)
    }
}
