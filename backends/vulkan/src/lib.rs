//! The Vulkan compute backend, built as a `cdylib` plugin exporting a [`BackendModRef`] root
//! module: weights and KV cache in device memory, the forward as GLSL compute shaders.
//!
//! Why this stack: raw Vulkan through `ash` (the loader opened at run time) with GLSL compiled
//! to SPIR-V at build time by Debian's `glslc`. Vulkan is the one GPU API every phone and
//! laptop vendor ships (Adreno, Mali, Xclipse, Intel, AMD, NVIDIA); raw Vulkan, unlike `wgpu`,
//! exposes subgroup arithmetic, 16-bit types and integer dot products as the device reports
//! them, and GLSL lets one source compile into per-type and per-feature variants that the
//! plugin picks at run time (SPIR-V for Vulkan 1.1, so the plugin runs on any 1.1+ device;
//! nothing depends on the build machine's GPU). llama.cpp's and MLC's Vulkan paths made the
//! same choice.
//!
//! Batch invariance holds by construction: every output value is computed by one fixed
//! sequence of operations whatever the batch's width, tree or chunking (see the shaders'
//! headers), so greedy speculative decoding on this backend equals its plain decoding.

pub mod forward;
pub mod gpu;
pub mod model;
pub mod shaders;

use std::collections::HashMap;
use std::sync::Arc;

use abi_stable::std_types::{RString, RVec};
use coordgen_interface::{BackendCaps, BackendImpl, ModelDesc};
use coordgen_model::quant::GgmlType;

use forward::{Batch, Slot, Work, MAX_WIDTH};
use gpu::Ctx;
use model::GpuModel;
use shaders::{MatmulVariant, Shaders};

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {
    /// Index of the Vulkan device (as `coordgen plugins` / vulkaninfo list them).
    device: Option<usize>,
    /// Caps the device memory the backend allocates, in MiB (default: the device-local heap).
    memory_budget_mb: Option<u64>,
    /// Matrix shader layout: "auto" (default), "row", "subgroup" or "shared".
    matmul: Option<String>,
    /// KV cache element type: only "f16" on this backend.
    kv_type: Option<String>,
    /// Accepted for symmetry with the CPU backend's options; the GPU does not use it.
    threads: Option<u32>,
}

pub struct VulkanBackend {
    // Declared first so they drop before the context.
    slots: HashMap<u32, Slot>,
    work: HashMap<u64, Work>,
    models: HashMap<u64, GpuModel>,
    shaders: Shaders,
    ctx: Arc<Ctx>,
    next_model: u64,
    next_slot: u32,
}

impl VulkanBackend {
    pub fn from_options_json(json: &str) -> Result<Self, String> {
        let opts: Options = if json.trim().is_empty() { Options::default() } else { serde_json::from_str(json).map_err(|e| format!("vulkan backend options: {e}"))? };
        if let Some(t) = &opts.kv_type {
            if t != "f16" {
                return Err(format!("vulkan backend options: kv_type {t:?} is not supported; this backend keeps its KV cache in \"f16\""));
            }
        }
        let _ = opts.threads;
        let budget = opts.memory_budget_mb.unwrap_or(0) << 20;
        let ctx = Ctx::new(opts.device, budget)?;
        let variant = MatmulVariant::choose(opts.matmul.as_deref(), &ctx)?;
        let shaders = Shaders::new(&ctx, variant)?;
        Ok(VulkanBackend { slots: HashMap::new(), work: HashMap::new(), models: HashMap::new(), shaders, ctx, next_model: 1, next_slot: 1 })
    }

    pub fn device_name(&self) -> &str {
        &self.ctx.info.name
    }

    fn slot(&mut self, id: u32) -> Result<&mut Slot, String> {
        self.slots.get_mut(&id).ok_or_else(|| format!("no KV slot {id}"))
    }
}

/// The plugin object: the backend behind the interface kit's guarded adapter.
impl BackendImpl for VulkanBackend {
    fn capabilities(&self) -> BackendCaps {
        BackendCaps {
            weight_types: GgmlType::ALL.iter().map(|t| RString::from(t.name())).collect(),
            kv_types: RVec::from(vec![RString::from("f16")]),
            widths: RVec::new(),
            max_width: MAX_WIDTH as u32,
            max_context: 0,
            batch_invariant: true,
            threads: 1,
        }
    }

