//! Calibration of the cost model: the latency of one forward at a range of widths (all rows'
//! logits, as verification needs; and one row, as prefill chunks need) at two context
//! lengths, measured by a short run and cached per machine, model and backend under the
//! cache directory. Any change of the CPU, core count, backend threads, backend plugin
//! (library path, size, modification time, options), model file (path, size, modification
//! time), coordgen version or build (the executable's modification time) changes the key, so
//! it is re-measured.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use coordgen_interface::CostSample;

use crate::engine::Session;
use crate::plugins::file_stamp;

/// Widths timed with logits for every row (verification of drafts and trees).
const VERIFY_WIDTHS: [u32; 11] = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32];
/// Widths timed with logits for the last row only (prefill chunks).
const PREFILL_WIDTHS: [u32; 3] = [32, 64, 128];
/// Passes over the verification widths; each width keeps its fastest time.
const PASSES: usize = 3;

/// What identifies a calibration: machine, backend and model.
pub fn key(s: &Session) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let caps = s.backend().capabilities();
    let path = std::fs::canonicalize(&s.model_path()).unwrap_or_else(|_| s.model_path().to_path_buf());
    let (size, mtime) = file_stamp(&path);
    // The running build: a rebuilt workspace (new kernels) re-measures instead of trusting
    // costs timed with the old ones.
    let build = std::env::current_exe().map(|p| file_stamp(&p).1).unwrap_or(0);
    format!(
        "cpu={cpu};cores={cores};backend={};threads={};max_width={};model={};size={size};mtime={mtime};coordgen={};build={build}",
        s.backend().identity(),
        caps.threads,
        caps.max_width,
        path.display(),
        env!("CARGO_PKG_VERSION")
    )
}

fn cache_file(key: &str) -> PathBuf {
    // FNV-1a: a stable file name for the key (the key itself is stored inside and compared).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    crate::config::cache_dir().join("calibration").join(format!("{h:016x}.json"))
}

fn load(key: &str) -> Option<Vec<CostSample>> {
    let text = std::fs::read_to_string(cache_file(key)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("key")?.as_str()? != key {
        return None;
    }
    let samples: Vec<CostSample> = v
        .get("samples")?
        .as_array()?
        .iter()
        .filter_map(|x| {
            let a = x.as_array()?;
            let n = |i: usize| a.get(i).and_then(|v| v.as_u64());
            Some(CostSample { width: n(0)? as u32, context: n(1)? as u32, rows: n(2)? as u32, micros: n(3)? })
        })
        .collect();
    (!samples.is_empty()).then_some(samples)
}

fn save(key: &str, samples: &[CostSample]) -> Result<PathBuf> {
    let path = cache_file(key);
    let dir = path.parent().expect("file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rows: Vec<[u64; 4]> = samples.iter().map(|s| [s.width as u64, s.context as u64, s.rows as u64, s.micros]).collect();
    let text = serde_json::json!({ "key": key, "format": "[width, context, logit rows, microseconds]", "samples": rows }).to_string();
    coordgen_drafter_store::atomic::write_atomic(&path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Whether a calibration for this session's machine, backend and model is cached.
pub fn is_cached(s: &Session) -> bool {
    load(&key(s)).is_some()
}

/// The calibration of this session's backend and model: the cached one, or (when there is
/// none, or `force`) a fresh measurement, which is then cached. The second value says
/// whether it was measured now. Measuring clears the session's KV cache.
pub fn cost_samples(s: &mut Session, force: bool) -> Result<(Vec<CostSample>, bool)> {
    let key = key(s);
    if !force {
        if let Some(v) = load(&key) {
            return Ok((v, false));
        }
    }
    let _span = tracing::info_span!("calibrate").entered();
    let t = Instant::now();
    let samples = measure(s)?;
    tracing::info!(ms = t.elapsed().as_millis() as u64, samples = samples.len(), "calibrated the cost model");
    if let Err(e) = save(&key, &samples) {
        tracing::warn!(error = %e, "could not cache the calibration");
    }
    Ok((samples, true))
}

/// Times forwards of each width at two context lengths (the fastest of [`PASSES`] runs each,
/// one run for prefill widths).
pub fn measure(s: &mut Session) -> Result<Vec<CostSample>> {
    let caps = s.backend().capabilities();
    let max_w = if caps.max_width == 0 { u32::MAX } else { caps.max_width };
    let vocab = s.tok().vocab_size().max(2) as u32;
    // Arbitrary but fixed tokens: the cost of a forward does not depend on which they are.
    let tok = |i: u32| (i.wrapping_mul(7919).wrapping_add(13)) % vocab;
    let room = s.n_ctx() as u32;
    let contexts: Vec<u32> = [32u32, 288].into_iter().filter(|&c| c + 64 < room).collect();
    let contexts = if contexts.is_empty() { vec![0] } else { contexts };
    s.reset()?;
    let mut out = Vec::new();
    for (ci, &ctx) in contexts.iter().enumerate() {
        // Fill the cache up to `ctx` (untimed).
        while (s.cached().len() as u32) < ctx {
            let start = s.cached().len() as u32;
            let n = (ctx - start).min(128).min(max_w);
            let toks: Vec<u32> = (start..start + n).map(tok).collect();
            s.append(&toks, &[])?;
        }
        let mut widths: Vec<(u32, u32)> = VERIFY_WIDTHS.iter().map(|&w| (w, w)).collect();
        if ci == 0 {
            widths.extend(PREFILL_WIDTHS.iter().map(|&w| (w, 1)));
            // A prefill chunk with logits for every 2nd row: what calibrated predictions cost.
            widths.push((128, 64));
            // One untimed pass first: the first forwards after loading run slower (pages of
            // the mapped weights, caches, clock ramp-up) and would bend the model.
            for &w in VERIFY_WIDTHS.iter().filter(|&&w| w <= max_w && ctx + w < room) {
                let toks: Vec<u32> = (ctx..ctx + w).map(tok).collect();
                let rows: Vec<u32> = (0..w).collect();
                s.append(&toks, &rows)?;
                s.truncate(ctx as usize)?;
            }
        }
        // Round-robin passes over all widths, keeping each width's fastest time: a slow
        // spell on a shared machine then costs every width a sample, instead of inflating
        // a few consecutive widths and bending the model's shape (which decides how wide
        // the scheduler drafts until the next calibration). Prefill widths: one pass.
        let mut best: Vec<u64> = vec![u64::MAX; widths.len()];
        for pass in 0..PASSES {
            for (i, &(w, rows)) in widths.iter().enumerate() {
                if w > max_w || ctx + w >= room || (pass > 0 && w >= 64) {
                    continue;
                }
                let toks: Vec<u32> = (ctx..ctx + w).map(tok).collect();
                let pos: Vec<u32> = (ctx..ctx + w).collect();
                let logit_rows: Vec<u32> = if rows > 1 && rows < w { (0..w).filter(|r| r % (w / rows) == 0).collect() } else { (w - rows..w).collect() };
                let t = Instant::now();
                s.forward(&toks, &pos, &[], &logit_rows)?;
                best[i] = best[i].min(t.elapsed().as_micros() as u64);
                s.truncate(ctx as usize)?;
            }
        }
        for (&(w, rows), &b) in widths.iter().zip(&best) {
            if b != u64::MAX {
                out.push(CostSample { width: w, context: ctx, rows, micros: b.max(1) });
            }
        }
    }
    s.reset()?;
    Ok(out)
}
