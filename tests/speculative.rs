//! Speculative decoding end to end: greedy output is token-for-token identical to plain
//! decoding with every drafter plugin (and combinations) on real models; sampled output
//! follows the target's distribution (chi-square against the exact distribution); failing,
//! incompatible or corrupt drafters give plain output or clear errors.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use coordgen::chat::Message;
use coordgen::config::PluginsConfig;
use coordgen::engine::{GenerateParams, Generation, Session};
use coordgen::plugins::{self, Draft, Drafter, Feedback, PResult};
use coordgen::sampling::{Sampler, SamplingParams};
use coordgen_model::quant::GgmlType;
use coordgen_tests::*;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const QWEN: &str = "qwen2.5-coder-0.5b-instruct.gguf";

/// A config with every drafter; `extra` is appended (more entries or options).
fn config(dir: &Path, extra: &str) -> PluginsConfig {
    let cache = format!("cache_dir = \"{}\"", dir.join("cache").display());
    let text = [
        "target_backend = \"cpu\"\n".to_string(),
        cpu_entry(2),
        plugin_entry("ngram", "drafter", "coordgen_drafter_ngram", &cache),
        plugin_entry("bigram", "drafter", "bigram_drafter", ""),
        format!("{extra}\n"),
    ];
    write_config(dir, &text.concat())
}

fn chat_prompt(s: &Session, user: &str) -> Vec<u32> {
    s.tok().encode(&s.render_chat(&[Message::new("user", user)], true).unwrap(), true).unwrap()
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams { max_tokens: n, ..Default::default() }
}

/// Greedy with a fixed draft budget every step (deep trees whatever the machine's timing).
fn greedy_fixed(n: usize) -> GenerateParams {
    GenerateParams { max_tokens: n, draft_budget: Some((10, 6)), ..Default::default() }
}

fn run(s: &mut Session, d: Option<Box<dyn Drafter>>, prompt: &[u32], p: &GenerateParams) -> Generation {
    s.set_drafter(d).unwrap();
    let g = s.generate(prompt, p, &mut |_| {}).unwrap();
    s.set_drafter(None).unwrap();
    g
}

fn document() -> String {
    std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap()[..1500].to_string()
}

#[test]
fn greedy_output_is_identical_with_every_drafter() {
    let dir = temp_dir("spec-greedy");
    let smol = model_file(SMOL);
    let ds = dir.join("docs.cgds");
    coordgen::index::build(&repo_path("tests/fixtures/eval_text.txt"), &smol, &ds).unwrap();
    let extra = format!(
        r#"[[plugin]]
name = "retrieval"
kind = "drafter"
library = "{d}/libcoordgen_drafter_retrieval.so"
[[plugin]]
name = "retrieval-ds"
kind = "drafter"
library = "{d}/libcoordgen_drafter_retrieval.so"
[plugin.options]
datastore = "{ds}"
[[plugin]]
name = "model"
kind = "drafter"
library = "{d}/libcoordgen_drafter_model.so"
[plugin.options]
model = "{m}"
backend = "cpu"
"#,
        d = plugin_dir().display(),
        ds = ds.display(),
        m = smol.display()
    );
    let cfg = config(&dir, &extra);
    let mut s = Session::open(cpu_backend(2), &smol, 2048).unwrap();
    let doc = document();
    let prompts = [
        chat_prompt(&s, &format!("Here is a text:\n\n{doc}\n\nRepeat its first two sentences exactly.")),
        chat_prompt(&s, "Write a short poem about the sea."),
        // Continuing the indexed document without it in the prompt: only the datastore knows it.
        s.tok().encode(&doc[..300], true).unwrap(),
    ];
    for (pi, prompt) in prompts.iter().enumerate() {
        let plain = run(&mut s, None, prompt, &greedy(96));
        assert!(plain.spec.is_none());
        for name in ["ngram", "retrieval", "retrieval-ds", "model", "bigram", "retrieval,model", "ngram,bigram"] {
            let d = plugins::load_drafters(&cfg, name).unwrap();
            let g = run(&mut s, Some(d), prompt, &greedy_fixed(96));
            assert_eq!(g.tokens, plain.tokens, "prompt {pi}, drafter {name}: output differs from plain greedy");
            let st = g.spec.unwrap();
            assert!(st.drafter_error.is_none(), "{name}: {:?}", st.drafter_error);
            // Each step yields its accepted drafts plus one token (the last step may overshoot).
            assert!(st.steps as usize + st.accepted as usize + 1 >= g.tokens.len(), "{name}: {st:?}");
            if pi == 0 && name != "bigram" {
                assert!(st.accepted > 0, "prompt {pi}, {name}: nothing accepted on a copying prompt: {st:?}");
            }
            if name == "model" {
                // The draft model is the target itself: its drafts are the target's argmax.
                assert!(st.mean_accepted > 1.0, "model drafting itself: {st:?}");
            }
            if pi == 2 && name == "retrieval-ds" {
                assert!(st.accepted > 10, "the datastore should supply the document's continuation: {st:?}");
            }
        }
    }
}

