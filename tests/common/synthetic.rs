//! Synthetic tiny models: random weights of any architecture, written as GGUF in any tensor
//! type or as a Hugging Face safetensors directory, and their tokenizer vocabulary.

use std::collections::BTreeMap;
use std::path::Path;

use coordgen_model::gguf::{GgufWriter, Value};
use coordgen_model::quant::{dequantize_row, quantize_row, GgmlType};

pub use coordgen_model::Arch;

#[derive(Clone, Debug)]
pub struct Spec {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub tied: bool,
    pub rope_theta: f64,
    pub eps: f64,
    /// Gemma 3: the sliding window and its layer pattern (every `swa_pattern`-th layer is
    /// global); unused by the other architectures.
    pub window: usize,
    pub swa_pattern: usize,
    /// Llama 3.1's RoPE scaling: factor, low_freq_factor, high_freq_factor,
    /// original_max_position_embeddings.
    pub llama3_rope: Option<[f64; 4]>,
}

impl Spec {
    /// RoPE inverse frequencies for base `theta`, with Llama 3.1's scaling when set (written
    /// as Hugging Face's rule states it: low frequencies divided by the factor, high ones
    /// kept, the band between interpolated).
    pub fn inv_freq(&self, theta: f64) -> Vec<f64> {
        let hd = self.head_dim;
        let base: Vec<f64> = (0..hd / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64)).collect();
        let Some([factor, low, high, orig]) = self.llama3_rope else { return base };
        let (low_wavelen, high_wavelen) = (orig / low, orig / high);
        base.iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen > low_wavelen {
                    f / factor
                } else if wavelen < high_wavelen {
                    f
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    /// Whether layer `l` attends over the sliding window (gemma3 only).
    pub fn is_swa(&self, l: usize) -> bool {
        self.arch == Arch::Gemma3 && self.window > 0 && !(l + 1).is_multiple_of(self.swa_pattern)
    }
}

impl Spec {
    /// Dimensions that are multiples of 256 so every quantized type applies.
    pub fn tiny(arch: Arch) -> Spec {
        Spec {
            arch,
            n_vocab: 320,
            n_embd: 256,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            // qwen3 decouples head_dim from n_embd / n_head.
            head_dim: if arch == Arch::Qwen3 { 128 } else { 64 },
            n_ff: 512,
            tied: matches!(arch, Arch::Llama | Arch::Gemma3),
            rope_theta: 50000.0,
            eps: 1e-5,
            // Shorter than the checks' token sequences, so the window hides keys; layer 0
            // windowed, layer 1 global.
            window: 4,
            swa_pattern: 2,
            llama3_rope: None,
        }
    }
}

/// Weights in Hugging Face layout: name -> (shape, row-major values).
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

pub struct Lcg(u64);
impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

pub fn random_weights(s: &Spec, seed: u64) -> Weights {
    let mut rng = Lcg::new(seed);
    let mut w = Weights::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let v = (0..n).map(|_| offset + scale * rng.next()).collect();
        w.insert(name, (shape, v));
    };
    let (e, q, kv) = (s.n_embd, s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
    add("model.embed_tokens.weight".into(), vec![s.n_vocab, e], 1.0, 0.0);
    for l in 0..s.n_layer {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        add(p("input_layernorm.weight"), vec![e], 0.2, 1.0);
        add(p("post_attention_layernorm.weight"), vec![e], 0.2, 1.0);
        if s.arch == Arch::Gemma3 {
            // Gemma's post_attention_layernorm norms the attention output; these two are
            // the feed-forward's input and output norms. Stored as multipliers (GGUF's
            // convention: the converter adds gemma's +1).
            add(p("pre_feedforward_layernorm.weight"), vec![e], 0.2, 1.0);
            add(p("post_feedforward_layernorm.weight"), vec![e], 0.2, 1.0);
        }
        add(p("self_attn.q_proj.weight"), vec![q, e], 0.15, 0.0);
        add(p("self_attn.k_proj.weight"), vec![kv, e], 0.15, 0.0);
        add(p("self_attn.v_proj.weight"), vec![kv, e], 0.15, 0.0);
        add(p("self_attn.o_proj.weight"), vec![e, q], 0.1, 0.0);
        add(p("mlp.gate_proj.weight"), vec![s.n_ff, e], 0.1, 0.0);
        add(p("mlp.up_proj.weight"), vec![s.n_ff, e], 0.1, 0.0);
        add(p("mlp.down_proj.weight"), vec![e, s.n_ff], 0.08, 0.0);
        if s.arch == Arch::Qwen2 {
            add(p("self_attn.q_proj.bias"), vec![q], 0.3, 0.0);
            add(p("self_attn.k_proj.bias"), vec![kv], 0.3, 0.0);
            add(p("self_attn.v_proj.bias"), vec![kv], 0.3, 0.0);
        }
        if matches!(s.arch, Arch::Qwen3 | Arch::Gemma3) {
            add(p("self_attn.q_norm.weight"), vec![s.head_dim], 0.2, 1.0);
            add(p("self_attn.k_norm.weight"), vec![s.head_dim], 0.2, 1.0);
        }
    }
    add("model.norm.weight".into(), vec![e], 0.2, 1.0);
    if !s.tied {
        add("lm_head.weight".into(), vec![s.n_vocab, e], 0.5, 0.0);
    }
    w
}

/// Replaces every matrix by its quantize-dequantize image in `ty` (what a GGUF of that type
/// holds), so the reference runs on exactly the weights the runtime sees.
pub fn as_stored(w: &Weights, ty: GgmlType) -> Weights {
    w.iter()
        .map(|(k, (shape, v))| {
            if shape.len() == 2 {
                let q = quantize_row(ty, v);
                let mut d = vec![0f32; v.len()];
                dequantize_row(ty, &q, &mut d);
                (k.clone(), (shape.clone(), d))
            } else {
                (k.clone(), (shape.clone(), v.clone()))
            }
        })
        .collect()
}

/// GPT-2's byte-to-character table.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// Vocabulary of the synthetic models: the 256 byte tokens, fillers, and an end token.
pub fn vocab(n: usize) -> (Vec<String>, Vec<i32>) {
    let mut toks: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    while toks.len() < n - 1 {
        toks.push(format!("<extra_{}>", toks.len()));
    }
    toks.push("<|end|>".into());
    let mut types = vec![1; n];
    types[n - 1] = 3;
    (toks, types)
}

fn gguf_name(arch: Arch, hf: &str) -> String {
    if arch == Arch::Gemma3 {
        // Gemma's four layer norms map to GGUF names of their own.
        for (from, to) in [
            ("post_attention_layernorm.weight", "post_attention_norm.weight"),
            ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
            ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
        ] {
            if let Some(l) = hf.strip_prefix("model.layers.").and_then(|r| r.strip_suffix(from)) {
                return format!("blk.{}{to}", l);
            }
        }
    }
    coordgen_model::safetensors_dir::hf_to_gguf_name(hf).expect("known tensor name")
}

/// llama.cpp's converter permutes llama Q/K rows so pairs are adjacent (rope "norm" mode).
fn permute_qk(v: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let mut out = vec![0f32; v.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let new = h * hd + 2 * i + j;
                let old = h * hd + j * (hd / 2) + i;
                out[new * cols..(new + 1) * cols].copy_from_slice(&v[old * cols..(old + 1) * cols]);
            }
        }
    }
    out
}

