//! Plugin loading (abi_stable's loader on top of libloading) and the host-side adapters that
//! turn foreign plugin objects into native Rust traits, so FFI types stay in this module.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibHeader};
use abi_stable::std_types::{RResult, RSlice, RStr, RString, RVec};
use coordgen_interface::{
    BackendCaps, ForwardOutput,
    BackendBox, BackendModRef, DraftBudget, DraftFeedback, DrafterBox, DrafterModRef, ForwardBatch, LoadRequest, PluginInfo,
    SchedulerModRef, INTERFACE_VERSION,
};

use crate::config::{resolve_library, PluginEntry, PluginsConfig};

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
    pub width_switch_cost_us: u64,
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
    fn unload_model(&mut self, model: u64) -> PResult<()>;
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

/// A loaded library, as `coordgen plugins` lists it.
#[derive(Clone, Debug)]
pub struct LoadedInfo {
    pub entry_name: String,
    pub info_name: String,
    pub kind: String,
    pub interface_version: u32,
    pub version: String,
    pub description: String,
    pub path: PathBuf,
}

pub(crate) fn load_err(plugin: &str, message: impl Into<String>) -> PluginError {
    PluginError::Load { plugin: plugin.to_string(), message: message.into() }
}

pub(crate) fn options_json(entry: &PluginEntry) -> String {
    serde_json::to_string(&entry.options).unwrap_or_else(|_| "{}".into())
}

/// Opens the library and checks that it holds a root module of the expected kind.
pub(crate) fn open_header(entry: &PluginEntry, path: &Path, expected_root: &str) -> PResult<&'static LibHeader> {
    let header = lib_header_from_path(path).map_err(|e| load_err(&entry.name, format!("cannot load {}: {e}", path.display())))?;
    let root = header.root_mod_consts().name();
    if root.as_str() != expected_root {
        let kind = root.as_str().strip_prefix("coordgen_").unwrap_or(root.as_str());
        return Err(load_err(&entry.name, format!("{} holds a '{kind}' plugin, but plugins.toml declares kind '{}'", path.display(), entry.kind)));
    }
    Ok(header)
}

pub(crate) fn check_info(entry: &PluginEntry, path: &Path, info: &PluginInfo) -> PResult<LoadedInfo> {
    if info.interface_version != INTERFACE_VERSION {
        return Err(load_err(
            &entry.name,
            format!(
                "{} was built against plugin interface version {}, but this coordgen speaks version {INTERFACE_VERSION}; rebuild the plugin",
                path.display(),
                info.interface_version
            ),
        ));
    }
    Ok(LoadedInfo {
        entry_name: entry.name.clone(),
        info_name: info.name.to_string(),
        kind: info.kind.as_str().to_string(),
        interface_version: info.interface_version,
        version: info.version.to_string(),
        description: info.description.to_string(),
        path: path.to_path_buf(),
    })
}

pub(crate) fn version_msg(e: impl std::fmt::Display) -> String {
    format!("incompatible plugin (built against another interface version or layout): {e}")
}

/// The config entry `name` of kind `kind` and the path of its library (`missing` is added
/// to the error when there is no such entry).
pub(crate) fn entry_of_kind<'a>(cfg: &'a PluginsConfig, name: &str, kind: &str, missing: &str) -> PResult<(&'a PluginEntry, PathBuf)> {
    let entry = cfg.entry(name).ok_or_else(|| load_err(name, format!("no [[plugin]] named '{name}' in {}{missing}", cfg.source)))?;
    if entry.kind != kind {
        return Err(load_err(name, format!("is a {} plugin, not a {kind}", entry.kind)));
    }
    let path = resolve_library(entry, &cfg.base_dir).map_err(|e| load_err(name, e.to_string()))?;
    Ok((entry, path))
}

