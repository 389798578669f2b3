//! Argument checks every backend makes the same way, so each backend's errors for a bad
//! batch or a bad compaction read alike: plain functions over plain data, called inside the
//! plugin (nothing here crosses the boundary).

/// Checks a forward batch against the model's vocabulary and the slot: `cached` entries
/// already held, room for `n_ctx`. An empty mask means causal. The width limit is the
/// backend's own check.
pub fn check_batch(tokens: &[u32], positions: &[u32], mask: &[u8], logit_rows: &[u32], n_vocab: usize, cached: usize, n_ctx: usize) -> Result<(), String> {
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
