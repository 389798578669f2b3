//! The `coordgen` command line: generate, chat, perplexity, plugins.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use coordgen::chat::Message;
use coordgen::config::{resolve_model, PluginsConfig};
use coordgen::engine::{GenerateParams, Session, Techniques};
use coordgen::plugins;
use coordgen::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "coordgen", version, about = "On-device LLM runtime with pluggable backends and drafters")]
struct Cli {
    /// Plugin configuration (default: $COORDGEN_CONFIG, ./plugins.toml, next to the binary).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a completion for a prompt.
    Generate(GenerateArgs),
    /// Interactive chat that keeps the conversation and its KV cache between turns.
    Chat(ChatArgs),
    /// Perplexity of a text file over non-overlapping windows.
    Perplexity(PplArgs),
    /// List the plugins of the configuration.
    Plugins,
    /// Measure forward latency per width, decode and prefill speed, memory bandwidth; or run
    /// a workload of prompts in several decoding modes (--workload).
    Bench(BenchArgs),
    /// Build a retrieval datastore from a directory of text files.
    Index(IndexArgs),
    /// Measure (again) the cost model of a model on a backend and cache it.
    Calibrate(CalibrateArgs),
    /// An OpenAI-compatible HTTP server (chat/completions, completions, models, health).
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Defaults of every request (request fields override the sampling ones).
    #[command(flatten)]
    sample: SampleArgs,
    /// Address to listen on (loopback by default; anything else exposes the model).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests served at once, each in its own KV slot of --ctx-size entries; their
    /// forwards are merged into shared ones.
    #[arg(long, short = 'n', default_value_t = 1)]
    parallel: usize,
    /// Requests that may wait for a busy slot; beyond them requests get 503.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Require `Authorization: Bearer KEY` (default: $COORDGEN_API_KEY, else no key).
    #[arg(long)]
    api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body: usize,
    /// Name of the model in /v1/models (default: the -m argument's file stem or name).
    #[arg(long)]
    alias: Option<String>,
}

#[derive(Args)]
struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct IndexArgs {
    /// Directory (or file) to index.
    dir: PathBuf,
    /// Output datastore file.
    #[arg(long, short)]
    output: PathBuf,
    /// Model whose tokenizer to use (the target model).
    #[arg(long, short, default_value = "qwen-1.5b")]
    model: String,
}

#[derive(Args)]
struct BenchArgs {
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
    /// extended, full) over --workload (default ../shared/eval/public.jsonl).
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

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF file, Hugging Face directory, or a default model name (smollm2, qwen-0.5b, qwen-1.5b).
    #[arg(long, short)]
    model: String,
    /// Backend plugin to run the model (default: target_backend of plugins.toml).
    #[arg(long)]
    backend: Option<String>,
    /// Threads the backend may use (0 = the backend's default: one per physical core for the CPU backend).
    #[arg(long, short = 't', default_value_t = 0)]
    threads: u32,
    /// KV context size (0 = the model's, capped at 8192).
    #[arg(long, default_value_t = 0)]
    ctx_size: usize,
}

#[derive(Args, Clone)]
struct SampleArgs {
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Drafter plugin(s) for speculative decoding: a name from plugins.toml, several joined
    /// by ',' (asked in order), or 'none' (default: the `drafter` key of plugins.toml).
    #[arg(long)]
    drafter: Option<String>,
    /// Deepest draft to verify per step.
    #[arg(long, default_value_t = 8)]
    max_draft_depth: u32,
    /// Scheduler: a scheduler plugin of plugins.toml or the built-in 'fixed' (default: the
    /// `scheduler` key, else the 'adaptive' plugin).
    #[arg(long)]
    scheduler: Option<String>,
    /// Turn off context-aligned drafting (the target's predictions over the prompt).
    #[arg(long)]
    no_calibration: bool,
    /// Turn off reuse of rejected drafts' agreeing tails.
    #[arg(long)]
    no_reuse: bool,
    /// Turn off growing drafts into trees up to the nearly free width.
    #[arg(long)]
    no_extension: bool,
    /// Prompt positions between calibrated predictions (0 = from the cost model).
    #[arg(long)]
    calibration_stride: Option<u32>,
    /// Draft the next step while the target verifies (a drafter running a model gets
    /// `overlap_draft_threads` of the target's threads for it).
    #[arg(long)]
    overlap: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sample: SampleArgs,
    /// The prompt text.
    #[arg(long, short, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, short = 'f')]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Print one JSON object (text, token ids, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sample: SampleArgs,
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Window size in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[arg(long)]
    json: bool,
    /// Per window: each scored token's log-prob and the model's argmax.
    #[arg(long)]
    per_token: bool,
}