/// A file's size and modification time (seconds since the epoch), `(0, 0)` where unknown:
/// what says a file was replaced or rebuilt, for cache keys.
pub(crate) fn file_stamp(path: &Path) -> (u64, u64) {
    std::fs::metadata(path)
        .map(|m| (m.len(), m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0)))
        .unwrap_or((0, 0))
}

/// Loads a backend plugin named in the config.
pub fn load_backend(cfg: &PluginsConfig, name: &str) -> PResult<(Box<dyn Backend>, LoadedInfo)> {
    let (entry, path) = entry_of_kind(cfg, name, "backend", "")?;
    let header = open_header(entry, &path, "coordgen_backend")?;
    let module = header.init_root_module::<BackendModRef>().map_err(|e| load_err(name, version_msg(e)))?;
    let info = check_info(entry, &path, &(module.info())())?;
    let options = options_json(entry);
    let obj = (module.create())(RStr::from(options.as_str()))
        .into_result()
        .map_err(|e| load_err(name, format!("could not start: {e}")))?;
    let (size, mtime) = file_stamp(&path);
    let identity = format!("{}:{}:{size}:{mtime}:{options}", entry.name, path.display());
    let caps = call(&entry.name, obj.capabilities()).map_err(|e| load_err(name, format!("could not report its capabilities: {e}")))?;
    let b = ForeignBackend { name: entry.name.clone(), identity, obj, caps: std::sync::Mutex::new(caps_of(caps)), models: HashMap::new(), slots: HashMap::new() };
    Ok((Box::new(b), info))
}

/// Loads a drafter plugin named in the config.
pub fn load_drafter(cfg: &PluginsConfig, name: &str) -> PResult<(Box<dyn Drafter>, LoadedInfo)> {
    let (entry, path) = entry_of_kind(cfg, name, "drafter", "")?;
    let header = open_header(entry, &path, "coordgen_drafter")?;
    let module = header.init_root_module::<DrafterModRef>().map_err(|e| load_err(name, version_msg(e)))?;
    let info = check_info(entry, &path, &(module.info())())?;
    let (options, own_threads) = drafter_options(cfg, entry)?;
    let obj = (module.create())(RStr::from(options.as_str()))
        .into_result()
        .map_err(|e| load_err(name, format!("could not start: {e}")))?;
    let vocab = call(&entry.name, obj.vocabulary()).map_err(|e| load_err(name, format!("could not name its vocabulary: {e}")))?.into_string();
    let vocabulary = (!vocab.is_empty()).then(|| PathBuf::from(vocab));
    let calibration_top_k = call(&entry.name, obj.calibration_top_k()).map_err(|e| load_err(name, format!("could not say what calibration it wants: {e}")))?;
    Ok((Box::new(ForeignDrafter { name: entry.name.clone(), obj, own_threads, vocabulary, calibration_top_k }), info))
}

/// Loads the drafter(s) named by `spec`: one plugin name, or several joined by `,` which are
/// combined into a [`crate::spec::Chain`] (asked in order, the first draft wins).
pub fn load_drafters(cfg: &PluginsConfig, spec: &str) -> PResult<Box<dyn Drafter>> {
    let mut parts = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        parts.push(load_drafter(cfg, name)?.0);
    }
    match parts.len() {
        0 => Err(load_err(spec, "no drafter named")),
        1 => Ok(parts.pop().expect("one")),
        _ => Ok(Box::new(crate::spec::Chain::new(parts))),
    }
}

