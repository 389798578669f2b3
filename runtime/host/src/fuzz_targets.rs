//! The bodies of the fuzz targets: each takes arbitrary bytes, hands them to one of the
//! parsers that read what users download or edit (model files, tokenizer metadata, chat
//! templates, `plugins.toml`, workloads, traces, drafter files, server requests), and must
//! come back with a value or a clean error: no panic, no hang, no allocation that the
//! input's own length does not back. `fuzz/` drives them under libFuzzer
//! (`scripts/fuzz.sh`); `tests/fuzz_regressions.rs` replays the committed corpora and every
//! input that once failed through the same functions, so CI checks what fuzzing found.

use std::path::{Path, PathBuf};

use coordgen_drafter_store::datastore::{self, Datastore};
use coordgen_drafter_store::ngram_cache::NgramCache;
use coordgen_model::gguf::GgufFile;
use coordgen_model::ModelFile;

use crate::chat::{self, Message};

/// Every target, by the name `scripts/fuzz.sh` and the corpus folders use.
pub const TARGETS: &[&str] = &[
    "gguf",
    "gguf_tokenizer",
    "safetensors",
    "chat_template",
    "plugins_toml",
    "workload",
    "replay_trace",
    "datastore",
    "ngram_cache",
    "server_request",
];

/// Runs target `name` on `data`; false for an unknown name. Whether the parser accepted
/// the input does not matter, only that it returned.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "gguf" => gguf(data),
        "gguf_tokenizer" => gguf_tokenizer(data),
        "safetensors" => safetensors(data),
        "chat_template" => chat_template(data),
        "plugins_toml" => plugins_toml(data),
        "workload" => workload(data),
        "replay_trace" => replay_trace(data),
        "datastore" => datastore(data),
        "ngram_cache" => ngram_cache(data),
        "server_request" => server_request(data),
        _ => return false,
    }
    true
}

fn gguf(data: &[u8]) {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else { return };
    for t in &g.tensors {
        let bytes = g.tensor_data(t);
        // Dequantize small tensors whole: the bounds the parser checked must hold here.
        if t.n_elements() <= 4096 {
            let mut out = vec![0f32; t.n_elements() as usize];
            coordgen_model::quant::dequantize_row(t.ty, bytes, &mut out);
        }
    }
    let f = ModelFile::Gguf(g);
    let _ = f.hparams();
}

fn gguf_tokenizer(data: &[u8]) {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else { return };
    let Ok(tok) = crate::tokenizer::from_gguf(&g) else { return };
    if let Ok(ids) = tok.encode("Hello world, <|im_start|> 12345 ünïcode\n", true) {
        let _ = tok.decode(&ids);
    }
    if let Some(t) = &tok.chat_template {
        let _ = chat::render(t, &[Message::new("user", "hi")], true, &tok.bos_text, &tok.eos_text);
    }
}

/// Input: a config.json and an index JSON, each after its length (u32 little-endian; an
/// index of length 0 is left out), then the shard's bytes.
fn safetensors(data: &[u8]) {
    let (config, rest) = length_prefixed(data);
    let (index, shard) = length_prefixed(rest);
    let index = (!index.is_empty()).then_some(index);
    let dir = scratch_dir("safetensors");
    let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).is_ok();
    if !write("config.json", config) || !write("model.safetensors", shard) {
        return;
    }
    if let Some(ix) = index {
        if !write("model.safetensors.index.json", ix) {
            return;
        }
    }
    if let Ok(f) = ModelFile::open(&dir) {
        let _ = f.hparams();
    }
}

/// Input: a template, a 0 byte, then message contents separated by 0 bytes.
fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let roles = ["system", "user", "assistant", "tool"];
    let messages: Vec<Message> = parts.enumerate().map(|(i, c)| Message::new(roles[i % roles.len()], c)).collect();
    let _ = chat::render(template, &messages, true, "<s>", "</s>");
}

fn plugins_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::config::PluginsConfig::parse(text, "fuzz.toml", Path::new("/nonexistent"));
}

fn workload(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::workload::parse(text, Path::new("fuzz.jsonl"));
}

fn replay_trace(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::replay::parse(text, None, Path::new("fuzz.traces"));
}

/// Input: a flag byte, then a datastore; with the flag's low bit set the harness appends
/// the right checksum, so the fuzzer gets past it to the layout behind.
fn datastore(data: &[u8]) {
    let Some((&flag, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if flag & 1 == 1 {
        bytes.extend_from_slice(&datastore::fnv(rest).to_le_bytes());
    }
    let Ok(ds) = Datastore::parse(&bytes, Path::new("fuzz.cgds")) else { return };
    // Queries over a crafted (unsorted, odd) suffix array must stay in bounds too.
    let probe: Vec<u32> = ds.tokens.iter().take(8).copied().collect();
    if let Some(r) = ds.find(&probe[..probe.len().min(2)]) {
        let _ = ds.children(r);
    }
    if let Some(r) = ds.longest_suffix(&probe, 1, 8) {
        let _ = ds.children(r);
    }
}

fn ngram_cache(data: &[u8]) {
    let Ok(c) = NgramCache::parse(data, Path::new("fuzz.ngram")) else { return };
    let _ = c.greedy_chain(0, 0, 16);
    let _ = c.best(1, 2);
}

fn server_request(data: &[u8]) {
    let _ = crate::server::api::parse(data, true);
    let _ = crate::server::api::parse(data, false);
}

/// Splits `data` into the part its first four bytes measure and the rest.
fn length_prefixed(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<4>() else { return (&[], &[]) };
    let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
    rest.split_at(n)
}

/// Builds a `safetensors` target input from its files.
pub fn safetensors_input(config: &[u8], index: Option<&[u8]>, shard: &[u8]) -> Vec<u8> {
    let mut out = (config.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(config);
    let index = index.unwrap_or_default();
    out.extend_from_slice(&(index.len() as u32).to_le_bytes());
    out.extend_from_slice(index);
    out.extend_from_slice(shard);
    out
}

/// A folder of this process's own for targets that need files.
fn scratch_dir(target: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coordgen-fuzz-{target}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}