/// Writes the model as GGUF with every matrix in `ty` (vectors stay F32).
pub fn write_gguf(s: &Spec, w: &Weights, ty: GgmlType, path: &Path) {
    let a = s.arch.name();
    let mut g = GgufWriter::new();
    let (toks, types) = vocab(s.n_vocab);
    g.kv("general.architecture", Value::Str(a.into()))
        .kv(&format!("{a}.block_count"), Value::U32(s.n_layer as u32))
        .kv(&format!("{a}.context_length"), Value::U32(512))
        .kv(&format!("{a}.embedding_length"), Value::U32(s.n_embd as u32))
        .kv(&format!("{a}.feed_forward_length"), Value::U32(s.n_ff as u32))
        .kv(&format!("{a}.attention.head_count"), Value::U32(s.n_head as u32))
        .kv(&format!("{a}.attention.head_count_kv"), Value::U32(s.n_head_kv as u32))
        .kv(&format!("{a}.attention.key_length"), Value::U32(s.head_dim as u32))
        .kv(&format!("{a}.rope.freq_base"), Value::F32(s.rope_theta as f32))
        .kv(&format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(s.eps as f32))
        .kv(&format!("{a}.attention.sliding_window"), Value::U32(s.window as u32))
        .kv(&format!("{a}.attention.sliding_window_pattern"), Value::U32(s.swa_pattern as u32))
        .kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str("default".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(toks.into_iter().map(Value::Str).collect()))
        .kv("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
        .kv("tokenizer.ggml.merges", Value::Array(vec![]))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(s.n_vocab as u32 - 1))
        .kv(
            "tokenizer.chat_template",
            Value::Str("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into()),
        );
    if s.llama3_rope.is_some() {
        // GGUF stores the scaling as per-frequency divisors.
        let divisors: Vec<f32> = s.inv_freq(s.rope_theta).iter().zip(Spec { llama3_rope: None, ..s.clone() }.inv_freq(s.rope_theta)).map(|(f, b)| (b / f) as f32).collect();
        g.tensor("rope_freqs.weight", &[divisors.len() as u64], GgmlType::F32, quantize_row(GgmlType::F32, &divisors));
    }
    for (name, (shape, v)) in w {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let mut data = v.clone();
        if s.arch == Arch::Llama && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) {
            let heads = if name.ends_with("q_proj.weight") { s.n_head } else { s.n_head_kv };
            data = permute_qk(v, shape[0], shape[1], heads);
        }
        let t = if shape.len() == 2 { ty } else { GgmlType::F32 };
        g.tensor(&gguf_name(s.arch, name), &dims, t, quantize_row(t, &data));
    }
    g.write(path).unwrap();
}

