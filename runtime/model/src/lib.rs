//! Model files and their meaning: GGUF and safetensors readers, ggml quantization formats,
//! and the hyper-parameters of the supported architectures (llama, qwen2, qwen3 from either
//! source; gemma3 from GGUF), read into one [`HParams`] and one tensor naming scheme (GGUF's).

pub mod gguf;
pub mod quant;
pub mod safetensors_dir;

use std::path::Path;

use gguf::GgufFile;
use quant::GgmlType;
use safetensors_dir::SafetensorsDir;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    /// Gemma 3 (text): scaled embeddings, GELU-tanh, norms after attention and feed-forward,
    /// QK norm, and interleaved sliding-window / global attention layers.
    Gemma3,
}

/// The feed-forward's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (llama, qwen).
    Silu,
    /// `gelu_tanh(gate) * up` (gemma).
    GeluTanh,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            "gemma3" => Ok(Arch::Gemma3),
            other => Err(ModelError::Unsupported(format!("architecture '{other}' (supported: llama, qwen2, qwen3, gemma3)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Hyper-parameters of a decoder-only transformer of a supported architecture.
#[derive(Clone, Debug)]
pub struct HParams {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Rotate halves (GPT-NeoX / HF layout) rather than adjacent pairs (GGUF llama layout,
    /// whose converter permutes the Q/K rows).
    pub rope_neox: bool,
    /// Per-frequency divisors (llama 3.1 long-context scaling), `head_dim / 2` of them.
    pub rope_freq_factors: Option<Vec<f32>>,
    pub n_ctx_train: usize,
    /// What gemma adds to the llama / qwen block (its defaults elsewhere).
    pub extras: Extras,
}

/// Architecture features beyond the llama / qwen decoder block; [`Extras::default`] is that
/// plain block.
#[derive(Clone, Debug)]
pub struct Extras {
    /// Factor on the token embeddings (gemma: `sqrt(n_embd)`; 1 elsewhere).
    pub embd_scale: f32,
    pub activation: Activation,
    /// Keys a sliding-window layer's query sees: those at positions `p - window + 1 ..= p`
    /// (0: no sliding-window layers).
    pub sliding_window: usize,
    /// Every `swa_pattern`-th layer is global, the others use the sliding window (0: no
    /// windowed layers). A number rather than a per-layer list: the file's layer count is
    /// only trusted after it has been checked against the tensors.
    pub swa_pattern: usize,
    /// RoPE base of the sliding-window layers (gemma: 10 000, beside the global 1 000 000;
    /// None: the global base).
    pub rope_theta_swa: Option<f32>,
    /// Linear RoPE scaling of the global layers (positions divided by it; 1 = none).
    pub rope_linear_factor: f32,
    /// `cap * tanh(logits / cap)` on the output logits when set.
    pub final_softcap: Option<f32>,
}

impl Default for Extras {
    fn default() -> Self {
        Extras { embd_scale: 1.0, activation: Activation::Silu, sliding_window: 0, swa_pattern: 0, rope_theta_swa: None, rope_linear_factor: 1.0, final_softcap: None }
    }
}

impl HParams {
    /// Whether layer `l` attends over a sliding window.
    pub fn is_swa(&self, l: usize) -> bool {
        let x = &self.extras;
        x.sliding_window > 0 && x.swa_pattern > 0 && !(l + 1).is_multiple_of(x.swa_pattern)
    }
}

/// A tensor borrowed from a model file.
pub struct TensorRef<'a> {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<u64>,
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// Dequantizes the whole tensor (used for small tensors: norms, biases).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n_elements()];
        quant::dequantize_row(self.ty, self.data, &mut out);
        out
    }
}

/// A model file of either format.
pub enum ModelFile {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
}

impl ModelFile {
    /// Opens a GGUF file or a Hugging Face directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            Ok(ModelFile::Safetensors(SafetensorsDir::open(path)?))
        } else if path.exists() {
            Ok(ModelFile::Gguf(GgufFile::open(path)?))
        } else {
            Err(ModelError::Io(format!("model path {} does not exist", path.display())))
        }
    }

    pub fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        match self {
            ModelFile::Gguf(g) => {
                let t = g.tensor(name)?;
                Some(TensorRef { name: name.to_string(), ty: t.ty, dims: t.dims.clone(), data: g.tensor_data(t) })
            }
            ModelFile::Safetensors(s) => {
                let t = s.tensors.get(name)?;
                Some(TensorRef { name: name.to_string(), ty: t.ty, dims: t.dims.clone(), data: s.data(t) })
            }
        }
    }

    pub fn require(&self, name: &str) -> Result<TensorRef<'_>> {
        self.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// The hyper-parameters, checked against the tensors they size (so no count read from
    /// the file can drive an allocation that the file's own tensors do not back).
    pub fn hparams(&self) -> Result<HParams> {
        let hp = match self {
            ModelFile::Gguf(g) => hparams_from_gguf(g)?,
            ModelFile::Safetensors(s) => hparams_from_config(&s.config, self)?,
        };
        self.check_shapes(&hp)?;
        Ok(hp)
    }

    fn dims(&self, name: &str) -> Option<Vec<u64>> {
        match self {
            ModelFile::Gguf(g) => g.tensor(name).map(|t| t.dims.clone()),
            ModelFile::Safetensors(s) => s.tensors.get(name).map(|t| t.dims.clone()),
        }
    }

    fn n_tensors(&self) -> usize {
        match self {
            ModelFile::Gguf(g) => g.tensors.len(),
            ModelFile::Safetensors(s) => s.tensors.len(),
        }
    }

    /// Layer count, widths and vocabulary must match the first and last layers' tensors.
    fn check_shapes(&self, hp: &HParams) -> Result<()> {
        let bad = |what: String| Err(ModelError::Config(format!("the model's metadata does not match its tensors: {what}")));
        // Every layer has at least its attention norm, so more layers than tensors is corrupt.
        if hp.n_layer > self.n_tensors() {
            return bad(format!("{} layers but only {} tensors", hp.n_layer, self.n_tensors()));
        }
        let last = format!("blk.{}.attn_norm.weight", hp.n_layer - 1);
        if self.dims(&last).is_none() {
            return bad(format!("{} layers, but tensor {last} is missing", hp.n_layer));
        }
        let want = |name: &str, dims: [u64; 2]| -> Result<()> {
            match self.dims(name) {
                Some(d) if d.len() == 2 && d[..] == dims[..] => Ok(()),
                Some(d) => bad(format!("tensor {name} has dims {d:?}, the metadata implies {dims:?}")),
                None => Err(ModelError::MissingTensor(name.to_string())),
            }
        };
        let (e, q, kv, ff) = (hp.n_embd as u64, (hp.n_head as u64).saturating_mul(hp.head_dim as u64), (hp.n_head_kv as u64).saturating_mul(hp.head_dim as u64), hp.n_ff as u64);
        want("token_embd.weight", [e, hp.n_vocab as u64])?;
        want("blk.0.attn_q.weight", [e, q])?;
        want("blk.0.attn_k.weight", [e, kv])?;
        want("blk.0.ffn_up.weight", [e, ff])?;
        Ok(())
    }

    /// Drops this process's mapped pages under `data` (a tensor of this file) once the
    /// caller keeps its own copy, so resident memory does not hold both. Best effort: the
    /// map is read-only, so a later read of those bytes just faults them in again.
    pub fn release(&self, data: &[u8]) {
        if let ModelFile::Gguf(g) = self {
            g.release(data)
        }
    }

    /// Total bytes of all tensors (weights read per forward, roughly).
    pub fn weight_bytes(&self) -> u64 {
        match self {
            ModelFile::Gguf(g) => g.tensors.iter().map(|t| t.size).sum(),
            ModelFile::Safetensors(s) => s.tensors.values().map(|t| (t.end - t.start) as u64).sum(),
        }
    }
}

