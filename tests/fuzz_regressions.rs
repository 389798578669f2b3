//! Replays the fuzz corpora (`fuzz/corpus/TARGET/`: the seeds and what fuzzing kept that is
//! small, `fuzz/regressions/TARGET/`: every input that once crashed, hung or blew memory)
//! through the fuzz targets' bodies, so CI checks each parser against them without running a
//! fuzzer. `write_fuzz_seeds` (ignored; run it by name) regenerates the seed files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coordgen::fuzz_targets::{self, TARGETS};
use coordgen_model::gguf::{GgufWriter, Value};
use coordgen_model::quant::GgmlType;
use coordgen_tests::*;

fn fuzz_dir(sub: &str) -> PathBuf {
    repo_path("fuzz").join(sub)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn replays_the_fuzz_corpora() {
    for t in TARGETS {
        let seeds = files(&fuzz_dir("corpus").join(t));
        assert!(!seeds.is_empty(), "fuzz/corpus/{t} has no seeds (run write_fuzz_seeds)");
        let crashes = files(&fuzz_dir("regressions").join(t));
        for f in seeds.iter().chain(&crashes) {
            let data = std::fs::read(f).unwrap();
            let t0 = Instant::now();
            assert!(fuzz_targets::run(t, &data), "unknown target {t}");
            // Generous for a debug-assertion build on a loaded 2-core machine; a hang that the
            // fuzzer found (seconds to forever) is far beyond it.
            assert!(t0.elapsed() < Duration::from_secs(20), "{} took {:?}", f.display(), t0.elapsed());
        }
    }
}

/// A model small enough to be a seed (a few tens of KB) with every tensor the loader wants.
fn micro(arch: Arch) -> Spec {
    Spec { arch, n_vocab: 300, n_embd: 32, n_layer: 1, n_head: 2, n_head_kv: 1, head_dim: 16, n_ff: 64, tied: arch == Arch::Llama, rope_theta: 10000.0, eps: 1e-5, window: 0, swa_pattern: 1, llama3_rope: None }
}

fn put(target: &str, name: &str, data: &[u8]) {
    let d = fuzz_dir("corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), data).unwrap();
}

#[test]
#[ignore = "writes fuzz/corpus; run by name to regenerate the seeds"]
fn write_fuzz_seeds() {
    let tmp = temp_dir("fuzz-seeds");
    for (arch, ty) in [(Arch::Llama, GgmlType::F16), (Arch::Qwen2, GgmlType::Q8_0), (Arch::Qwen3, GgmlType::Q4_0)] {
        let s = micro(arch);
        let w = random_weights(&s, 7);
        let p = tmp.join(format!("{}.gguf", arch.name()));
        write_gguf(&s, &w, ty, &p);
        let bytes = std::fs::read(&p).unwrap();
        put("gguf", &format!("micro-{}-{}.gguf", arch.name(), ty.name()), &bytes);
        put("gguf_tokenizer", &format!("micro-{}.gguf", arch.name()), &bytes);
        let dir = tmp.join(format!("hf-{}", arch.name()));
        write_hf_dir(&s, &w, safetensors::Dtype::F16, 1, &dir);
        let config = std::fs::read(dir.join("config.json")).unwrap();
        let shard = std::fs::read(dir.join("model.safetensors")).unwrap();
        put("safetensors", &format!("micro-{}", arch.name()), &fuzz_targets::safetensors_input(&config, None, &shard));
        let index = serde_json::json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}).to_string();
        put("safetensors", &format!("micro-{}-indexed", arch.name()), &fuzz_targets::safetensors_input(&config, Some(index.as_bytes()), &shard));
    }
    // A SentencePiece (llama) tokenizer: scores, byte tokens, an unknown token.
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for t in ["\u{2581}", "h", "e", "l", "o", "\u{2581}h", "el", "lo", "hello", "\u{2581}hello"] {
        tokens.push(t.into());
        types.push(1);
    }
    let scores: Vec<Value> = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
    let mut g = GgufWriter::new();
    g.kv("tokenizer.ggml.model", Value::Str("llama".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::Str).collect()))
        .kv("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
        .kv("tokenizer.ggml.scores", Value::Array(scores))
        .kv("tokenizer.ggml.unknown_token_id", Value::U32(0))
        .kv("tokenizer.chat_template", Value::Str("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}".into()));
    put("gguf_tokenizer", "spm.gguf", &g.to_bytes());
    // Truncated copies of the real models' headers, where the models are here.
    for (file, name) in [("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"), ("qwen2.5-coder-0.5b-instruct.gguf", "qwen25")] {
        let p = models_dir().join(file);
        if let Ok(bytes) = std::fs::read(&p) {
            put("gguf", &format!("real-{name}-head.gguf"), &bytes[..16384]);
            let g = coordgen_model::gguf::GgufFile::open(&p).unwrap();
            if let Some(t) = g.get_str("tokenizer.chat_template") {
                let mut seed = t.as_bytes().to_vec();
                for m in ["You are helpful.", "Summarize: the cat sat.", "A cat sat.", "Thanks"] {
                    seed.push(0);
                    seed.extend_from_slice(m.as_bytes());
                }
                put("chat_template", &format!("real-{name}"), &seed);
            }
        }
    }
    put("chat_template", "loop", b"{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% if not loop.last %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}\0sys\0hi\0hello");
    put("chat_template", "macro", b"{% macro r(n) %}{% if n > 0 %}{{ r(n - 1) }}{% endif %}x{% endmacro %}{{ r(5) }}{{ raise_exception('no') if messages|length > 9 }}\0a");
    put("plugins_toml", "repo.toml", &std::fs::read(repo_path("plugins.toml")).unwrap());
    put(
        "plugins_toml",
        "small.toml",
        b"target_backend = \"cpu\"\ndefault_drafter = \"ngram\"\n\n[[plugin]]\nname = \"cpu\"\nkind = \"backend\"\nlibrary = \"libx.so\"\n[plugin.options]\nthreads = 2\n",
    );
    let shared = repo_path("eval/public.jsonl");
    let mut wl = String::new();
    if let Ok(text) = std::fs::read_to_string(&shared) {
        for line in text.lines().take(3) {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            let p = v["prompt"].as_str().unwrap_or_default().chars().take(200).collect::<String>();
            v["prompt"] = p.into();
            wl.push_str(&serde_json::json!({"id": v["id"], "category": v["category"], "prompt": v["prompt"]}).to_string());
            wl.push('\n');
        }
    } else {
        wl.push_str("{\"id\":\"a\",\"category\":\"rag\",\"prompt\":\"What is x?\"}\n");
    }
    put("workload", "public-head.jsonl", wl.as_bytes());
    let header = serde_json::json!({"model": "m.gguf", "max_tokens": 8, "top_k": 4});
    let trace = serde_json::json!({"id": "a", "category": "rag", "prompt": [1, 2], "output": [3, 4, 5], "top_tokens": [1, 2, 3, 4, 5, 6, 7, 8], "top_probs": [0.5, 0.2, 0.1, 0.1, 0.6, 0.2, 0.1, 0.05]});
    put("replay_trace", "one.traces", format!("{header}\n{trace}\n").as_bytes());
    let ds = tmp.join("d.cgds");
    coordgen_drafter_store::datastore::write(&ds, Path::new("m.gguf"), &[vec![1, 2, 3, 1, 2, 4], vec![5, 1, 2, 3]]).unwrap();
    let bytes = std::fs::read(&ds).unwrap();
    put("datastore", "checked", &[&[0u8][..], &bytes].concat());
    put("datastore", "unchecked", &[&[1u8][..], &bytes[..bytes.len() - 8]].concat());
    let mut c = coordgen_drafter_store::ngram_cache::NgramCache::default();
    for (a, b, n) in [(1, 2, 3), (2, 3, 4), (1, 2, 3), (3, 4, 1)] {
        c.add(a, b, n);
    }
    let nc = tmp.join("c.ngram");
    c.save(&nc).unwrap();
    put("ngram_cache", "small", &std::fs::read(&nc).unwrap());
    put("server_request", "chat", br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":16,"temperature":0.7,"top_p":0.9,"top_k":40,"min_p":0.05,"seed":3,"stop":["\n","END"],"stream":true,"stream_options":{"include_usage":true},"n":1}"#);
    put("server_request", "completion", br#"{"prompt":[1,2,3],"max_completion_tokens":4,"stop":"x"}"#);
    put("server_request", "completion-text", br#"{"prompt":["once upon"],"temperature":0}"#);
    std::fs::remove_dir_all(&tmp).ok();
}