impl SampleArgs {
    /// The techniques the config turns on, minus those switched off here.
    fn techniques(&self, cfg: &PluginsConfig) -> Techniques {
        let t = Techniques::from_config(&cfg.techniques);
        Techniques {
            calibration: t.calibration && !self.no_calibration,
            reuse: t.reuse && !self.no_reuse,
            extension: t.extension && !self.no_extension,
            calibration_stride: self.calibration_stride.unwrap_or(t.calibration_stride),
            overlap: t.overlap || self.overlap,
        }
    }

    /// The plugin configuration with this command's `--overlap` applied: overlap decides how
    /// a drafter running a model is loaded (its threads).
    fn config(&self, path: &Option<PathBuf>) -> Result<PluginsConfig> {
        let mut cfg = PluginsConfig::load(path.as_deref())?;
        cfg.techniques.overlap |= self.overlap;
        Ok(cfg)
    }

    fn params_with(&self, cfg: &PluginsConfig) -> Result<GenerateParams> {
        Ok(GenerateParams { techniques: self.techniques(cfg), ..self.params()? })
    }

    fn params(&self) -> Result<GenerateParams> {
        if self.temp < 0.0 || !(0.0..=1.0).contains(&self.top_p) || !(0.0..=1.0).contains(&self.min_p) || self.repeat_penalty <= 0.0 {
            bail!("invalid sampling options: need temp >= 0, 0 <= top-p <= 1, 0 <= min-p <= 1, repeat-penalty > 0");
        }
        Ok(GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..Default::default()
            },
            stop: self.stop.clone(),
            stop_at_eos: !self.ignore_eos,
            max_draft_depth: self.max_draft_depth.max(1),
            ..Default::default()
        })
    }
}

/// Installs the drafter asked for on the command line (`none` = plain), or else the
/// configuration's default drafter.
fn attach_drafter(cfg: &PluginsConfig, s: &mut Session, cli: Option<&str>) -> Result<()> {
    let spec = match cli {
        Some("none") | Some("plain") => None,
        Some(x) => Some(x.to_string()),
        None => cfg.drafter.clone(),
    };
    if let Some(spec) = spec {
        let d = plugins::load_drafters(cfg, &spec)?;
        s.set_drafter(Some(d))?;
    }
    Ok(())
}

/// Installs the scheduler (measuring the cost model first if this machine, model and backend
/// have no cached calibration).
fn attach_scheduler(cfg: &PluginsConfig, s: &mut Session, cli: Option<&str>) -> Result<()> {
    let name = cli.map(str::to_string).unwrap_or_else(|| cfg.default_scheduler());
    let sched = coordgen::scheduler::load_scheduler(cfg, &name)?;
    if !coordgen::calibrate::is_cached(s) {
        eprintln!("calibrating the cost model for this machine, model and backend (once; `coordgen calibrate` redoes it)...");
    }
    s.set_scheduler(sched)
}

/// A backend other than the CPU one that fails to start or to load the model: the error,
/// and how to run without it, unless the backend's message says so already.
fn with_fallback_hint(name: &str, e: anyhow::Error) -> anyhow::Error {
    let msg = format!("{e:#}");
    if name == "cpu" || msg.contains("target_backend") || msg.contains("--backend cpu") {
        e
    } else {
        e.context(format!("backend {name:?} failed; to run on the CPU instead use --backend cpu or target_backend = \"cpu\" in plugins.toml"))
    }
}

