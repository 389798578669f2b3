//! Injected faults and resource limits: a backend that fails mid-request, plugins that panic
//! outside their data calls, crafted model metadata, memory that does not fit, a cache
//! directory that cannot be written. Each asserts that the error names the cause and that
//! the next request on the same process succeeds.

use std::path::Path;
use std::process::Command;

use coordgen::config::PluginsConfig;
use coordgen::engine::{GenerateParams, Session};
use coordgen::plugins;
use coordgen_model::gguf::{GgufFile, GgufWriter, Value};
use coordgen_model::quant::GgmlType;
use coordgen_model::ModelFile;
use coordgen_tests::*;

fn tiny_model(dir: &Path) -> std::path::PathBuf {
    let spec = Spec::tiny(Arch::Llama);
    let p = dir.join("tiny.gguf");
    write_gguf(&spec, &random_weights(&spec, 9), GgmlType::Q4_0, &p);
    p
}

fn faulty_config(dir: &Path, fault: &str, at: u32) -> PluginsConfig {
    let inner = plugin_dir().join("libcoordgen_backend_cpu.so");
    let entry = plugin_entry("faulty", "backend", "coordgen_test_faulty_backend", &format!("fault = \"{fault}\"\nat = {at}\ninner = \"{}\"\nthreads = 1", inner.display()));
    write_config(dir, &format!("target_backend = \"faulty\"\n{entry}"))
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams { max_tokens: n, stop_at_eos: false, ..Default::default() }
}

#[test]
fn backend_faults_fail_the_request_and_the_next_one_succeeds() {
    let dir = temp_dir("faults-backend");
    let model = tiny_model(&dir);
    let prompt: Vec<u32> = (10..40).collect();
    let mut plain = Session::open(cpu_backend(1), &model, 256).unwrap();
    let want = plain.generate(&prompt, &greedy(12), &mut |_| {}).unwrap().tokens;
    for (fault, message) in [
        ("panic", "plugin panicked: injected panic in forward"),
        ("error", "injected forward error"),
        ("short_logits", "forward returned"),
        ("wrong_vocab", "but the model's vocabulary is 320"),
    ] {
        // The third forward fails: the prompt's prefill and one decode step went through.
        let (b, _) = plugins::load_backend(&faulty_config(&dir, fault, 3), "faulty").unwrap();
        let mut s = Session::open(b, &model, 256).unwrap();
        s.set_prefill_chunk(16);
        let e = s.generate(&prompt, &greedy(12), &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains(message) && e.contains("faulty"), "{fault}: {e}");
        // The fault fired once; the same session serves the next request, from a clean cache.
        let again = s.generate(&prompt, &greedy(12), &mut |_| {}).unwrap();
        assert_eq!(again.tokens, want, "{fault}: the request after the fault differs from plain output");
        assert_eq!(again.timings.prefill_tokens, prompt.len(), "{fault}: the failed request's cache was reused");
    }
}

