//! The host's static-width path. A backend that runs only the token widths it lists in
//! its capabilities (an NPU's precompiled graphs) is wrapped in [`FixedWidths`], which
//! shows the rest of the host an ordinary backend of any width up to the widest:
//! - each forward is padded to the smallest listed width that holds it. The pad tokens sit
//!   after the real ones and no real row's mask sees them (a causal batch needs no mask for
//!   that; a tree batch gets its mask widened with zero columns), and their entries are
//!   truncated off the slot right after the call, so the slot holds exactly what the host
//!   asked for;
//! - a causal batch wider than the widest listed width (a prefill chunk) runs as several
//!   forwards; a tree batch that wide is refused, since its rows would need each other;
//! - slots get room for the widest pad beyond the context the host asks for.
//!
//! The contract of `forward` and `forward_slots` holds as for any backend: on an error the
//! slots are as before the call.

use std::path::Path;

use super::traits::{Backend, Capabilities, Forward, ModelInfo, PResult, PluginError};

pub(crate) struct FixedWidths {
    inner: Box<dyn Backend>,
    /// The backend's widths, ascending, none zero.
    widths: Vec<u32>,
}

impl FixedWidths {
    /// Wraps `inner` when it lists widths; checks the list is usable.
    pub(crate) fn wrap(inner: Box<dyn Backend>) -> PResult<Box<dyn Backend>> {
        let caps = inner.capabilities();
        if caps.widths.is_empty() {
            return Ok(inner);
        }
        let ascending = caps.widths.windows(2).all(|p| p[0] < p[1]);
        if caps.widths[0] == 0 || !ascending || caps.widths.iter().any(|&w| w > caps.max_width) {
            return Err(PluginError::Load {
                plugin: inner.name().to_string(),
                message: format!("its widths {:?} must be ascending, above 0 and at most its max_width {}", caps.widths, caps.max_width),
            });
        }
        Ok(Box::new(FixedWidths { inner, widths: caps.widths }))
    }

    fn widest(&self) -> u32 {
        *self.widths.last().expect("wrap keeps only non-empty width lists")
    }

    fn err(&self, message: String) -> PluginError {
        PluginError::Call { plugin: self.inner.name().to_string(), message }
    }

    /// One forward of at most the widest width: padded, run, and the pads truncated off.
    fn padded_forward(&mut self, f: &Forward<'_>, len_before: u32) -> PResult<Vec<f32>> {
        let w = f.tokens.len();
        let padded = *self.widths.iter().find(|&&x| x as usize >= w).expect("callers split batches wider than the widest") as usize;
        if padded == w {
            return self.inner.forward(f);
        }
        let pad = padded - w;
        // Pads repeat the last real token at its position: any token would do, since no
        // real row sees them and their entries are dropped.
        let mut tokens = f.tokens.to_vec();
        tokens.extend(std::iter::repeat(f.tokens[w - 1]).take(pad));
        let mut positions = f.positions.to_vec();
        positions.extend(std::iter::repeat(f.positions[w - 1]).take(pad));
        let mask = if f.mask.is_empty() {
            Vec::new()
        } else {
            let mut m = vec![0u8; padded * padded];
            for i in 0..w {
                m[i * padded..i * padded + w].copy_from_slice(&f.mask[i * w..(i + 1) * w]);
            }
            for i in w..padded {
                m[i * padded + i] = 1;
            }
            m
        };
        let out = self.inner.forward(&Forward { slot: f.slot, tokens: &tokens, positions: &positions, mask: &mask, logit_rows: f.logit_rows })?;
        if let Err(e) = self.inner.truncate(f.slot, len_before + w as u32) {
            // The pads are in the slot: drop the whole forward so the slot is as before.
            let _ = self.inner.truncate(f.slot, len_before);
            return Err(self.err(format!("could not drop the {pad} pad entries of a width-{padded} forward: {e}")));
        }
        Ok(out)
    }

