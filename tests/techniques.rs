//! CoordGen's techniques end to end on real models: the cost model is calibrated, cached
//! and re-used; the adaptive scheduler plugin sizes the prefill from it; the target's
//! calibrated predictions are what its full logits say; and every configuration of the
//! ablation (prompt lookup, retrieval, + calibration, + reuse and extension, + adaptive
//! scheduling) gives greedy output identical to plain decoding.

use std::path::{Path, PathBuf};
use std::sync::Once;

use coordgen::chat::Message;
use coordgen::config::PluginsConfig;
use coordgen::engine::{GenerateParams, Session, Techniques};
use coordgen::{calibrate, plugins, replay, scheduler, workload};
use coordgen_tests::*;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Every test of this file shares one cache directory (the calibration lives there).
fn cache() -> PathBuf {
    static ONCE: Once = Once::new();
    let d = plugin_dir().join("test-tmp").join(format!("techniques-cache-{}", std::process::id()));
    ONCE.call_once(|| {
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::env::set_var("COORDGEN_CACHE", &d);
    });
    d
}

fn config(dir: &Path, extra: &str) -> PluginsConfig {
    let text = [
        format!("target_backend = \"cpu\"\n{extra}\n"),
        cpu_entry(2),
        plugin_entry("ngram", "drafter", "coordgen_drafter_ngram", ""),
        plugin_entry("retrieval", "drafter", "coordgen_drafter_retrieval", ""),
        plugin_entry("adaptive", "scheduler", "coordgen_scheduler_adaptive", ""),
    ];
    write_config(dir, &text.concat())
}

fn summary_prompt(s: &Session) -> Vec<u32> {
    let doc = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap()[..1800].to_string();
    let text = s.render_chat(&[Message::new("user", &format!("Summarize the following text, quoting its key sentences.\n\n{doc}"))], true).unwrap();
    s.tok().encode(&text, true).unwrap()
}

#[test]
fn calibration_is_measured_once_then_cached_per_model() {
    let _c = cache();
    let mut s = Session::open(cpu_backend(2), &model_file(SMOL), 1024).unwrap();
    let (a, measured) = calibrate::cost_samples(&mut s, false).unwrap();
    let (b, again) = calibrate::cost_samples(&mut s, false).unwrap();
    assert!(!again || measured, "a second call must not measure again");
    assert_eq!(a, b, "the cached calibration is the measured one");
    for w in [1u32, 2, 4, 8, 16, 32] {
        assert!(a.iter().any(|x| x.width == w && x.rows == w), "verify width {w} calibrated");
    }
    assert!(a.iter().any(|x| x.width == 64 && x.rows == 1), "prefill widths calibrated");
    assert!(a.iter().map(|x| x.context).collect::<std::collections::BTreeSet<_>>().len() == 2, "two context lengths");
    // Every sample is a real measurement (no timing comparisons: tests share a noisy machine,
    // and on the 135M model width 32 costs little more than width 1).
    assert!(a.iter().all(|x| x.micros > 0), "{a:?}");
    // Another model has another key.
    let other = Session::open(cpu_backend(2), &model_file("qwen2.5-coder-0.5b-instruct.gguf"), 1024).unwrap();
    assert_ne!(calibrate::key(&s), calibrate::key(&other));
    // So does the same model on a backend with other options (its kernels time differently).
    let f16 = Session::open(cpu_backend_with(2, "kv_type = \"f16\""), &model_file(SMOL), 1024).unwrap();
    assert_ne!(calibrate::key(&s), calibrate::key(&f16));
    assert!(calibrate::key(&s).contains("coordgen_backend_cpu"), "the key names the plugin library");
    let (_, forced) = calibrate::cost_samples(&mut s, true).unwrap();
    assert!(forced, "force re-measures");
}

#[test]
fn calibrated_predictions_are_the_targets_own_top_tokens() {
    let _c = cache();
    let mut s = Session::open(cpu_backend(2), &model_file(SMOL), 1024).unwrap();
    let prompt = summary_prompt(&s);
    s.set_prefill_chunk(64);
    s.prefill_with(&prompt, Some((3, 5))).unwrap();
    let pr = s.predictions().clone();
    assert_eq!(pr.k, 3);
    assert!(pr.positions.iter().all(|p| p % 5 == 0 || *p as usize == prompt.len() - 1));
    assert!(pr.len() >= prompt.len() / 5);
    // A second prefill of the same prompt keeps the predictions of the cached positions.
    s.prefill_with(&prompt, Some((3, 5))).unwrap();
    assert_eq!(s.predictions().positions[..pr.len() - 1], pr.positions[..pr.len() - 1]);
    // The full logits of every position (one window over the whole prompt).
    let ppl = s.perplexity(&prompt, prompt.len(), true).unwrap();
    let argmax = &ppl.windows.as_ref().unwrap()[0].argmax;
    let logprob = &ppl.windows.as_ref().unwrap()[0].logprob;
    let mut checked = 0;
    for (i, &p) in pr.positions.iter().enumerate() {
        let p = p as usize;
        if p + 1 >= prompt.len() {
            continue;
        }
        assert_eq!(pr.tokens[i * 3], argmax[p], "position {p}");
        let probs = &pr.probs[i * 3..i * 3 + 3];
        assert!(probs[0] >= probs[1] && probs[1] >= probs[2] && probs.iter().sum::<f32>() <= 1.0 + 1e-5);
        // Where the prompt's next token is the top prediction, its probability matches.
        if prompt[p + 1] == argmax[p] {
            assert!((probs[0].ln() - logprob[p]).abs() < 1e-3, "position {p}: {} vs {}", probs[0].ln(), logprob[p]);
        }
        checked += 1;
    }
    assert!(checked > 10);
}