fn hparams_from_gguf(g: &GgufFile) -> Result<HParams> {
    let arch_s = g.get_str("general.architecture").ok_or_else(|| ModelError::Config("GGUF has no general.architecture".into()))?;
    let arch = Arch::parse(arch_s)?;
    let key = |k: &str| format!("{arch_s}.{k}");
    let req = |k: &str| -> Result<usize> {
        g.get_u64(&key(k)).map(|v| v as usize).ok_or_else(|| ModelError::Config(format!("GGUF metadata {} is missing", key(k))))
    };
    let n_embd = req("embedding_length")?;
    let n_head = req("attention.head_count")?;
    if n_head == 0 || n_embd == 0 {
        return Err(ModelError::Config("GGUF has zero heads or zero embedding length".into()));
    }
    let n_head_kv = g.get_u64(&key("attention.head_count_kv")).map(|v| v as usize).unwrap_or(n_head);
    let head_dim = g.get_u64(&key("attention.key_length")).map(|v| v as usize).unwrap_or(n_embd / n_head);
    let tok = g.tensor("token_embd.weight").ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    let n_vocab = tok.dims.get(1).copied().unwrap_or(0) as usize;
    let rope_freq_factors = g.tensor("rope_freqs.weight").map(|t| {
        let mut v = vec![0f32; t.n_elements() as usize];
        quant::dequantize_row(t.ty, g.tensor_data(t), &mut v);
        v
    });
    let n_layer = req("block_count")?;
    let rope_theta = g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32;
    let mut hp = HParams {
        arch,
        n_vocab,
        n_embd,
        n_layer,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: req("feed_forward_length")?,
        rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6) as f32,
        rope_theta,
        rope_neox: arch != Arch::Llama,
        rope_freq_factors,
        n_ctx_train: g.get_u64(&key("context_length")).unwrap_or(2048) as usize,
        extras: Extras::default(),
    };
    if arch == Arch::Gemma3 {
        gemma3_from_gguf(g, &mut hp)?;
    }
    validate(&hp)?;
    Ok(hp)
}

