//! `coordgen serve` on SmolLM2 over loopback HTTP: OpenAI-shaped responses equal to
//! `coordgen generate`, streaming, prompt-prefix reuse across requests, 32 concurrent
//! clients against 4 slots, errors for bad input, and faults (disconnects, a panicking
//! drafter, SIGTERM) after which the server keeps serving or stops cleanly.
//!
//! The tests run one at a time (each server uses both cores of a CI machine).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use coordgen_tests::http::{request, send, stream_text, Server};
use coordgen_tests::*;
use serde_json::{json, Value};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const Q1: &str = "What is the capital of France?";
const Q2: &str = "And of Italy?";
const TEXT_PROMPT: &str = "The history of the printing press begins";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The calibration cache all servers of this file share (measured once).
fn cache() -> PathBuf {
    let d = plugin_dir().join("test-tmp").join("server-cache");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config() -> PathBuf {
    repo_path("plugins.toml")
}

fn smollm2() -> String {
    model_file("SmolLM2-135M-Instruct.Q4_1.gguf").display().to_string()
}

/// What `coordgen generate` prints for the same request (plain greedy decoding).
fn generate_cli(cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(plugin_dir().join("coordgen"))
        .args(["--config", cfg.to_str().unwrap(), "generate", "-m", &smollm2(), "-t", "2", "--drafter", "none"])
        .args(args)
        .env("COORDGEN_CACHE", cache())
        .output()
        .unwrap();
    assert!(out.status.success(), "generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

fn chat_body(msgs: &[(&str, &str)], max_tokens: usize, stream: bool) -> Value {
    let messages: Vec<Value> = msgs.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
    json!({"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
           "stream_options": {"include_usage": true}})
}

fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["message"]["content"].as_str().or(c["text"].as_str()).unwrap_or_else(|| panic!("no text in {v}")).to_string()
}

#[test]
fn responses_equal_generate_stream_and_reuse_the_prompt_cache() {
    let _g = serial();
    let model = smollm2();
    let chat_ref = generate_cli(&config(), &["--chat", "-p", Q1, "--max-tokens", "32"]);
    let text_ref = generate_cli(&config(), &["-p", TEXT_PROMPT, "--max-tokens", "24"]);
    // With the configuration's drafter (retrieval) and with none: the same greedy text.
    let with = Server::start(&config(), &["-m", &model, "-t", "2", "--parallel", "2", "--alias", "smollm2"], &cache(), &[("COORDGEN_LOG", "info")]);
    let plain = Server::start(&config(), &["-m", &model, "-t", "2", "--parallel", "1", "--alias", "smollm2", "--drafter", "none"], &cache(), &[]);
    for (name, s) in [("retrieval", &with), ("plain", &plain)] {
        let h = s.get("/health");
        assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
        let m = s.get("/v1/models").json();
        assert_eq!(m["data"][0]["id"], "smollm2", "{m}");

        let r = s.post("/v1/chat/completions", &chat_body(&[("user", Q1)], 32, false));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(text_of(&v), chat_ref, "{name}: chat differs from coordgen generate --chat");
        assert_eq!(v["usage"]["completion_tokens"], 32, "{v}");
        let drafter = v["coordgen"]["drafter"].clone();
        assert_eq!(drafter, if name == "plain" { Value::Null } else { json!("retrieval") }, "{v}");

        let r = s.post("/v1/chat/completions", &chat_body(&[("user", Q1)], 32, true));
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap_or_default().starts_with("text/event-stream"), "{:?}", r.headers);
        let first: Value = serde_json::from_str(&r.events()[0]).unwrap();
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let (text, last, usage) = stream_text(&r);
        assert_eq!(text, chat_ref, "{name}: streamed chat differs");
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage = usage.expect("include_usage sends a usage chunk");
        assert_eq!(usage["completion_tokens"], 32);

        let body = json!({"model": "smollm2", "prompt": TEXT_PROMPT, "max_tokens": 24, "temperature": 0});
        let v = s.post("/v1/completions", &body).json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(text_of(&v), text_ref, "{name}: completion differs from coordgen generate");
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let (text, _, _) = stream_text(&s.post("/v1/completions", &sb));
        assert_eq!(text, text_ref, "{name}: streamed completion differs");
    }

    // A chat's second turn lands on the slot holding the first and reuses its cache; the
    // text equals that of the same request on a server whose slot holds something else.
    let t1 = with.post("/v1/chat/completions", &chat_body(&[("user", Q1)], 24, false)).json();
    let a1 = text_of(&t1);
    let p1 = t1["usage"]["prompt_tokens"].as_u64().unwrap();
    let turn2 = [("user", Q1), ("assistant", a1.as_str()), ("user", Q2)];
    let t2 = with.post("/v1/chat/completions", &chat_body(&turn2, 24, false)).json();
    let cached = t2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= p1, "second turn reused {cached} tokens, less than the first turn's prompt of {p1}: {t2}");
    plain.post("/v1/completions", &json!({"prompt": TEXT_PROMPT, "max_tokens": 2}));
    let fresh = plain.post("/v1/chat/completions", &chat_body(&turn2, 24, false)).json();
    assert!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() < 4, "{fresh}");
    assert_eq!(text_of(&fresh), text_of(&t2), "the cached second turn differs from a fresh one");
    // One log line per request at COORDGEN_LOG=info.
    let log = with.wait_log(&format!("cached_tokens={cached}"), 1, Duration::from_secs(30));
    assert!(log.lines().any(|l| l.contains("request done") && l.contains(&format!("cached_tokens={cached}"))), "{log}");
}

