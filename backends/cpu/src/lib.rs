//! The CPU compute backend, built as a `cdylib` plugin exporting a `BackendModRef` root
//! module. [`CpuBackend`] is the native implementation; the plugin hands the host
//! it inside the interface kit's panic-guarded adapter (`GuardedBackend`).

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod attn_x86;
pub mod forward;
#[cfg(test)]
mod isa_forward_tests;
pub mod kv;
pub mod model;
pub mod ops;
pub mod pool;
pub mod qgemm;
#[cfg(any(target_arch = "aarch64", test))]
pub mod qgemm_neon;
#[cfg(all(test, not(target_arch = "aarch64")))]
mod neon_emu;
pub mod repack;
pub mod simd;
#[doc(hidden)]
pub mod testdata;
pub mod topology;
#[cfg(target_arch = "x86_64")]
pub mod unpack_x86;

use std::collections::HashMap;
use std::sync::Arc;

use abi_stable::std_types::{RString, RVec};
use coordgen_interface::{BackendCaps, BackendImpl, ModelDesc};
use coordgen_model::quant::GgmlType;

use forward::Batch;
use kv::Slot;
use kv::KvType;
use model::CpuModel;
use qgemm::ActBits;
use pool::ThreadPool;
use simd::Isa;

/// Widest batch accepted in one forward.
pub const MAX_WIDTH: u32 = 4096;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {
    threads: Option<u32>,
    /// Activation precision of the integer kernels: 8 (default, llama.cpp's precision:
    /// perplexity within 0.35% of the float reference on the test models) or 15 (matches the
    /// float reference, at twice the integer work).
    activation_bits: Option<u32>,
    /// Element type of the KV cache: "f32" (default) or "f16" (half the bytes attention
    /// reads per token over a long context).
    kv_type: Option<String>,
    /// Caps the memory the backend allocates (repacked weights and KV slots), in MiB.
    /// Without it, each allocation is checked against the memory available at the time.
    memory_budget_mb: Option<u64>,
    /// Runs only forwards of these widths, like an NPU's precompiled graphs, and lists them
    /// in the capabilities (the host then pads every batch to one of them). For testing
    /// the host's static-width path on the CPU; the results are those of any width.
    widths: Option<Vec<u32>>,
}

pub struct CpuBackend {
    pool: ThreadPool,
    isa: Isa,
    act_bits: ActBits,
    kv_type: KvType,
    /// Cap on what the backend allocates, in bytes (`memory_budget_mb`).
    memory_budget: Option<u64>,
    /// The only forward widths accepted (empty: any up to [`MAX_WIDTH`]), ascending.
    widths: Vec<u32>,
    models: HashMap<u64, Arc<CpuModel>>,
    slots: HashMap<u32, Slot>,
    next_model: u64,
    next_slot: u32,
}

/// Threads to use by default: one per physical core the process may run on
/// ([`topology::default_threads`]).
pub fn default_threads() -> usize {
    topology::default_threads()
}

