//! CoordGen's C API (`include/coordgen.h`, generated from this file by cbindgen).
//!
//! An app opens a session (a plugin config, a model, a KV context, a drafter), runs
//! completions or chat replies whose text arrives through a callback, may cancel one from
//! another thread, reads the speculative figures, and frees the session. Every function
//! returns a status code; the message of the last failure on the calling thread is
//! `coordgen_last_error()`. No panic crosses the boundary: each entry point catches them
//! and returns `COORDGEN_STATUS_PANIC`.

mod embed;

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;

use coordgen::chat::Message;
use coordgen::engine::{GenerateParams, Generation};
use coordgen::sampling::SamplingParams;

use embed::{Embedded, Input, OpenArgs};

/// What a call did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoordgenStatus {
    Ok = 0,
    /// A null pointer, text that is not UTF-8, or an out-of-range parameter.
    InvalidArgument = 1,
    /// The config, a plugin or the model could not be loaded.
    Load = 2,
    /// The request failed (the prompt does not fit the context, a backend error, ...).
    Generate = 3,
    /// A panic inside CoordGen was caught; the session should be freed.
    Panic = 4,
}

/// Why a generation ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CoordgenFinish {
    /// An end-of-sequence token or a stop string.
    #[default]
    Stop = 0,
    /// `max_tokens` reached.
    Length = 1,
    /// `coordgen_cancel`, or the callback returned false.
    Cancelled = 2,
}

/// Sampling and length of one request; `coordgen_params_default()` gives greedy decoding
/// of up to 256 tokens.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CoordgenParams {
    pub max_tokens: u32,
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// 1: off.
    pub repeat_penalty: f32,
    pub seed: u64,
    /// Stop at the model's end-of-sequence tokens (false: run to `max_tokens`).
    pub stop_at_eos: bool,
}

/// One chat message: role ("system", "user", "assistant") and content, UTF-8.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CoordgenMessage {
    pub role: *const c_char,
    pub content: *const c_char,
}

/// Figures of one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CoordgenStats {
    pub prompt_tokens: u32,
    /// Prompt tokens computed (the rest were reused from the session's cache).
    pub prefill_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Verification steps and drafted tokens accepted (0 without a drafter).
    pub steps: u64,
    pub accepted: u64,
    /// Tokens produced per verification step (1 without a drafter).
    pub tokens_per_step: f64,
    pub finish: CoordgenFinish,
}

/// A loaded model with its KV cache (opaque).
pub struct CoordgenSession {
    inner: Embedded,
}

/// Receives each piece of generated text (`len` bytes of UTF-8, not NUL-terminated; valid
/// during the call). Return true to go on, false to stop after the current step.
pub type CoordgenTextCallback = Option<extern "C" fn(text: *const c_char, len: usize, user: *mut c_void) -> bool>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning an error into its status and message and a panic into
/// `COORDGEN_STATUS_PANIC`.
fn guarded(f: impl FnOnce() -> Result<(), (CoordgenStatus, String)>) -> CoordgenStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CoordgenStatus::Ok,
        Ok(Err((status, msg))) => {
            set_error(msg);
            status
        }
        Err(p) => {
            let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            set_error(format!("internal error (a panic was caught): {what}"));
            CoordgenStatus::Panic
        }
    }
}

fn invalid(msg: impl Into<String>) -> (CoordgenStatus, String) {
    (CoordgenStatus::InvalidArgument, msg.into())
}

/// A required NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is null or points at a NUL-terminated string that lives for `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, (CoordgenStatus, String)> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    CStr::from_ptr(p).to_str().map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

/// An optional one: NULL is `None`.
///
/// # Safety
/// As [`text`].
unsafe fn opt_text<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, (CoordgenStatus, String)> {
    if p.is_null() {
        Ok(None)
    } else {
        text(p, what).map(Some)
    }
}