/// A request about the document another slot is busy answering copies that slot's prompt
/// entries instead of prefilling them, and answers what plain greedy decoding answers.
#[test]
fn busy_slots_share_their_prompt_prefix() {
    let _g = serial();
    let doc = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap()[..1500].to_string();
    let ask = format!("Here is a text:\n\n{doc}\n\nRepeat it word for word.");
    let reference = generate_cli(&config(), &["--chat", "-p", &ask, "--max-tokens", "24"]);
    let s = Server::start(&config(), &["-m", &smollm2(), "-t", "2", "--parallel", "2", "--alias", "smollm2"], &cache(), &[("COORDGEN_LOG", "info")]);
    // The first client streams a long answer; once its first piece arrives its prompt is
    // in its slot's cache, and the second client asks the same while it is still busy.
    let body = chat_body(&[("user", ask.as_str())], 256, true).to_string();
    let mut first = send(&s.addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], body.as_bytes());
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // (The first event, the assistant role, may come before the prefill.)
    while String::from_utf8_lossy(&seen).matches("\"content\"").count() < 2 {
        let n = std::io::Read::read(&mut first, &mut buf).unwrap();
        assert!(n > 0, "the first stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let v = s.post("/v1/chat/completions", &chat_body(&[("user", ask.as_str())], 24, false)).json();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut first, &mut rest).unwrap();
    assert_eq!(text_of(&v), reference, "the answer over copied entries differs from plain greedy decoding");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(prompt > 300 && cached == prompt - 1, "only {cached} of {prompt} prompt tokens came from the busy slot: {v}");
    let log = s.wait_log("request done", 2, Duration::from_secs(30));
    let copied = format!("copied_from_other_slot={}", prompt - 1);
    assert!(log.lines().filter(|l| l.contains("request done")).any(|l| l.contains(&copied)), "{log}");
    assert_eq!(s.get("/health").json()["slots_idle"], 2);
}

/// Three clients asking about one document at the same moment: one slot prefills it, the
/// other two wait for that prefill and copy its entries, and every answer is what plain
/// greedy decoding gives that question alone.
#[test]
fn simultaneous_requests_prefill_a_shared_document_once() {
    let _g = serial();
    let doc = std::fs::read_to_string(repo_path("tests/fixtures/eval_text.txt")).unwrap()[..1500].to_string();
    let questions = ["Summarize it in one sentence.", "What is its first word?", "Give it a title."];
    let references: Vec<String> = questions
        .iter()
        .map(|q| generate_cli(&config(), &["--chat", "--system", &doc, "-p", q, "--max-tokens", "16"]))
        .collect();
    let s = Server::start(&config(), &["-m", &smollm2(), "-t", "2", "--parallel", "3", "--alias", "smollm2"], &cache(), &[("COORDGEN_LOG", "info")]);
    let clients: Vec<_> = questions
        .iter()
        .map(|q| {
            let (addr, body) = (s.addr.clone(), chat_body(&[("system", doc.as_str()), ("user", q)], 16, false).to_string());
            std::thread::spawn(move || request(&addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], body.as_bytes()))
        })
        .collect();
    let replies: Vec<Value> = clients.into_iter().map(|c| c.join().unwrap().json()).collect();
    let mut sharing = 0;
    for ((v, want), q) in replies.iter().zip(&references).zip(questions) {
        assert_eq!(&text_of(v), want, "{q:?}: the answer differs from plain greedy decoding");
        let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        // The document is about 350 tokens; the questions differ only in the last few.
        if prompt > 300 && cached + 20 >= prompt {
            sharing += 1;
        }
    }
    assert_eq!(sharing, 2, "two requests should have copied the document's entries: {replies:?}");
    let log = s.wait_log("request done", 3, Duration::from_secs(30));
    assert_eq!(log.lines().filter(|l| l.contains("request done") && !l.contains("copied_from_other_slot=0")).count(), 2, "{log}");
    assert_eq!(s.get("/health").json()["slots_idle"], 3);
}

