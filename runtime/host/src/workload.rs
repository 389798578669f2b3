//! `coordgen bench --workload`: runs each prompt of a JSONL workload (`{id, category,
//! prompt}` per line) as a chat request, greedy, in several decoding modes (plain and one
//! per drafter), and reports per prompt and per category: decode speed, speedup over plain
//! measured in the same run, mean accepted length, and whether the text equals plain output.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::bench::median;
use crate::chat::Message;
use crate::config::PluginsConfig;
use crate::engine::{GenerateParams, Session, Techniques};
use crate::plugins::{self, Drafter};
use crate::scheduler::{load_scheduler, Scheduler};
use crate::spec::policy::Policy;

/// Categories whose prompts carry the context the output draws on.
pub const CONTEXT_HEAVY: [&str; 4] = ["summarization", "rag", "code_edit", "extraction"];

#[derive(Clone, Debug)]
pub struct Prompt {
    pub id: String,
    pub category: String,
    pub prompt: String,
}

/// Reads a workload file; a malformed line is an error naming the file and line.
pub fn load(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read workload {}", path.display()))?;
    parse(&text, path)
}

/// Parses a workload's text; `path` names it in messages.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{} line {}: not valid JSON", path.display(), i + 1))?;
        let field = |k: &str| -> Result<String> {
            v.get(k).and_then(|x| x.as_str()).map(str::to_string).with_context(|| format!("{} line {}: missing string field \"{k}\"", path.display(), i + 1))
        };
        out.push(Prompt { id: field("id")?, category: field("category")?, prompt: field("prompt")? });
    }
    if out.is_empty() {
        bail!("workload {} has no prompts", path.display());
    }
    Ok(out)
}

#[derive(Clone, Debug, Serialize)]
pub struct ModeResult {
    pub id: String,
    pub category: String,
    pub mode: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub decode_tps: f64,
    /// Decode speed over plain decoding of the same prompt in the same run.
    pub speedup: f64,
    /// Drafted tokens accepted per verification step.
    pub mean_accepted: f64,
    /// Tokens produced per verification step (accepted drafts + the target's own).
    pub tokens_per_step: f64,
    pub identical_to_plain: bool,
    /// How far the prompt's two plain runs (first and last) differ in decode speed,
    /// relative to their mean: the machine's noise on this prompt, against which a speedup
    /// near 1 should be read (short answers take a second or less, and swing most).
    pub plain_spread: f64,
    /// The target's prefill of the prompt (measured once per prompt) plus the drafter's own
    /// pass over it (the draft model's prefill; next to nothing for the model-free ones).
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Prefill as above plus this mode's decode.
    pub e2e_ms: f64,
    /// Drafted tokens accepted from reused segments of rejected drafts.
    pub reused: u64,
    /// Process CPU time (all threads) per generated token, seconds.
    pub cpu_s_per_token: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drafter_error: Option<String>,
}

/// Process CPU time (user + system) in seconds, from /proc (0 where unavailable).
pub fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    (ticks(11) + ticks(12)) / 100.0
}

/// A decoding mode: a drafter (None = plain), the scheduler and the techniques it runs with.
pub struct Mode {
    pub name: String,
    pub drafter: Option<Box<dyn Drafter>>,
    pub scheduler: Option<Box<dyn Scheduler>>,
    pub techniques: Techniques,
    /// The acceptance statistics this mode's requests carry from one to the next (modes
    /// sharing a drafter must not learn from each other's runs of the same prompt).
    pub carried_policy: Option<(String, Policy)>,
}

