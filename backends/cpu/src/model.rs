//! A loaded model: hyper-parameters plus borrowed views of every weight in the memory-mapped
//! file (small norm and bias vectors are dequantized to f32 at load). Where the CPU runs the
//! fused packed kernels, quantized projection matrices (all but Q5_K) are repacked at load into a copy
//! of the same size (see [`crate::repack`]); the copies are reported as extra memory.

use coordgen_model::quant::GgmlType;
use coordgen_model::{Arch, HParams, ModelFile, TensorRef};

use crate::simd::Isa;

/// A weight matrix of `rows x cols` in its file type, borrowed from the map.
pub struct Matrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    ptr: *const u8,
    len: usize,
    /// The rows in the packed layout of [`crate::repack`], when repacked at load.
    packed: Option<Vec<u8>>,
}

// SAFETY: the bytes live in a read-only memory map owned by `CpuModel::file`, which outlives
// every `Matrix` (both are fields of `CpuModel`, and the map never moves).
unsafe impl Send for Matrix {}
unsafe impl Sync for Matrix {}

impl Matrix {
    fn from_tensor(t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<Self, String> {
        if t.dims.len() != 2 || t.dims[0] as usize != cols || t.dims[1] as usize != rows {
            return Err(format!("tensor {} has shape {:?}, expected [{cols}, {rows}]", t.name, t.dims));
        }
        Ok(Matrix { ty: t.ty, rows, cols, ptr: t.data.as_ptr(), len: t.data.len(), packed: None })
    }
    /// The rows' bytes: packed ones when [`Matrix::is_packed`], else the file's.
    pub fn data(&self) -> &[u8] {
        match &self.packed {
            Some(p) => p,
            // SAFETY: see the `Send`/`Sync` impls.
            None => unsafe { std::slice::from_raw_parts(self.ptr, self.len) },
        }
    }
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }
    /// Repacks the rows when the type has a packed layout and the CPU its kernels; returns
    /// the bytes of the copy (0 when left on the map).
    fn repack(&mut self, isa: Isa, threads: usize) -> usize {
        if self.packed.is_some() || !crate::repack::supported(self.ty) || !crate::qgemm::packed_kernels(isa) {
            return 0;
        }
        let p = crate::repack::repack_matrix(isa, self.ty, self.data(), self.rows, self.cols, threads);
        let n = p.len();
        self.packed = Some(p);
        n
    }
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }
    pub fn bytes(&self) -> usize {
        self.len
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    /// Gemma's norms of the attention and feed-forward outputs before each residual add.
    pub post_attn_norm: Option<Vec<f32>>,
    pub post_ffn_norm: Option<Vec<f32>>,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
}

pub struct CpuModel {
    pub hp: HParams,
    pub tok_embd: Matrix,
    pub layers: Vec<Layer>,
    pub out_norm: Vec<f32>,
    pub output: Matrix,
    /// Inverse frequencies of the rotary embedding, `head_dim / 2`: of the global layers,
    /// and of the sliding-window layers (the same where the model has one base).
    pub rope_inv_freq: Vec<f32>,
    pub rope_inv_freq_swa: Vec<f32>,
    pub weight_bytes: u64,
    /// Bytes of repacked copies of weights (memory beyond the mapped file).
    pub extra_bytes: u64,
    // Keeps the map alive; declared last so the views above drop first.
    _file: ModelFile,
}

fn vector(f: &ModelFile, name: &str, len: usize) -> Result<Vec<f32>, String> {
    let t = f.require(name).map_err(|e| e.to_string())?;
    if t.n_elements() != len {
        return Err(format!("tensor {name} has {} elements, expected {len}", t.n_elements()));
    }
    Ok(t.to_f32())
}

fn opt_vector(f: &ModelFile, name: &str, len: usize) -> Result<Option<Vec<f32>>, String> {
    if f.tensor(name).is_some() {
        vector(f, name, len).map(Some)
    } else {
        Ok(None)
    }
}

fn matrix(f: &ModelFile, name: &str, rows: usize, cols: usize) -> Result<Matrix, String> {
    let t = f.require(name).map_err(|e| e.to_string())?;
    Matrix::from_tensor(&t, rows, cols)
}

/// Gemma requires both post norms; other architectures have none.
fn post_norm(f: &ModelFile, hp: &HParams, name: &str) -> Result<Option<Vec<f32>>, String> {
    if hp.arch == Arch::Gemma3 {
        vector(f, name, hp.n_embd).map(Some)
    } else {
        Ok(None)
    }
}

/// RoPE inverse frequencies for `theta`, divided by the file's per-frequency factors (llama
/// 3.1) and by a linear position scale (gemma's global layers).
pub fn inv_freq(hp: &HParams, theta: f32, linear: f32) -> Vec<f32> {
    let hd = hp.head_dim;
    (0..hd / 2)
        .map(|i| {
            let f = 1.0 / (theta as f64).powf(2.0 * i as f64 / hd as f64);
            let factor = hp.rope_freq_factors.as_ref().and_then(|v| v.get(i)).copied().unwrap_or(1.0) as f64;
            (f / factor / linear as f64) as f32
        })
        .collect()
}