/// Sampling draws one number per sequence position from the seed, so a sampled request
/// with a drafter gives exactly the tokens plain sampling gives with the same seed (drafts
/// are accepted when they equal the token the draw picks), whichever drafter.
#[test]
fn sampled_output_with_a_drafter_equals_plain_sampling_with_the_same_seed() {
    let dir = temp_dir("spec-seeded");
    let smol = model_file(SMOL);
    let extra = format!("[[plugin]]\nname = \"retrieval\"\nkind = \"drafter\"\nlibrary = \"{}/libcoordgen_drafter_retrieval.so\"\n", plugin_dir().display());
    let cfg = config(&dir, &extra);
    let mut s = Session::open(cpu_backend(2), &smol, 2048).unwrap();
    let doc = document();
    let prompt = chat_prompt(&s, &format!("Here is a text:\n\n{doc}\n\nRepeat its first two sentences exactly."));
    let mut accepted = 0;
    for seed in [1u64, 2, 3] {
        let p = GenerateParams {
            max_tokens: 64,
            sampling: SamplingParams { temperature: 0.7, top_p: 0.95, seed, ..Default::default() },
            ..Default::default()
        };
        let plain = run(&mut s, None, &prompt, &p);
        for name in ["ngram", "retrieval"] {
            let d = plugins::load_drafters(&cfg, name).unwrap();
            let g = run(&mut s, Some(d), &prompt, &GenerateParams { draft_budget: Some((10, 6)), ..p.clone() });
            assert_eq!(g.tokens, plain.tokens, "seed {seed}, drafter {name}: sampled output differs from plain sampling");
            accepted += g.spec.unwrap().accepted;
        }
    }
    assert!(accepted > 20, "drafts were hardly accepted ({accepted}), so the test shows little");
}

#[test]
fn overlapped_drafting_is_lossless_and_drafts_during_verification() {
    let dir = temp_dir("spec-overlap");
    let smol = model_file(SMOL);
    let extra = format!(
        "[[plugin]]\nname = \"model\"\nkind = \"drafter\"\nlibrary = \"{}/libcoordgen_drafter_model.so\"\n[plugin.options]\nmodel = \"{}\"\nbackend = \"cpu\"\n",
        plugin_dir().display(),
        smol.display()
    );
    let mut cfg = config(&dir, &extra);
    let mut s = Session::open(cpu_backend(2), &smol, 2048).unwrap();
    let prompts = [
        chat_prompt(&s, &format!("Here is a text:\n\n{}\n\nRepeat its first two sentences exactly.", document())),
        chat_prompt(&s, "Write a short poem about the sea."),
    ];
    // Without overlap the draft model is loaded as configured (no threads of the target's).
    assert_eq!(plugins::load_drafters(&cfg, "model").unwrap().own_threads(), 0);
    cfg.techniques.overlap = true;
    for (pi, prompt) in prompts.iter().enumerate() {
        let plain = run(&mut s, None, prompt, &greedy(64));
        for mut p in [greedy_fixed(64), greedy(64)] {
            p.techniques.overlap = true;
            let d = plugins::load_drafters(&cfg, "model").unwrap();
            assert_eq!(d.own_threads(), 1);
            let g = run(&mut s, Some(d), prompt, &p);
            assert_eq!(g.tokens, plain.tokens, "overlapped drafting changed the output");
            let st = g.spec.unwrap();
            assert!(st.drafter_error.is_none(), "{:?}", st.drafter_error);
            // The target gave one of its two threads to the draft model, and got it back.
            assert_eq!(st.overlap_threads, 1);
            assert_eq!(s.backend().capabilities().threads, 2);
            if pi == 0 && p.draft_budget.is_some() {
                // The draft model is the target itself: on the copying prompt, where it drafts
                // confidently, whole main paths are accepted and the next draft, made during
                // verification, starts with the target's own token.
                assert!(st.overlapped_steps * 2 > st.draft_steps, "{st:?}");
            }
        }
    }
}