/// Modes `plain`, a drafter name, or drafters joined by `+`, each with the configuration's
/// scheduler and techniques; a name ending in `:overlap` turns overlapped drafting on for
/// that mode. The scheduler is fed the session's calibration.
pub fn load_modes(cfg: &PluginsConfig, names: &[String], s: &Session, techniques: &Techniques) -> Result<Vec<Mode>> {
    let mut modes = Vec::new();
    let mut names: Vec<String> = names.to_vec();
    if !names.iter().any(|m| m == "plain") {
        names.insert(0, "plain".into());
    }
    for n in names {
        let (spec, overlap) = match n.strip_suffix(":overlap") {
            Some(d) => (d, true),
            None => (n.as_str(), techniques.overlap),
        };
        let mut cfg = cfg.clone();
        cfg.techniques.overlap = overlap;
        let drafter = if spec == "plain" { None } else { Some(plugins::load_drafters(&cfg, &spec.replace('+', ","))?) };
        modes.push(mode(&cfg, s, &n, drafter, &cfg.default_scheduler(), Techniques { overlap, ..techniques.clone() })?);
    }
    Ok(modes)
}

fn mode(cfg: &PluginsConfig, s: &Session, name: &str, drafter: Option<Box<dyn Drafter>>, sched: &str, techniques: Techniques) -> Result<Mode> {
    let mut sc = load_scheduler(cfg, sched)?;
    sc.observe_costs(s.costs())?;
    Ok(Mode { name: name.into(), drafter, scheduler: Some(sc), techniques, carried_policy: None })
}

/// The ablation of `coordgen bench --ablation`: plain; prompt lookup alone (`pld`, the n-gram
/// drafter without its learned cache); retrieval alone; + calibration; + reuse and
/// extension; + adaptive scheduling (`full`). All but `full` use the fixed schedule.
pub fn ablation_modes(cfg: &PluginsConfig, s: &Session) -> Result<Vec<Mode>> {
    let mut cfg = cfg.clone();
    let mut pld = cfg.entry("ngram").cloned().context("the ablation needs the 'ngram' drafter plugin in the config")?;
    pld.name = "pld".into();
    pld.options.insert("cache".into(), toml::Value::Boolean(false));
    cfg.plugins.push(pld);
    let retrieval = || plugins::load_drafters(&cfg, "retrieval").map(Some);
    let none = Techniques::none();
    let cal = Techniques { calibration: true, ..Techniques::none() };
    let all = Techniques::default();
    Ok(vec![
        mode(&cfg, s, "plain", None, "fixed", none.clone())?,
        mode(&cfg, s, "pld", Some(plugins::load_drafters(&cfg, "pld")?), "fixed", none.clone())?,
        mode(&cfg, s, "retrieval", retrieval()?, "fixed", none)?,
        mode(&cfg, s, "calibrated", retrieval()?, "fixed", cal)?,
        mode(&cfg, s, "extended", retrieval()?, "fixed", all.clone())?,
        mode(&cfg, s, "full", retrieval()?, &cfg.default_scheduler(), all)?,
    ])
}