impl CpuModel {
    /// Loads the model, repacking matrices for `isa`'s kernels with `threads` threads.
    pub fn load(path: &str, isa: Isa, threads: usize) -> Result<Self, String> {
        Self::from_file(ModelFile::open(path).map_err(|e| e.to_string())?, isa, threads)
    }

    /// As [`CpuModel::load`], for a file already opened.
    pub fn from_file(file: ModelFile, isa: Isa, threads: usize) -> Result<Self, String> {
        let hp = file.hparams().map_err(|e| e.to_string())?;
        let (e, hd) = (hp.n_embd, hp.head_dim);
        let q_dim = hp.n_head * hd;
        let kv_dim = hp.n_head_kv * hd;
        let tok_embd = matrix(&file, "token_embd.weight", hp.n_vocab, e)?;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let (q_norm, k_norm) = if matches!(hp.arch, Arch::Qwen3 | Arch::Gemma3) {
                (Some(vector(&file, &n("attn_q_norm.weight"), hd)?), Some(vector(&file, &n("attn_k_norm.weight"), hd)?))
            } else {
                (opt_vector(&file, &n("attn_q_norm.weight"), hd)?, opt_vector(&file, &n("attn_k_norm.weight"), hd)?)
            };
            layers.push(Layer {
                attn_norm: vector(&file, &n("attn_norm.weight"), e)?,
                wq: matrix(&file, &n("attn_q.weight"), q_dim, e)?,
                wk: matrix(&file, &n("attn_k.weight"), kv_dim, e)?,
                wv: matrix(&file, &n("attn_v.weight"), kv_dim, e)?,
                bq: opt_vector(&file, &n("attn_q.bias"), q_dim)?,
                bk: opt_vector(&file, &n("attn_k.bias"), kv_dim)?,
                bv: opt_vector(&file, &n("attn_v.bias"), kv_dim)?,
                q_norm,
                k_norm,
                wo: matrix(&file, &n("attn_output.weight"), e, q_dim)?,
                ffn_norm: vector(&file, &n("ffn_norm.weight"), e)?,
                post_attn_norm: post_norm(&file, &hp, &n("post_attention_norm.weight"))?,
                post_ffn_norm: post_norm(&file, &hp, &n("post_ffw_norm.weight"))?,
                w_gate: matrix(&file, &n("ffn_gate.weight"), hp.n_ff, e)?,
                w_up: matrix(&file, &n("ffn_up.weight"), hp.n_ff, e)?,
                w_down: matrix(&file, &n("ffn_down.weight"), e, hp.n_ff)?,
            });
        }
        if hp.arch == Arch::Qwen2 && layers.iter().any(|l| l.bq.is_none()) {
            return Err("qwen2 model is missing the attention QKV biases".into());
        }
        let out_norm = vector(&file, "output_norm.weight", e)?;
        // Tied embeddings: no output matrix means the embedding table doubles as it.
        let output = if file.tensor("output.weight").is_some() {
            matrix(&file, "output.weight", hp.n_vocab, e)?
        } else {
            matrix(&file, "token_embd.weight", hp.n_vocab, e)?
        };
        let rope_inv_freq = inv_freq(&hp, hp.rope_theta, hp.extras.rope_linear_factor);
        let rope_inv_freq_swa = inv_freq(&hp, hp.extras.rope_theta_swa.unwrap_or(hp.rope_theta), 1.0);
        let mut output = output;
        let mut layers = layers;
        let mut weight_bytes = output.bytes() as u64;
        // Repacked copies replace the mapped bytes, whose pages are then dropped (unless the
        // tensor is also the embedding table, which reads the file's rows).
        let repack = |m: &mut Matrix, file: &ModelFile, keep_map: bool| {
            let n = m.repack(isa, threads) as u64;
            if n > 0 && !keep_map {
                // SAFETY: `ptr`/`len` view the live map (see the `Send`/`Sync` impls).
                file.release(unsafe { std::slice::from_raw_parts(m.ptr, m.len) });
            }
            n
        };
        let tied = output.ptr == tok_embd.ptr;
        let mut extra_bytes = repack(&mut output, &file, tied);
        for l in &mut layers {
            for m in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
                weight_bytes += m.bytes() as u64;
                extra_bytes += repack(m, &file, false);
            }
        }
        Ok(CpuModel { hp, tok_embd, layers, out_norm, output, rope_inv_freq, rope_inv_freq_swa, weight_bytes, extra_bytes, _file: file })
    }

    pub fn kv_dim(&self) -> usize {
        self.hp.n_head_kv * self.hp.head_dim
    }
}