/// The message of the last failed call on this thread ("" if none). Valid until the next
/// failing call on this thread.
#[no_mangle]
pub extern "C" fn coordgen_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's version, e.g. "0.1.0" (static storage).
#[no_mangle]
pub extern "C" fn coordgen_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// Greedy decoding of up to 256 tokens, stopping at end-of-sequence.
#[no_mangle]
pub extern "C" fn coordgen_params_default() -> CoordgenParams {
    CoordgenParams { max_tokens: 256, temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, seed: 0, stop_at_eos: true }
}

/// Opens a session: the plugin config at `config_path` (NULL: `$COORDGEN_CONFIG`,
/// `./plugins.toml`, or the built-in CPU-only default), the model at `model` (a GGUF file,
/// a Hugging Face directory, or a default model name under `$COORDGEN_MODELS`), a KV
/// context of `n_ctx` tokens (0: the model's, capped at 8192), `threads` backend threads
/// (0: the backend's default) and the drafter `drafter` (NULL: the config's default;
/// "none": plain decoding). On success `*out` is the session, to be freed with
/// `coordgen_session_free`.
///
/// # Safety
/// The strings are NULL or NUL-terminated; `out` points at writable storage.
#[no_mangle]
pub unsafe extern "C" fn coordgen_session_open(
    config_path: *const c_char,
    model: *const c_char,
    n_ctx: u32,
    threads: u32,
    drafter: *const c_char,
    out: *mut *mut CoordgenSession,
) -> CoordgenStatus {
    guarded(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        *out = std::ptr::null_mut();
        let config = opt_text(config_path, "config_path")?;
        let args = OpenArgs {
            config: config.map(Path::new),
            model: text(model, "model")?,
            n_ctx: n_ctx as usize,
            threads,
            drafter: opt_text(drafter, "drafter")?,
        };
        let inner = embed::open(&args).map_err(|e| (CoordgenStatus::Load, format!("{e:#}")))?;
        *out = Box::into_raw(Box::new(CoordgenSession { inner }));
        Ok(())
    })
}

/// Frees a session (NULL is ignored). No call on it may be running.
///
/// # Safety
/// `s` came from `coordgen_session_open` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn coordgen_session_free(s: *mut CoordgenSession) {
    if !s.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(s))));
    }
}

/// Asks the generation running on `s` (from another thread) to stop after its current
/// step; it then returns `COORDGEN_STATUS_OK` with finish `COORDGEN_FINISH_CANCELLED`.
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn coordgen_cancel(s: *const CoordgenSession) {
    if let Some(s) = s.as_ref() {
        s.inner.cancel.store(true, Ordering::SeqCst);
    }
}

// Written as negated comparisons so that NaN fails them.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn params(p: &CoordgenParams) -> Result<GenerateParams, (CoordgenStatus, String)> {
    if !(p.temperature >= 0.0) || !(0.0..=1.0).contains(&p.top_p) || !(0.0..=1.0).contains(&p.min_p) || !(p.repeat_penalty > 0.0) {
        return Err(invalid("invalid sampling parameters: need temperature >= 0, 0 <= top_p <= 1, 0 <= min_p <= 1, repeat_penalty > 0"));
    }
    Ok(GenerateParams {
        max_tokens: p.max_tokens as usize,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            seed: p.seed,
            ..Default::default()
        },
        stop_at_eos: p.stop_at_eos,
        ..Default::default()
    })
}

fn stats(g: &Generation) -> CoordgenStats {
    let t = &g.timings;
    let (steps, accepted, tps) = match &g.spec {
        Some(sp) => (sp.steps, sp.accepted, sp.tokens_per_step),
        None => (t.generated_tokens as u64, 0, 1.0),
    };
    let finish = match g.finish_reason.as_str() {
        "length" => CoordgenFinish::Length,
        "cancelled" => CoordgenFinish::Cancelled,
        _ => CoordgenFinish::Stop,
    };
    CoordgenStats {
        prompt_tokens: t.prompt_tokens as u32,
        prefill_tokens: t.prefill_tokens as u32,
        generated_tokens: t.generated_tokens as u32,
        prefill_ms: t.prefill_ms,
        decode_ms: t.decode_ms,
        steps,
        accepted,
        tokens_per_step: tps,
        finish,
    }
}