impl CpuBackend {
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 { default_threads() } else { threads };
        CpuBackend {
            pool: ThreadPool::new(threads),
            isa: simd::detect(),
            act_bits: ActBits::Eight,
            kv_type: KvType::F32,
            memory_budget: None,
            widths: Vec::new(),
            models: HashMap::new(),
            slots: HashMap::new(),
            next_model: 1,
            next_slot: 1,
        }
    }

    pub fn from_options_json(json: &str) -> Result<Self, String> {
        let opts: Options = if json.trim().is_empty() {
            Options::default()
        } else {
            serde_json::from_str(json).map_err(|e| format!("cpu backend options: {e}"))?
        };
        let mut b = Self::new(opts.threads.unwrap_or(0) as usize);
        b.act_bits = match opts.activation_bits {
            Some(15) => ActBits::Fifteen,
            None | Some(8) => ActBits::Eight,
            Some(other) => return Err(format!("cpu backend options: activation_bits must be 15 or 8, not {other}")),
        };
        b.memory_budget = opts.memory_budget_mb.map(|m| m.saturating_mul(1 << 20));
        if let Some(mut w) = opts.widths {
            w.sort_unstable();
            w.dedup();
            if w.is_empty() || w[0] == 0 || w[w.len() - 1] > MAX_WIDTH {
                return Err(format!("cpu backend options: widths must list widths from 1 to {MAX_WIDTH}, not {w:?}"));
            }
            b.widths = w;
        }
        if let Some(t) = &opts.kv_type {
            b.kv_type = KvType::parse(t).map_err(|e| format!("cpu backend options: {e}"))?;
        }
        Ok(b)
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Bytes this backend holds beyond the mapped files: repacked weights and KV slots.
    fn used_bytes(&self) -> u64 {
        self.models.values().map(|m| m.extra_bytes).sum::<u64>() + self.slots.values().map(|s| s.bytes() as u64).sum::<u64>()
    }

    fn model(&self, id: u64) -> Result<&Arc<CpuModel>, String> {
        self.models.get(&id).ok_or_else(|| format!("no model with handle {id}"))
    }

    /// Refuses a width the `widths` option does not list.
    fn check_width(&self, w: usize) -> Result<(), String> {
        if !self.widths.is_empty() && !self.widths.contains(&(w as u32)) {
            return Err(format!("a forward of {w} tokens, but this backend runs only the widths {:?} (option `widths`)", self.widths));
        }
        Ok(())
    }

    fn slot(&mut self, id: u32) -> Result<&mut Slot, String> {
        self.slots.get_mut(&id).ok_or_else(|| format!("no KV slot {id}"))
    }
}

/// The plugin object: the backend behind the interface kit's guarded adapter.
impl BackendImpl for CpuBackend {
    fn capabilities(&self) -> BackendCaps {
        BackendCaps {
            weight_types: GgmlType::ALL.iter().map(|t| RString::from(t.name())).collect(),
            kv_types: RVec::from(vec![RString::from(self.kv_type.name())]),
            widths: RVec::from(self.widths.clone()),
            max_width: MAX_WIDTH,
            max_context: 0,
            batch_invariant: true,
            threads: self.pool.threads() as u32,
        }
    }

    fn set_threads(&mut self, n: u32) -> Result<(), String> {
        let n = if n == 0 { default_threads() } else { n as usize };
        if n != self.pool.threads() {
            self.pool = ThreadPool::new(n);
        }
        Ok(())
    }

    fn load_model(&mut self, path: &str) -> Result<ModelDesc, String> {
        // The kernels' repacked copies of the weights take about the file's tensor bytes.
        let file = coordgen_model::ModelFile::open(path).map_err(|e| e.to_string())?;
        coordgen_interface::checks::check_fits(&format!("loading {path}"), file.weight_bytes(), self.used_bytes(), self.memory_budget)?;
        let m = CpuModel::from_file(file, self.isa, self.pool.threads())?;
        let id = self.next_model;
        self.next_model += 1;
        let desc = ModelDesc {
            handle: id,
            arch: m.hp.arch.name().into(),
            n_vocab: m.hp.n_vocab as u32,
            n_layer: m.hp.n_layer as u32,
            n_embd: m.hp.n_embd as u32,
            n_ctx_train: m.hp.n_ctx_train as u32,
            weight_bytes: m.weight_bytes,
            extra_bytes: m.extra_bytes,
        };
        self.models.insert(id, Arc::new(m));
        Ok(desc)
    }

    fn create_slot(&mut self, model: u64, n_ctx: u32) -> Result<u32, String> {
        if n_ctx == 0 {
            return Err("a KV slot needs at least one entry".into());
        }
        let m = self.model(model)?.clone();
        let need = Slot::planned_bytes(&m, n_ctx as usize, self.kv_type);
        coordgen_interface::checks::check_fits(&format!("a KV cache of {n_ctx} entries"), need, self.used_bytes(), self.memory_budget)
            .map_err(|e| format!("{e}; lower --ctx-size"))?;
        let id = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(id, Slot::new(model, &m, n_ctx as usize, self.kv_type));
        Ok(id)
    }

    fn free_slot(&mut self, id: u32) -> Result<(), String> {
        self.slots.remove(&id).map(|_| ()).ok_or_else(|| format!("no KV slot {id}"))
    }

    fn slot_len(&self, id: u32) -> Result<u32, String> {
        self.slots.get(&id).map(|s| s.len() as u32).ok_or_else(|| format!("no KV slot {id}"))
    }

