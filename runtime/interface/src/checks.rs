//! Argument checks every backend makes the same way, so each backend's errors for a bad
//! batch or a bad compaction read alike: plain functions over plain data, called inside the
//! plugin (nothing here crosses the boundary).

/// Checks a forward batch's shape: a token, a position per token, a `w*w` mask or none
/// (causal), logit rows inside the batch. Host-side adapters that reshape a batch (the
/// fixed-width padding) check this much before they touch it.
pub fn check_shape(tokens: &[u32], positions: &[u32], mask: &[u8], logit_rows: &[u32]) -> Result<(), String> {
    let w = tokens.len();
    if w == 0 {
        return Err("forward: empty batch".into());
    }
    if positions.len() != w {
        return Err(format!("forward: {} positions for {w} tokens", positions.len()));
    }
    if !mask.is_empty() && mask.len() != w * w {
        return Err(format!("forward: mask has {} entries, expected {}", mask.len(), w * w));
    }
    if let Some(&r) = logit_rows.iter().find(|&&r| r as usize >= w) {
        return Err(format!("forward: logit row {r} outside a batch of {w}"));
    }
    Ok(())
}

/// Checks a forward batch: its shape ([`check_shape`]), then against the model's
/// vocabulary and the slot: `cached` entries already held, room for `n_ctx`. The width
/// limit is the backend's own check.
pub fn check_batch(tokens: &[u32], positions: &[u32], mask: &[u8], logit_rows: &[u32], n_vocab: usize, cached: usize, n_ctx: usize) -> Result<(), String> {
    check_shape(tokens, positions, mask, logit_rows)?;
    let w = tokens.len();
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(format!("forward: token id {t} outside the vocabulary of {n_vocab}"));
    }
    if cached + w > n_ctx {
        return Err(format!("context is full: {cached} cached + {w} new tokens exceed the slot's {n_ctx} entries"));
    }
    Ok(())
}

/// Checks a `keep_entries(start, keep)` on a slot holding `len` entries: `start` within it,
/// `keep` strictly increasing and every kept entry held.
pub fn check_keep(len: usize, start: usize, keep: &[u32]) -> Result<(), String> {
    if start > len {
        return Err(format!("keep_entries: start {start} beyond slot length {len}"));
    }
    let mut prev: Option<u32> = None;
    for &k in keep {
        if prev.is_some_and(|p| k <= p) {
            return Err("keep_entries: indices must be strictly increasing".into());
        }
        if start + k as usize >= len {
            return Err(format!("keep_entries: entry {} beyond slot length {len}", start + k as usize));
        }
        prev = Some(k);
    }
    Ok(())
}

/// Checks a `copy_prefix` of `len` entries from a slot of model `src_model` holding
/// `src_len` entries into one of model `dst_model` that holds at most `dst_n_ctx`.
pub fn check_copy_prefix(src_model: u64, dst_model: u64, len: usize, src_len: usize, dst_n_ctx: usize) -> Result<(), String> {
    if src_model != dst_model {
        return Err("copy_prefix: slots belong to different models".to_string());
    }
    if len > src_len || len > dst_n_ctx {
        return Err(format!("copy_prefix: {len} entries do not fit (source has {src_len}, destination holds {dst_n_ctx})"));
    }
    Ok(())
}

/// Memory the system can hand out now (`MemAvailable`), in bytes; None where unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses an allocation of `need` bytes for `what` when it does not fit: in `budget` (a
/// backend's configured cap) less `used`, or, with no cap, in the memory available now. A
/// refusal here is an error message; an allocation that the system cannot back would abort
/// the process (or wake the OOM killer) instead.
pub fn check_fits(what: &str, need: u64, used: u64, budget: Option<u64>) -> Result<(), String> {
    let mib = |b: u64| b.div_ceil(1 << 20);
    match budget {
        Some(cap) if need > cap.saturating_sub(used) => Err(format!(
            "{what} needs {} MiB, but the backend's memory budget of {} MiB has {} MiB left",
            mib(need),
            mib(cap),
            mib(cap.saturating_sub(used))
        )),
        Some(_) => Ok(()),
        None => match available_memory() {
            Some(avail) if need > avail => Err(format!("{what} needs {} MiB, but only {} MiB of memory is available", mib(need), mib(avail))),
            _ => Ok(()),
        },
    }
}
