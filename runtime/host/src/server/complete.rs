//! One completion request through the server: authenticate, read the body (bounded), parse
//! and check it, render the chat template and tokenize, check the lengths, take a slot (or
//! get 503), then generate on a blocking thread, streaming SSE chunks or answering once.
//!
//! A request is cancelled between steps when its client goes away: the response stream (or,
//! for a plain response, the handler's future) holds a [`Cancel`] guard whose drop sets the
//! request's flag, and the slot is free as soon as the current step ends.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use super::api::{self, ApiError, Input, Request};
use super::Served;
use crate::engine::{GenerateParams, Generation, PrefillHook};

pub async fn chat(State(st): State<Arc<Served>>, headers: HeaderMap, body: Body) -> Response {
    complete(st, headers, body, true).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn completion(State(st): State<Arc<Served>>, headers: HeaderMap, body: Body) -> Response {
    complete(st, headers, body, false).await.unwrap_or_else(IntoResponse::into_response)
}

/// Sets the request's cancel flag and forgets it when dropped.
struct Cancel {
    st: Arc<Served>,
    id: u64,
    flag: Arc<AtomicBool>,
}

impl Drop for Cancel {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::SeqCst);
        self.st.unregister(self.id);
    }
}

fn server_error(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", msg)
}

fn unavailable(msg: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "server_busy", msg)
}

impl Served {
    fn prompt_tokens(&self, input: &Input) -> Result<Vec<u32>, ApiError> {
        let text = match input {
            Input::Tokens(t) => {
                if let Some(&bad) = t.iter().find(|&&x| x as usize >= self.n_vocab) {
                    return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {} tokens", self.n_vocab), Some("prompt")));
                }
                return Ok(t.clone());
            }
            Input::Text(s) => s.clone(),
            Input::Chat(msgs) => {
                let t = self.tok.chat_template.as_deref().ok_or_else(|| ApiError::bad_request("the model has no chat template; use /v1/completions", Some("messages")))?;
                crate::chat::render(t, msgs, true, &self.tok.bos_text, &self.tok.eos_text).map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("messages")))?
            }
        };
        let toks = self.tok.encode(&text, true).map_err(|e| server_error(format!("tokenizing the prompt failed: {e:#}")))?;
        if toks.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        Ok(toks)
    }

    /// The request's generation parameters on top of the server's defaults; checks that the
    /// prompt and `max_tokens` fit a slot's context.
    fn params(&self, r: &Request, prompt_len: usize) -> Result<GenerateParams, ApiError> {
        let n_ctx = self.n_ctx;
        if prompt_len >= n_ctx {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("the prompt has {prompt_len} tokens, but a slot's context holds {n_ctx} (start the server with a larger --ctx-size)"),
                kind: "invalid_request_error",
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            });
        }
        let room = n_ctx - prompt_len;
        let max_tokens = match r.max_tokens {
            Some(0) => return Err(ApiError::bad_request("'max_tokens' must be at least 1", Some("max_tokens"))),
            Some(m) if m > room => {
                return Err(ApiError::bad_request(
                    format!("'max_tokens' is {m}, but after the prompt's {prompt_len} tokens a slot's context of {n_ctx} has room for {room}"),
                    Some("max_tokens"),
                ))
            }
            Some(m) => m,
            None => room,
        };
        let mut p = self.opts.defaults.clone();
        p.max_tokens = max_tokens;
        let s = &mut p.sampling;
        s.temperature = r.temperature.unwrap_or(s.temperature);
        s.top_p = r.top_p.unwrap_or(s.top_p);
        s.top_k = r.top_k.unwrap_or(s.top_k);
        s.min_p = r.min_p.unwrap_or(s.min_p);
        s.seed = match r.seed {
            Some(x) => x,
            // A sampled request without a seed gets a fresh one, as with other servers.
            None if s.temperature > 0.0 => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
            None => s.seed,
        };
        if !r.stop.is_empty() {
            p.stop = r.stop.clone();
        }
        Ok(p)
    }
}

/// Facts every response of a request repeats.
#[derive(Clone)]
struct Reply {
    chat: bool,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        if self.chat {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}]})
        }
    }

    fn whole(&self, g: &Generation) -> Value {
        let finish = finish_reason(g);
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": finish, "logprobs": null})
        } else {
            json!({"index": 0, "text": g.text, "finish_reason": finish, "logprobs": null})
        };
        json!({
            "id": self.id,
            "object": if self.chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_of(g),
            "coordgen": figures(g),
        })
    }
}

/// OpenAI's finish reasons: a full context is a length limit; a cancelled request stopped.
fn finish_reason(g: &Generation) -> &'static str {
    match g.finish_reason.as_str() {
        "length" | "context_full" => "length",
        _ => "stop",
    }
}

fn usage_of(g: &Generation) -> Value {
    let t = &g.timings;
    api::usage(t.prompt_tokens, t.generated_tokens, t.prompt_tokens - t.prefill_tokens)
}

/// CoordGen's own figures, in a field OpenAI clients ignore.
fn figures(g: &Generation) -> Value {
    let t = &g.timings;
    json!({
        "finish": g.finish_reason,
        "prefill_ms": t.prefill_ms,
        "decode_ms": t.decode_ms,
        "decode_tokens_per_s": t.decode_tps(),
        "drafter": g.spec.as_ref().map(|s| s.drafter.clone()),
        "accepted_per_step": g.spec.as_ref().map(|s| s.mean_accepted),
        "tokens_per_step": g.spec.as_ref().map(|s| s.tokens_per_step).unwrap_or(1.0),
        "drafter_error": g.spec.as_ref().and_then(|s| s.drafter_error.clone()),
    })
}