    fn truncate(&mut self, id: u32, len: u32) -> Result<(), String> {
        let s = self.slot(id)?;
        s.truncate(len as usize).map_err(|e| format!("slot {id}: {e}"))
    }

    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> Result<(), String> {
        if src == dst {
            return Err("copy_prefix: source and destination are the same slot".into());
        }
        let s = self.slots.remove(&src).ok_or_else(|| format!("no KV slot {src}"))?;
        let r = (|| {
            let d = self.slots.get_mut(&dst).ok_or_else(|| format!("no KV slot {dst}"))?;
            d.copy_prefix_from(&s, len as usize)
        })();
        self.slots.insert(src, s);
        r
    }

    fn keep_entries(&mut self, id: u32, start: u32, keep: &[u32]) -> Result<(), String> {
        self.slot(id)?.keep_entries(start as usize, keep)
    }

    fn forward(&mut self, slot: u32, batch: &Batch<'_>) -> Result<Vec<f32>, String> {
        if batch.tokens.len() > MAX_WIDTH as usize {
            return Err(format!("batch of {} tokens exceeds the maximum width {MAX_WIDTH}", batch.tokens.len()));
        }
        self.check_width(batch.tokens.len())?;
        let s = self.slots.get_mut(&slot).ok_or_else(|| format!("no KV slot {slot}"))?;
        let m = self.models.get(&s.model()).ok_or_else(|| format!("slot {slot} refers to an unloaded model"))?;
        forward::forward(&self.pool, self.isa, self.act_bits, m, s, batch)
    }

    /// One forward over several distinct slots of one model (see `BackendFfi::forward_slots`).
    fn forward_slots(&mut self, ids: &[u32], batches: &[Batch<'_>]) -> Result<Vec<Vec<f32>>, String> {
        let total: usize = batches.iter().map(|b| b.tokens.len()).sum();
        if total > MAX_WIDTH as usize {
            return Err(format!("batches of {total} tokens in all exceed the maximum width {MAX_WIDTH}"));
        }
        for b in batches {
            self.check_width(b.tokens.len())?;
        }
        // The slots leave the map for the call, so each is borrowed once; all go back after.
        let mut taken: Vec<(u32, Slot)> = Vec::with_capacity(ids.len());
        let mut missing = None;
        for &id in ids {
            match self.slots.remove(&id) {
                Some(s) => taken.push((id, s)),
                None => {
                    missing = Some(id);
                    break;
                }
            }
        }
        let r = (|| {
            if let Some(id) = missing {
                return Err(if ids.iter().filter(|&&x| x == id).count() > 1 {
                    format!("KV slot {id} appears twice in one forward")
                } else {
                    format!("no KV slot {id}")
                });
            }
            let model = taken.first().map(|(_, s)| s.model()).ok_or("a forward over no slots")?;
            if taken.iter().any(|(_, s)| s.model() != model) {
                return Err("one forward over slots of different models".to_string());
            }
            let m = self.models.get(&model).ok_or_else(|| format!("slot {} refers to an unloaded model", ids[0]))?;
            let mut refs: Vec<&mut Slot> = taken.iter_mut().map(|(_, s)| s).collect();
            forward::forward_slots(&self.pool, self.isa, self.act_bits, m, &mut refs, batches)
        })();
        for (id, s) in taken {
            self.slots.insert(id, s);
        }
        r
    }

    fn n_vocab_of_slot(&self, slot: u32) -> Result<usize, String> {
        let s = self.slots.get(&slot).ok_or_else(|| format!("no KV slot {slot}"))?;
        Ok(self.model(s.model())?.hp.n_vocab)
    }

    fn stats_json(&self) -> String {
        serde_json::json!({
            "isa": self.isa.name(),
            "activation_bits": if self.act_bits == ActBits::Eight { 8 } else { 15 },
            "kv_type": self.kv_type.name(),
            "threads": self.pool.threads(),
            "models": self.models.len(),
            "kv_bytes_reserved": self.slots.values().map(|s| s.bytes()).sum::<usize>(),
        })
        .to_string()
    }
}

coordgen_interface::export_backend!("cpu", "CPU backend: GGUF/safetensors llama, qwen2, qwen3; GGUF gemma3; scalar/AVX2/AVX-512/NEON", CpuBackend::from_options_json);