    fn load_model(&mut self, path: &str) -> Result<ModelDesc, String> {
        let m = GpuModel::load(&self.ctx, path)?;
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
            extra_bytes: m.device_bytes,
        };
        self.models.insert(id, m);
        self.work.insert(id, Work::default());
        Ok(desc)
    }

    fn create_slot(&mut self, model: u64, n_ctx: u32) -> Result<u32, String> {
        if n_ctx == 0 {
            return Err("a KV slot needs at least one entry".into());
        }
        let m = self.models.get(&model).ok_or_else(|| format!("no model with handle {model}"))?;
        let s = Slot::new(&self.ctx, model, m, n_ctx as usize)?;
        let id = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(id, s);
        Ok(id)
    }

    fn free_slot(&mut self, id: u32) -> Result<(), String> {
        self.slots.remove(&id).map(|_| ()).ok_or_else(|| format!("no KV slot {id}"))
    }

    fn slot_len(&self, id: u32) -> Result<u32, String> {
        self.slots.get(&id).map(|s| s.len as u32).ok_or_else(|| format!("no KV slot {id}"))
    }

    fn truncate(&mut self, id: u32, len: u32) -> Result<(), String> {
        let s = self.slot(id)?;
        if len as usize > s.len {
            return Err(format!("cannot truncate slot {id} of length {} to {len}", s.len));
        }
        s.len = len as usize;
        Ok(())
    }

    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> Result<(), String> {
        if src == dst {
            return Err("copy_prefix: source and destination are the same slot".into());
        }
        let s = self.slots.remove(&src).ok_or_else(|| format!("no KV slot {src}"))?;
        let r = (|| {
            let d = self.slots.get_mut(&dst).ok_or_else(|| format!("no KV slot {dst}"))?;
            let len = len as usize;
            coordgen_interface::checks::check_copy_prefix(s.model, d.model, len, s.len, d.n_ctx)?;
            let kv = self.models[&s.model].kv_dim();
            forward::copy_prefix(&self.ctx, &s, d, kv, len)
        })();
        self.slots.insert(src, s);
        r
    }

    fn keep_entries(&mut self, id: u32, start: u32, keep: &[u32]) -> Result<(), String> {
        let s = self.slots.get_mut(&id).ok_or_else(|| format!("no KV slot {id}"))?;
        let kv = self.models.get(&s.model).ok_or("slot refers to an unloaded model")?.kv_dim();
        forward::keep_entries(&self.ctx, s, kv, start as usize, keep)
    }

    fn forward(&mut self, slot: u32, batch: &Batch<'_>) -> Result<Vec<f32>, String> {
        let s = self.slots.get_mut(&slot).ok_or_else(|| format!("no KV slot {slot}"))?;
        let m = self.models.get_mut(&s.model).ok_or_else(|| format!("slot {slot} refers to an unloaded model"))?;
        let work = self.work.entry(s.model).or_default();
        forward::forward(&self.ctx, &self.shaders, m, s, work, batch)
    }

    fn n_vocab_of_slot(&self, slot: u32) -> Result<usize, String> {
        let s = self.slots.get(&slot).ok_or_else(|| format!("no KV slot {slot}"))?;
        Ok(self.models.get(&s.model).ok_or("slot refers to an unloaded model")?.hp.n_vocab)
    }

    fn stats_json(&self) -> String {
        let i = &self.ctx.info;
        serde_json::json!({
            "device": i.name,
            "device_type": i.kind,
            "vulkan": i.api,
            "subgroup_size": i.subgroup_size,
            "subgroup_arithmetic": i.subgroup_arith,
            "matmul": self.shaders.variant.name(),
            "shader_float16": i.float16,
            "int8_dot_product": i.int8_dot,
            "kv_type": "f16",
            "models": self.models.len(),
            "device_bytes": self.ctx.used_bytes(),
            "kv_bytes_reserved": self.slots.values().map(Slot::bytes).sum::<u64>(),
            "work_bytes": self.work.values().map(Work::bytes).sum::<u64>(),
            "memory_budget_bytes": self.ctx.budget,
        })
        .to_string()
    }
}

coordgen_interface::export_backend!("vulkan", "Vulkan GPU backend: GGUF/safetensors llama, qwen2, qwen3; weights and f16 KV cache in device memory", VulkanBackend::from_options_json);
