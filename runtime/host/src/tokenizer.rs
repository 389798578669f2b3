//! Tokenizers through the Hugging Face `tokenizers` crate: loaded from `tokenizer.json`, or
//! assembled from GGUF metadata (gpt2-style byte-level BPE with the pre-tokenizer named by
//! `tokenizer.ggml.pre`, or llama/SentencePiece BPE with byte fallback and merges derived
//! from the token scores), plus the special-token facts generation needs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use coordgen_model::gguf::GgufFile;
use coordgen_model::ModelFile;
use serde_json::{json, Value};

#[derive(Clone)]
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    pub bos_text: String,
    pub eos_text: String,
}

// Pre-tokenizer regexes of the vocabularies we support (see each model's tokenizer.json).
const RE_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(re: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false})
}
fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex})
}

impl Tok {
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            // A rendered chat template that opens with the BOS text already holds it.
            if let Some(b) = self.bos.filter(|&b| enc.get_ids().first() != Some(&b)) {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn is_eos(&self, t: u32) -> bool {
        self.eos.contains(&t)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Loads the tokenizer of a model path (GGUF file or Hugging Face directory).
    pub fn for_model(path: &Path, file: &ModelFile) -> Result<Tok> {
        match file {
            ModelFile::Gguf(g) => from_gguf(g),
            ModelFile::Safetensors(_) => from_hf_dir(path),
        }
    }
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// `tokenizer.json` plus `tokenizer_config.json` (chat template, bos/eos) of a HF directory.
pub fn from_hf_dir(dir: &Path) -> Result<Tok> {
    let tj = dir.join("tokenizer.json");
    let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| anyhow!("cannot load {}: {e}", tj.display()))?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: Value = if cfg_path.exists() {
        serde_json::from_str(&std::fs::read_to_string(&cfg_path)?).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?
    } else {
        Value::Null
    };
    let model_cfg: Value = std::fs::read_to_string(dir.join("config.json")).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null);
    let bos_text = cfg.get("bos_token").and_then(token_content).unwrap_or_default();
    let eos_text = cfg.get("eos_token").and_then(token_content).unwrap_or_default();
    let bos = if bos_text.is_empty() { None } else { inner.token_to_id(&bos_text) };
    let mut eos: Vec<u32> = Vec::new();
    if let Some(e) = inner.token_to_id(&eos_text) {
        eos.push(e);
    }
    match model_cfg.get("eos_token_id") {
        Some(Value::Number(n)) => eos.extend(n.as_u64().map(|v| v as u32)),
        Some(Value::Array(a)) => eos.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
        _ => {}
    }
    eos.sort();
    eos.dedup();
    let chat_template = match cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    let add_bos = cfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
    Ok(Tok { inner, bos, eos, add_bos, chat_template, bos_text, eos_text })
}

/// Builds the tokenizer described by GGUF metadata.
pub fn from_gguf(g: &GgufFile) -> Result<Tok> {
    let model = g.get_str("tokenizer.ggml.model").ok_or_else(|| anyhow!("GGUF has no tokenizer (tokenizer.ggml.model missing)"))?;
    let tokens = g.get_str_array("tokenizer.ggml.tokens").ok_or_else(|| anyhow!("GGUF tokenizer.ggml.tokens missing or not strings"))?;
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.items())
        .map(|a| a.map(|x| x.as_u64().map(|u| u as i64).unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(i));
    }
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // 3 = control, 4 = user-defined: matched whole, never split by the model.
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": ty == 3}));
        }
    }
    let spec = match model {
        "gpt2" => {
            let merges = g.get_str_array("tokenizer.ggml.merges").ok_or_else(|| anyhow!("GGUF gpt2 tokenizer has no merges"))?;
            let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
            let (normalizer, pre_tok, ignore_merges) = match pre {
                "qwen2" => (json!({"type": "NFC"}), json!({"type": "Sequence", "pretokenizers": [split(RE_QWEN2), byte_level(false)]}), false),
                "llama-bpe" | "llama3" => (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(RE_LLAMA3), byte_level(false)]}), true),
                "smollm" => (
                    Value::Null,
                    json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                    false,
                ),
                "gpt-2" | "default" | "gpt2" => (Value::Null, byte_level(true), false),
                other => bail!("unsupported GGUF pre-tokenizer '{other}' (supported: qwen2, llama-bpe, smollm, gpt-2, default)"),
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": normalizer, "pre_tokenizer": pre_tok, "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let scores: Vec<f64> = g
                .get("tokenizer.ggml.scores")
                .and_then(|v| v.items())
                .map(|a| a.map(|x| x.as_f64().unwrap_or(0.0)).collect())
                .ok_or_else(|| anyhow!("GGUF llama tokenizer has no scores"))?;
            let merges = spm_merges(&tokens, &scores);
            let unk = g.get_u64("tokenizer.ggml.unknown_token_id").map(|u| tokens.get(u as usize).copied().unwrap_or("<unk>")).unwrap_or("<unk>");
            let add_space = g.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.as_bool()).unwrap_or(true);
            let mut norms = vec![];
            if add_space {
                norms.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            norms.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
            let mut decs = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space {
                decs.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": norms}, "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decs},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        other => bail!("unsupported GGUF tokenizer model '{other}' (supported: gpt2, llama)"),
    };
    let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| anyhow!("building the tokenizer from GGUF metadata failed: {e}"))?;
    let id = |k: &str| g.get_u64(k).map(|v| v as u32);
    let bos = id("tokenizer.ggml.bos_token_id");
    let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
    if let Some(e) = id("tokenizer.ggml.eot_token_id") {
        eos.push(e);
    }
    // Gemma ends a chat turn with <end_of_turn>, which its files do not name as EOT.
    if g.get_str("general.architecture") == Some("gemma3") {
        eos.extend(tokens.iter().position(|t| *t == "<end_of_turn>").map(|i| i as u32));
    }
    eos.sort();
    eos.dedup();
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(model == "llama");
    let text = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize)).map(|s| s.to_string()).unwrap_or_default();
    Ok(Tok {
        inner,
        bos,
        eos: eos.clone(),
        add_bos,
        chat_template: g.get_str("tokenizer.chat_template").map(String::from).or_else(|| builtin_template(g.get_str("general.architecture").unwrap_or(""))),
        bos_text: text(bos),
        eos_text: text(eos.first().copied()),
    })
}