fn open_session(cfg: &PluginsConfig, m: &ModelArgs) -> Result<Session> {
    let name = m.backend.clone().unwrap_or_else(|| cfg.target_backend.clone());
    let (mut backend, _) = plugins::load_backend(cfg, &name).map_err(|e| with_fallback_hint(&name, e.into()))?;
    if m.threads != 0 {
        backend.set_threads(m.threads)?;
    }
    let path = resolve_model(&m.model);
    if !path.exists() {
        bail!("model {} not found (run scripts/fetch_models.sh for the default models)", path.display());
    }
    let pb = indicatif::ProgressBar::new_spinner();
    if std::io::stderr().is_terminal() {
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
    } else {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb.set_message(format!("loading {}", path.display()));
    let s = Session::open(backend, &path, m.ctx_size);
    pb.finish_and_clear();
    let s = s.map_err(|e| with_fallback_hint(&name, e))?;
    // Extra bytes: what the backend allocated beyond the mapped file (the CPU backend's
    // repacked weights, whose mapped pages it releases).
    tracing::info!(model = %path.display(), arch = %s.model.arch, weight_bytes = s.model.weight_bytes, extra_bytes = s.model.extra_bytes, "model loaded");
    Ok(s)
}

fn cmd_generate(config: &Option<PathBuf>, a: GenerateArgs) -> Result<()> {
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("cannot read prompt file {}", f.display()))?,
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    let cfg = a.sample.config(config)?;
    let params = a.sample.params_with(&cfg)?;
    let mut s = open_session(&cfg, &a.model)?;
    attach_drafter(&cfg, &mut s, a.sample.drafter.as_deref())?;
    attach_scheduler(&cfg, &mut s, a.sample.scheduler.as_deref())?;
    let prompt_text = if a.chat {
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &text));
        s.render_chat(&msgs, true)?
    } else {
        text
    };
    let prompt = s.tok.encode(&prompt_text, true)?;
    let json = a.json;
    let mut stdout = std::io::stdout();
    let g = s.generate(&prompt, &params, &mut |piece| {
        if !json {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if json {
        let v = serde_json::json!({
            "text": g.text,
            "tokens": g.tokens,
            "prompt_tokens": prompt.len(),
            "finish_reason": g.finish_reason,
            "timings": {
                "prompt_tokens": g.timings.prompt_tokens,
                "prefill_tokens": g.timings.prefill_tokens,
                "prefill_ms": g.timings.prefill_ms,
                "prefill_tps": g.timings.prefill_tps(),
                "generated_tokens": g.timings.generated_tokens,
                "decode_ms": g.timings.decode_ms,
                "decode_tps": g.timings.decode_tps(),
            },
            "speculative": g.spec,
        });
        println!("{v}");
    } else {
        println!();
        eprintln!("{}", g.timings.summary());
        if let Some(sp) = &g.spec {
            eprintln!("{}", coordgen::spec::run::summary(sp));
        }
    }
    Ok(())
}

fn cmd_chat(config: &Option<PathBuf>, a: ChatArgs) -> Result<()> {
    let cfg = a.sample.config(config)?;
    let params = a.sample.params_with(&cfg)?;
    let mut s = open_session(&cfg, &a.model)?;
    attach_drafter(&cfg, &mut s, a.sample.drafter.as_deref())?;
    attach_scheduler(&cfg, &mut s, a.sample.scheduler.as_deref())?;
    let mut msgs = Vec::new();
    if let Some(sys) = &a.system {
        msgs.push(Message::new("system", sys));
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    eprintln!("chat with {} ({}); /reset clears the conversation, /exit or Ctrl-D quits", a.model.model, s.model.arch);
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                msgs.retain(|m| m.role == "system");
                s.reset()?;
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        msgs.push(Message::new("user", line));
        let prompt = s.tok.encode(&s.render_chat(&msgs, true)?, true)?;
        let mut stdout = std::io::stdout();
        let g = match s.generate(&prompt, &params, &mut |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }) {
            Ok(g) => g,
            Err(e) => {
                msgs.pop();
                eprintln!("error: {e:#}");
                continue;
            }
        };
        println!();
        eprintln!("[{}]", g.timings.summary());
        msgs.push(Message::new("assistant", &g.text));
    }
    Ok(())
}

fn cmd_perplexity(config: &Option<PathBuf>, a: PplArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut m = a.model.clone();
    if m.ctx_size == 0 {
        m.ctx_size = a.ctx;
    }
    let mut s = open_session(&PluginsConfig::load(config.as_deref())?, &m)?;
    let tokens = s.tok.encode(&text, true)?;
    let t0 = std::time::Instant::now();
    let r = s.perplexity(&tokens, a.ctx, a.per_token)?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        println!("perplexity {:.4} over {} scored tokens in {} windows of {} ({:.1} s)", r.ppl, r.n_scored, r.n_windows, a.ctx, secs);
        if let Some(ws) = &r.windows {
            for (i, w) in ws.iter().enumerate() {
                println!("window {i}: logprob {:?}", w.logprob);
                println!("window {i}: argmax {:?}", w.argmax);
            }
        }
    }
    Ok(())
}

