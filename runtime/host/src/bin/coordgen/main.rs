//! The `coordgen` command line: generate, chat, perplexity, plugins, serve, index; the
//! evaluation commands (bench, calibrate) are in `eval`, the shared options in `args`.

mod args;
mod eval;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use coordgen::chat::Message;
use coordgen::config::{resolve_model, PluginsConfig};
use coordgen::engine::Session;
use coordgen::plugins;

use args::{attach_scheduler, open_session, ModelArgs, SampleArgs};
use eval::{cmd_bench, cmd_calibrate, BenchArgs, CalibrateArgs};

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
    /// Do not copy a shared prompt prefix from another busy slot (each slot then prefills
    /// its whole prompt, as when the prompts differ).
    #[arg(long)]
    no_prefix_sharing: bool,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body: usize,
    /// Name of the model in /v1/models (default: the -m argument's file stem or name).
    #[arg(long)]
    alias: Option<String>,
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

fn cmd_generate(config: &Option<PathBuf>, a: GenerateArgs) -> Result<()> {
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("cannot read prompt file {}", f.display()))?,
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    let cfg = a.sample.config(config)?;
    let params = a.sample.params_with(&cfg)?;
    let mut s = open_session(&cfg, &a.model)?;
    s.attach_drafter_from(&cfg, a.sample.drafter.as_deref())?;
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
    let prompt = s.tok().encode(&prompt_text, true)?;
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
            eprintln!("{}", coordgen::spec::summary(sp));
        }
    }
    Ok(())
}

fn cmd_chat(config: &Option<PathBuf>, a: ChatArgs) -> Result<()> {
    let cfg = a.sample.config(config)?;
    let params = a.sample.params_with(&cfg)?;
    let mut s = open_session(&cfg, &a.model)?;
    s.attach_drafter_from(&cfg, a.sample.drafter.as_deref())?;
    attach_scheduler(&cfg, &mut s, a.sample.scheduler.as_deref())?;
    let mut msgs = Vec::new();
    if let Some(sys) = &a.system {
        msgs.push(Message::new("system", sys));
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    eprintln!("chat with {} ({}); /reset clears the conversation, /exit or Ctrl-D quits", a.model.model, s.model().arch);
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
        let prompt = s.tok().encode(&s.render_chat(&msgs, true)?, true)?;
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
    let tokens = s.tok().encode(&text, true)?;
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
        first.costs().to_vec()
    };
    let (backend, model, tok, model_path, n_ctx) = first.into_loaded()?;
    let batcher = Batcher::new(backend);
    let drafter_spec = match a.sample.drafter.as_deref() {
        Some("none") | Some("plain") => None,
        Some(x) => Some(x.to_string()),
        None => cfg.drafter.clone(),
    };
    let mut sessions = Vec::new();
    for _ in 0..a.parallel {
        let mut s = Session::attach(batcher.backend(), model.clone(), tok.clone(), &model_path, n_ctx)?;
        s.set_costs(costs.clone());
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
        prefix_sharing: !a.no_prefix_sharing,
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
