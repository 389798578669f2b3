//! `coordgen serve`: an OpenAI-compatible HTTP server on the local machine.
//!
//! Built on tokio and axum: both are maintained, hyper-based and the usual choice in Rust,
//! and axum's SSE support gives the streaming responses with little code. The HTTP side is
//! async; generation is not: each request's [`crate::engine::Session::generate`] runs on a
//! blocking thread with the slot it took from the [`slots::Pool`], and the slots' forwards
//! meet in one [`crate::batching::Batcher`], which merges them into shared forwards.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (streaming or not),
//! `GET /v1/models`, `GET /health`. See [`complete`] for one request's way through.

pub mod api;
mod complete;
pub mod slots;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::batching::Batcher;
use crate::engine::{GenerateParams, Session};
use crate::plugins::Drafter;
use crate::tokenizer::Tok;
use api::ApiError;

/// Makes a fresh drafter for a slot whose drafter was lost (a plugin that failed for good).
pub type DrafterFactory = Box<dyn Fn() -> Result<Box<dyn Drafter>> + Send + Sync>;

pub struct Options {
    pub addr: SocketAddr,
    /// Requests without `Authorization: Bearer KEY` get 401 (None = no key needed).
    pub api_key: Option<String>,
    /// The name `/v1/models` lists; requests may also name the model file.
    pub model_id: String,
    pub model_aliases: Vec<String>,
    /// Largest request body in bytes (beyond it: 413).
    pub max_body: usize,
    /// Requests that may wait for a busy slot (beyond them: 503).
    pub queue: usize,
    /// Requests copy the prompt prefix they share with a busy slot (see `slots`).
    pub prefix_sharing: bool,
    /// Defaults of every request (sampling, drafting techniques); request fields override.
    pub defaults: GenerateParams,
    /// The seconds a shutdown waits for in-flight requests to end after cancelling them.
    pub shutdown_grace: Duration,
}

pub struct Served {
    pub opts: Options,
    pub pool: slots::Pool,
    pub batcher: Batcher,
    pub tok: Tok,
    pub n_ctx: usize,
    pub n_vocab: usize,
    drafter_factory: Option<DrafterFactory>,
    /// Cancel flags of the requests in flight, so shutdown can end them.
    in_flight: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    created: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Served {
    pub fn new(opts: Options, sessions: Vec<Session>, batcher: Batcher, drafter_factory: Option<DrafterFactory>) -> Result<Served> {
        let first = sessions.first().context("the server needs at least one slot")?;
        let (tok, n_ctx, n_vocab) = (first.tok().clone(), first.n_ctx(), first.model().n_vocab);
        let pool = slots::Pool::new(sessions, opts.queue, opts.prefix_sharing);
        Ok(Served {
            opts,
            pool,
            batcher,
            tok,
            n_ctx,
            n_vocab,
            drafter_factory,
            in_flight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            created: unix_now(),
        })
    }

    fn check_auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.opts.api_key else { return Ok(()) };
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if g.trim() == key => Ok(()),
            _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", "missing or wrong API key (send Authorization: Bearer KEY)")),
        }
    }

    fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if *m == self.opts.model_id || self.opts.model_aliases.contains(m) => Ok(()),
            Some(m) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("the model '{m}' is not served here; this server serves '{}'", self.opts.model_id),
            )),
        }
    }

    fn register(&self) -> (u64, Arc<AtomicBool>) {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let flag = Arc::new(AtomicBool::new(false));
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(id, flag.clone());
        (id, flag)
    }

    fn unregister(&self, id: u64) {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Gives a slot whose drafter was lost a new one (the request goes on without one if
    /// that fails too).
    fn ensure_drafter(&self, s: &mut Session) {
        if let (false, Some(make)) = (s.has_drafter(), &self.drafter_factory) {
            match make().and_then(|d| s.set_drafter(Some(d))) {
                Ok(()) => tracing::info!("a slot's drafter was restarted"),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot restart a slot's drafter"),
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

async fn health(axum::extract::State(st): axum::extract::State<Arc<Served>>) -> Response {
    let status = if st.shutting_down.load(Ordering::SeqCst) { "shutting_down" } else { "ok" };
    let code = if status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let b = st.batcher.stats();
    (
        code,
        Json(json!({
            "status": status,
            "slots_total": st.pool.total(),
            "slots_idle": st.pool.idle(),
            "requests_queued": st.pool.waiting(),
            "merged_forwards": {"calls": b.calls, "forwards": b.forwards, "tokens": b.tokens},
        })),
    )
        .into_response()
}

async fn models(axum::extract::State(st): axum::extract::State<Arc<Served>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.check_auth(&headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{"id": st.opts.model_id, "object": "model", "created": st.created, "owned_by": "coordgen", "context_length": st.n_ctx}],
    }))
    .into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such endpoint (see /v1/chat/completions, /v1/completions, /v1/models, /health)").into_response()
}

pub fn router(st: Arc<Served>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(complete::chat))
        .route("/v1/completions", post(complete::completion))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(st)
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serves until SIGINT/SIGTERM; then refuses new requests, cancels those in flight (each
/// ends its response cleanly), and returns once they are done or the grace time is over.
pub fn run(st: Served) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let st = Arc::new(st);
        let listener = tokio::net::TcpListener::bind(st.opts.addr).await.with_context(|| format!("cannot listen on {}", st.opts.addr))?;
        let addr = listener.local_addr()?;
        // Tests and scripts wait for this line.
        eprintln!("coordgen serve: listening on http://{addr} (model '{}', {} slots, context {} per slot)", st.opts.model_id, st.pool.total(), st.n_ctx);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let st2 = st.clone();
        let stopper = async move {
            shutdown_signal().await;
            eprintln!("coordgen serve: shutting down; cancelling requests in flight");
            st2.shutting_down.store(true, Ordering::SeqCst);
            for f in st2.in_flight.lock().unwrap_or_else(|e| e.into_inner()).values() {
                f.store(true, Ordering::SeqCst);
            }
            let _ = stop_tx.send(true);
        };
        let mut rx = stop_rx.clone();
        let server = axum::serve(listener, router(st.clone())).with_graceful_shutdown(async move {
            let _ = rx.wait_for(|&s| s).await;
        });
        tokio::spawn(stopper);
        let mut rx = stop_rx;
        let grace = st.opts.shutdown_grace;
        tokio::select! {
            r = server => r.context("the server failed")?,
            _ = async { let _ = rx.wait_for(|&s| s).await; tokio::time::sleep(grace).await } => {
                eprintln!("coordgen serve: requests still open after {grace:?}; exiting");
            }
        }
        eprintln!("coordgen serve: stopped");
        Ok(())
    })
}
