//! The evaluation commands: `coordgen bench` (forward widths, decode and prefill
//! throughput, a workload of prompts in several decoding modes, the techniques' ablation,
//! offline replay of drafters over recorded traces) and `coordgen calibrate`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use coordgen::config::PluginsConfig;

use crate::args::{attach_scheduler, open_session, ModelArgs};

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token widths of one forward to time, e.g. 1,2,4,8,16,32,64.
    #[arg(long, value_delimiter = ',')]
    widths: Vec<usize>,
    /// Context length before the timed forwards.
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Repetitions per width (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Decode throughput over this many tokens (like tg128).
    #[arg(long, num_args = 0..=1, default_missing_value = "128")]
    decode: Option<usize>,
    /// Prefill throughput over this many tokens (like pp512).
    #[arg(long, num_args = 0..=1, default_missing_value = "512")]
    prefill: Option<usize>,
    /// Runs of decode/prefill (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    json: bool,
    /// A JSONL workload ({id, category, prompt} per line) to run in each of --modes.
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Decoding modes for --workload: plain, a drafter name, or drafters joined by '+'; a
    /// mode ending in ':overlap' drafts the next step while the target verifies.
    #[arg(long, value_delimiter = ',', default_value = "plain,ngram,retrieval")]
    modes: Vec<String>,
    /// New tokens per prompt with --workload.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Only the first N prompts of the workload (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Only the first N prompts of each category (0 = all).
    #[arg(long, default_value_t = 0)]
    per_category: usize,
    /// The ablation of CoordGen's techniques (modes plain, pld, retrieval, calibrated,
    /// extended, full) over --workload (default: the repository's eval/public.jsonl, found from
    /// the current directory or the plugin config's).
    #[arg(long)]
    ablation: bool,
    /// Replay the --modes drafters offline over each prompt's greedy continuation, kept in
    /// this trace file (computed for prompts it lacks): tokens per step and a modelled
    /// speedup per prompt, without running the target per step. A mode ending in ':nocal'
    /// gets no calibrated predictions.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Draft budget of a replayed step: nodes,depth.
    #[arg(long, value_delimiter = ',', default_values_t = [8u32, 8])]
    replay_budget: Vec<u32>,
}