async fn complete(st: Arc<Served>, headers: HeaderMap, body: Body, chat: bool) -> Result<Response, ApiError> {
    st.check_auth(&headers)?;
    if st.shutting_down.load(Ordering::SeqCst) {
        return Err(unavailable("the server is shutting down"));
    }
    let limit = st.opts.max_body;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "request_too_large", format!("the request body is larger than {limit} bytes"))
    })?;
    let req = api::parse(&bytes, chat)?;
    st.check_model(&req.model)?;
    let prompt = st.prompt_tokens(&req.input)?;
    let params = st.params(&req, prompt.len())?;
    let lease = st.pool.take(&prompt).await.map_err(|_| unavailable("every slot is busy and the queue is full; retry later"))?;
    if st.shutting_down.load(Ordering::SeqCst) {
        st.pool.put(lease);
        return Err(unavailable("the server is shutting down"));
    }
    let (id, flag) = st.register();
    let mut params = params;
    params.cancel = Some(flag.clone());
    let cancel = Cancel { st: st.clone(), id, flag: flag.clone() };
    let reply = Reply { chat, id: format!("{}-{id}", if chat { "chatcmpl" } else { "cmpl" }), created: super::unix_now(), model: st.opts.model_id.clone() };
    if req.stream {
        Ok(stream(st, lease, prompt, params, reply, req.include_usage, cancel))
    } else {
        let task = spawn_generate(st.clone(), lease, prompt, params, id, |_| true);
        let r = task.await.map_err(|e| server_error(format!("the generation task failed: {e}")))?;
        drop(cancel);
        let g = r.map_err(server_error)?;
        Ok(Json(reply.whole(&g)).into_response())
    }
}

/// Runs the request on a blocking thread with its slot, hands the slot back afterwards (also
/// after an error or a panic, with the slot's cache cleared then), and logs one line.
/// `on_text` gets each new piece of text; returning false cancels the request.
fn spawn_generate(
    st: Arc<Served>,
    mut lease: super::slots::Lease,
    prompt: Vec<u32>,
    params: GenerateParams,
    id: u64,
    mut on_text: impl FnMut(&str) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<Result<Generation, String>> {
    tokio::task::spawn_blocking(move || {
        let _span = tracing::info_span!("request", id, prompt_tokens = prompt.len()).entered();
        st.ensure_drafter(&mut lease.session);
        // Before this request counts as active: the batcher's leader would wait for its
        // forwards while it waits for another slot's prefill.
        let copied = st.pool.adopt_shared_prefix(&mut lease.session, &prompt, params.cancel.as_deref());
        let slot = lease.session.slot();
        st.pool.announce(slot, &prompt);
        let active = st.batcher.active();
        let mut params = params;
        let pool = st.clone();
        params.on_prefilled = Some(PrefillHook(Arc::new(move || pool.pool.publish(slot))));
        let cancel = params.cancel.clone();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            lease.session.generate(&prompt, &params, &mut |piece| {
                if !on_text(piece) {
                    if let Some(c) = &cancel {
                        c.store(true, Ordering::SeqCst);
                    }
                }
            })
        }));
        drop(active);
        let r = match r {
            Ok(Ok(g)) => Ok(g),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => {
                let _ = lease.session.reset();
                Err("generation panicked; the slot was reset".to_string())
            }
        };
        st.pool.put(lease);
        match &r {
            Ok(g) => tracing::info!(
                id,
                prompt_tokens = g.timings.prompt_tokens,
                cached_tokens = g.timings.prompt_tokens - g.timings.prefill_tokens,
                copied_from_other_slot = copied,
                generated = g.timings.generated_tokens,
                tokens_per_s = format!("{:.1}", g.timings.decode_tps()),
                accepted_per_step = format!("{:.2}", g.spec.as_ref().map(|s| s.mean_accepted).unwrap_or(0.0)),
                finish = %g.finish_reason,
                "request done"
            ),
            Err(e) => tracing::warn!(id, error = %e, "request failed"),
        }
        r
    })
}

fn event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

fn stream(st: Arc<Served>, lease: super::slots::Lease, prompt: Vec<u32>, params: GenerateParams, reply: Reply, include_usage: bool, cancel: Cancel) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    if reply.chat {
        let _ = tx.send(event(&reply.chunk(json!({"role": "assistant", "content": ""}), None)));
    }
    let id = cancel.id;
    let (tx2, r2) = (tx.clone(), reply.clone());
    let task = spawn_generate(st, lease, prompt, params, id, move |piece| tx2.send(event(&r2.chunk(json!({"content": piece}), None))).is_ok());
    tokio::spawn(async move {
        let r = task.await.map_err(|e| format!("the generation task failed: {e}")).and_then(|r| r);
        match r {
            Ok(g) => {
                let mut last = reply.chunk(json!({}), Some(finish_reason(&g)));
                last["coordgen"] = figures(&g);
                if include_usage {
                    let _ = tx.send(event(&last));
                    let mut u = reply.chunk(json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = usage_of(&g);
                    let _ = tx.send(event(&u));
                } else {
                    // Some clients read usage from the last chunk even unasked.
                    last["usage"] = usage_of(&g);
                    let _ = tx.send(event(&last));
                }
            }
            Err(e) => {
                let _ = tx.send(event(&server_error(e).body()));
            }
        }
        let _ = tx.send(Event::default().data("[DONE]"));
    });
    // The guard lives as long as the response stream: a client that goes away drops it.
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |e| {
        let _ = &cancel;
        Ok::<_, Infallible>(e)
    });
    Sse::new(events).into_response()
}