    /// A forward of any width: pieces of the widest width for a wider causal batch.
    fn forward_any(&mut self, f: &Forward<'_>) -> PResult<Vec<f32>> {
        let w = f.tokens.len();
        let widest = self.widest() as usize;
        // Before padding: a malformed batch must fail as it would on the backend itself.
        coordgen_interface::checks::check_shape(f.tokens, f.positions, f.mask, f.logit_rows).map_err(|m| self.err(m))?;
        let len_before = self.inner.slot_len(f.slot)?;
        if w <= widest {
            return self.padded_forward(f, len_before);
        }
        if !f.mask.is_empty() {
            return Err(self.err(format!("a tree batch of {w} tokens is wider than this backend's widest graph ({widest})")));
        }
        // Rows of each piece, keyed by where they go in the output (logit_rows' order).
        let mut pieces: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut done = 0usize;
        let result = (|| {
            while done < w {
                let end = (done + widest).min(w);
                let want: Vec<(usize, u32)> =
                    f.logit_rows.iter().enumerate().filter(|(_, &r)| (r as usize) >= done && (r as usize) < end).map(|(k, &r)| (k, r - done as u32)).collect();
                let rows: Vec<u32> = want.iter().map(|x| x.1).collect();
                let piece = Forward { slot: f.slot, tokens: &f.tokens[done..end], positions: &f.positions[done..end], mask: &[], logit_rows: &rows };
                let out = self.padded_forward(&piece, len_before + done as u32)?;
                let n_vocab = if rows.is_empty() { 0 } else { out.len() / rows.len() };
                for (i, (k, _)) in want.iter().enumerate() {
                    pieces.push((*k, out[i * n_vocab..(i + 1) * n_vocab].to_vec()));
                }
                done = end;
            }
            Ok(())
        })();
        if let Err(e) = result {
            if done > 0 {
                let _ = self.inner.truncate(f.slot, len_before);
            }
            return Err(e);
        }
        pieces.sort_by_key(|p| p.0);
        Ok(pieces.into_iter().flat_map(|p| p.1).collect())
    }
}

impl Backend for FixedWidths {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn identity(&self) -> String {
        self.inner.identity()
    }
    /// The backend's capabilities as the host sees them through the padding: any width up
    /// to the widest listed one.
    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        c.max_width = self.widest();
        c.widths.clear();
        c
    }
    fn set_threads(&mut self, n: u32) -> PResult<()> {
        self.inner.set_threads(n)
    }
    fn load_model(&mut self, path: &Path) -> PResult<ModelInfo> {
        self.inner.load_model(path)
    }
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> PResult<u32> {
        // Room for the pads of a forward that fills the context.
        let room = n_ctx.checked_add(self.widest()).ok_or_else(|| self.err(format!("a KV slot of {n_ctx} entries plus padding overflows")))?;
        self.inner.create_slot(model, room)
    }
    fn free_slot(&mut self, slot: u32) -> PResult<()> {
        self.inner.free_slot(slot)
    }
    fn slot_len(&self, slot: u32) -> PResult<u32> {
        self.inner.slot_len(slot)
    }
    fn truncate(&mut self, slot: u32, len: u32) -> PResult<()> {
        self.inner.truncate(slot, len)
    }
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> PResult<()> {
        self.inner.copy_prefix(src, dst, len)
    }
    fn keep_entries(&mut self, slot: u32, start: u32, keep: &[u32]) -> PResult<()> {
        self.inner.keep_entries(slot, start, keep)
    }
    fn forward(&mut self, f: &Forward<'_>) -> PResult<Vec<f32>> {
        self.forward_any(f)
    }
    /// The slots' forwards one after another (a static graph holds one slot's batch); if
    /// one fails, those already run are truncated back, so no slot changes.
    fn forward_slots(&mut self, fs: &[Forward<'_>]) -> PResult<Vec<Vec<f32>>> {
        let mut outs = Vec::with_capacity(fs.len());
        let mut before = Vec::with_capacity(fs.len());
        for f in fs {
            before.push(self.inner.slot_len(f.slot)?);
        }
        for f in fs {
            match self.forward_any(f) {
                Ok(o) => outs.push(o),
                Err(e) => {
                    for (g, &len) in fs.iter().zip(&before).take(outs.len()) {
                        let _ = self.inner.truncate(g.slot, len);
                    }
                    return Err(e);
                }
            }
        }
        Ok(outs)
    }
    fn stats_json(&self) -> String {
        self.inner.stats_json()
    }
}