fn cmd_plugins(config: &Option<PathBuf>) -> Result<()> {
    let cfg = PluginsConfig::load(config.as_deref())?;
    println!("config: {} (target backend: {})", cfg.source, cfg.target_backend);
    println!("{:<12} {:<10} {:<10} {:<9} library", "name", "kind", "interface", "version");
    let mut failed = false;
    for r in plugins::describe_all(&cfg) {
        match r {
            Ok(i) => println!("{:<12} {:<10} {:<10} {:<9} {}", i.entry_name, i.kind, i.interface_version, i.version, i.path.display()),
            Err(e) => {
                failed = true;
                println!("error: {e}");
            }
        }
    }
    if failed {
        bail!("some plugins could not be loaded");
    }
    Ok(())
}

fn cmd_workload(config: &Option<PathBuf>, a: &BenchArgs, path: &std::path::Path) -> Result<()> {
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
        workload::load_modes(&cfg, &a.modes, &s, &Techniques::from_config(&cfg.techniques))?
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
    let invariant = s.backend.capabilities().batch_invariant;
    if !invariant {
        eprintln!(
            "note: backend '{}' is not batch invariant, so 'identical' compares outputs that may differ by rounding alone",
            s.backend.name()
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

fn cmd_replay(cfg: &PluginsConfig, s: &mut coordgen::engine::Session, a: &BenchArgs, prompts: &[coordgen::workload::Prompt], path: &std::path::Path) -> Result<()> {
    use coordgen::replay;
    if a.replay_budget.len() != 2 || a.replay_budget.contains(&0) {
        bail!("--replay-budget takes two positive numbers, nodes,depth (got {:?})", a.replay_budget);
    }
    let traces = replay::traces(s, prompts, a.max_tokens, path, &mut |m| eprintln!("{m}"))?;
    let costs = replay::verify_costs(s);
    let techniques = Techniques::from_config(&cfg.techniques);
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

fn cmd_calibrate(config: &Option<PathBuf>, a: CalibrateArgs) -> Result<()> {
    let cfg = PluginsConfig::load(config.as_deref())?;
    let mut s = open_session(&cfg, &a.model)?;
    let (samples, _) = coordgen::calibrate::cost_samples(&mut s, true)?;
    s.costs = samples.clone();
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

fn cmd_bench(config: &Option<PathBuf>, a: BenchArgs) -> Result<()> {
    use coordgen::bench;
    if let Some(w) = a.workload.clone() {
        return cmd_workload(config, &a, &w);
    }
    if a.ablation {
        let w = PathBuf::from("../shared/eval/public.jsonl");
        if !w.exists() {
            bail!("--ablation runs --workload FILE (default ../shared/eval/public.jsonl, which is not there)");
        }
        return cmd_workload(config, &a, &w);
    }
    let mut m = a.model.clone();
    let need = a.context + a.widths.iter().copied().max().unwrap_or(0) + a.prefill.unwrap_or(0) + a.decode.unwrap_or(0) + 64;
    if m.ctx_size == 0 {
        m.ctx_size = need;
    }
    let mut s = open_session(&PluginsConfig::load(config.as_deref())?, &m)?;
    let caps = s.backend.capabilities();
    let threads = caps.threads as usize;
    let mut out = serde_json::json!({
        "model": m.model,
        "backend": s.backend.name(),
        "threads": threads,
        "weight_bytes": s.model.weight_bytes,
        "extra_bytes": s.model.extra_bytes,
        "backend_stats": serde_json::from_str::<serde_json::Value>(&s.backend.stats_json()).unwrap_or_default(),
    });
    if !a.json {
        println!(
            "model: {:.0} MB of weights read per token; {:.0} MB allocated by the backend beyond the mapped file (the CPU backend's repacked weights: it releases the mapped pages they replace)",
            s.model.weight_bytes as f64 / 1e6,
            s.model.extra_bytes as f64 / 1e6
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
        let used = tps * s.model.weight_bytes as f64 / 1e9;
        if !a.json {
            println!("decode: {tps:.2} tokens/s over {n} tokens; weights read {:.1} GB/s = {:.0}% of measured read bandwidth {bw:.1} GB/s (roofline {:.1} tokens/s)",
                used, 100.0 * used / bw, bw * 1e9 / s.model.weight_bytes as f64);
        }
        out["decode_tps"] = serde_json::json!(tps);
        out["read_bandwidth_gbs"] = serde_json::json!(bw);
        out["decode_bandwidth_fraction"] = serde_json::json!(used / bw);
    }
    if let Some(n) = a.prefill {
        let mut v: Vec<f64> = (0..a.runs.max(1)).map(|_| bench::prefill_tps(&mut s, n)).collect::<Result<_>>()?;
        let tps = bench::median(&mut v);
        if !a.json {
            println!("prefill: {tps:.2} tokens/s over {n} tokens (chunks of {})", s.prefill_chunk);
        }
        out["prefill_tps"] = serde_json::json!(tps);
    }
    if a.json {
        println!("{out}");
    }
    Ok(())
}

/// Loads the model once on the backend and makes `--parallel` sessions (slots) on it, each
/// with its own drafter and scheduler, then serves.
fn cmd_serve(config: &Option<PathBuf>, a: ServeArgs) -> Result<()> {
    use coordgen::batching::Batcher;
    use coordgen::server::{Options, Served};
    if a.parallel == 0 || a.parallel > 64 {
        bail!("--parallel must be between 1 and 64");
    }
    let cfg = a.sample.config(config)?;
    let defaults = a.sample.params_with(&cfg)?;
    // One session loads the model and measures (or loads) the cost model; the others attach
    // to the same loaded model.
    let mut first = open_session(&cfg, &ModelArgs { ctx_size: if a.model.ctx_size == 0 { 4096 } else { a.model.ctx_size }, ..a.model.clone() })?;
    let costs = {
        attach_scheduler(&cfg, &mut first, a.sample.scheduler.as_deref())?;
        first.costs.clone()
    };
    let Session { mut backend, model, tok, model_path, n_ctx, slot, .. } = first;
    backend.free_slot(slot)?;
    let batcher = Batcher::new(backend);
    let drafter_spec = match a.sample.drafter.as_deref() {
        Some("none") | Some("plain") => None,
        Some(x) => Some(x.to_string()),
        None => cfg.drafter.clone(),
    };
    let mut sessions = Vec::new();
    for _ in 0..a.parallel {
        let mut s = Session::attach(batcher.backend(), model.clone(), tok.clone(), &model_path, n_ctx)?;
        s.costs = costs.clone();
        if let Some(spec) = &drafter_spec {
            s.set_drafter(Some(plugins::load_drafters(&cfg, spec)?))?;
        }
        let name = a.sample.scheduler.clone().unwrap_or_else(|| cfg.default_scheduler());
        s.set_scheduler(coordgen::scheduler::load_scheduler(&cfg, &name)?)?;
        sessions.push(s);
    }
    let factory: Option<coordgen::server::DrafterFactory> = drafter_spec.map(|spec| {
        let cfg = cfg.clone();
        Box::new(move || Ok(plugins::load_drafters(&cfg, &spec)?)) as coordgen::server::DrafterFactory
    });
    let model_id = a.alias.clone().unwrap_or_else(|| {
        let p = std::path::Path::new(&a.model.model);
        if p.exists() { p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| a.model.model.clone()) } else { a.model.model.clone() }
    });
    let mut aliases = vec![a.model.model.clone(), model_path.display().to_string()];
    if let Some(n) = model_path.file_name() {
        aliases.push(n.to_string_lossy().into_owned());
    }
    let addr: std::net::SocketAddr = format!("{}:{}", a.host, a.port).parse().or_else(|_| {
        use std::net::ToSocketAddrs;
        (a.host.as_str(), a.port).to_socket_addrs().ok().and_then(|mut i| i.next()).ok_or(())
    }).map_err(|_| anyhow::anyhow!("cannot use --host {} --port {} as an address to listen on", a.host, a.port))?;
    let api_key = a.api_key.clone().or_else(|| std::env::var("COORDGEN_API_KEY").ok()).filter(|k| !k.is_empty());
    let opts = Options {
        addr,
        api_key,
        model_id,
        model_aliases: aliases,
        max_body: a.max_body,
        queue: a.queue,
        defaults,
        shutdown_grace: std::time::Duration::from_secs(10),
    };
    coordgen::server::run(Served::new(opts, sessions, batcher, factory)?)
}

fn cmd_index(a: IndexArgs) -> Result<()> {
    let model = resolve_model(&a.model);
    let r = coordgen::index::build(&a.dir, &model, &a.output)?;
    println!("indexed {} files ({} skipped as binary or empty): {} tokens -> {}", r.files, r.skipped, r.tokens, a.output.display());
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("COORDGEN_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs that go to files and pipes stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(&cli.config, a),
        Cmd::Chat(a) => cmd_chat(&cli.config, a),
        Cmd::Perplexity(a) => cmd_perplexity(&cli.config, a),
        Cmd::Plugins => cmd_plugins(&cli.config),
        Cmd::Bench(a) => cmd_bench(&cli.config, a),
        Cmd::Index(a) => cmd_index(a),
        Cmd::Calibrate(a) => cmd_calibrate(&cli.config, a),
        Cmd::Serve(a) => cmd_serve(&cli.config, a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