/// Writes a Hugging Face directory (config, tokenizer, safetensors in `dtype`, split over
/// `shards` files with an index when more than one).
pub fn write_hf_dir(s: &Spec, w: &Weights, dtype: safetensors::Dtype, shards: usize, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = serde_json::json!({
        "model_type": s.arch.name(),
        "vocab_size": s.n_vocab,
        "hidden_size": s.n_embd,
        "num_hidden_layers": s.n_layer,
        "num_attention_heads": s.n_head,
        "num_key_value_heads": s.n_head_kv,
        "intermediate_size": s.n_ff,
        "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": 512,
        "tie_word_embeddings": s.tied,
        "eos_token_id": s.n_vocab - 1,
    });
    if s.arch == Arch::Qwen3 {
        cfg["head_dim"] = serde_json::json!(s.head_dim);
        // transformers 5 layout: rope settings nested under rope_parameters.
        cfg.as_object_mut().unwrap().remove("rope_theta");
        cfg["rope_parameters"] = serde_json::json!({"rope_theta": s.rope_theta, "rope_type": "default"});
    }
    if let Some([factor, low, high, orig]) = s.llama3_rope {
        cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": orig});
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    // tokenizer.json: the same byte-level vocabulary, via our GGUF tokenizer builder.
    let tmp = dir.join("tok.gguf");
    let mut g = GgufWriter::new();
    let (toks, types) = vocab(s.n_vocab);
    g.kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str("default".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(toks.into_iter().map(Value::Str).collect()))
        .kv("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
        .kv("tokenizer.ggml.merges", Value::Array(vec![]));
    g.write(&tmp).unwrap();
    let gf = coordgen_model::gguf::GgufFile::open(&tmp).unwrap();
    let tok = coordgen::tokenizer::from_gguf(&gf).unwrap();
    tok.inner.save(dir.join("tokenizer.json"), false).unwrap();
    drop(gf);
    std::fs::remove_file(&tmp).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "<|end|>", "chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"}).to_string(),
    )
    .unwrap();

    let names: Vec<&String> = w.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (si, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", si + 1, shards) };
        let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|n| {
                let (shape, v) = &w[*n];
                let bytes: Vec<u8> = match dtype {
                    safetensors::Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    safetensors::Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                    safetensors::Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                    _ => panic!("unsupported test dtype"),
                };
                weight_map.insert((*n).clone(), serde_json::json!(file));
                ((*n).clone(), shape.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
            .iter()
            .map(|(n, shape, b)| (n.clone(), safetensors::tensor::TensorView::new(dtype, shape.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string()).unwrap();
    }
}

/// Rounds weights through a safetensors dtype (what the directory stores).
pub fn round_to(w: &Weights, dtype: safetensors::Dtype) -> Weights {
    w.iter()
        .map(|(k, (s, v))| {
            let r = v
                .iter()
                .map(|x| match dtype {
                    safetensors::Dtype::F16 => half::f16::from_f32(*x).to_f32(),
                    safetensors::Dtype::BF16 => half::bf16::from_f32(*x).to_f32(),
                    _ => *x,
                })
                .collect();
            (k.clone(), (s.clone(), r))
        })
        .collect()
}