#[test]
fn every_ablation_configuration_keeps_greedy_output_identical() {
    let _c = cache();
    let dir = temp_dir("techniques-ablation");
    let cfg = config(&dir, "");
    let mut s = Session::open(cpu_backend(2), &model_file(SMOL), 2048).unwrap();
    s.set_scheduler(scheduler::load_scheduler(&cfg, "adaptive").unwrap()).unwrap();
    let doc = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap();
    let prompts = vec![
        workload::Prompt { id: "sum".into(), category: "summarization".into(), prompt: format!("Summarize, quoting the text:\n\n{}", &doc[..1600]) },
        workload::Prompt { id: "chat".into(), category: "conversation".into(), prompt: "Write a short poem about the sea.".into() },
    ];
    let mut modes = workload::ablation_modes(&cfg, &s).unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["plain", "pld", "retrieval", "calibrated", "extended", "full"]);
    let results = workload::run(&mut s, &prompts, &mut modes, 48, &mut |_| {}).unwrap();
    assert_eq!(results.len(), 12);
    for r in &results {
        assert!(r.identical_to_plain, "{} in mode {} differs from plain", r.id, r.mode);
        assert!(r.e2e_ms >= r.decode_ms && r.cpu_s_per_token > 0.0);
    }
    assert!(results.iter().any(|r| r.mode != "plain" && r.mean_accepted > 0.0), "some drafts were accepted");
}

#[test]
fn full_configuration_reports_its_techniques_and_the_scheduler_chooses_from_the_cost_model() {
    let _c = cache();
    let dir = temp_dir("techniques-full");
    let cfg = config(&dir, "drafter = \"retrieval\"\nscheduler = \"adaptive\"");
    assert_eq!(cfg.default_scheduler(), "adaptive");
    let mut s = Session::open(cpu_backend(2), &model_file(SMOL), 2048).unwrap();
    s.set_scheduler(scheduler::load_scheduler(&cfg, "adaptive").unwrap()).unwrap();
    let prompt = summary_prompt(&s);
    let plain = s.generate(&prompt, &GenerateParams { max_tokens: 64, ..Default::default() }, &mut |_| {}).unwrap();
    s.set_drafter(Some(plugins::load_drafters(&cfg, "retrieval").unwrap())).unwrap();
    let g = s.generate(&prompt, &GenerateParams { max_tokens: 64, techniques: Techniques::default(), ..Default::default() }, &mut |_| {}).unwrap();
    assert_eq!(g.tokens, plain.tokens);
    let sp = g.spec.unwrap();
    assert_eq!(sp.scheduler, "adaptive");
    assert!(sp.calibrated_positions > 0 && sp.calibration_stride >= 2, "{sp:?}");
    // Retrieval scores its drafts, so every verified draft was planned and counted under a
    // confidence class (or the reused-segment class).
    assert!(sp.draft_steps > 0, "{sp:?}");
    assert_eq!(sp.drafts_by_confidence.iter().sum::<u64>(), sp.draft_steps, "{sp:?}");
    assert_eq!(sp.accepted_by_confidence.iter().sum::<u64>(), sp.accepted, "{sp:?}");
    // The prefill chunk is the calibrated prefill width with the most tokens per ms.
    let best = s
        .costs()
        .iter()
        .filter(|c| c.rows == 1 && c.width > 1 && c.context == s.costs()[0].context)
        .max_by(|a, b| (a.width as f64 / a.micros as f64).total_cmp(&(b.width as f64 / b.micros as f64)))
        .unwrap()
        .width as usize;
    assert_eq!(sp.prefill_chunk, best);
    // With calibration off, no predictions reach the drafter.
    let g = s.generate(&prompt, &GenerateParams { max_tokens: 16, techniques: Techniques::none(), ..Default::default() }, &mut |_| {}).unwrap();
    assert_eq!(g.spec.unwrap().calibrated_positions, 0);
}

#[test]
fn bad_scheduler_configuration_is_named() {
    let dir = temp_dir("techniques-bad");
    let write = |extra: &str| {
        let p = dir.join("bad.toml");
        std::fs::write(&p, format!("target_backend = \"cpu\"\n{extra}\n[[plugin]]\nname = \"cpu\"\nkind = \"backend\"\nlibrary = \"x\"\n")).unwrap();
        PluginsConfig::load(Some(&p)).map(|_| ()).unwrap_err().to_string()
    };
    assert!(write("scheduler = \"nope\"").contains("scheduler 'nope' is not among"));
    assert!(write("scheduler = \"cpu\"").contains("is a backend plugin, not a scheduler"));
    assert!(write("[techniques]\ncalibraton = true").contains("calibraton"));
    let cfg = config(&dir, "");
    let e = scheduler::load_scheduler(&cfg, "ngram").err().unwrap().to_string();
    assert!(e.contains("not a scheduler"), "{e}");
}