/// A drafter's options with host facts filled in: `model` aliases resolved to files, a
/// `backend` plugin name resolved to `backend_library` (its path) and `backend_options`, and
/// `cache_dir` defaulted to the host's cache directory. With overlapped drafting on, a
/// drafter that runs a model on a backend gets `threads` (unless its options set them) and
/// the thread count is returned, for the host to take from the target while decoding.
fn drafter_options(cfg: &PluginsConfig, entry: &PluginEntry) -> PResult<(String, u32)> {
    let mut o: serde_json::Map<String, serde_json::Value> = serde_json::to_value(&entry.options)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let mut own_threads = 0;
    if let Some(m) = o.get("model").and_then(|v| v.as_str()) {
        let p = crate::config::resolve_model(m);
        if !p.exists() {
            return Err(load_err(&entry.name, format!("draft model {} not found (run scripts/fetch_models.sh)", p.display())));
        }
        let p = std::fs::canonicalize(&p).unwrap_or(p);
        o.insert("model".into(), p.display().to_string().into());
    }
    if let Some(b) = o.get("backend").and_then(|v| v.as_str()).map(str::to_string) {
        let be = cfg.entry(&b).filter(|e| e.kind == "backend").ok_or_else(|| {
            load_err(&entry.name, format!("option backend = '{b}' does not name a backend plugin of {}", cfg.source))
        })?;
        let lib = resolve_library(be, &cfg.base_dir).map_err(|e| load_err(&entry.name, e.to_string()))?;
        o.insert("backend_library".into(), lib.display().to_string().into());
        o.insert("backend_options".into(), serde_json::to_value(&be.options).unwrap_or_default());
        if cfg.techniques.overlap {
            let t = o.entry("threads").or_insert(cfg.techniques.overlap_draft_threads.max(1).into());
            own_threads = t.as_u64().unwrap_or(0) as u32;
        }
    }
    if !o.contains_key("cache_dir") {
        o.insert("cache_dir".into(), crate::config::cache_dir().display().to_string().into());
    }
    Ok((serde_json::Value::Object(o).to_string(), own_threads))
}

/// Loads every plugin of the config and reports what each is (for `coordgen plugins`).
pub fn describe_all(cfg: &PluginsConfig) -> Vec<Result<LoadedInfo, PluginError>> {
    cfg.plugins
        .iter()
        .map(|entry| {
            let path = resolve_library(entry, &cfg.base_dir).map_err(|e| load_err(&entry.name, e.to_string()))?;
            let root = format!("coordgen_{}", entry.kind);
            let header = open_header(entry, &path, &root)?;
            let info = match entry.kind.as_str() {
                "backend" => (header.init_root_module::<BackendModRef>().map_err(|e| load_err(&entry.name, version_msg(e)))?.info())(),
                "drafter" => (header.init_root_module::<DrafterModRef>().map_err(|e| load_err(&entry.name, version_msg(e)))?.info())(),
                _ => (header.init_root_module::<SchedulerModRef>().map_err(|e| load_err(&entry.name, version_msg(e)))?.info())(),
            };
            check_info(entry, &path, &info)
        })
        .collect()
}

struct ForeignBackend {
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

fn caps_of(c: BackendCaps) -> Capabilities {
    Capabilities {
        weight_types: c.weight_types.iter().map(|s| s.to_string()).collect(),
        kv_types: c.kv_types.iter().map(|s| s.to_string()).collect(),
        widths: c.widths.to_vec(),
        max_width: c.max_width,
        max_context: c.max_context,
        width_switch_cost_us: c.width_switch_cost_us,
        batch_invariant: c.batch_invariant,
        threads: c.threads,
    }
}

/// Converts a plugin call's result, naming the plugin in the error.
pub(crate) fn call<T>(plugin: &str, r: RResult<T, RString>) -> PResult<T> {
    r.into_result().map_err(|e| PluginError::Call { plugin: plugin.to_string(), message: e.into_string() })
}

impl ForeignBackend {
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
    fn unload_model(&mut self, model: u64) -> PResult<()> {
        let r = self.obj.unload_model(model);
        self.models.remove(&model);
        self.call(r)
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

struct ForeignDrafter {
    name: String,
    obj: DrafterBox,
    own_threads: u32,
    /// Asked once at load (a failure there is a load error).
    vocabulary: Option<PathBuf>,
    calibration_top_k: u32,
}

impl ForeignDrafter {
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