#[test]
fn panics_outside_data_calls_are_errors() {
    let dir = temp_dir("faults-caps");
    // A panic in `capabilities` (which returned a plain value before interface 5) refuses
    // the load with the message instead of aborting the process.
    let e = match plugins::load_backend(&faulty_config(&dir, "capabilities", 1), "faulty") {
        Ok(_) => panic!("a backend whose capabilities panic must not load"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("could not report its capabilities") && e.contains("capabilities exploded"), "{e}");
    // A panic in stats_json becomes an error object.
    let lib = plugin_dir().join("libcoordgen_test_panicky.so");
    let cfg = write_config(&dir, &format!("target_backend = \"x\"\n[[plugin]]\nname = \"x\"\nkind = \"backend\"\nlibrary = \"{}\"\n", lib.display()));
    let (b, _) = plugins::load_backend(&cfg, "x").unwrap();
    let stats: serde_json::Value = serde_json::from_str(&b.stats_json()).unwrap();
    assert!(stats["error"].as_str().unwrap_or_default().contains("no stats today"), "{stats}");
}

#[test]
fn a_backend_without_batch_invariance_is_reported() {
    let dir = temp_dir("faults-invariance");
    let model = tiny_model(&dir);
    let cfg = faulty_config(&dir, "not_invariant", 0);
    let cfg_path = dir.join("plugins.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap() + &plugin_entry("ngram", "drafter", "coordgen_drafter_ngram", "");
    std::fs::write(&cfg_path, text).unwrap();
    let _ = cfg;
    let out = Command::new(plugin_dir().join("coordgen"))
        .args(["--config", cfg_path.to_str().unwrap(), "generate", "-m", model.to_str().unwrap(), "--drafter", "ngram", "--max-tokens", "8", "-p", "hello hello hello"])
        .env("COORDGEN_CACHE", dir.join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("does not promise batch invariance") && err.contains("faulty"), "{err}");
}

#[test]
fn crafted_metadata_cannot_drive_allocations() {
    let dir = temp_dir("faults-gguf");
    let good = tiny_model(&dir);
    let g = GgufFile::open(&good).unwrap();
    // Rewrite the file with one metadata value replaced.
    let with = |key: &str, v: Value| -> std::path::PathBuf {
        let mut w = GgufWriter::new();
        for (k, old) in &g.metadata {
            w.kv(k, if k == key { v.clone() } else { old.clone() });
        }
        for t in &g.tensors {
            w.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
        }
        let p = dir.join(format!("{key}.gguf"));
        w.write(&p).unwrap();
        p
    };
    // A block count of 2^40 used to size per-layer vectors (an abort no guard can catch).
    let p = with("llama.block_count", Value::U64(1 << 40));
    let e = ModelFile::open(&p).unwrap().hparams().unwrap_err().to_string();
    assert!(e.contains("1099511627776 layers"), "{e}");
    let e = match Session::open(cpu_backend(1), &p, 64) {
        Ok(_) => panic!("a model claiming 2^40 layers must not load"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("layers"), "{e}");
    // Three layers claimed, two present.
    let p = with("llama.block_count", Value::U32(3));
    let e = ModelFile::open(&p).unwrap().hparams().unwrap_err().to_string();
    assert!(e.contains("blk.2.attn_norm.weight is missing"), "{e}");
    // A feed-forward width that the tensors do not have.
    let p = with("llama.feed_forward_length", Value::U32(1 << 30));
    let e = ModelFile::open(&p).unwrap().hparams().unwrap_err().to_string();
    assert!(e.contains("blk.0.ffn_up.weight") && e.contains("1073741824"), "{e}");

    // An array of n one-byte values costs n bytes once parsed, not n `Value`s.
    let n = 1 << 20;
    let mut w = GgufWriter::new();
    w.kv("big", Value::Array(vec![Value::U8(7); n]));
    let f = GgufFile::from_bytes("big.gguf", w.to_bytes()).unwrap();
    match f.get("big") {
        Some(Value::Packed(p)) => {
            assert_eq!(p.len(), n);
            assert_eq!(p.get(n - 1), Some(Value::U8(7)));
        }
        other => panic!("expected a packed array, got {:?}", other.map(|_| "another value")),
    }
}

#[test]
fn memory_that_does_not_fit_is_an_error() {
    let dir = temp_dir("faults-memory");
    let model = tiny_model(&dir);
    // A budget smaller than the weights.
    let mut b = cpu_backend_with(1, "memory_budget_mb = 0");
    let e = b.load_model(&model).unwrap_err().to_string();
    assert!(e.contains("loading") && e.contains("memory budget of 0 MiB"), "{e}");
    // Weights fit, a 2^31-entry KV cache does not (the session's error names the fix).
    let b = cpu_backend_with(1, "memory_budget_mb = 64");
    let e = match Session::open(b, &model, 1 << 31) {
        Ok(_) => panic!("a 2^31-entry context must not fit in 64 MiB"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("KV cache of 2147483648 entries") && e.contains("lower --ctx-size"), "{e}");
    // Without a budget the check is against the memory available now.
    let e = match Session::open(cpu_backend(1), &model, u32::MAX as usize) {
        Ok(_) => panic!("a 2^32-entry context must not fit"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("of memory is available"), "{e}");
    // Past what a slot can index at all.
    let e = match Session::open(cpu_backend(1), &model, 1 << 33) {
        Ok(_) => panic!("a 2^33-entry context must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("more than a KV slot holds"), "{e}");
    // The same backend still works at a sane size.
    let mut s = Session::open(cpu_backend_with(1, "memory_budget_mb = 64"), &model, 128).unwrap();
    assert_eq!(s.generate(&[10, 11, 12], &greedy(4), &mut |_| {}).unwrap().tokens.len(), 4);
}

#[test]
fn an_unwritable_cache_directory_costs_nothing_but_the_cache() {
    let dir = temp_dir("faults-cache");
    let model = tiny_model(&dir);
    // A regular file where the cache directory should be: nothing can be created under it
    // (unlike a read-only directory, which root could still write).
    let blocked = dir.join("not-a-dir");
    std::fs::write(&blocked, b"file").unwrap();
    let cfg_path = dir.join("plugins.toml");
    std::fs::write(
        &cfg_path,
        format!("target_backend = \"cpu\"\n{}{}", cpu_entry(1), plugin_entry("ngram", "drafter", "coordgen_drafter_ngram", &format!("cache_dir = \"{}\"", blocked.join("ngram").display()))),
    )
    .unwrap();
    let run = |drafter: &str| {
        let mut args = vec!["--config", cfg_path.to_str().unwrap(), "generate", "-m", model.to_str().unwrap(), "--max-tokens", "12", "--ignore-eos", "-p", "one two one two one two"];
        if !drafter.is_empty() {
            args.extend(["--drafter", drafter]);
        }
        let out = Command::new(plugin_dir().join("coordgen")).args(&args).env("COORDGEN_CACHE", blocked.join("cache")).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, plain, err) = run("");
    assert!(ok, "{err}");
    let (ok, spec, err) = run("ngram");
    assert!(ok, "{err}");
    assert_eq!(spec, plain, "the drafter's failed cache write changed the output");
    assert!(err.contains("cannot write n-gram cache"), "the failed write should be reported: {err}");
}