fn cmd_workload(config: &Option<PathBuf>, a: &BenchArgs, path: &Path) -> Result<()> {
    use coordgen::workload;
    let mut prompts = workload::load(path)?;
    if a.per_category > 0 {
        let mut seen = std::collections::HashMap::new();
        prompts.retain(|p| {
            let n = seen.entry(p.category.clone()).or_insert(0usize);
            *n += 1;
            *n <= a.per_category
        });
    }
    if a.limit > 0 {
        prompts.truncate(a.limit);
    }
    // Drafters that learn across runs (the n-gram cache) start empty, so a benchmark never
    // drafts from outputs it memorised in an earlier run of the same prompts.
    if std::env::var_os("COORDGEN_CACHE").is_none() {
        let dir = std::env::temp_dir().join(format!("coordgen-bench-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::env::set_var("COORDGEN_CACHE", &dir);
    }
    let cfg = PluginsConfig::load(config.as_deref())?;
    let mut s = open_session(&cfg, &a.model)?;
    attach_scheduler(&cfg, &mut s, None)?;
    if let Some(traces) = &a.replay {
        return cmd_replay(&cfg, &mut s, a, &prompts, traces);
    }
    let mut modes = if a.ablation {
        workload::ablation_modes(&cfg, &s)?
    } else {
        workload::load_modes(&cfg, &a.modes, &s, &cfg.techniques)?
    };
    let json = a.json;
    let results = workload::run(&mut s, &prompts, &mut modes, a.max_tokens, &mut |r| {
        let line = format!(
            "{:<45} {:<14} {:<16} {:>7.2} tok/s  x{:<5.2} (plain runs {:>3.0}% apart) accepted/step {:>5.2}  identical {}{}",
            r.id, r.category, r.mode, r.decode_tps, r.speedup, r.plain_spread * 100.0, r.mean_accepted, r.identical_to_plain,
            r.drafter_error.as_deref().map(|e| format!("  drafter error: {e}")).unwrap_or_default()
        );
        if json { eprintln!("{line}") } else { println!("{line}") }
    })?;
    let summary = workload::summarize(&results);
    if json {
        println!("{}", serde_json::json!({ "model": a.model.model, "max_tokens": a.max_tokens, "results": results, "summary": summary }));
    } else {
        println!(
            "\n{:<16} {:<12} {:>7} {:>9} {:>7} {:>8} {:>9} {:>10} {:>9} {:>9}",
            "group", "mode", "prompts", "median x", "min x", "tok/s", "acc/step", "e2e ms", "cpu s/tok", "identical"
        );
        for g in &summary {
            println!(
                "{:<16} {:<12} {:>7} {:>9.2} {:>7.2} {:>8.2} {:>9.2} {:>10.0} {:>9.3} {:>6}/{}",
                g.group, g.mode, g.prompts, g.median_speedup, g.min_speedup, g.median_decode_tps, g.mean_accepted, g.median_e2e_ms, g.cpu_s_per_token, g.identical, g.prompts
            );
        }
    }
    let invariant = s.backend().capabilities().batch_invariant;
    if !invariant {
        eprintln!(
            "note: backend '{}' is not batch invariant, so 'identical' compares outputs that may differ by rounding alone",
            s.backend().name()
        );
    }
    if results.iter().any(|r| !r.identical_to_plain) {
        bail!(
            "some speculative outputs differ from plain greedy output{}",
            if invariant { "" } else { " (on a backend that is not batch invariant)" }
        );
    }
    Ok(())
}

fn cmd_replay(cfg: &PluginsConfig, s: &mut coordgen::engine::Session, a: &BenchArgs, prompts: &[coordgen::workload::Prompt], path: &Path) -> Result<()> {
    use coordgen::replay;
    if a.replay_budget.len() != 2 || a.replay_budget.contains(&0) {
        bail!("--replay-budget takes two positive numbers, nodes,depth (got {:?})", a.replay_budget);
    }
    let traces = replay::traces(s, prompts, a.max_tokens, path, &mut |m| eprintln!("{m}"))?;
    let costs = replay::verify_costs(s);
    let techniques = cfg.techniques.clone();
    let stride = techniques.stride(s);
    let mut results = Vec::new();
    for name in a.modes.iter().filter(|m| m.as_str() != "plain") {
        let (spec, cal) = match name.strip_suffix(":nocal") {
            Some(d) => (d, false),
            None => (name.as_str(), techniques.calibration),
        };
        let mut d = coordgen::plugins::load_drafters(cfg, &spec.replace('+', ","))?;
        let k = d.calibration_top_k() as usize;
        let rc = replay::ReplayConfig { max_nodes: a.replay_budget[0], max_depth: a.replay_budget[1], calibration: (cal && k > 0).then_some((k, stride)) };
        for t in &traces {
            let r = replay::replay(d.as_mut(), name, t, &rc, &costs).with_context(|| format!("prompt {} in mode {name}", t.id))?;
            let line = format!(
                "{:<45} {:<14} {:<18} tokens {:>4} steps {:>4} accepted/step {:>5.2} nodes/step {:>5.2} modelled x{:.2} draft {:.0} ms",
                r.id, r.category, r.mode, r.tokens, r.steps, r.mean_accepted, r.mean_nodes, r.modelled_speedup, r.draft_ms
            );
            if a.json { eprintln!("{line}") } else { println!("{line}") }
            results.push(r);
        }
    }
    let summary = replay::summarize(&results);
    if a.json {
        println!("{}", serde_json::json!({"model": a.model.model, "max_tokens": a.max_tokens, "budget": a.replay_budget, "calibration_stride": stride, "replay": results, "summary": summary}));
    } else {
        println!("\n{:<16} {:<18} {:>7} {:>9} {:>11}", "group", "mode", "prompts", "acc/step", "modelled x");
        for g in &summary {
            println!("{:<16} {:<18} {:>7} {:>9.2} {:>11.2}", g.group, g.mode, g.prompts, g.mean_accepted, g.median_modelled_speedup);
        }
    }
    Ok(())
}

pub fn cmd_calibrate(config: &Option<PathBuf>, a: CalibrateArgs) -> Result<()> {
    let cfg = PluginsConfig::load(config.as_deref())?;
    let mut s = open_session(&cfg, &a.model)?;
    let (samples, _) = coordgen::calibrate::cost_samples(&mut s, true)?;
    s.set_costs(samples.clone());
    let mut sched = coordgen::scheduler::load_scheduler(&cfg, &cfg.default_scheduler())?;
    sched.observe_costs(&samples)?;
    let chunk = sched.prefill_chunk(512, 512)?;
    let ctxs: Vec<u32> = {
        let mut c: Vec<u32> = samples.iter().map(|x| x.context).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let free: Vec<(u32, u32)> = ctxs.iter().map(|&c| Ok((c, sched.free_width(c, 32)?))).collect::<Result<_>>()?;
    let stride = s.calibration_stride(0.10);
    if a.json {
        let rows: Vec<serde_json::Value> =
            samples.iter().map(|x| serde_json::json!({"width": x.width, "context": x.context, "logit_rows": x.rows, "ms": x.micros as f64 / 1e3})).collect();
        let free: Vec<serde_json::Value> = free.iter().map(|(c, w)| serde_json::json!({"context": c, "free_width": w})).collect();
        println!("{}", serde_json::json!({"samples": rows, "prefill_chunk": chunk, "free_width": free, "calibration_stride": stride, "scheduler": sched.name()}));
    } else {
        println!("{:>8} {:>6} {:>6} {:>10} {:>8}", "context", "width", "rows", "ms", "x w=1");
        for x in &samples {
            let one = samples.iter().find(|y| y.context == x.context && y.width == 1).map(|y| y.micros as f64).unwrap_or(f64::NAN);
            println!("{:>8} {:>6} {:>6} {:>10.2} {:>8.2}", x.context, x.width, x.rows, x.micros as f64 / 1e3, x.micros as f64 / one);
        }
        println!("scheduler {}: prefill chunk {chunk}; nearly free verify width {:?} (context, width); calibration stride {stride}", sched.name(), free);
    }
    Ok(())
}

pub fn cmd_bench(config: &Option<PathBuf>, a: BenchArgs) -> Result<()> {
    use coordgen::bench;
    if let Some(w) = a.workload.clone() {
        return cmd_workload(config, &a, &w);
    }
    if a.ablation {
        let cfg = PluginsConfig::load(config.as_deref())?;
        let candidates = [PathBuf::from("eval/public.jsonl"), cfg.base_dir.join("eval/public.jsonl")];
        let Some(w) = candidates.iter().find(|p| p.exists()) else {
            bail!("--ablation runs --workload FILE (default eval/public.jsonl of the repository, not found in the current directory nor beside {})", cfg.source);
        };
        return cmd_workload(config, &a, w);
    }
    let mut m = a.model.clone();
    let need = a.context + a.widths.iter().copied().max().unwrap_or(0) + a.prefill.unwrap_or(0) + a.decode.unwrap_or(0) + 64;
    if m.ctx_size == 0 {
        m.ctx_size = need;
    }
    let mut s = open_session(&PluginsConfig::load(config.as_deref())?, &m)?;
    let caps = s.backend().capabilities();
    let threads = caps.threads as usize;
    let mut out = serde_json::json!({
        "model": m.model,
        "backend": s.backend().name(),
        "threads": threads,
        "weight_bytes": s.model().weight_bytes,
        "extra_bytes": s.model().extra_bytes,
        "backend_stats": serde_json::from_str::<serde_json::Value>(&s.backend().stats_json()).unwrap_or_default(),
    });
    if !a.json {
        println!(
            "model: {:.0} MB of weights read per token; {:.0} MB allocated by the backend beyond the mapped file (the CPU backend's repacked weights: it releases the mapped pages they replace)",
            s.model().weight_bytes as f64 / 1e6,
            s.model().extra_bytes as f64 / 1e6
        );
    }
    let (do_widths, do_decode, do_prefill) = (!a.widths.is_empty(), a.decode.is_some(), a.prefill.is_some());
    let widths = if !do_widths && !do_decode && !do_prefill { vec![1, 2, 4, 8, 16, 32, 64] } else { a.widths.clone() };
    if !widths.is_empty() {
        let r = bench::widths(&mut s, &widths, a.context, a.reps.max(1))?;
        if !a.json {
            println!("forward latency after {} context tokens ({} threads):", a.context, threads);
            for w in &r {
                println!("  width {:>4}: {:>9.2} ms  ({:.2}x width 1)", w.width, w.ms, w.ratio);
            }
        }
        out["widths"] = serde_json::to_value(&r)?;
        out["context"] = serde_json::json!(a.context);
    }
    if let Some(n) = a.decode {
        let mut v: Vec<f64> = (0..a.runs.max(1)).map(|_| bench::decode_tps(&mut s, n)).collect::<Result<_>>()?;
        let tps = bench::median(&mut v);
        let bw = bench::read_bandwidth_gbs(threads, 1 << 30);
        let used = tps * s.model().weight_bytes as f64 / 1e9;
        if !a.json {
            println!("decode: {tps:.2} tokens/s over {n} tokens; weights read {:.1} GB/s = {:.0}% of measured read bandwidth {bw:.1} GB/s (roofline {:.1} tokens/s)",
                used, 100.0 * used / bw, bw * 1e9 / s.model().weight_bytes as f64);
        }
        out["decode_tps"] = serde_json::json!(tps);
        out["read_bandwidth_gbs"] = serde_json::json!(bw);
        out["decode_bandwidth_fraction"] = serde_json::json!(used / bw);
    }
    if let Some(n) = a.prefill {
        let mut v: Vec<f64> = (0..a.runs.max(1)).map(|_| bench::prefill_tps(&mut s, n)).collect::<Result<_>>()?;
        let tps = bench::median(&mut v);
        if !a.json {
            println!("prefill: {tps:.2} tokens/s over {n} tokens (chunks of {})", s.prefill_chunk());
        }
        out["prefill_tps"] = serde_json::json!(tps);
    }
    if a.json {
        println!("{out}");
    }
    Ok(())
}