/// The chat format of a model family whose files often carry no template (llama.cpp also
/// falls back to a known format by architecture). Gemma base-model conversions have none.
fn builtin_template(arch: &str) -> Option<String> {
    match arch {
        "gemma3" => Some(include_str!("../templates/gemma.jinja").to_string()),
        _ => None,
    }
}

/// SentencePiece BPE merges: every split of a vocabulary piece into two pieces that are both
/// in the vocabulary, ranked by the merged piece's score (higher merges first). Pairs, not
/// "left right" strings: some vocabularies (gemma) have pieces that contain spaces.
const MAX_SPM_PIECE: usize = 256;

fn spm_merges(tokens: &[&str], scores: &[f64]) -> Vec<[String; 2]> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, [String; 2])> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // Every split of a token is looked up, so the work grows with the square of its
        // length; real pieces are a few dozen bytes, and a crafted huge one is skipped.
        if t.len() > MAX_SPM_PIECE {
            continue;
        }
        let chars: Vec<(usize, char)> = t.char_indices().collect();
        for &(cut, _) in chars.iter().skip(1) {
            let (l, r) = t.split_at(cut);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores.get(i).copied().unwrap_or(0.0), li, ri, [l.to_string(), r.to_string()]));
            }
        }
    }
    merges.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|m| m.3).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordgen_model::gguf::{GgufWriter, Value};

    /// A SentencePiece-style (llama) vocabulary: merges follow the scores, unknown characters
    /// fall back to byte tokens, and decoding strips the prefix space.
    #[test]
    fn sentencepiece_vocab_from_gguf() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2i32, 3, 3];
        for b in 0..256 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        let pieces = ["\u{2581}", "h", "e", "l", "o", "w", "r", "d", "\u{2581}h", "\u{2581}he", "\u{2581}hel", "\u{2581}hell", "\u{2581}hello",
            "\u{2581}w", "\u{2581}wo", "\u{2581}wor", "\u{2581}worl", "\u{2581}world"];
        let mut scores = vec![0f32; tokens.len()];
        for (i, p) in pieces.iter().enumerate() {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(-(i as f32));
        }
        let mut w = GgufWriter::new();
        w.kv("tokenizer.ggml.model", Value::Str("llama".into()))
            .kv("tokenizer.ggml.tokens", Value::Array(tokens.iter().cloned().map(Value::Str).collect()))
            .kv("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
            .kv("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect()))
            .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
            .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
            .kv("tokenizer.ggml.unknown_token_id", Value::U32(0));
        let path = std::env::temp_dir().join(format!("coordgen-spm-{}.gguf", std::process::id()));
        w.write(&path).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let tok = from_gguf(&g).unwrap();
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, id("\u{2581}hello"), id("\u{2581}world")]);
        let ids = tok.encode("hi!", false).unwrap();
        assert_eq!(ids, vec![id("\u{2581}h"), id("<0x69>"), id("<0x21>")]);
        assert_eq!(tok.decode(&ids).unwrap(), "hi!");
        assert!(tok.is_eos(2));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn spm_merges_rank_by_merged_score() {
        let toks = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -5.0, -1.0, -0.5];
        let m = spm_merges(&toks, &scores);
        // "abc" (best score) splits two ways; "bc" outranks "ab".
        let pairs: Vec<String> = m.iter().map(|[l, r]| format!("{l} {r}")).collect();
        assert_eq!(pairs, vec!["a bc", "ab c", "b c", "a b"]);
    }
}
