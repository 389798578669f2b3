//! Hugging Face model directories: `config.json` plus one or more `*.safetensors` shards
//! (with `model.safetensors.index.json` when sharded). Tensors are memory-mapped and
//! exposed under GGUF tensor names so the rest of the runtime sees one naming scheme.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::quant::GgmlType;
use crate::{ModelError, Result};

pub struct StTensor {
    pub shard: usize,
    pub start: usize,
    pub end: usize,
    pub ty: GgmlType,
    /// ggml order (reversed from the safetensors shape).
    pub dims: Vec<u64>,
}

pub struct SafetensorsDir {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    shards: Vec<Mmap>,
    /// Keyed by GGUF-style name.
    pub tensors: HashMap<String, StTensor>,
}

/// Maps a Hugging Face tensor name to the GGUF name; `None` for tensors we do not use.
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    let direct = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{idx}.{mapped}"))
}

impl SafetensorsDir {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| ModelError::Io(format!("cannot read {}: {e}", cfg_path.display())))?;
        let config: serde_json::Value = serde_json::from_str(&cfg_text)
            .map_err(|e| ModelError::Corrupt(format!("{} is not valid JSON: {e}", cfg_path.display())))?;

        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<String> = if index_path.exists() {
            let idx: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&index_path).map_err(|e| ModelError::Io(format!("cannot read {}: {e}", index_path.display())))?,
            )
            .map_err(|e| ModelError::Corrupt(format!("{} is not valid JSON: {e}", index_path.display())))?;
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Corrupt(format!("{} has no weight_map", index_path.display())))?;
            let mut v: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            v.sort();
            v.dedup();
            v
        } else {
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .map_err(|e| ModelError::Io(format!("cannot list {}: {e}", dir.display())))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(ModelError::Io(format!("{} holds no .safetensors files", dir.display())));
        }
        files.retain(|f| !f.contains('/') && !f.contains(".."));

        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (si, f) in files.iter().enumerate() {
            let p = dir.join(f);
            let file = File::open(&p).map_err(|e| ModelError::Io(format!("cannot open {}: {e}", p.display())))?;
            // SAFETY: read-only map of a file we do not modify.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io(format!("cannot map {}: {e}", p.display())))?;
            {
                let st = SafeTensors::deserialize(&mmap)
                    .map_err(|e| ModelError::Corrupt(format!("{} is not a valid safetensors file: {e}", p.display())))?;
                let base = mmap.as_ptr() as usize;
                for (name, view) in st.tensors() {
                    let Some(gname) = hf_to_gguf_name(&name) else { continue };
                    let ty = match view.dtype() {
                        Dtype::F32 => GgmlType::F32,
                        Dtype::F16 => GgmlType::F16,
                        Dtype::BF16 => GgmlType::BF16,
                        other => {
                            return Err(ModelError::Unsupported(format!(
                                "tensor {name} in {} has dtype {other:?} (supported: F32, F16, BF16)",
                                p.display()
                            )))
                        }
                    };
                    let start = view.data().as_ptr() as usize - base;
                    let end = start + view.data().len();
                    let dims: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
                    tensors.insert(gname, StTensor { shard: si, start, end, ty, dims });
                }
            }
            shards.push(mmap);
        }
        Ok(SafetensorsDir { dir, config, shards, tensors })
    }

    pub fn data(&self, t: &StTensor) -> &[u8] {
        &self.shards[t.shard][t.start..t.end]
    }
}
