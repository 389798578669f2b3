//! Test helpers: synthetic tiny models of every architecture written as GGUF (any tensor
//! type) and as Hugging Face safetensors directories, a naive f64 reference forward that
//! follows the Hugging Face conventions, and loading the CPU backend through its plugin.

pub mod http;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use coordgen::config::PluginsConfig;
use coordgen::engine::Session;
use coordgen::plugins::Forward;
use coordgen::plugins::{self, Backend};
use coordgen_model::gguf::{GgufWriter, Value};
use serde_json::Value as Json;
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
            tied: arch == Arch::Llama,
            rope_theta: 50000.0,
            eps: 1e-5,
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
        if s.arch == Arch::Qwen3 {
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

fn gguf_name(hf: &str) -> String {
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
    for (name, (shape, v)) in w {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let mut data = v.clone();
        if s.arch == Arch::Llama && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) {
            let heads = if name.ends_with("q_proj.weight") { s.n_head } else { s.n_head_kv };
            data = permute_qk(v, shape[0], shape[1], heads);
        }
        let t = if shape.len() == 2 { ty } else { GgmlType::F32 };
        g.tensor(&gguf_name(name), &dims, t, quantize_row(t, &data));
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

fn rms(x: &[f64], g: &[f32], eps: f64) -> Vec<f64> {
    let ss = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ss + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * s * *g as f64).collect()
}

fn matvec(w: &(Vec<usize>, Vec<f32>), x: &[f64]) -> Vec<f64> {
    let (rows, cols) = (w.0[0], w.0[1]);
    (0..rows).map(|r| (0..cols).map(|c| w.1[r * cols + c] as f64 * x[c]).sum()).collect()
}

/// Naive f64 forward with Hugging Face conventions (rotate-half rope, causal attention):
/// logits of every position of `tokens`.
pub fn reference_logits(s: &Spec, w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let g = |n: &str| &w[n];
    let (e, hd) = (s.n_embd, s.head_dim);
    let half = hd / 2;
    let inv: Vec<f64> = (0..half).map(|i| 1.0 / s.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
    let rope = |v: &mut [f64], pos: usize| {
        for h in v.chunks_mut(hd) {
            for i in 0..half {
                let (sn, cs) = (pos as f64 * inv[i]).sin_cos();
                let (a, b) = (h[i], h[i + half]);
                h[i] = a * cs - b * sn;
                h[i + half] = a * sn + b * cs;
            }
        }
    };
    let emb = g("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| emb.1[t as usize * e..(t as usize + 1) * e].iter().map(|&v| v as f64).collect()).collect();
    let group = s.n_head / s.n_head_kv;
    for l in 0..s.n_layer {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, &g(&p("input_layernorm.weight")).1, s.eps);
            let mut q = matvec(g(&p("self_attn.q_proj.weight")), &h);
            let mut k = matvec(g(&p("self_attn.k_proj.weight")), &h);
            let mut v = matvec(g(&p("self_attn.v_proj.weight")), &h);
            if s.arch == Arch::Qwen2 {
                for (buf, b) in [(&mut q, "q"), (&mut k, "k"), (&mut v, "v")] {
                    let bias = &g(&p(&format!("self_attn.{b}_proj.bias"))).1;
                    buf.iter_mut().zip(bias).for_each(|(a, b)| *a += *b as f64);
                }
            }
            if s.arch == Arch::Qwen3 {
                let qn = &g(&p("self_attn.q_norm.weight")).1;
                let kn = &g(&p("self_attn.k_norm.weight")).1;
                q = q.chunks(hd).flat_map(|c| rms(c, qn, s.eps)).collect();
                k = k.chunks(hd).flat_map(|c| rms(c, kn, s.eps)).collect();
            }
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (t, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; s.n_head * hd];
            for h in 0..s.n_head {
                let kvh = h / group;
                let q = &qs[t][h * hd..(h + 1) * hd];
                let sc: Vec<f64> = (0..=t).map(|j| q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()).collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                let sum: f64 = ex.iter().sum();
                for j in 0..=t {
                    for d in 0..hd {
                        att[h * hd + d] += ex[j] / sum * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(g(&p("self_attn.o_proj.weight")), &att);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms(x, &g(&p("post_attention_layernorm.weight")).1, s.eps);
            let gt = matvec(g(&p("mlp.gate_proj.weight")), &h);
            let up = matvec(g(&p("mlp.up_proj.weight")), &h);
            let act: Vec<f64> = gt.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let d = matvec(g(&p("mlp.down_proj.weight")), &act);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    let out = if s.tied { g("model.embed_tokens.weight") } else { g("lm_head.weight") };
    xs.iter().map(|x| matvec(out, &rms(x, &g("model.norm.weight").1, s.eps))).collect()
}

/// Token ids of the synthetic-model checks (a 320-token vocabulary).
pub const TOKENS: [u32; 9] = [17, 200, 3, 45, 45, 310, 99, 0, 256];

/// Logits of every position of `tokens` from the backend (one causal forward), and n_vocab.
pub fn backend_logits(b: &mut Box<dyn Backend>, path: &Path, tokens: &[u32]) -> (Vec<Vec<f32>>, usize) {
    let m = b.load_model(path).unwrap();
    let slot = b.create_slot(m.handle, 64).unwrap();
    let pos: Vec<u32> = (0..tokens.len() as u32).collect();
    let rows = pos.clone();
    let out = b.forward(&Forward { slot, tokens, positions: &pos, mask: &[], logit_rows: &rows }).unwrap();
    b.free_slot(slot).unwrap();
    b.unload_model(m.handle).unwrap();
    (out.chunks(m.n_vocab).map(|c| c.to_vec()).collect(), m.n_vocab)
}

/// Asserts the largest logit error relative to each row's largest reference logit is
/// below `tol`, and returns that error.
pub fn assert_close(name: &str, ours: &[Vec<f32>], reference: &[Vec<f64>], tol: f64) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let mut worst = 0f64;
    for (o, r) in ours.iter().zip(reference) {
        assert_eq!(o.len(), r.len(), "{name}: vocab size");
        let scale = r.iter().fold(0f64, |m, v| m.max(v.abs())).max(1.0);
        for (a, b) in o.iter().zip(r) {
            worst = worst.max((*a as f64 - b).abs() / scale);
        }
    }
    assert!(worst < tol, "{name}: max relative logit error {worst:.2e} >= {tol:.0e}");
    worst
}

/// The directory holding the built plugin libraries (target/<profile>).
pub fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    deps.parent().unwrap().to_path_buf()
}

/// A `[[plugin]]` entry for `lib<lib>.so` built in this workspace; `options` (TOML lines,
/// may be empty) go under its `[plugin.options]`.
pub fn plugin_entry(name: &str, kind: &str, lib: &str, options: &str) -> String {
    let mut e = format!("[[plugin]]\nname = \"{name}\"\nkind = \"{kind}\"\nlibrary = \"{}/lib{lib}.so\"\n", plugin_dir().display());
    if !options.is_empty() {
        e += &format!("[plugin.options]\n{options}\n");
    }
    e
}

/// The CPU backend's entry with `threads` threads.
pub fn cpu_entry(threads: u32) -> String {
    plugin_entry("cpu", "backend", "coordgen_backend_cpu", &format!("threads = {threads}"))
}

/// Writes `text` as `dir/plugins.toml` and loads it, as a user's file would be.
pub fn write_config(dir: &Path, text: &str) -> PluginsConfig {
    let p = dir.join("plugins.toml");
    std::fs::write(&p, text).unwrap();
    PluginsConfig::load(Some(&p)).unwrap()
}

/// Loads the CPU backend through its cdylib plugin, as the binary does.
pub fn cpu_backend(threads: u32) -> Box<dyn Backend> {
    cpu_backend_with(threads, "")
}

/// As [`cpu_backend`] with extra option lines (e.g. `activation_bits = 15`).
pub fn cpu_backend_with(threads: u32, options: &str) -> Box<dyn Backend> {
    let entry = plugin_entry("cpu", "backend", "coordgen_backend_cpu", &format!("threads = {threads}\n{options}"));
    let cfg = PluginsConfig::parse(&format!("target_backend = \"cpu\"\n{entry}"), "test config", Path::new(".")).unwrap();
    plugins::load_backend(&cfg, "cpu").unwrap_or_else(|e| panic!("{e} (build the workspace first: cargo build --workspace)")).0
}

/// A fresh temporary directory under target/.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = plugin_dir().join("test-tmp").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The models directory ($COORDGEN_MODELS or <repo>/models).
pub fn models_dir() -> PathBuf {
    std::env::var_os("COORDGEN_MODELS").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// A default model file under [`models_dir`], which must have been fetched.
pub fn model_file(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(p.is_file(), "{} is missing: run scripts/fetch_models.sh", p.display());
    p
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts batch invariance on a session's backend: the logits of a position are
/// bit-identical whether computed alone, inside chunks of any width, or inside a token tree
/// with sibling branches; after compacting the tree to the accepted path, decoding continues
/// bit-identically. `name` labels the failures.
pub fn check_batch_invariance(s: &mut Session, name: &str) {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap();
    let toks = s.tok().encode(&text, false).unwrap();
    let (np, nc) = (40usize, 8usize);
    let seq = &toks[..np + nc + 1];
    let nv = s.model().n_vocab;

    // (a) one token at a time.
    s.truncate(0).unwrap();
    let mut alone = Vec::new();
    for (i, &t) in seq.iter().enumerate() {
        alone.push(s.forward(&[t], &[i as u32], &[], &[0]).unwrap());
    }
    // (b) chunks of several widths, logits for every row.
    for width in [3usize, 8, 16, 33] {
        s.truncate(0).unwrap();
        for (ci, chunk) in seq.chunks(width).enumerate() {
            let base = ci * width;
            let pos: Vec<u32> = (base as u32..(base + chunk.len()) as u32).collect();
            let rows: Vec<u32> = (0..chunk.len() as u32).collect();
            let out = s.forward(chunk, &pos, &[], &rows).unwrap();
            for r in 0..chunk.len() {
                assert_eq!(bits(&out[r * nv..(r + 1) * nv]), bits(&alone[base + r]), "{name}: width {width}, position {}", base + r);
            }
        }
    }
    // (c) a token tree: the true continuation as one branch, with a distractor sibling
    // at every depth, nodes interleaved so the true branch is not contiguous.
    s.truncate(0).unwrap();
    let pos: Vec<u32> = (0..np as u32).collect();
    s.forward(&seq[..np], &pos, &[], &[]).unwrap();
    let mut tokens = Vec::new();
    let mut parents: Vec<i32> = Vec::new();
    let mut true_nodes = Vec::new();
    let mut prev: i32 = -1;
    for d in 0..nc {
        let distractor = (seq[np + d] + 7) % nv as u32;
        tokens.push(distractor);
        parents.push(prev);
        true_nodes.push(tokens.len());
        tokens.push(seq[np + d]);
        parents.push(prev);
        prev = tokens.len() as i32 - 1;
    }
    let w = tokens.len();
    let mut mask = vec![0u8; w * w];
    let mut positions = vec![0u32; w];
    for i in 0..w {
        let mut a = i as i32;
        let mut depth = 0;
        while a >= 0 {
            mask[i * w + a as usize] = 1;
            a = parents[a as usize];
            depth += 1;
        }
        positions[i] = (np + depth - 1) as u32;
    }
    let rows: Vec<u32> = (0..w as u32).collect();
    let out = s.forward(&tokens, &positions, &mask, &rows).unwrap();
    for (d, &node) in true_nodes.iter().enumerate() {
        assert_eq!(bits(&out[node * nv..(node + 1) * nv]), bits(&alone[np + d]), "{name}: tree node at depth {d}");
    }
    // Keep the accepted path and continue.
    let keep: Vec<u32> = true_nodes.iter().map(|&n| n as u32).collect();
    s.keep_entries(np, &keep).unwrap();
    assert_eq!(s.backend().slot_len(s.slot()).unwrap() as usize, np + nc);
    assert_eq!(s.cached(), &seq[..np + nc], "{name}: the session's record of the slot after compaction");
    let next = s.forward(&[seq[np + nc]], &[(np + nc) as u32], &[], &[0]).unwrap();
    assert_eq!(bits(&next), bits(&alone[np + nc]), "{name}: decode after tree compaction");
}

/// A reference fixture, tests/fixtures/reference/<name>.json.
pub fn fixture(name: &str) -> Json {
    let p = repo_path(&format!("tests/fixtures/reference/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Json) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A perplexity run against a model's fixture: the reference's perplexity and the share
/// of teacher-forced positions whose top-1 token agrees with it.
pub struct PplCheck {
    pub ppl: f64,
    pub reference: f64,
    /// |ppl - reference| / reference
    pub rel: f64,
    pub agreement: f64,
    pub positions: usize,
}

impl std::fmt::Display for PplCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ppl {:.4} vs reference {:.4} ({:+.3}%), top-1 agreement {:.2}% over {}",
            self.ppl,
            self.reference,
            (self.ppl - self.reference) / self.reference * 100.0,
            self.agreement * 100.0,
            self.positions
        )
    }
}

/// Runs the fixture's perplexity evaluation of model `name` (file `file`) on `backend`, over
/// its first `windows` windows (all of them with `None`; the reference figure is then the
/// one of those windows, from their per-token log-probabilities).
pub fn perplexity_vs_fixture(backend: Box<dyn Backend>, name: &str, file: &str, windows: Option<usize>) -> PplCheck {
    let f = fixture(name);
    let pf = &f["perplexity"];
    let ctx = pf["ctx"].as_u64().unwrap() as usize;
    let mut tokens = ids(&pf["tokens"]);
    let ref_windows = pf["windows"].as_array().unwrap();
    let n = windows.unwrap_or(ref_windows.len()).min(ref_windows.len());
    let reference = if windows.is_none() {
        pf["ppl"].as_f64().unwrap()
    } else {
        tokens.truncate(n * ctx);
        let lp: Vec<f64> = ref_windows[..n].iter().flat_map(|w| w["logprob"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap())).collect();
        (-lp.iter().sum::<f64>() / lp.len() as f64).exp()
    };
    let mut s = Session::open(backend, &model_file(file), ctx).unwrap();
    let r = s.perplexity(&tokens, ctx, true).unwrap();
    if windows.is_none() {
        assert_eq!(r.n_scored as u64, pf["n_scored"].as_u64().unwrap(), "{name}: scored positions");
    }
    assert_eq!(r.n_windows, n, "{name}: windows");
    let (mut agree, mut total) = (0usize, 0usize);
    for (ours, theirs) in r.windows.as_ref().unwrap().iter().zip(ref_windows) {
        for (a, b) in ours.argmax.iter().zip(ids(&theirs["argmax"])) {
            agree += usize::from(*a == b);
            total += 1;
        }
    }
    PplCheck { ppl: r.ppl, reference, rel: (r.ppl - reference).abs() / reference, agreement: agree as f64 / total.max(1) as f64, positions: total }
}

/// Loads the Vulkan backend through its plugin with `options` (TOML lines, may be empty).
/// Panics with the plugin's own message where it cannot start (no Vulkan driver, or a build
/// without glslc): scripts/install_vulkan.sh installs lavapipe, a CPU Vulkan driver.
pub fn vulkan_backend_with(options: &str) -> Box<dyn Backend> {
    let entry = plugin_entry("vulkan", "backend", "coordgen_backend_vulkan", options);
    let cfg = PluginsConfig::parse(&format!("target_backend = \"vulkan\"\n{entry}"), "test config", Path::new(".")).unwrap();
    match plugins::load_backend(&cfg, "vulkan") {
        Ok((b, _)) => b,
        Err(e) => panic!("{e} (run scripts/install_vulkan.sh, then cargo build --workspace)"),
    }
}

/// Runs `coordgen --config CFG chat ARGS` with two questions and `/exit` on its input (the
/// cache under `dir`), and returns its output.
pub fn chat_cli_two_turns(cfg: &Path, args: &[&str], dir: &Path) -> std::process::Output {
    let mut child = std::process::Command::new(plugin_dir().join("coordgen"))
        .args(["--config", cfg.to_str().unwrap(), "chat"])
        .args(args)
        .env("COORDGEN_CACHE", dir.join("cache"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.as_mut().unwrap().write_all(b"What is the capital of France?\nAnd of Italy?\n/exit\n").unwrap();
    }
    child.wait_with_output().unwrap()
}

/// The (prompt tokens, computed tokens) of each turn from `chat`'s "[prompt N tokens (M
/// computed, ..." lines on stderr.
pub fn chat_turns(stderr: &str) -> Vec<(usize, usize)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("[prompt "))
        .map(|l| {
            let n: usize = l.split_whitespace().next().unwrap().parse().unwrap();
            let m: usize = l.split('(').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
            (n, m)
        })
        .collect()
}
