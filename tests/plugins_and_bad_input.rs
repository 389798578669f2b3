//! Plugin loading and bad input: every failure is a clear error naming the problem and a
//! non-zero exit of the CLI, never a panic or a hang.

use std::path::Path;
use std::process::Command;

use coordgen::config::PluginsConfig;
use coordgen::engine::Session;
use coordgen::plugins::{self, Forward};
use coordgen_model::gguf::GgufFile;
use coordgen_model::quant::GgmlType;
use coordgen_model::ModelFile;
use coordgen_tests::*;

fn config(lib: &str, kind: &str) -> PluginsConfig {
    PluginsConfig::parse(
        &format!("target_backend = \"x\"\n[[plugin]]\nname = \"x\"\nkind = \"backend\"\nlibrary = \"{lib}\"\n[[plugin]]\nname = \"y\"\nkind = \"{kind}\"\nlibrary = \"{lib}\"\n"),
        "test",
        Path::new("."),
    )
    .unwrap()
}

fn load_err(cfg: &PluginsConfig, name: &str) -> String {
    match plugins::load_backend(cfg, name) {
        Ok(_) => panic!("loading {name} should fail"),
        Err(e) => e.to_string(),
    }
}

fn coordgen(args: &[&str]) -> (i32, String, String) {
    // Calibrations and drafter caches go under target/, never into the user's cache.
    let out = Command::new(plugin_dir().join("coordgen"))
        .args(args)
        .env("COORDGEN_CACHE", plugin_dir().join("test-tmp").join("cli-cache"))
        .output()
        .expect("run coordgen (build the workspace first)");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tiny_model(dir: &Path) -> std::path::PathBuf {
    let spec = Spec::tiny(Arch::Llama);
    let p = dir.join("tiny.gguf");
    write_gguf(&spec, &random_weights(&spec, 9), GgmlType::Q4_0, &p);
    p
}

#[test]
fn cli_lists_plugins() {
    let dir = temp_dir("cli-plugins");
    let cfg = dir.join("plugins.toml");
    std::fs::write(&cfg, format!("target_backend = \"cpu\"\n{}", plugin_entry("cpu", "backend", "coordgen_backend_cpu", ""))).unwrap();
    let (code, out, err) = coordgen(&["plugins", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with("cpu")).expect("cpu listed");
    assert!(line.contains("backend") && line.contains("libcoordgen_backend_cpu.so"), "{line}");
    assert!(line.split_whitespace().nth(2) == Some(&coordgen_interface::INTERFACE_VERSION.to_string()), "{line}");
}

#[test]
fn other_interface_version_is_refused() {
    let lib = plugin_dir().join("libcoordgen_test_old_interface.so");
    let e = load_err(&config(lib.to_str().unwrap(), "backend"), "x");
    assert!(e.contains("interface version") && e.contains("rebuild"), "{e}");
}

#[test]
fn missing_unloadable_and_wrong_kind_libraries_are_refused() {
    let dir = temp_dir("bad-libs");
    let e = load_err(&config("/nonexistent/libnope.so", "backend"), "x");
    assert!(e.contains("does not exist"), "{e}");
    let e = load_err(&config("no_such_plugin_name", "backend"), "x");
    assert!(e.contains("not found"), "{e}");
    let junk = dir.join("libjunk.so");
    std::fs::write(&junk, b"this is not a shared library").unwrap();
    let e = load_err(&config(junk.to_str().unwrap(), "backend"), "x");
    assert!(e.contains("cannot load"), "{e}");
    // The CPU backend declared as a drafter.
    let cpu = plugin_dir().join("libcoordgen_backend_cpu.so");
    let cfg = config(cpu.to_str().unwrap(), "drafter");
    let e = match plugins::load_drafter(&cfg, "y") {
        Ok(_) => panic!("a backend library must not load as a drafter"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("holds a 'backend' plugin") && e.contains("'drafter'"), "{e}");
}

#[test]
fn plugin_panics_become_errors() {
    let dir = temp_dir("panicky");
    let lib = plugin_dir().join("libcoordgen_test_panicky.so");
    let (mut b, _) = plugins::load_backend(&config(lib.to_str().unwrap(), "backend"), "x").unwrap();
    let e = b.load_model(&dir.join("whatever.gguf")).unwrap_err().to_string();
    assert!(e.contains("plugin panicked") && e.contains("cannot load"), "{e}");
    let e = b.forward(&Forward { slot: 1, tokens: &[1], positions: &[0], mask: &[], logit_rows: &[0] }).unwrap_err().to_string();
    assert!(e.contains("plugin panicked") && e.contains("index out of bounds"), "{e}");
    // The plugin still answers after panicking.
    assert_eq!(b.slot_len(1).unwrap(), 0);
}

#[test]
fn corrupt_and_truncated_gguf_are_reported() {
    let dir = temp_dir("bad-gguf");
    let good = std::fs::read(tiny_model(&dir)).unwrap();
    let check = |name: &str, bytes: &[u8], want: &str| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = match GgufFile::open(&p) {
            Ok(_) => panic!("{name} should not open"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{name}: {e}");
    };
    check("truncated-data.gguf", &good[..good.len() - 100], "truncated");
    check("truncated-header.gguf", &good[..300], "truncated");
    check("tiny.gguf", &good[..3], "too short");
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    check("magic.gguf", &bad_magic, "not a GGUF file");
    let mut v1 = good.clone();
    v1[4] = 1;
    check("v1.gguf", &v1, "GGUF version 1");
    // Version 2 has the same layout as 3 and loads.
    let mut v2 = good.clone();
    v2[4] = 2;
    std::fs::write(dir.join("v2.gguf"), &v2).unwrap();
    assert_eq!(GgufFile::open(dir.join("v2.gguf")).unwrap().version, 2);
    // Unknown tensor type: patch the type id of the first tensor (Q8_1, not a storage type).
    let orig = dir.join("orig.gguf");
    std::fs::write(&orig, &good).unwrap();
    let f = GgufFile::open(&orig).unwrap();
    let first = &f.tensors[0];
    let name_bytes = first.name.as_bytes();
    let pos = good.windows(name_bytes.len()).position(|w| w == name_bytes).unwrap();
    let type_pos = pos + name_bytes.len() + 4 + 8 * first.dims.len();
    let mut unknown = good.clone();
    unknown[type_pos..type_pos + 4].copy_from_slice(&9u32.to_le_bytes());
    check("unknown-type.gguf", &unknown, "unsupported ggml type id 9");
}

#[test]
fn unknown_architecture_and_bad_config_are_reported() {
    let dir = temp_dir("bad-arch");
    let spec = Spec::tiny(Arch::Qwen2);
    let w = random_weights(&spec, 4);
    let d = dir.join("hf");
    write_hf_dir(&spec, &w, safetensors::Dtype::F32, 1, &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), cfg.replace("\"qwen2\"", "\"mamba\"")).unwrap();
    let e = ModelFile::open(&d).unwrap().hparams().unwrap_err().to_string();
    assert!(e.contains("architecture 'mamba'"), "{e}");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = ModelFile::open(&d).err().unwrap().to_string();
    assert!(e.contains("config.json is not valid JSON"), "{e}");
    std::fs::write(d.join("config.json"), &cfg).unwrap();
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = ModelFile::open(&d).err().unwrap().to_string();
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn over_long_prompt_and_full_context_are_errors() {
    let dir = temp_dir("long-prompt");
    let p = tiny_model(&dir);
    let mut s = Session::open(cpu_backend(1), &p, 16).unwrap();
    let long: Vec<u32> = (0..40).collect();
    let e = s.prefill(&long).unwrap_err().to_string();
    assert!(e.contains("40 tokens") && e.contains("context holds 16"), "{e}");
    // The backend itself refuses to overfill a slot.
    let e = s.forward(&long[..20], &long[..20], &[], &[]).unwrap_err().to_string();
    assert!(e.contains("context is full"), "{e}");
    let e = s.forward(&[99999], &[0], &[], &[0]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    // And the CLI exits non-zero with the message.
    let cfg = dir.join("plugins.toml");
    std::fs::write(&cfg, format!("target_backend = \"cpu\"\n{}", plugin_entry("cpu", "backend", "coordgen_backend_cpu", ""))).unwrap();
    let prompt = "x".repeat(100);
    let (code, _, err) = coordgen(&["--config", cfg.to_str().unwrap(), "generate", "-m", p.to_str().unwrap(), "--ctx-size", "32", "-p", &prompt]);
    assert_ne!(code, 0);
    assert!(err.contains("the prompt has 100 tokens"), "{err}");
}

#[test]
fn cli_reports_malformed_config_and_bad_model_with_nonzero_exit() {
    let dir = temp_dir("cli-bad");
    let cfg = dir.join("plugins.toml");
    std::fs::write(&cfg, "target_backend = \"cpu\"\n[[plugin]]\nname = \"cpu\"\nkind = \"backend\"\nlibrary = [oops\n").unwrap();
    let (code, _, err) = coordgen(&["--config", cfg.to_str().unwrap(), "plugins"]);
    assert_ne!(code, 0);
    assert!(err.contains("line 5"), "{err}");
    let good_cfg = format!("target_backend = \"cpu\"\n{}", plugin_entry("cpu", "backend", "coordgen_backend_cpu", ""));
    std::fs::write(&cfg, good_cfg).unwrap();
    let bad = dir.join("bad.gguf");
    let good = std::fs::read(tiny_model(&dir)).unwrap();
    std::fs::write(&bad, &good[..good.len() / 2]).unwrap();
    let (code, _, err) = coordgen(&["--config", cfg.to_str().unwrap(), "generate", "-m", bad.to_str().unwrap(), "-p", "hi"]);
    assert_ne!(code, 0);
    assert!(err.contains("truncated") && !err.contains("panicked"), "{err}");
    let (code, _, err) = coordgen(&["--config", cfg.to_str().unwrap(), "generate", "-m", "/no/such/model.gguf", "-p", "hi"]);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn bad_backend_options_are_refused() {
    let lib = plugin_dir().join("libcoordgen_backend_cpu.so");
    for (opts, want) in [("activation_bits = 7", "activation_bits must be 15 or 8"), ("kv_type = \"q4\"", "kv_type must be \"f32\" or \"f16\""), ("threds = 2", "unknown field `threds`")] {
        let cfg = PluginsConfig::parse(
            &format!("target_backend = \"cpu\"\n[[plugin]]\nname = \"cpu\"\nkind = \"backend\"\nlibrary = \"{}\"\n[plugin.options]\n{opts}\n", lib.display()),
            "test",
            Path::new("."),
        )
        .unwrap();
        let e = load_err(&cfg, "cpu");
        assert!(e.contains("could not start") && e.contains(want), "{e}");
    }
}