#[test]
fn replayed_drafting_matches_live_verification_at_the_same_budget() {
    let _c = cache();
    let dir = temp_dir("techniques-replay");
    let cfg = config(&dir, "");
    let mut s = Session::open(cpu_backend(2), &model_file(SMOL), 2048).unwrap();
    s.set_scheduler(scheduler::load_scheduler(&cfg, "adaptive").unwrap()).unwrap();
    let doc = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap();
    let prompts = vec![workload::Prompt { id: "sum".into(), category: "summarization".into(), prompt: format!("Summarize the following text, quoting its key sentences.\n\n{}", &doc[..1800]) }];
    let path = dir.join("traces.jsonl");
    let _ = std::fs::remove_file(&path);
    let mut traced = 0;
    let t = replay::traces(&mut s, &prompts, 48, &path, &mut |_| traced += 1).unwrap();
    assert_eq!(traced, 1);
    assert_eq!(t[0].top_tokens.len(), t[0].prompt.len() * replay::TRACE_TOP_K);
    // A second call reads the trace file instead of running the model.
    let mut again = 0;
    let t2 = replay::traces(&mut s, &prompts, 48, &path, &mut |_| again += 1).unwrap();
    assert_eq!((again, &t2[0].output), (0, &t[0].output));
    // A prompt whose text changed under the same id is traced again.
    let changed = vec![workload::Prompt { prompt: format!("{} Be brief.", prompts[0].prompt), ..prompts[0].clone() }];
    let mut retraced = 0;
    let t3 = replay::traces(&mut s, &changed, 48, &path, &mut |_| retraced += 1).unwrap();
    assert_eq!(retraced, 1);
    assert_ne!(t3[0].prompt, t[0].prompt);
    // The live run at a fixed budget, no reuse or calibration, is what the replay predicts:
    // the same drafter sees the same sequences, so it drafts the same trees.
    let budget = (4u32, 4u32);
    s.set_drafter(Some(plugins::load_drafters(&cfg, "retrieval").unwrap())).unwrap();
    let params = GenerateParams { max_tokens: 48, draft_budget: Some(budget), techniques: Techniques::none(), ..Default::default() };
    let g = s.generate(&t[0].prompt, &params, &mut |_| {}).unwrap();
    assert_eq!(g.tokens, t[0].output);
    let live = g.spec.unwrap();
    let mut d = plugins::load_drafters(&cfg, "retrieval").unwrap();
    let costs = replay::verify_costs(&s);
    let rc = replay::ReplayConfig { max_nodes: budget.0, max_depth: budget.1, calibration: None };
    let r = replay::replay(d.as_mut(), "retrieval", &t[0], &rc, &costs).unwrap();
    assert!(live.accepted > 0, "{live:?}");
    assert_eq!((r.steps as u64, (r.mean_accepted * r.steps as f64).round() as u64), (live.steps, live.accepted), "{live:?} vs {r:?}");
    assert!(r.modelled_speedup > 0.0);
    // With calibrated predictions (every 2nd prompt position) too: the trace's predictions
    // are the ones the live prefill computes.
    let cal = Techniques { calibration: true, calibration_stride: 2, ..Techniques::none() };
    // A fresh drafter (the last one keeps the response in its history) and cache (the
    // cached prompt kept the uncalibrated run's empty predictions).
    s.reset().unwrap();
    s.set_drafter(Some(plugins::load_drafters(&cfg, "retrieval").unwrap())).unwrap();
    let g = s.generate(&t[0].prompt, &GenerateParams { techniques: cal, ..params }, &mut |_| {}).unwrap();
    assert_eq!(g.tokens, t[0].output);
    let live = g.spec.unwrap();
    assert_eq!(live.calibrated_positions, t[0].prompt.len().div_ceil(2));
    let mut d = plugins::load_drafters(&cfg, "retrieval").unwrap();
    let k = d.calibration_top_k() as usize;
    let rc = replay::ReplayConfig { calibration: Some((k, 2)), ..rc };
    let r = replay::replay(d.as_mut(), "retrieval", &t[0], &rc, &costs).unwrap();
    assert_eq!((r.steps as u64, (r.mean_accepted * r.steps as f64).round() as u64), (live.steps, live.accepted), "{live:?} vs {r:?}");
    // A file that is not a trace file is never overwritten.
    let other = dir.join("notes.txt");
    std::fs::write(&other, "my notes\n").unwrap();
    let e = replay::traces(&mut s, &prompts, 48, &other, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("is not a trace file"), "{e:#}");
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "my notes\n");
    // A damaged trace file is an error naming it, not a panic.
    std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("\"output\"", "\"outptu\"")).unwrap();
    let e = replay::traces(&mut s, &prompts, 48, &path, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("traces.jsonl line 2"), "{e:#}");
}