#[test]
fn greedy_identity_on_qwen_code_edit() {
    let dir = temp_dir("spec-qwen");
    let extra = format!("[[plugin]]\nname = \"retrieval\"\nkind = \"drafter\"\nlibrary = \"{}/libcoordgen_drafter_retrieval.so\"\n", plugin_dir().display());
    let cfg = config(&dir, &extra);
    let mut s = Session::open(cpu_backend(2), &model_file(QWEN), 2048).unwrap();
    let code = std::fs::read_to_string(repo_path("runtime/host/src/spec/emit.rs")).unwrap();
    let code: String = code.lines().take(60).collect::<Vec<_>>().join("\n");
    let prompt = chat_prompt(&s, &format!("Rename the field `emitted` to `streamed` in this Rust code and print the whole changed code:\n\n```rust\n{code}\n```"));
    let plain = run(&mut s, None, &prompt, &greedy(64));
    for name in ["ngram", "retrieval"] {
        // The adaptive policy (its choices depend on the machine's timing): identity only.
        let g = run(&mut s, Some(plugins::load_drafters(&cfg, name).unwrap()), &prompt, &greedy(64));
        assert_eq!(g.tokens, plain.tokens, "{name}, adaptive budget");
        // A fixed budget: identity, and the copied code is accepted.
        let g = run(&mut s, Some(plugins::load_drafters(&cfg, name).unwrap()), &prompt, &greedy_fixed(64));
        assert_eq!(g.tokens, plain.tokens, "{name}, fixed budget");
        let st = g.spec.unwrap();
        assert!(st.accepted > 0, "{name}: nothing accepted while editing code: {st:?}");
    }
}

/// Gemma 3 (sliding-window layers of 512) on a prompt longer than its window, asked to
/// repeat the text: greedy output with the n-gram and retrieval drafters equals plain
/// output while the verified trees sit past the window, and the copied text is accepted.
#[test]
fn greedy_identity_on_gemma3_past_its_window() {
    let dir = temp_dir("spec-gemma3");
    let extra = format!("[[plugin]]\nname = \"retrieval\"\nkind = \"drafter\"\nlibrary = \"{}/libcoordgen_drafter_retrieval.so\"\n", plugin_dir().display());
    let cfg = config(&dir, &extra);
    // 4096 entries: the windowed layers keep rings of 1024 (window + slack), which the
    // prompt wraps, so drafts are verified and compacted inside wrapped rings.
    let mut s = Session::open(cpu_backend(2), &model_file("gemma-3-270m-q4_k_m.gguf"), 4096).unwrap();
    let text = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap();
    let head: String = text.chars().take(300).collect();
    // A base model: a plain-text prompt that invites copying.
    let prompt = s.tok().encode(&format!("{text}\n\nThe same text once more, word for word:\n\n{head}"), true).unwrap();
    assert!(prompt.len() > 1100, "the prompt must outrun the 512-token window: {}", prompt.len());
    let plain = run(&mut s, None, &prompt, &greedy(48));
    for name in ["ngram", "retrieval"] {
        let g = run(&mut s, Some(plugins::load_drafters(&cfg, name).unwrap()), &prompt, &greedy(48));
        assert_eq!(g.tokens, plain.tokens, "{name}, adaptive budget");
        let g = run(&mut s, Some(plugins::load_drafters(&cfg, name).unwrap()), &prompt, &greedy_fixed(48));
        assert_eq!(g.tokens, plain.tokens, "{name}, fixed budget");
        let st = g.spec.unwrap();
        assert!(st.accepted > 0, "{name}: nothing accepted while copying: {st:?}");
    }
}