/// Shared body of the two generation calls.
///
/// # Safety
/// As the callers'.
unsafe fn run(
    s: *const CoordgenSession,
    input: impl FnOnce() -> Result<Vec<Message>, (CoordgenStatus, String)>,
    raw: *const c_char,
    p: *const CoordgenParams,
    cb: CoordgenTextCallback,
    user: *mut c_void,
    out: *mut CoordgenStats,
) -> CoordgenStatus {
    guarded(|| {
        let s = s.as_ref().ok_or_else(|| invalid("session is NULL"))?;
        let gp = params(&p.as_ref().copied().unwrap_or_else(|| coordgen_params_default()))?;
        let msgs;
        let inp = if raw.is_null() {
            msgs = input()?;
            Input::Chat(&msgs)
        } else {
            Input::Text(text(raw, "prompt")?)
        };
        let mut on_text = |piece: &str| match cb {
            Some(f) => f(piece.as_ptr() as *const c_char, piece.len(), user),
            None => true,
        };
        let g = embed::generate(&s.inner, inp, gp, &mut on_text).map_err(|e| (CoordgenStatus::Generate, format!("{e:#}")))?;
        if let Some(o) = out.as_mut() {
            *o = stats(&g);
        }
        Ok(())
    })
}

/// Completes `prompt` (UTF-8 text, tokenized with the model's BOS) with parameters `p`
/// (NULL: the defaults), streaming the text to `cb` (may be NULL) with `user`; fills
/// `*out` (may be NULL) with the figures. The session's cache keeps the longest prefix a
/// later prompt shares.
///
/// # Safety
/// `s` is a live session not used by another generation; the pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn coordgen_generate(
    s: *const CoordgenSession,
    prompt: *const c_char,
    p: *const CoordgenParams,
    cb: CoordgenTextCallback,
    user: *mut c_void,
    out: *mut CoordgenStats,
) -> CoordgenStatus {
    if prompt.is_null() {
        set_error("prompt is NULL".into());
        return CoordgenStatus::InvalidArgument;
    }
    run(s, || Ok(Vec::new()), prompt, p, cb, user, out)
}

/// Replies to the conversation `messages[0..n]` through the model's chat template (the
/// assistant's turn opened), otherwise as `coordgen_generate`. Sending the growing
/// conversation each turn reuses the cache of the earlier turns.
///
/// # Safety
/// As `coordgen_generate`; `messages` points at `n` messages with valid strings.
#[no_mangle]
pub unsafe extern "C" fn coordgen_chat(
    s: *const CoordgenSession,
    messages: *const CoordgenMessage,
    n: usize,
    p: *const CoordgenParams,
    cb: CoordgenTextCallback,
    user: *mut c_void,
    out: *mut CoordgenStats,
) -> CoordgenStatus {
    let input = || {
        if messages.is_null() || n == 0 {
            return Err(invalid("a chat needs at least one message"));
        }
        std::slice::from_raw_parts(messages, n)
            .iter()
            .enumerate()
            .map(|(i, m)| Ok(Message::new(text(m.role, &format!("messages[{i}].role"))?, text(m.content, &format!("messages[{i}].content"))?)))
            .collect()
    };
    run(s, input, std::ptr::null(), p, cb, user, out)
}

#[cfg(test)]
mod tests {
    /// The committed header (what C programs include) is the one cbindgen makes from this
    /// file now; after changing the API, copy `$OUT_DIR/coordgen.h` over it.
    #[test]
    fn committed_header_is_current() {
        let generated = include_str!(concat!(env!("OUT_DIR"), "/coordgen.h"));
        let committed = include_str!("../include/coordgen.h");
        assert!(generated == committed, "capi/include/coordgen.h is stale: regenerate it (cp {}/coordgen.h capi/include/)", env!("OUT_DIR"));
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        let st = super::guarded(|| panic!("boom"));
        assert_eq!(st, super::CoordgenStatus::Panic);
        let msg = unsafe { std::ffi::CStr::from_ptr(super::coordgen_last_error()) }.to_str().unwrap().to_string();
        assert!(msg.contains("boom"), "{msg}");
    }
}