/// Runs every prompt in every mode (plain first and again last, as the reference).
/// `progress` is told each prompt's results as they are measured.
pub fn run(s: &mut Session, prompts: &[Prompt], modes: &mut [Mode], max_tokens: usize, progress: &mut dyn FnMut(&ModeResult)) -> Result<Vec<ModeResult>> {
    let mut results = Vec::new();
    // Calibrated predictions wanted by any mode (top-k, stride).
    let calib = modes.iter().find(|m| m.techniques.calibration).and_then(|m| {
        let k = m.drafter.as_ref().map(|d| d.calibration_top_k()).unwrap_or(0) as usize;
        (k > 0).then_some((k, m.techniques.stride(s)))
    });
    for p in prompts {
        let text = s.render_chat(&[Message::new("user", &p.prompt)], true)?;
        let tokens = s.tok().encode(&text, true)?;
        // Prefill timed once per variant (plain; with calibrated predictions if a mode uses
        // them), then every mode decodes from the same cached prompt, and calibrated modes
        // get the predictions kept with it.
        let mut prefill = |c: Option<(usize, u32)>| -> Result<f64> {
            s.reset()?;
            let t = std::time::Instant::now();
            s.prefill_with(&tokens, c).with_context(|| format!("prompt {}", p.id))?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        let prefill_ms = prefill(None)?;
        let prefill_cal_ms = match calib {
            Some(c) => prefill(Some(c))?,
            None => prefill_ms,
        };
        // Plain runs first and again last; speedups are over the mean of the two, so drift
        // of the machine's speed during a prompt does not favour either side.
        let mut rows: Vec<ModeResult> = Vec::new();
        let mut plain_tokens: Option<Vec<u32>> = None;
        let mut plain_tps = Vec::new();
        let n_modes = modes.len();
        let order: Vec<usize> = (0..n_modes).chain(modes.iter().position(|m| m.drafter.is_none())).collect();
        for (k, &mi) in order.iter().enumerate() {
            let m = &mut modes[mi];
            s.set_drafter(m.drafter.take()).with_context(|| format!("mode {}", m.name))?;
            s.replace_scheduler(m.scheduler.take());
            s.set_carried_policy(m.carried_policy.take());
            let params = GenerateParams { max_tokens, techniques: m.techniques.clone(), ..Default::default() };
            let cpu0 = cpu_seconds();
            // A drafter's own pass over the prompt (the draft model's prefill) runs beside the
            // target's prefill in a normal request; here decoding starts from the cached
            // prompt, so run it before the decode clock starts and count it with the prefill
            // (and the CPU time). `generate` begins again, which for every drafter here is
            // cheap once the prompt is known (the draft model keeps its cached prefix).
            let begin_ms = match s.drafter_mut() {
                Some(d) => {
                    let t = std::time::Instant::now();
                    // An error here shows up again in `generate`, which reports it.
                    let _ = d.begin(&tokens);
                    t.elapsed().as_secs_f64() * 1e3
                }
                None => 0.0,
            };
            let g = s.generate(&tokens, &params, &mut |_| {});
            let cpu = cpu_seconds() - cpu0;
            m.drafter = s.take_drafter();
            m.scheduler = s.replace_scheduler(None);
            m.carried_policy = s.take_carried_policy();
            let pf = begin_ms + if m.techniques.calibration && m.drafter.is_some() { prefill_cal_ms } else { prefill_ms };
            let g = g.with_context(|| format!("prompt {} in mode {}", p.id, m.name))?;
            let tps = g.timings.decode_tps();
            let identical = match &plain_tokens {
                None => {
                    plain_tokens = Some(g.tokens.clone());
                    true
                }
                Some(pt) => *pt == g.tokens,
            };
            if m.drafter.is_none() {
                plain_tps.push(tps);
            }
            if k == n_modes {
                // The closing plain run only refines the reference speed (and must agree).
                if let Some(r) = rows.iter_mut().find(|r| r.mode == m.name) {
                    r.identical_to_plain &= identical;
                    r.decode_tps = (r.decode_tps + tps) / 2.0;
                    r.cpu_s_per_token = (r.cpu_s_per_token + cpu / g.tokens.len().max(1) as f64) / 2.0;
                }
                continue;
            }
            let spec = g.spec.clone().unwrap_or_default();
            rows.push(ModeResult {
                id: p.id.clone(),
                category: p.category.clone(),
                mode: m.name.clone(),
                prompt_tokens: tokens.len(),
                generated_tokens: g.tokens.len(),
                decode_tps: tps,
                speedup: 1.0,
                mean_accepted: spec.mean_accepted,
                tokens_per_step: if spec.steps > 0 { spec.tokens_per_step } else { 1.0 },
                identical_to_plain: identical,
                plain_spread: 0.0,
                prefill_ms: pf,
                decode_ms: g.timings.decode_ms,
                e2e_ms: pf + g.timings.decode_ms,
                reused: spec.reused,
                cpu_s_per_token: cpu / g.tokens.len().max(1) as f64,
                drafter_error: spec.drafter_error.clone(),
            });
        }
        let reference = plain_tps.iter().sum::<f64>() / plain_tps.len().max(1) as f64;
        let spread = match plain_tps[..] {
            [a, b] if reference > 0.0 => (a - b).abs() / reference,
            _ => 0.0,
        };
        for mut r in rows {
            r.speedup = if reference > 0.0 { r.decode_tps / reference } else { 0.0 };
            r.plain_spread = spread;
            progress(&r);
            results.push(r);
        }
    }
    Ok(results)
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupSummary {
    pub group: String,
    pub mode: String,
    pub prompts: usize,
    pub median_speedup: f64,
    pub min_speedup: f64,
    pub median_decode_tps: f64,
    pub mean_accepted: f64,
    pub tokens_per_step: f64,
    pub median_e2e_ms: f64,
    pub cpu_s_per_token: f64,
    pub identical: usize,
}

/// The summary group of a category besides its own: `context_heavy` or `other`.
pub fn group_of(category: &str) -> &'static str {
    if CONTEXT_HEAVY.contains(&category) {
        "context_heavy"
    } else {
        "other"
    }
}

/// Per category, for the context-heavy group and the others, and over all prompts.
pub fn summarize(results: &[ModeResult]) -> Vec<GroupSummary> {
    let mut groups: BTreeMap<(String, String), Vec<&ModeResult>> = BTreeMap::new();
    for r in results {
        for g in [r.category.clone(), group_of(&r.category).into(), "all".into()] {
            groups.entry((g, r.mode.clone())).or_default().push(r);
        }
    }
    groups
        .into_iter()
        .map(|((group, mode), rs)| {
            let mut sp: Vec<f64> = rs.iter().map(|r| r.speedup).collect();
            let mut tps: Vec<f64> = rs.iter().map(|r| r.decode_tps).collect();
            let mut e2e: Vec<f64> = rs.iter().map(|r| r.e2e_ms).collect();
            let n = rs.len() as f64;
            GroupSummary {
                group,
                mode,
                prompts: rs.len(),
                median_speedup: median(&mut sp),
                min_speedup: sp.iter().copied().fold(f64::INFINITY, f64::min),
                median_decode_tps: median(&mut tps),
                mean_accepted: rs.iter().map(|r| r.mean_accepted).sum::<f64>() / n,
                tokens_per_step: rs.iter().map(|r| r.tokens_per_step).sum::<f64>() / n,
                median_e2e_ms: median(&mut e2e),
                cpu_s_per_token: rs.iter().map(|r| r.cpu_s_per_token).sum::<f64>() / n,
                identical: rs.iter().filter(|r| r.identical_to_plain).count(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_name_the_line() {
        let dir = std::env::temp_dir().join(format!("cg-wl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("w.jsonl");
        std::fs::write(&p, "{\"id\":\"a\",\"category\":\"qa\",\"prompt\":\"hi\"}\n{\"id\": \"b\", \"category\": \n").unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("line 2") && e.contains("not valid JSON"), "{e}");
        std::fs::write(&p, "{\"id\":\"a\",\"prompt\":\"hi\"}\n").unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("line 1") && e.contains("\"category\""), "{e}");
        std::fs::write(&p, "\n{\"id\":\"a\",\"category\":\"qa\",\"prompt\":\"hi\"}\n").unwrap();
        assert_eq!(load(&p).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn summary_groups_and_medians() {
        let r = |id: &str, cat: &str, mode: &str, sp: f64| ModeResult {
            id: id.into(),
            category: cat.into(),
            mode: mode.into(),
            prompt_tokens: 1,
            generated_tokens: 1,
            decode_tps: 10.0 * sp,
            speedup: sp,
            mean_accepted: 0.0,
            tokens_per_step: 1.0,
            identical_to_plain: true,
            plain_spread: 0.0,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            e2e_ms: 0.0,
            reused: 0,
            cpu_s_per_token: 0.0,
            drafter_error: None,
        };
        let rs = vec![r("a", "rag", "x", 2.0), r("b", "rag", "x", 3.0), r("c", "summarization", "x", 5.0), r("d", "math", "x", 0.9)];
        let s = summarize(&rs);
        let get = |g: &str| s.iter().find(|x| x.group == g && x.mode == "x").unwrap();
        assert_eq!(get("rag").median_speedup, 2.5);
        assert_eq!(get("context_heavy").median_speedup, 3.0);
        assert_eq!(get("other").min_speedup, 0.9);
        assert_eq!(get("all").prompts, 4);
    }
}