/// On a backend that runs only a few fixed widths (as an NPU's static graphs; the CPU
/// backend's `widths` option), where the host pads every prefill chunk and verification
/// tree: greedy output with drafters equals plain decoding on a backend of any width.
#[test]
fn greedy_identity_on_a_fixed_width_backend() {
    let dir = temp_dir("spec-widths");
    let extra = format!("[[plugin]]\nname = \"retrieval\"\nkind = \"drafter\"\nlibrary = \"{}/libcoordgen_drafter_retrieval.so\"\n", plugin_dir().display());
    let cfg = config(&dir, &extra);
    let smol = model_file(SMOL);
    let mut any = Session::open(cpu_backend(2), &smol, 2048).unwrap();
    let mut fixed = Session::open(cpu_backend_with(2, "widths = [1, 4, 8, 16, 64]"), &smol, 2048).unwrap();
    let doc = document();
    let prompt = chat_prompt(&any, &format!("Here is a text:\n\n{doc}\n\nRepeat its first two sentences exactly."));
    let plain = run(&mut any, None, &prompt, &greedy(64));
    assert_eq!(run(&mut fixed, None, &prompt, &greedy(64)).tokens, plain.tokens, "plain decoding, padded prefill");
    for name in ["ngram", "retrieval"] {
        let g = run(&mut fixed, Some(plugins::load_drafters(&cfg, name).unwrap()), &prompt, &greedy_fixed(64));
        assert_eq!(g.tokens, plain.tokens, "{name}, fixed budget (trees of up to 11 nodes, padded to 16)");
        let st = g.spec.unwrap();
        assert!(st.drafter_error.is_none() && st.accepted > 0, "{name}: {st:?}");
        assert_eq!(fixed.backend().slot_len(fixed.slot()).unwrap() as usize, fixed.cached().len(), "no pad entries stay behind");
    }
}

/// Proposes, after the pending token, siblings taken from a table of the target's own top
/// tokens (so they are sometimes accepted, sometimes rejected), one of them with a child.
struct TableDrafter {
    table: std::collections::HashMap<Vec<u32>, Vec<u32>>,
}

impl Drafter for TableDrafter {
    fn name(&self) -> &str {
        "table"
    }
    fn begin(&mut self, _: &[u32]) -> PResult<()> {
        Ok(())
    }
    fn propose(&mut self, seq: &[u32], _: u32, _: u32) -> PResult<Draft> {
        let key = seq[seq.len() - 1..].to_vec();
        let Some(top) = self.table.get(&key) else { return Ok(Draft::default()) };
        // Siblings: ranks 1, 3 and 5; the first gets a child (the best after it).
        let mut d = Draft { tokens: vec![top[0], top[2], top[4]], parents: vec![-1, -1, -1], scores: vec![] };
        if let Some(next) = self.table.get(&vec![seq[seq.len() - 1], top[0]]) {
            d.tokens.push(next[0]);
            d.parents.push(0);
        }
        Ok(d)
    }
    fn observe(&mut self, _: &Feedback) -> PResult<()> {
        Ok(())
    }
    fn vocabulary(&self) -> Option<PathBuf> {
        None
    }
    fn finish(&mut self) -> PResult<()> {
        Ok(())
    }
}

