//! A backend for fault-injection tests: the CPU backend, except that its `at`-th forward
//! (counted from 1 over the plugin's life; once only) fails in the way `fault` names:
//! `panic` (inside the guard, as a bug would), `error`, `short_logits` (one value fewer
//! than asked for) or `wrong_vocab` (a vocabulary size that is not the model's). `fault =
//! "capabilities"` panics in `capabilities` instead, and `not_invariant` reports
//! `batch_invariant = false` without other change. `inner` is the path of the backend
//! library it wraps (the CPU plugin); the other options go to that backend.

use std::sync::atomic::{AtomicU64, Ordering};

use abi_stable::export_root_module;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use coordgen_interface::*;

struct Faulty {
    inner: BackendBox,
    fault: String,
    at: u64,
    forwards: AtomicU64,
}

impl Faulty {
    /// Whether this forward is the one that fails.
    fn fires(&self) -> bool {
        self.forwards.fetch_add(1, Ordering::SeqCst) + 1 == self.at
    }
    fn spoil(&self, out: RResult<ForwardOutput, RString>) -> RResult<ForwardOutput, RString> {
        let RResult::ROk(mut o) = out else { return out };
        match self.fault.as_str() {
            "short_logits" => {
                o.logits.pop();
            }
            "wrong_vocab" => o.n_vocab += 1,
            _ => {}
        }
        RResult::ROk(o)
    }
}

impl BackendFfi for Faulty {
    fn capabilities(&self) -> RResult<BackendCaps, RString> {
        match self.fault.as_str() {
            "capabilities" => guard(|| panic!("capabilities exploded")),
            "not_invariant" => self.inner.capabilities().map(|mut c| {
                c.batch_invariant = false;
                c
            }),
            _ => self.inner.capabilities(),
        }
    }
    fn set_threads(&mut self, n: u32) -> RResult<(), RString> {
        self.inner.set_threads(n)
    }
    fn load_model(&mut self, req: &LoadRequest) -> RResult<ModelDesc, RString> {
        self.inner.load_model(req)
    }
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> RResult<u32, RString> {
        self.inner.create_slot(model, n_ctx)
    }
    fn free_slot(&mut self, slot: u32) -> RResult<(), RString> {
        self.inner.free_slot(slot)
    }
    fn slot_len(&self, slot: u32) -> RResult<u32, RString> {
        self.inner.slot_len(slot)
    }
    fn truncate(&mut self, slot: u32, len: u32) -> RResult<(), RString> {
        self.inner.truncate(slot, len)
    }
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> RResult<(), RString> {
        self.inner.copy_prefix(src, dst, len)
    }
    fn keep_entries(&mut self, slot: u32, start: u32, keep: RSlice<'_, u32>) -> RResult<(), RString> {
        self.inner.keep_entries(slot, start, keep)
    }
    fn forward(&mut self, b: &ForwardBatch) -> RResult<ForwardOutput, RString> {
        if !self.fires() {
            return self.inner.forward(b);
        }
        match self.fault.as_str() {
            "panic" => guard(|| panic!("injected panic in forward")),
            "error" => RResult::RErr("injected forward error".into()),
            _ => {
                let out = self.inner.forward(b);
                self.spoil(out)
            }
        }
    }
    fn stats_json(&self) -> RResult<RString, RString> {
        self.inner.stats_json()
    }
}

extern "C" fn info() -> PluginInfo {
    PluginInfo {
        name: "faulty".into(),
        kind: PluginKind::Backend,
        interface_version: INTERFACE_VERSION,
        version: "0.0.1".into(),
        description: "the CPU backend with one injected fault".into(),
    }
}

extern "C" fn create(options: RStr<'_>) -> RResult<BackendBox, RString> {
    guard(|| {
        let mut v: serde_json::Value = if options.trim().is_empty() { serde_json::json!({}) } else { serde_json::from_str(options.as_str()).map_err(|e| e.to_string())? };
        let o = v.as_object_mut().ok_or("options must be a table")?;
        let fault = o.remove("fault").and_then(|f| f.as_str().map(str::to_string)).unwrap_or_default();
        let at = o.remove("at").and_then(|a| a.as_u64()).unwrap_or(1);
        let lib = o.remove("inner").and_then(|f| f.as_str().map(str::to_string)).ok_or("option 'inner' (the wrapped backend library) is required")?;
        let inner = load_backend_library(std::path::Path::new(&lib), &v.to_string())?;
        Ok(BackendFfi_TO::from_value(Faulty { inner, fault, at, forwards: AtomicU64::new(0) }, TD_Opaque))
    })
}

#[export_root_module]
pub fn get_library() -> BackendModRef {
    BackendMod { info, create }.leak_into_prefix()
}