fn hparams_from_config(c: &serde_json::Value, f: &ModelFile) -> Result<HParams> {
    let model_type = c.get("model_type").and_then(|v| v.as_str()).ok_or_else(|| ModelError::Config("config.json has no model_type".into()))?;
    let arch = Arch::parse(model_type)?;
    let req = |k: &str| -> Result<usize> {
        c.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| ModelError::Config(format!("config.json: {k} is missing or not a number")))
    };
    let n_embd = req("hidden_size")?;
    let n_head = req("num_attention_heads")?;
    if n_head == 0 {
        return Err(ModelError::Config("config.json: num_attention_heads is 0".into()));
    }
    let head_dim = c.get("head_dim").and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(n_embd / n_head);
    // transformers 5 nests rope settings in `rope_parameters`; older configs use
    // `rope_theta` and `rope_scaling` at the top level.
    let rope_params = c.get("rope_parameters").filter(|v| v.is_object());
    let rope_theta = c
        .get("rope_theta")
        .or_else(|| rope_params.and_then(|r| r.get("rope_theta")))
        .and_then(|v| v.as_f64())
        .unwrap_or(10000.0) as f32;
    let scaling = c.get("rope_scaling").filter(|v| !v.is_null()).or(rope_params);
    let rope_freq_factors = match scaling {
        None => None,
        Some(rs) => {
            let ty = rs.get("rope_type").or_else(|| rs.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
            match ty {
                "default" => None,
                "llama3" => Some(llama3_freq_factors(rs, head_dim, rope_theta)?),
                other => return Err(ModelError::Unsupported(format!("config.json: rope scaling type '{other}' (supported: default, llama3)"))),
            }
        }
    };
    let _ = f;
    if arch == Arch::Gemma3 {
        // Gemma's Hugging Face files name and offset their norms differently (weights
        // stored as `w - 1`); only the GGUF conversion is read so far.
        return Err(ModelError::Unsupported("gemma3 from a safetensors directory (convert it to GGUF, or use a GGUF file)".into()));
    }
    let n_layer = req("num_hidden_layers")?;
    let hp = HParams {
        arch,
        n_vocab: req("vocab_size")?,
        n_embd,
        n_layer,
        n_head,
        n_head_kv: c.get("num_key_value_heads").and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(n_head),
        head_dim,
        n_ff: req("intermediate_size")?,
        rms_eps: c.get("rms_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-6) as f32,
        rope_theta,
        rope_neox: true,
        rope_freq_factors,
        n_ctx_train: c.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(2048) as usize,
        extras: Extras::default(),
    };
    validate(&hp)?;
    Ok(hp)
}

/// Gemma 3's extras: embeddings scaled by `sqrt(n_embd)`, GELU-tanh, and a sliding window
/// on all layers but every `pattern`-th (llama.cpp's converter writes the window, not the
/// pattern; Gemma 3 uses 6, with a RoPE base of 10 000 on the window layers).
fn gemma3_from_gguf(g: &GgufFile, hp: &mut HParams) -> Result<()> {
    let key = |k: &str| format!("gemma3.{k}");
    hp.extras.embd_scale = (hp.n_embd as f32).sqrt();
    hp.extras.activation = Activation::GeluTanh;
    hp.extras.sliding_window = g.get_u64(&key("attention.sliding_window")).unwrap_or(0) as usize;
    let pattern = g.get_u64(&key("attention.sliding_window_pattern")).unwrap_or(6) as usize;
    if pattern == 0 {
        return Err(ModelError::Config("gemma3.attention.sliding_window_pattern is 0".into()));
    }
    hp.extras.swa_pattern = pattern;
    hp.extras.rope_theta_swa = Some(10000.0);
    match g.get_str(&key("rope.scaling.type")) {
        None | Some("none") => {}
        Some("linear") => hp.extras.rope_linear_factor = g.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0) as f32,
        Some(other) => return Err(ModelError::Unsupported(format!("gemma3 rope scaling '{other}' (supported: linear)"))),
    }
    if !(hp.extras.rope_linear_factor.is_finite() && hp.extras.rope_linear_factor >= 1.0) {
        return Err(ModelError::Config(format!("gemma3 rope scaling factor {} (must be at least 1)", hp.extras.rope_linear_factor)));
    }
    hp.extras.final_softcap = g.get_f64(&key("final_logit_softcapping")).map(|v| v as f32).filter(|v| *v > 0.0);
    if g.get_f64(&key("attn_logit_softcapping")).is_some_and(|v| v > 0.0) {
        return Err(ModelError::Unsupported("gemma3 attention logit soft-capping".into()));
    }
    Ok(())
}

/// The llama 3.1 rope scaling rule expressed as per-frequency divisors (as GGUF stores them).
fn llama3_freq_factors(rs: &serde_json::Value, head_dim: usize, theta: f32) -> Result<Vec<f32>> {
    let g = |k: &str| rs.get(k).and_then(|v| v.as_f64()).ok_or_else(|| ModelError::Config(format!("rope_scaling.{k} missing")));
    let factor = g("factor")?;
    let low = g("low_freq_factor")?;
    let high = g("high_freq_factor")?;
    let orig = g("original_max_position_embeddings")?;
    let low_wavelen = orig / low;
    let high_wavelen = orig / high;
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect())
}

fn validate(hp: &HParams) -> Result<()> {
    if hp.n_head_kv == 0 || hp.n_head % hp.n_head_kv != 0 {
        return Err(ModelError::Config(format!("{} heads cannot be grouped over {} KV heads", hp.n_head, hp.n_head_kv)));
    }
    if hp.head_dim % 2 != 0 || hp.n_layer == 0 || hp.n_vocab == 0 {
        return Err(ModelError::Config(format!("implausible hyper-parameters: {hp:?}")));
    }
    Ok(())
}
