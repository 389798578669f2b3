//! A model resident in device memory: every weight matrix uploaded with its file bytes
//! unchanged (the shaders dequantize them), split into chunks of whole rows so no binding
//! exceeds the device's storage-buffer range or workgroup count; norm and bias vectors as
//! f32; the rotary cos/sin table, grown on demand with the CPU backend's formula.

use std::sync::Arc;

use coordgen_model::quant::GgmlType;
use coordgen_model::{Arch, HParams, ModelFile, TensorRef};

use crate::gpu::{Buffer, Ctx, Mem};

pub struct Chunk {
    pub buf: Buffer,
    pub row0: u32,
    pub rows: u32,
}

pub struct Matrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub chunks: Vec<Chunk>,
}

impl Matrix {
    fn upload(ctx: &Arc<Ctx>, t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<Matrix, String> {
        if t.dims.len() != 2 || t.dims[0] as usize != cols || t.dims[1] as usize != rows {
            return Err(format!("tensor {} has shape {:?}, expected [{cols}, {rows}]", t.name, t.dims));
        }
        if cols % 32 != 0 {
            return Err(format!("vulkan: tensor {} has rows of {cols} values; the Vulkan shaders need a multiple of 32 (use target_backend = \"cpu\")", t.name));
        }
        let row_bytes = t.ty.row_bytes(cols);
        if t.data.len() < rows * row_bytes {
            return Err(format!("tensor {} is truncated", t.name));
        }
        let by_range = (ctx.info.max_range as usize / row_bytes).max(1);
        let per = by_range.min(ctx.info.max_groups[0] as usize).min(rows.max(1));
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = per.min(rows - r0);
            let bytes = &t.data[r0 * row_bytes..(r0 + n) * row_bytes];
            // 16 bytes of padding: the shaders read a block's bytes as whole words (bytes16).
            let buf = Buffer::new(ctx, bytes.len() as u64 + 16, Mem::Device, &format!("tensor {}", t.name))?;
            buf.write(0, bytes)?;
            chunks.push(Chunk { buf, row0: r0 as u32, rows: n as u32 });
            r0 += n;
        }
        Ok(Matrix { ty: t.ty, rows, cols, row_bytes, chunks })
    }

    pub fn bytes(&self) -> u64 {
        (self.rows * self.row_bytes) as u64
    }
}

pub struct Layer {
    pub attn_norm: Buffer,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub bq: Option<Buffer>,
    pub bk: Option<Buffer>,
    pub bv: Option<Buffer>,
    pub q_norm: Option<Buffer>,
    pub k_norm: Option<Buffer>,
    pub wo: Matrix,
    pub ffn_norm: Buffer,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
}

pub struct GpuModel {
    pub hp: HParams,
    pub tok_embd: Matrix,
    pub layers: Vec<Layer>,
    pub out_norm: Buffer,
    /// `None`: tied to the embedding table.
    pub output: Option<Matrix>,
    pub rope_inv_freq: Vec<f32>,
    /// `(cos, sin)` of position x frequency for positions `0..rope_positions`.
    pub rope_table: Buffer,
    pub rope_positions: usize,
    pub weight_bytes: u64,
    pub device_bytes: u64,
}

pub fn f32_buffer(ctx: &Arc<Ctx>, v: &[f32], what: &str) -> Result<Buffer, String> {
    let b = Buffer::new(ctx, (v.len() * 4) as u64, Mem::Device, what)?;
    b.write(0, bytemuck(v))?;
    Ok(b)
}

pub fn bytemuck(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
}

fn vector(ctx: &Arc<Ctx>, f: &ModelFile, name: &str, len: usize) -> Result<Buffer, String> {
    let t = f.require(name).map_err(|e| e.to_string())?;
    if t.n_elements() != len {
        return Err(format!("tensor {name} has {} elements, expected {len}", t.n_elements()));
    }
    f32_buffer(ctx, &t.to_f32(), &format!("tensor {name}"))
}

fn opt_vector(ctx: &Arc<Ctx>, f: &ModelFile, name: &str, len: usize) -> Result<Option<Buffer>, String> {
    if f.tensor(name).is_some() {
        vector(ctx, f, name, len).map(Some)
    } else {
        Ok(None)
    }
}

fn matrix(ctx: &Arc<Ctx>, f: &ModelFile, name: &str, rows: usize, cols: usize) -> Result<Matrix, String> {
    let t = f.require(name).map_err(|e| e.to_string())?;
    Matrix::upload(ctx, &t, rows, cols)
}

/// Bytes the model's weights need on the device, from the file's tensor table alone, so a
/// model that cannot fit is refused before anything is uploaded.
fn needed_bytes(f: &ModelFile, hp: &HParams) -> u64 {
    let mut n = 0u64;
    let mut add = |name: String| {
        if let Some(t) = f.tensor(&name) {
            n += if t.ty == GgmlType::F32 || t.dims.len() == 1 { (t.n_elements() * 4) as u64 } else { t.data.len() as u64 };
        }
    };
    add("token_embd.weight".into());
    add("output.weight".into());
    add("output_norm.weight".into());
    for i in 0..hp.n_layer {
        for s in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"] {
            add(format!("blk.{i}.{s}.weight"));
        }
    }
    n
}