/// Upper 1e-4 quantile of chi-square with `df` degrees of freedom (Wilson-Hilferty).
fn chi2_limit(df: f64) -> f64 {
    let z = 3.719;
    df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3)
}

/// Chi-square statistic with cells of expected count below 5 pooled; returns (stat, df).
fn chi2(observed: &[f64], expected: &[f64]) -> (f64, f64) {
    let (mut stat, mut cells, mut po, mut pe) = (0.0, 0usize, 0.0, 0.0);
    for (&o, &e) in observed.iter().zip(expected) {
        if e < 5.0 {
            po += o;
            pe += e;
        } else {
            stat += (o - e) * (o - e) / e;
            cells += 1;
        }
    }
    if pe > 0.0 {
        stat += (po - pe) * (po - pe) / pe.max(1e-9);
        cells += 1;
    }
    (stat, (cells - 1) as f64)
}

#[test]
fn sampling_follows_the_target_distribution() {
    let dir = temp_dir("spec-sampling");
    let spec = Spec::tiny(Arch::Llama);
    let path = dir.join("tiny.gguf");
    write_gguf(&spec, &random_weights(&spec, 21), GgmlType::Q8_0, &path);
    let sp = SamplingParams { temperature: 12.0, top_k: 6, ..Default::default() };
    let prompt: Vec<u32> = vec![5, 77, 130, 9];
    let mut s = Session::open(cpu_backend(1), &path, 64).unwrap();
    let nv = s.model().n_vocab;
    let oracle = Sampler::new(sp.clone());
    // Exact distributions from plain forwards: p(t1), p(t2 | t1), p(t3 | t1 t2).
    let dist_after = |s: &mut Session, seq: &[u32]| -> Vec<(u32, f32)> {
        s.reset().unwrap();
        let pos: Vec<u32> = (0..seq.len() as u32).collect();
        let l = s.forward(seq, &pos, &[], &[seq.len() as u32 - 1]).unwrap();
        oracle.distribution(&l[..nv], seq)
    };
    let p1 = dist_after(&mut s, &prompt);
    let mut table = std::collections::HashMap::new();
    let mut joint = vec![0f64; nv * nv];
    let mut third = vec![0f64; nv];
    for &(t1, q1) in &p1 {
        let seq1: Vec<u32> = prompt.iter().copied().chain([t1]).collect();
        let p2 = dist_after(&mut s, &seq1);
        table.insert(vec![t1], p2.iter().map(|x| x.0).collect::<Vec<_>>());
        for &(t2, q2) in &p2 {
            joint[t1 as usize * nv + t2 as usize] = (q1 * q2) as f64;
            let seq2: Vec<u32> = seq1.iter().copied().chain([t2]).collect();
            let p3 = dist_after(&mut s, &seq2);
            if t2 == p2[0].0 {
                table.insert(vec![t1, t2], p3.iter().map(|x| x.0).collect());
            }
            for &(t3, q3) in &p3 {
                third[t3 as usize] += (q1 * q2 * q3) as f64;
            }
        }
    }
    s.reset().unwrap();
    let n = 6000u64;
    let mut obs_joint = vec![0f64; nv * nv];
    let mut obs_third = vec![0f64; nv];
    let (mut accepted, mut drafted) = (0u64, 0u64);
    s.set_drafter(Some(Box::new(TableDrafter { table }))).unwrap();
    for seed in 0..n {
        let p = GenerateParams {
            max_tokens: 3,
            sampling: SamplingParams { seed, ..sp.clone() },
            stop_at_eos: false,
            draft_budget: Some((8, 4)),
            ..Default::default()
        };
        let g = s.generate(&prompt, &p, &mut |_| {}).unwrap();
        assert_eq!(g.tokens.len(), 3);
        obs_joint[g.tokens[0] as usize * nv + g.tokens[1] as usize] += 1.0;
        obs_third[g.tokens[2] as usize] += 1.0;
        let st = g.spec.unwrap();
        accepted += st.accepted;
        drafted += st.drafted;
    }
    // Both acceptance and rejection happened often, so both paths are under test.
    assert!(accepted > n / 3 && accepted < drafted / 2, "accepted {accepted} of {drafted}");
    let expected: Vec<f64> = joint.iter().map(|p| p * n as f64).collect();
    let (stat, df) = chi2(&obs_joint, &expected);
    assert!(stat < chi2_limit(df), "joint (t1, t2): chi-square {stat:.1} with {df} df exceeds {:.1}", chi2_limit(df));
    let expected: Vec<f64> = third.iter().map(|p| p * n as f64).collect();
    let (stat3, df3) = chi2(&obs_third, &expected);
    assert!(stat3 < chi2_limit(df3), "t3: chi-square {stat3:.1} with {df3} df exceeds {:.1}", chi2_limit(df3));
    // The test has power: the same counts are far from a distribution tilted toward drafts.
    let tilted: Vec<f64> = (0..nv * nv).map(|i| if joint[i] > 0.0 { n as f64 / p1.len() as f64 / 6.0 } else { 0.0 }).collect();
    assert!(chi2(&obs_joint, &tilted).0 > chi2_limit(df), "the test cannot tell distributions apart");
}

