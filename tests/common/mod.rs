//! Test helpers: synthetic tiny models of every architecture written as GGUF (any tensor
//! type) and as Hugging Face safetensors directories, a naive f64 reference forward that
//! follows the Hugging Face conventions, and loading the CPU backend through its plugin.

pub mod http;
pub mod reference;
pub mod synthetic;

pub use reference::*;
pub use synthetic::*;

use std::path::{Path, PathBuf};

use coordgen::config::PluginsConfig;
use coordgen::engine::Session;
use coordgen::plugins::{self, Backend};
use serde_json::Value as Json;


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

pub fn bits(v: &[f32]) -> Vec<u32> {
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
