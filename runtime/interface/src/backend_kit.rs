//! Helpers for writing a backend plugin in plain Rust: implement [`BackendImpl`] (plain
//! slices and `Result<_, String>`), wrap it in [`GuardedBackend`], and every FFI entry point
//! runs inside [`guard`], so errors and panics reach the host as errors. Both backends of
//! this repository use it; the FFI conversions live here once.

use abi_stable::std_types::{RResult, RSlice, RString, RVec};

use crate::{guard, BackendCaps, BackendFfi, ForwardBatch, ForwardOutput, LoadRequest, ModelDesc};

/// One forward's inputs as plain slices (see [`ForwardBatch`] for their meaning).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    /// `W x W` row-major, empty = causal.
    pub mask: &'a [u8],
    pub logit_rows: &'a [u32],
}

impl<'a> Batch<'a> {
    pub fn of(b: &'a ForwardBatch) -> Batch<'a> {
        Batch { tokens: &b.tokens, positions: &b.positions, mask: &b.mask, logit_rows: &b.logit_rows }
    }
}

/// The plain-Rust side of a backend plugin; the methods mean what [`BackendFfi`]'s do.
pub trait BackendImpl: Send + 'static {
    fn capabilities(&self) -> BackendCaps;
    /// Backends without a thread count of their own (a GPU) keep the default.
    fn set_threads(&mut self, _n: u32) -> Result<(), String> {
        Ok(())
    }
    fn load_model(&mut self, path: &str) -> Result<ModelDesc, String>;
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> Result<u32, String>;
    fn free_slot(&mut self, slot: u32) -> Result<(), String>;
    fn slot_len(&self, slot: u32) -> Result<u32, String>;
    fn truncate(&mut self, slot: u32, len: u32) -> Result<(), String>;
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> Result<(), String>;
    fn keep_entries(&mut self, slot: u32, start: u32, keep: &[u32]) -> Result<(), String>;
    /// The output vocabulary of the model a slot belongs to (the logits' row length).
    fn n_vocab_of_slot(&self, slot: u32) -> Result<usize, String>;
    /// Returns `logit_rows.len() x n_vocab` logits.
    fn forward(&mut self, slot: u32, batch: &Batch<'_>) -> Result<Vec<f32>, String>;
    /// Batch `i` on `slots[i]`; the default runs them one after another.
    fn forward_slots(&mut self, slots: &[u32], batches: &[Batch<'_>]) -> Result<Vec<Vec<f32>>, String> {
        slots.iter().zip(batches).map(|(&s, b)| self.forward(s, b)).collect()
    }
    fn stats_json(&self) -> String;
}

/// Wraps a [`BackendImpl`] as the FFI trait object, guarding every call.
pub struct GuardedBackend<T>(pub T);

impl<T: BackendImpl> BackendFfi for GuardedBackend<T> {
    fn capabilities(&self) -> RResult<BackendCaps, RString> {
        guard(|| Ok(self.0.capabilities()))
    }
    fn set_threads(&mut self, n: u32) -> RResult<(), RString> {
        guard(|| self.0.set_threads(n))
    }
    fn load_model(&mut self, req: &LoadRequest) -> RResult<ModelDesc, RString> {
        guard(|| self.0.load_model(req.path.as_str()))
    }
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> RResult<u32, RString> {
        guard(|| self.0.create_slot(model, n_ctx))
    }
    fn free_slot(&mut self, slot: u32) -> RResult<(), RString> {
        guard(|| self.0.free_slot(slot))
    }
    fn slot_len(&self, slot: u32) -> RResult<u32, RString> {
        guard(|| self.0.slot_len(slot))
    }
    fn truncate(&mut self, slot: u32, len: u32) -> RResult<(), RString> {
        guard(|| self.0.truncate(slot, len))
    }
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> RResult<(), RString> {
        guard(|| self.0.copy_prefix(src, dst, len))
    }
    fn keep_entries(&mut self, slot: u32, start: u32, keep: RSlice<'_, u32>) -> RResult<(), RString> {
        guard(|| self.0.keep_entries(slot, start, keep.as_slice()))
    }
    fn forward(&mut self, b: &ForwardBatch) -> RResult<ForwardOutput, RString> {
        guard(|| {
            let n_vocab = self.0.n_vocab_of_slot(b.slot)?;
            let logits = self.0.forward(b.slot, &Batch::of(b))?;
            Ok(ForwardOutput { n_vocab: n_vocab as u32, logits: RVec::from(logits) })
        })
    }
    fn stats_json(&self) -> RResult<RString, RString> {
        guard(|| Ok(RString::from(self.0.stats_json())))
    }
    fn forward_slots(&mut self, bs: RSlice<'_, ForwardBatch>) -> RResult<RVec<ForwardOutput>, RString> {
        guard(|| {
            let ids: Vec<u32> = bs.iter().map(|b| b.slot).collect();
            let n_vocab = ids.iter().map(|&id| self.0.n_vocab_of_slot(id)).collect::<Result<Vec<_>, _>>()?;
            let batches: Vec<Batch<'_>> = bs.iter().map(Batch::of).collect();
            let outs = self.0.forward_slots(&ids, &batches)?;
            if outs.len() != ids.len() {
                return Err(format!("forward_slots computed {} outputs for {} batches", outs.len(), ids.len()));
            }
            Ok(outs.into_iter().zip(n_vocab).map(|(l, v)| ForwardOutput { n_vocab: v as u32, logits: RVec::from(l) }).collect())
        })
    }
}

/// Exports a backend plugin's root module: `export_backend!("name", "description",
/// create_fn)` where `create_fn(&str) -> Result<impl BackendImpl, String>` builds the backend
/// from its options JSON; the object is wrapped in [`GuardedBackend`].
#[macro_export]
macro_rules! export_backend {
    ($name:expr, $description:expr, $create:path) => {
        extern "C" fn __coordgen_info() -> $crate::PluginInfo {
            $crate::PluginInfo {
                name: $name.into(),
                kind: $crate::PluginKind::Backend,
                interface_version: $crate::INTERFACE_VERSION,
                version: env!("CARGO_PKG_VERSION").into(),
                description: $description.into(),
            }
        }

        extern "C" fn __coordgen_create(
            options: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<$crate::BackendBox, $crate::abi_stable::std_types::RString> {
            $crate::guard(|| {
                let b = $create(options.as_str())?;
                Ok($crate::BackendFfi_TO::from_value($crate::GuardedBackend(b), $crate::abi_stable::sabi_trait::TD_Opaque))
            })
        }

        /// The plugin's root module.
        #[$crate::abi_stable::export_root_module]
        pub fn get_library() -> $crate::BackendModRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::BackendMod { info: __coordgen_info, create: __coordgen_create }.leak_into_prefix()
        }
    };
}