#[test]
fn failing_drafters_degrade_to_plain_output() {
    let dir = temp_dir("spec-flaky");
    let mut extra = String::new();
    let modes = ["panic", "error", "garbage", "oov", "hang"];
    for mode in modes {
        extra += &format!(
            "[[plugin]]\nname = \"flaky-{mode}\"\nkind = \"drafter\"\nlibrary = \"{}/libcoordgen_test_flaky_drafter.so\"\n[plugin.options]\nmode = \"{mode}\"\nfail_after = 4\nhang_ms = 30000\n",
            plugin_dir().display()
        );
    }
    let cfg = config(&dir, &extra);
    let mut s = Session::open(cpu_backend(2), &model_file(SMOL), 1024).unwrap();
    let prompt = chat_prompt(&s, &format!("Repeat this text:\n{}", &document()[..600]));
    let plain = run(&mut s, None, &prompt, &greedy(64));
    for mode in modes {
        let d = plugins::load_drafters(&cfg, &format!("flaky-{mode}")).unwrap();
        // A short proposal limit, so the hanging drafter is abandoned after 0.5 s.
        let p = GenerateParams { draft_timeout: Some(std::time::Duration::from_millis(500)), ..greedy(64) };
        let t0 = std::time::Instant::now();
        let g = run(&mut s, Some(d), &prompt, &p);
        assert!(t0.elapsed() < std::time::Duration::from_secs(20) || mode != "hang", "the hung drafter held the request for {:?}", t0.elapsed());
        assert_eq!(g.tokens, plain.tokens, "{mode}");
        let e = g.spec.unwrap().drafter_error.unwrap_or_else(|| panic!("{mode}: the failure should be reported"));
        let want = match mode {
            "panic" => "plugin panicked: flaky drafter gave up",
            "error" => "flaky drafter error",
            "oov" => "outside the vocabulary",
            "hang" => "no answer within 500 ms",
            _ => "parents must precede",
        };
        assert!(e.contains(want), "{mode}: {e}");
    }
}