/// 32 clients at once against 4 slots and a queue of 8: every request completes or gets a
/// 503 with Retry-After, and each completed one has exactly its solo output.
#[test]
fn concurrent_clients_get_their_solo_outputs() {
    let _g = serial();
    let s = Server::start(&config(), &["-m", &smollm2(), "-t", "2", "--parallel", "4", "--queue", "8", "--alias", "smollm2"], &cache(), &[]);
    let prompts: Vec<String> = (0..8).map(|i| format!("Write one sentence about the number {i}.")).collect();
    let body = |i: usize, stream: bool| chat_body(&[("user", prompts[i % 8].as_str())], 16, stream);
    let solo: Vec<String> = (0..8).map(|i| text_of(&s.post("/v1/chat/completions", &body(i, false)).json())).collect();
    let addr = s.addr.clone();
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (addr, b) = (addr.clone(), body(i, i % 2 == 0).to_string());
            std::thread::spawn(move || request(&addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], b.as_bytes()))
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap();
        match r.status {
            200 => {
                let text = if i % 2 == 0 { stream_text(&r).0 } else { text_of(&r.json()) };
                assert_eq!(text, solo[i % 8], "client {i} got another output than its solo run");
                ok += 1;
            }
            503 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                assert!(r.json()["error"]["message"].as_str().unwrap().contains("busy"), "{}", r.body);
                busy += 1;
            }
            other => panic!("client {i}: status {other}: {}", r.body),
        }
    }
    assert_eq!(ok + busy, 32);
    assert!(ok >= 12, "only {ok} of 32 requests were served (4 slots + 8 queued run at once)");
    let h = s.get("/health").json();
    let m = &h["merged_forwards"];
    assert!(m["forwards"].as_u64() > m["calls"].as_u64(), "no forwards were merged: {h}");
    assert_eq!(h["slots_idle"], 4);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let _g = serial();
    let s = Server::start(
        &config(),
        &["-m", &smollm2(), "-t", "2", "--ctx-size", "256", "--api-key", "sekrit", "--max-body", "65536", "--alias", "smollm2"],
        &cache(),
        &[],
    );
    let auth = [("Content-Type", "application/json"), ("Authorization", "Bearer sekrit")];
    let post = |path: &str, body: &[u8]| request(&s.addr, "POST", path, &auth, body);
    let err = |r: &coordgen_tests::http::Response, status: u16| -> String {
        assert_eq!(r.status, status, "{}", r.body);
        r.json()["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {}", r.body)).to_string()
    };
    let ok_body = chat_body(&[("user", Q1)], 8, false).to_string();
    // No key, a wrong key.
    err(&request(&s.addr, "POST", "/v1/chat/completions", &[], ok_body.as_bytes()), 401);
    err(&request(&s.addr, "GET", "/v1/models", &[("Authorization", "Bearer nope")], b""), 401);
    // Malformed JSON, wrong field types, unsupported n, unknown model, unknown endpoint.
    assert!(err(&post("/v1/chat/completions", b"{\"messages\": [}"), 400).contains("JSON"));
    let m = err(&post("/v1/chat/completions", br#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#), 400);
    assert!(m.contains("max_tokens"), "{m}");
    assert!(err(&post("/v1/completions", br#"{"prompt": {"a": 1}}"#), 400).contains("prompt"));
    assert!(err(&post("/v1/completions", br#"{"prompt": "x", "n": 3}"#), 400).contains("n = 1"));
    assert!(err(&post("/v1/chat/completions", br#"{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}"#), 404).contains("gpt-9"));
    err(&request(&s.addr, "GET", "/v1/nothing", &auth, b""), 404);
    // A prompt longer than the context, and max_tokens that does not fit after the prompt.
    let long = "lorem ipsum dolor sit amet ".repeat(60);
    let m = err(&post("/v1/completions", json!({"prompt": long}).to_string().as_bytes()), 400);
    assert!(m.contains("256") && m.contains("tokens"), "{m}");
    let m = err(&post("/v1/completions", br#"{"prompt": "hello", "max_tokens": 1000}"#), 400);
    assert!(m.contains("max_tokens") && m.contains("256"), "{m}");
    // A body over the limit.
    let big = json!({"prompt": "x".repeat(100_000)}).to_string();
    assert!(err(&post("/v1/completions", big.as_bytes()), 413).contains("65536"));
    // Still serving.
    assert_eq!(s.get("/health").json()["status"], "ok");
    let r = post("/v1/chat/completions", ok_body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 8);
}

#[test]
fn disconnects_a_panicking_drafter_and_sigterm() {
    let _g = serial();
    let dir = temp_dir("server-faults");
    let flaky = format!(
        "[[plugin]]\nname = \"flaky\"\nkind = \"drafter\"\nlibrary = \"{}/libcoordgen_test_flaky_drafter.so\"\n[plugin.options]\nmode = \"panic\"\nfail_after = 3\n",
        plugin_dir().display()
    );
    let cfg_path = dir.join("plugins.toml");
    std::fs::write(&cfg_path, format!("target_backend = \"cpu\"\ndrafter = \"flaky\"\n{}\n{flaky}", cpu_entry(2))).unwrap();
    let reference = generate_cli(&config(), &["--chat", "-p", Q1, "--max-tokens", "32"]);
    let mut s = Server::start(&cfg_path, &["-m", &smollm2(), "--parallel", "1", "--alias", "smollm2"], &cache(), &[]);

    // A client that goes away after two chunks of a long stream frees the slot.
    {
        use std::io::Read;
        let body = chat_body(&[("user", "Tell me a very long story about a dragon.")], 2000, true).to_string();
        let mut c = send(&s.addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], body.as_bytes());
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while seen.windows(5).filter(|w| w == b"data:").count() < 3 {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
    }
    s.wait_idle(1, Duration::from_secs(20));

    // The drafter panics after three proposals: the request ends with plain decoding and
    // the same text, and says so.
    let v = s.post("/v1/chat/completions", &chat_body(&[("user", Q1)], 32, false)).json();
    assert_eq!(text_of(&v), reference, "{v}");
    let e = v["coordgen"]["drafter_error"].as_str().unwrap_or_else(|| panic!("no drafter error reported: {v}"));
    assert!(e.contains("panicked"), "{e}");
    assert_eq!(s.get("/health").json()["status"], "ok");
    let (text, _, _) = stream_text(&s.post("/v1/chat/completions", &chat_body(&[("user", Q1)], 32, true)));
    assert_eq!(text, reference);

    // SIGTERM mid-stream: the stream still ends properly and the process exits 0.
    let body = chat_body(&[("user", "Tell me a very long story about a dragon.")], 2000, true).to_string();
    let addr = s.addr.clone();
    let client = std::thread::spawn(move || request(&addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], body.as_bytes()));
    // Once the request holds the slot (it is generating), stop the server.
    s.wait_idle(0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.terminate(Duration::from_secs(20)), "the server did not exit cleanly on SIGTERM:\n{}", s.log());
    let r = client.join().unwrap();
    let (_, last, _) = stream_text(&r);
    assert_eq!(last["coordgen"]["finish"], "cancelled", "{last}");
    assert!(s.log().contains("coordgen serve: stopped"), "{}", s.log());
}

/// The Python interpreter with the openai package (scripts/install_openai_client.sh):
/// $COORDGEN_PYTHON, else target/pyenv. None when absent, unless the test command asked
/// for it ($COORDGEN_REQUIRE_OPENAI=1, as scripts/test.sh does), which then fails.
fn openai_python() -> Option<PathBuf> {
    let p = std::env::var_os("COORDGEN_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo_path("target/pyenv/bin/python"));
    let ok = Command::new(&p).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(p);
    }
    assert!(std::env::var("COORDGEN_REQUIRE_OPENAI").as_deref() != Ok("1"), "{} cannot import openai: run scripts/install_openai_client.sh", p.display());
    eprintln!("skipping: {} cannot import openai (scripts/install_openai_client.sh installs it)", p.display());
    None
}

/// The official openai client: chat and completions, streaming and not, equal to
/// `coordgen generate`; usage; seeded sampling; and its exception types for our errors.
#[test]
fn openai_python_client_gets_what_generate_gives() {
    let _g = serial();
    let Some(py) = openai_python() else { return };
    let chat_ref = generate_cli(&config(), &["--chat", "-p", Q1, "--max-tokens", "32"]);
    let text_ref = generate_cli(&config(), &["-p", TEXT_PROMPT, "--max-tokens", "24"]);
    let s = Server::start(&config(), &["-m", &smollm2(), "-t", "2", "--parallel", "2", "--api-key", "k3y", "--alias", "smollm2"], &cache(), &[]);
    let out = Command::new(py)
        .arg(repo_path("tests/openai_client.py"))
        .args([&format!("http://{}/v1", s.addr), "k3y", "smollm2", Q1, TEXT_PROMPT])
        .output()
        .unwrap();
    assert!(out.status.success(), "openai client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], json!(["smollm2"]));
    assert_eq!(v["chat"], chat_ref.as_str());
    assert_eq!(v["chat_stream"], chat_ref.as_str());
    assert_eq!((v["chat_finish"].as_str(), v["chat_stream_finish"].as_str()), (Some("length"), Some("length")));
    let u = &v["chat_usage"];
    assert_eq!(u[1], 32);
    assert_eq!(u[2].as_u64(), Some(u[0].as_u64().unwrap() + 32));
    assert_eq!(v["chat_stream_usage"][1], 32);
    assert_eq!(v["completion"], text_ref.as_str());
    assert_eq!(v["completion_stream"], text_ref.as_str());
    assert_eq!(v["seeded_equal"], true);
    let e = &v["errors"];
    assert_eq!((e["wrong_key"].as_u64(), e["unknown_model"].as_u64()), (Some(401), Some(404)), "{e}");
    assert_eq!(e["too_long"][0], 400, "{e}");
    assert!(e["too_long"][1].as_str().unwrap().contains("4096"), "{e}");
}
