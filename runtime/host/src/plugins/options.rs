//! The options a drafter plugin is started with: its `[plugin.options]` with the host's facts
//! filled in (model files, the backend library a draft model runs on, threads, cache dir).

use super::loader::load_err;
use super::traits::PResult;
use crate::config::{resolve_library, PluginEntry, PluginsConfig};

/// A drafter's options with host facts filled in: `model` aliases resolved to files, a
/// `backend` plugin name resolved to `backend_library` (its path) and `backend_options`, and
/// `cache_dir` defaulted to the host's cache directory. With overlapped drafting on, a
/// drafter that runs a model on a backend gets `threads` (unless its options set them) and
/// the thread count is returned, for the host to take from the target while decoding.
pub(super) fn drafter_options(cfg: &PluginsConfig, entry: &PluginEntry) -> PResult<(String, u32)> {
    let mut o: serde_json::Map<String, serde_json::Value> = serde_json::to_value(&entry.options)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let mut own_threads = 0;
    if let Some(m) = o.get("model").and_then(|v| v.as_str()) {
        let p = crate::config::resolve_model(m);
        if !p.exists() {
            return Err(load_err(&entry.name, format!("draft model {} not found (run scripts/fetch_models.sh)", p.display())));
        }
        let p = std::fs::canonicalize(&p).unwrap_or(p);
        o.insert("model".into(), p.display().to_string().into());
    }
    if let Some(b) = o.get("backend").and_then(|v| v.as_str()).map(str::to_string) {
        let be = cfg.entry(&b).filter(|e| e.kind == "backend").ok_or_else(|| {
            load_err(&entry.name, format!("option backend = '{b}' does not name a backend plugin of {}", cfg.source))
        })?;
        let lib = resolve_library(be, &cfg.base_dir).map_err(|e| load_err(&entry.name, e.to_string()))?;
        o.insert("backend_library".into(), lib.display().to_string().into());
        o.insert("backend_options".into(), serde_json::to_value(&be.options).unwrap_or_default());
        if cfg.techniques.overlap {
            let t = o.entry("threads").or_insert(cfg.techniques.overlap_draft_threads.max(1).into());
            own_threads = t.as_u64().unwrap_or(0) as u32;
        }
    }
    if !o.contains_key("cache_dir") {
        o.insert("cache_dir".into(), crate::config::cache_dir().display().to_string().into());
    }
    Ok((serde_json::Value::Object(o).to_string(), own_threads))
}