impl GpuModel {
    pub fn load(ctx: &Arc<Ctx>, path: &str) -> Result<GpuModel, String> {
        let file = ModelFile::open(path).map_err(|e| e.to_string())?;
        let hp = file.hparams().map_err(|e| e.to_string())?;
        let need = needed_bytes(&file, &hp);
        let free = ctx.budget.saturating_sub(ctx.used_bytes());
        if need > free {
            return Err(format!(
                "vulkan: too little device memory for {path}: its weights need {} MB, {} MB of the {} MB budget on {} are free; use a smaller model, raise memory_budget_mb, or use target_backend = \"cpu\"",
                need >> 20,
                free >> 20,
                ctx.budget >> 20,
                ctx.info.name
            ));
        }
        let before = ctx.used_bytes();
        let (e, hd) = (hp.n_embd, hp.head_dim);
        if hp.arch == Arch::Gemma3 {
            // Its scaled embeddings, GELU, post norms and sliding window have no shaders yet.
            return Err("vulkan: the gemma3 architecture is not supported on this backend yet; run it with target_backend = \"cpu\"".into());
        }
        if hd % 2 != 0 || hd > 512 {
            return Err(format!("vulkan: head dimension {hd} is not supported (even, at most 512)"));
        }
        let q_dim = hp.n_head * hd;
        let kv_dim = hp.n_head_kv * hd;
        let tok_embd = matrix(ctx, &file, "token_embd.weight", hp.n_vocab, e)?;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let (q_norm, k_norm) = if hp.arch == Arch::Qwen3 {
                (Some(vector(ctx, &file, &n("attn_q_norm.weight"), hd)?), Some(vector(ctx, &file, &n("attn_k_norm.weight"), hd)?))
            } else {
                (opt_vector(ctx, &file, &n("attn_q_norm.weight"), hd)?, opt_vector(ctx, &file, &n("attn_k_norm.weight"), hd)?)
            };
            layers.push(Layer {
                attn_norm: vector(ctx, &file, &n("attn_norm.weight"), e)?,
                wq: matrix(ctx, &file, &n("attn_q.weight"), q_dim, e)?,
                wk: matrix(ctx, &file, &n("attn_k.weight"), kv_dim, e)?,
                wv: matrix(ctx, &file, &n("attn_v.weight"), kv_dim, e)?,
                bq: opt_vector(ctx, &file, &n("attn_q.bias"), q_dim)?,
                bk: opt_vector(ctx, &file, &n("attn_k.bias"), kv_dim)?,
                bv: opt_vector(ctx, &file, &n("attn_v.bias"), kv_dim)?,
                q_norm,
                k_norm,
                wo: matrix(ctx, &file, &n("attn_output.weight"), e, q_dim)?,
                ffn_norm: vector(ctx, &file, &n("ffn_norm.weight"), e)?,
                w_gate: matrix(ctx, &file, &n("ffn_gate.weight"), hp.n_ff, e)?,
                w_up: matrix(ctx, &file, &n("ffn_up.weight"), hp.n_ff, e)?,
                w_down: matrix(ctx, &file, &n("ffn_down.weight"), e, hp.n_ff)?,
            });
        }
        if hp.arch == Arch::Qwen2 && layers.iter().any(|l| l.bq.is_none()) {
            return Err("qwen2 model is missing the attention QKV biases".into());
        }
        let out_norm = vector(ctx, &file, "output_norm.weight", e)?;
        let output = if file.tensor("output.weight").is_some() { Some(matrix(ctx, &file, "output.weight", hp.n_vocab, e)?) } else { None };
        // The CPU backend's frequencies, so both backends rotate by the same angles.
        let rope_inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let f = 1.0 / (hp.rope_theta as f64).powf(2.0 * i as f64 / hd as f64);
                let factor = hp.rope_freq_factors.as_ref().and_then(|v| v.get(i)).copied().unwrap_or(1.0) as f64;
                (f / factor) as f32
            })
            .collect();
        let mut weight_bytes = output.as_ref().unwrap_or(&tok_embd).bytes();
        for l in &layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                weight_bytes += m.bytes();
            }
        }
        let rope_table = Buffer::new(ctx, 16, Mem::Device, "the rotary table")?;
        let mut m = GpuModel { hp, tok_embd, layers, out_norm, output, rope_inv_freq, rope_table, rope_positions: 0, weight_bytes, device_bytes: 0 };
        m.ensure_rope(ctx, 4096.min(m.hp.n_ctx_train.max(1)))?;
        m.device_bytes = ctx.used_bytes() - before;
        Ok(m)
    }

    pub fn output(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.tok_embd)
    }

    pub fn kv_dim(&self) -> usize {
        self.hp.n_head_kv * self.hp.head_dim
    }

    /// Makes the rotary table cover positions `0..n`.
    pub fn ensure_rope(&mut self, ctx: &Arc<Ctx>, n: usize) -> Result<(), String> {
        if n <= self.rope_positions {
            return Ok(());
        }
        let n = n.next_power_of_two();
        let half = self.rope_inv_freq.len();
        let mut tab = Vec::with_capacity(n * half * 2);
        for pos in 0..n {
            for &f in &self.rope_inv_freq {
                let (s, c) = (pos as f32 * f).sin_cos();
                tab.push(c);
                tab.push(s);
            }
        }
        self.rope_table = f32_buffer(ctx, &tab, "the rotary table")?;
        self.rope_positions = n;
        Ok(())
    }
}