#[test]
fn incompatible_or_corrupt_drafter_inputs_are_refused() {
    let dir = temp_dir("spec-bad");
    let smol = model_file(SMOL);
    let ds = dir.join("smol.cgds");
    coordgen::index::build(&repo_path("tests/fixtures/eval_text.txt"), &smol, &ds).unwrap();
    let garbage = dir.join("garbage.cgds");
    std::fs::write(&garbage, b"CGDS but not really a datastore at all").unwrap();
    let d = plugin_dir();
    let extra = format!(
        "[[plugin]]\nname = \"smol-draft\"\nkind = \"drafter\"\nlibrary = \"{d}/libcoordgen_drafter_model.so\"\n[plugin.options]\nmodel = \"{m}\"\nbackend = \"cpu\"\n\
         [[plugin]]\nname = \"smol-ds\"\nkind = \"drafter\"\nlibrary = \"{d}/libcoordgen_drafter_retrieval.so\"\n[plugin.options]\ndatastore = \"{ds}\"\n\
         [[plugin]]\nname = \"bad-ds\"\nkind = \"drafter\"\nlibrary = \"{d}/libcoordgen_drafter_retrieval.so\"\n[plugin.options]\ndatastore = \"{g}\"\n\
         [[plugin]]\nname = \"no-backend\"\nkind = \"drafter\"\nlibrary = \"{d}/libcoordgen_drafter_model.so\"\n[plugin.options]\nmodel = \"{m}\"\n",
        d = d.display(),
        m = smol.display(),
        ds = ds.display(),
        g = garbage.display()
    );
    let cfg = config(&dir, &extra);
    let mut s = Session::open(cpu_backend(2), &model_file(QWEN), 256).unwrap();
    for name in ["smol-draft", "smol-ds"] {
        let d = plugins::load_drafters(&cfg, name).unwrap();
        let e = format!("{:#}", s.set_drafter(Some(d)).unwrap_err());
        assert!(e.contains("not compatible with the target"), "{name}: {e}");
    }
    let e = plugins::load_drafters(&cfg, "bad-ds").err().unwrap().to_string();
    assert!(e.contains("corrupt") && e.contains("coordgen index"), "{e}");
    let e = plugins::load_drafters(&cfg, "no-backend").err().unwrap().to_string();
    assert!(e.contains("backend"), "{e}");
    // A damaged n-gram cache file.
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    std::fs::write(dir.join("cache/ngram-cache.bin"), b"CGNG\x01\0\0\0\x05\0\0\0\0\0\0\0trunc").unwrap();
    let e = plugins::load_drafters(&cfg, "ngram").err().unwrap().to_string();
    assert!(e.contains("n-gram cache") && e.contains("corrupt"), "{e}");
}

#[test]
fn ngram_cache_persists_and_cancel_stops_between_steps() {
    let dir = temp_dir("spec-cache");
    let cfg = config(&dir, "");
    let mut s = Session::open(cpu_backend(2), &model_file(SMOL), 1024).unwrap();
    let prompt = chat_prompt(&s, "List the numbers from one to thirty in words, separated by commas.");
    let g = run(&mut s, Some(plugins::load_drafters(&cfg, "ngram").unwrap()), &prompt, &greedy(64));
    assert_eq!(g.tokens.len(), 64);
    let file = dir.join("cache/ngram-cache.bin");
    let c = coordgen_drafter_store::ngram_cache::NgramCache::load(&file).unwrap();
    // Every token pair of the output (with the prompt's last two tokens before it) is a key;
    // the last step may have accepted a few tokens past the limit, which are learned too.
    let seq: Vec<u32> = prompt[prompt.len() - 2..].iter().chain(&g.tokens).copied().collect();
    let pairs: std::collections::HashSet<(u32, u32)> = seq.windows(3).map(|w| (w[0], w[1])).collect();
    assert!(c.len() >= pairs.len() && c.len() <= pairs.len() + 8, "cache has {} keys, the output {} pairs", c.len(), pairs.len());
    // A new drafter instance (a new run) starts from the saved cache.
    drop(plugins::load_drafters(&cfg, "ngram").unwrap());
    // Cancellation from the streaming callback ends the request after the current step.
    let cancel = Arc::new(AtomicBool::new(false));
    let p = GenerateParams { max_tokens: 64, cancel: Some(cancel.clone()), ..Default::default() };
    s.set_drafter(Some(plugins::load_drafters(&cfg, "ngram").unwrap())).unwrap();
    let mut pieces = 0;
    let g = s.generate(&prompt, &p, &mut |_| {
        pieces += 1;
        if pieces == 3 {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert_eq!(g.finish_reason, "cancelled");
    assert!(g.tokens.len() < 64 && !g.tokens.is_empty());
}
