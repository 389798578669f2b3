//! A backend plugin whose entry points panic (inside `guard`), to test that a panic in a
//! plugin reaches the host as an error instead of aborting the process.

use abi_stable::export_root_module;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice, RStr, RString, RVec};
use coordgen_interface::*;

struct Panicky;

impl BackendFfi for Panicky {
    fn capabilities(&self) -> RResult<BackendCaps, RString> {
        RResult::ROk(BackendCaps {
            weight_types: RVec::new(),
            kv_types: RVec::new(),
            widths: RVec::new(),
            max_width: 1,
            max_context: 1,
            batch_invariant: false,
            threads: 1,
        })
    }
    fn set_threads(&mut self, _: u32) -> RResult<(), RString> {
        guard(|| Ok(()))
    }
    fn load_model(&mut self, req: &LoadRequest) -> RResult<ModelDesc, RString> {
        guard(|| panic!("cannot load {}", req.path))
    }
    fn create_slot(&mut self, _: u64, _: u32) -> RResult<u32, RString> {
        guard(|| Ok(1))
    }
    fn free_slot(&mut self, _: u32) -> RResult<(), RString> {
        guard(|| Ok(()))
    }
    fn slot_len(&self, _: u32) -> RResult<u32, RString> {
        guard(|| Ok(0))
    }
    fn truncate(&mut self, _: u32, _: u32) -> RResult<(), RString> {
        guard(|| Ok(()))
    }
    fn copy_prefix(&mut self, _: u32, _: u32, _: u32) -> RResult<(), RString> {
        guard(|| Ok(()))
    }
    fn keep_entries(&mut self, _: u32, _: u32, _: RSlice<'_, u32>) -> RResult<(), RString> {
        guard(|| Ok(()))
    }
    fn forward(&mut self, _: &ForwardBatch) -> RResult<ForwardOutput, RString> {
        guard(|| {
            let v: Vec<u32> = Vec::new();
            // An out-of-bounds index: a genuine bug-style panic.
            let i = v.len() + 3;
            Ok(ForwardOutput { n_vocab: v[i], logits: RVec::new() })
        })
    }
    fn stats_json(&self) -> RResult<RString, RString> {
        guard(|| panic!("no stats today"))
    }
}

extern "C" fn info() -> PluginInfo {
    PluginInfo {
        name: "panicky".into(),
        kind: PluginKind::Backend,
        interface_version: INTERFACE_VERSION,
        version: "0.0.1".into(),
        description: "panics in load_model and forward".into(),
    }
}

extern "C" fn create(_: RStr<'_>) -> RResult<BackendBox, RString> {
    guard(|| Ok(BackendFfi_TO::from_value(Panicky, TD_Opaque)))
}

#[export_root_module]
pub fn get_library() -> BackendModRef {
    BackendMod { info, create }.leak_into_prefix()
}
