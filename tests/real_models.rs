//! The real default models against golden fixtures from an independent reference
//! (transformers + PyTorch in float32 loading the same GGUF, see scripts/reference.py):
//! tokenizer ids, chat template renderings, perplexity and teacher-forced top-1 agreement,
//! and bit-exact batch invariance (alone, in chunks, inside a token tree).
//! The models are fetched by scripts/fetch_models.sh (the test script runs it).


use coordgen::chat::Message;
use coordgen::engine::Session;
use coordgen_tests::*;

const MODELS: [(&str, &str); 3] = [
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("qwen-0.5b", "qwen2.5-coder-0.5b-instruct.gguf"),
    ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"),
];


#[test]
fn tokenizer_and_chat_template_match_reference() {
    for (name, file) in MODELS {
        let f = fixture(name);
        let s = Session::open(cpu_backend(1), &model_file(file), 64).unwrap();
        for case in f["tokenizer"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ours = s.tok().encode(text, false).unwrap();
            assert_eq!(ours, ids(&case["ids"]), "{name}: tokens of {text:?}");
            assert_eq!(s.tok().decode(&ours).unwrap(), text, "{name}: decode round trip of {text:?}");
        }
        for case in f["chat"].as_array().unwrap() {
            let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            assert_eq!(s.render_chat(&msgs, true).unwrap(), case["rendered"].as_str().unwrap(), "{name}: chat template");
        }
        if name.starts_with("gemma3") {
            // Gemma's chat turns end with <end_of_turn>, a stop token beside <eos>.
            let eot = s.tok().inner.token_to_id("<end_of_turn>").unwrap();
            assert!(s.tok().is_eos(eot) && s.tok().is_eos(1), "{name}: stop tokens {:?}", s.tok().eos);
        }
        // The eval text tokenizes exactly as the reference did.
        let text = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap();
        let want = ids(&f["perplexity"]["tokens"]);
        let ours = s.tok().encode(&text, false).unwrap();
        assert_eq!(&ours[..want.len()], &want[..], "{name}: eval text tokens");
    }
}

/// 15-bit activations keep the float reference's results (perplexity within 1%, top-1
/// within 1%); 8-bit ones (the default, llama.cpp's precision) stay within 1% of its
/// perplexity and agree on at least 95% of the top-1 predictions, with an f32 or an f16
/// KV cache. Gemma 3 270M is the exception for the f16 cache: its one KV head of 256
/// dimensions gives attention scores in the hundreds, where f16 keys' rounding moves the
/// perplexity by about +1.5% (measured; f32, the CPU default, stays within 0.02%).
#[test]
fn perplexity_and_top1_agreement_match_reference() {
    for (bits, kv, min_agreement) in [(15, "f32", 0.99), (8, "f32", 0.95), (8, "f16", 0.95)] {
        perplexity_against_reference(bits, kv, min_agreement);
    }
}

fn perplexity_against_reference(bits: u32, kv: &str, min_agreement: f64) {
    for (name, file) in MODELS {
        let backend = cpu_backend_with(2, &format!("activation_bits = {bits}\nkv_type = \"{kv}\""));
        let r = perplexity_vs_fixture(backend, name, file, None);
        eprintln!("{name}, {bits}-bit activations, {kv} KV: {r}");
        let tol = if name.starts_with("gemma3") && kv == "f16" { 0.02 } else { 0.01 };
        assert!(r.rel < tol, "{name}, {bits}-bit, {kv} KV: {r}");
        assert!(r.agreement >= min_agreement, "{name}, {bits}-bit, {kv} KV: {r}");
    }
}

/// Gemma 3 over 1024-token windows, twice its sliding window of 512: the windowed layers
/// must hide the keys beyond it, through the prefill's chunks, as transformers does.
#[test]
fn gemma3_long_window_matches_reference() {
    let r = perplexity_vs_fixture(cpu_backend(2), "gemma3-270m-ctx1024", MODELS[2].1, None);
    eprintln!("gemma3-270m over 1024 tokens: {r}");
    assert!(r.rel < 0.01 && r.agreement >= 0.95, "{r}");
    // At 8192 entries its 15 windowed layers keep rings of 2 x 1024 rows, the 3 global
    // layers all 8192: 37.5% of a full f32 cache (one KV head of 256, keys and values).
    let s = Session::open(cpu_backend(2), &model_file(MODELS[2].1), 8192).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s.backend().stats_json()).unwrap();
    let full = 18 * 8192 * 256 * 2 * 4u64;
    assert_eq!(v["kv_bytes_reserved"].as_u64().unwrap(), (3 * 8192 + 15 * 2048) * 256 * 2 * 4, "of {full} for a full cache");
}

/// The logits of a position are bit-identical whether computed alone, inside chunks of
/// any width, or inside a token tree with sibling branches; after compacting the tree to
/// the accepted path, decoding continues bit-identically. Both KV cache types.
#[test]
fn batch_invariance_alone_chunked_and_in_a_tree() {
    for ((name, file), kv) in MODELS.iter().flat_map(|m| [(*m, "f32"), (*m, "f16")]) {
        let mut s = Session::open(cpu_backend_with(2, &format!("kv_type = \"{kv}\"")), &model_file(file), 256).unwrap();
        check_batch_invariance(&mut s, &format!("{name} ({kv} KV)"));
    }
}

/// `coordgen chat` keeps the conversation and its KV cache between turns: the second turn
/// only computes the tokens after the cached first turn.
#[test]
fn chat_cli_reuses_the_cache_between_turns() {
    let dir = temp_dir("chat-cli");
    let cfg = dir.join("plugins.toml");
    // 15-bit activations: with 8 (the default) the 135M model's greedy answer to this
    // question turns from "The capital of France is Paris." into a list of French words.
    std::fs::write(&cfg, format!("target_backend = \"cpu\"\n{}", plugin_entry("cpu", "backend", "coordgen_backend_cpu", "activation_bits = 15"))).unwrap();
    let out = chat_cli_two_turns(&cfg, &["-m", model_file(MODELS[0].1).to_str().unwrap(), "--max-tokens", "12", "-t", "2"], &dir);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // "[prompt N tokens (M computed, ...". Two turns.
    let turns = chat_turns(&err);
    assert_eq!(turns.len(), 2, "{err}");
    assert_eq!(turns[0].0, turns[0].1, "first turn computes its whole prompt");
    assert!(turns[1].0 > turns[0].0 && turns[1].1 < turns[1].0 - turns[0].0 + 16, "second turn reuses the cache: {turns:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
}
