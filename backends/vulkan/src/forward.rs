//! KV slots in device memory and the transformer forward (llama / qwen2 / qwen3) recorded as
//! one command buffer of dispatches. Per forward only the token ids, positions, mask and logit
//! rows go to the device and the requested logits come back.

use std::sync::Arc;

use crate::gpu::{Bind, Buffer, Ctx, Mem, Recorder};
use crate::model::{GpuModel, Matrix};
use crate::shaders::Shaders;

/// Widest batch of one forward (the attention shader keeps a row's visible batch entries in
/// shared memory).
pub const MAX_WIDTH: usize = 512;

/// One sequence's cache: per layer, `n_ctx` entries of f16 keys and values, and a fill count.
pub struct Slot {
    pub model: u64,
    pub n_ctx: usize,
    pub len: usize,
    pub k: Vec<Buffer>,
    pub v: Vec<Buffer>,
}

impl Slot {
    pub fn new(ctx: &Arc<Ctx>, model_id: u64, m: &GpuModel, n_ctx: usize) -> Result<Slot, String> {
        let bytes = (n_ctx * m.kv_dim() * 2) as u64;
        if bytes > ctx.info.max_range {
            return Err(format!("vulkan: a context of {n_ctx} entries needs {} MB per layer, more than one device binding holds ({} MB)", bytes >> 20, ctx.info.max_range >> 20));
        }
        let total = bytes * 2 * m.hp.n_layer as u64;
        let free = ctx.budget.saturating_sub(ctx.used_bytes());
        if total > free {
            return Err(format!(
                "vulkan: too little device memory for a KV cache of {n_ctx} entries: it needs {} MB, {} MB are free; use a smaller --ctx-size or target_backend = \"cpu\"",
                total >> 20,
                free >> 20
            ));
        }
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..m.hp.n_layer {
            k.push(Buffer::new(ctx, bytes, Mem::Device, "the KV cache")?);
            v.push(Buffer::new(ctx, bytes, Mem::Device, "the KV cache")?);
        }
        Ok(Slot { model: model_id, n_ctx, len: 0, k, v })
    }

    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|b| b.size).sum()
    }
}

/// Working buffers of a forward, grown to the widest batch and context seen.
#[derive(Default)]
pub struct Work {
    width: usize,
    bufs: Option<WorkBufs>,
    logits: Option<Buffer>,
    logit_rows: usize,
    scores: Option<Buffer>,
    score_floats: usize,
}

struct WorkBufs {
    x: Buffer,
    xn: Buffer,
    q: Buffer,
    k: Buffer,
    v: Buffer,
    attn: Buffer,
    gate: Buffer,
    up: Buffer,
    tokens: Buffer,
    positions: Buffer,
    mask: Buffer,
    rows: Buffer,
    dummy: Buffer,
}

impl Work {
    fn ensure(&mut self, ctx: &Arc<Ctx>, m: &GpuModel, w: usize) -> Result<(), String> {
        if self.bufs.is_some() && w <= self.width {
            return Ok(());
        }
        let w = w.next_power_of_two().clamp(8, MAX_WIDTH);
        let hp = &m.hp;
        let f = |n: usize| (n * w * 4) as u64;
        let dev = |n: u64| Buffer::new(ctx, n, Mem::Device, "activations");
        let host = |n: u64| Buffer::new(ctx, n, Mem::Host, "forward inputs");
        self.bufs = None;
        self.bufs = Some(WorkBufs {
            x: dev(f(hp.n_embd))?,
            xn: dev(f(hp.n_embd))?,
            q: dev(f(hp.n_head * hp.head_dim))?,
            k: dev(f(m.kv_dim()))?,
            v: dev(f(m.kv_dim()))?,
            attn: dev(f(hp.n_head * hp.head_dim))?,
            gate: dev(f(hp.n_ff))?,
            up: dev(f(hp.n_ff))?,
            tokens: host((w * 4) as u64)?,
            positions: host((w * 4) as u64)?,
            mask: host((w * w) as u64)?,
            rows: host((w * 4) as u64)?,
            dummy: dev(16)?,
        });
        self.width = w;
        Ok(())
    }

    fn ensure_logits(&mut self, ctx: &Arc<Ctx>, rows: usize, n_vocab: usize) -> Result<(), String> {
        if self.logits.is_none() || rows > self.logit_rows {
            self.logits = None;
            self.logits = Some(Buffer::new(ctx, (rows * n_vocab * 4) as u64, Mem::Host, "the logits")?);
            self.logit_rows = rows;
        }
        Ok(())
    }

    fn ensure_scores(&mut self, ctx: &Arc<Ctx>, floats: usize) -> Result<(), String> {
        if self.scores.is_none() || floats > self.score_floats {
            self.scores = None;
            self.scores = Some(Buffer::new(ctx, (floats * 4) as u64, Mem::Device, "attention scores")?);
            self.score_floats = floats;
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        let b = self.bufs.as_ref().map(|b| [&b.x, &b.xn, &b.q, &b.k, &b.v, &b.attn, &b.gate, &b.up].iter().map(|x| x.size).sum()).unwrap_or(0);
        b + self.logits.as_ref().map_or(0, |l| l.size) + self.scores.as_ref().map_or(0, |s| s.size)
    }
}

/// One forward's inputs (the interface kit's plain-slice form).
pub use coordgen_interface::backend_kit::Batch;

fn words(v: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
}

/// `out[t][...] (+)= W x[t]` for `n_tok` rows of `x` (stride `x_stride` floats), every chunk of
/// the matrix's rows; `bias` adds a vector, `add` accumulates into `out` (the residual).
#[allow(clippy::too_many_arguments)]
fn matmul(r: &mut Recorder<'_>, sh: &Shaders, m: &Matrix, x: Bind, out: Bind, bias: Option<&Buffer>, dummy: &Buffer, n_tok: usize, add: bool) -> Result<(), String> {
    let p = sh.matmul(m.ty);
    let flags = u32::from(bias.is_some()) | (u32::from(add) << 1);
    let b = bias.map(|b| b.all()).unwrap_or(dummy.all());
    for c in &m.chunks {
        let push = [m.cols as u32, n_tok as u32, m.rows as u32, c.row0, m.row_bytes as u32, flags, m.cols as u32, c.rows];
        r.dispatch(p, &[c.buf.all(), x, out, b], &push, [c.rows.div_ceil(sh.matmul_rows), n_tok.div_ceil(8) as u32, 1])?;
    }
    Ok(())
}

fn rms_norm(r: &mut Recorder<'_>, sh: &Shaders, x: Bind, out: Bind, g: &Buffer, rows: Bind, n_rows: usize, n: usize, gather: bool, eps: f32) -> Result<(), String> {
    r.dispatch(&sh.rms_norm, &[x, out, g.all(), rows], &[n as u32, u32::from(gather), eps.to_bits()], [n_rows as u32, 1, 1])
}

/// Runs the forward and returns the logits of the requested rows (`rows x n_vocab`).
pub fn forward(ctx: &Arc<Ctx>, sh: &Shaders, m: &mut GpuModel, slot: &mut Slot, work: &mut Work, b: &Batch<'_>) -> Result<Vec<f32>, String> {
    let w = b.tokens.len();
    let nv = m.hp.n_vocab;
    if w > MAX_WIDTH {
        return Err(format!("batch of {w} tokens exceeds the Vulkan backend's maximum width {MAX_WIDTH}"));
    }
    coordgen_interface::checks::check_batch(b.tokens, b.positions, b.mask, b.logit_rows, nv, slot.len, slot.n_ctx)?;
    let start = slot.len;
    let max_pos = *b.positions.iter().max().unwrap() as usize;
    m.ensure_rope(ctx, max_pos + 1)?;
    work.ensure(ctx, m, w)?;
    let m = &*m;
    let hp = &m.hp;
    let (e, hd) = (hp.n_embd, hp.head_dim);
    let kv_dim = m.kv_dim();
    let nr = b.logit_rows.len();

    // Attention scores: one scratch row of n_ctx floats per (token, head) of a dispatch;
    // tokens are dispatched in groups that keep the scratch within one binding.
    let row_floats = slot.n_ctx * hp.n_head;
    let group = (ctx.info.max_range as usize / 4 / row_floats).clamp(1, w);
    work.ensure_scores(ctx, group * row_floats)?;
    // Logits: rows in groups that fit one binding.
    let lgroup = if nr == 0 { 0 } else { (ctx.info.max_range as usize / 4 / nv).clamp(1, nr) };
    if nr > 0 {
        work.ensure_logits(ctx, lgroup, nv)?;
    }
    let wb = work.bufs.as_ref().unwrap();
    let scores = work.scores.as_ref().unwrap();

    wb.tokens.write(0, words(b.tokens))?;
    wb.positions.write(0, words(b.positions))?;
    if !b.mask.is_empty() {
        wb.mask.write(0, b.mask)?;
    }
    if nr > 0 {
        wb.rows.write(0, words(b.logit_rows))?;
    }

    let mut r = Recorder::new(ctx)?;
    for c in &m.tok_embd.chunks {
        let push = [e as u32, c.row0, c.rows, m.tok_embd.row_bytes as u32];
        r.dispatch(sh.get_rows(m.tok_embd.ty), &[c.buf.all(), wb.tokens.all(), wb.x.all()], &push, [w as u32, 1, 1])?;
    }
    let d = &wb.dummy;
    let rope_flags = u32::from(hp.rope_neox);
    let pairs = (kv_dim / 2) as u32;
    for (li, l) in m.layers.iter().enumerate() {
        rms_norm(&mut r, sh, wb.x.all(), wb.xn.all(), &l.attn_norm, d.all(), w, e, false, hp.rms_eps)?;
        matmul(&mut r, sh, &l.wq, wb.xn.all(), wb.q.all(), l.bq.as_ref(), d, w, false)?;
        matmul(&mut r, sh, &l.wk, wb.xn.all(), wb.k.all(), l.bk.as_ref(), d, w, false)?;
        matmul(&mut r, sh, &l.wv, wb.xn.all(), wb.v.all(), l.bv.as_ref(), d, w, false)?;
        let flags = rope_flags | (u32::from(l.q_norm.is_some()) << 1) | (u32::from(l.k_norm.is_some()) << 2);
        let qn = l.q_norm.as_ref().unwrap_or(d).all();
        let kn = l.k_norm.as_ref().unwrap_or(d).all();
        r.dispatch(
            &sh.rope,
            &[wb.q.all(), wb.k.all(), qn, kn, wb.positions.all(), m.rope_table.all()],
            &[hp.n_head as u32, hp.n_head_kv as u32, hd as u32, flags, hp.rms_eps.to_bits()],
            [w as u32, (hp.n_head + hp.n_head_kv) as u32, 1],
        )?;
        r.dispatch(&sh.kv_write, &[wb.k.all(), wb.v.all(), slot.k[li].all(), slot.v[li].all()], &[start as u32, pairs, w as u32], [pairs.div_ceil(64), w as u32, 1])?;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut t0 = 0;
        while t0 < w {
            let g = group.min(w - t0);
            let push = [start as u32, w as u32, t0 as u32, hp.n_head as u32, hp.n_head_kv as u32, hd as u32, u32::from(b.mask.is_empty()), slot.n_ctx as u32, scale.to_bits()];
            r.dispatch(&sh.attention, &[wb.q.all(), slot.k[li].all(), slot.v[li].all(), wb.mask.all(), scores.all(), wb.attn.all()], &push, [g as u32, hp.n_head as u32, 1])?;
            t0 += g;
        }
        matmul(&mut r, sh, &l.wo, wb.attn.all(), wb.x.all(), None, d, w, true)?;
        rms_norm(&mut r, sh, wb.x.all(), wb.xn.all(), &l.ffn_norm, d.all(), w, e, false, hp.rms_eps)?;
        matmul(&mut r, sh, &l.w_gate, wb.xn.all(), wb.gate.all(), None, d, w, false)?;
        matmul(&mut r, sh, &l.w_up, wb.xn.all(), wb.up.all(), None, d, w, false)?;
        let n = (w * hp.n_ff) as u32;
        let groups = n.div_ceil(256);
        r.dispatch(&sh.swiglu, &[wb.gate.all(), wb.up.all()], &[n], [groups.min(65535), groups.div_ceil(65535), 1])?;
        matmul(&mut r, sh, &l.w_down, wb.gate.all(), wb.x.all(), None, d, w, true)?;
    }
    slot.len = start + w;
    if nr == 0 {
        r.submit()?;
        return Ok(Vec::new());
    }
    // The logit rows, normalised, into xn (nr <= w rows).
    rms_norm(&mut r, sh, wb.x.all(), wb.xn.all(), &m.out_norm, wb.rows.all(), nr, e, true, hp.rms_eps)?;
    let logits = work.logits.as_ref().unwrap();
    let mut out = vec![0f32; nr * nv];
    let mut r = Some(r);
    let mut g0 = 0;
    while g0 < nr {
        let g = lgroup.min(nr - g0);
        let mut rec = match r.take() {
            Some(rec) => rec,
            None => Recorder::new(ctx)?,
        };
        let x = wb.xn.range((g0 * e * 4) as u64, (g * e * 4) as u64);
        matmul(&mut rec, sh, m.output(), x, logits.all(), None, d, g, false)?;
        rec.submit()?;
        let host = logits.host().ok_or("vulkan: the logits buffer is not host visible")?;
        // SAFETY: the buffer holds at least g * nv f32 values written by the shader.
        let src = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const f32, g * nv) };
        out[g0 * nv..(g0 + g) * nv].copy_from_slice(src);
        g0 += g;
    }
    Ok(out)
}

/// Keeps entries `0..start`, then `start + keep[k]` moved to `start + k`: the moved entries
/// go through a temporary buffer, because one copy command's sources and destinations must
/// not overlap.
pub fn keep_entries(ctx: &Arc<Ctx>, slot: &mut Slot, kv_dim: usize, start: usize, keep: &[u32]) -> Result<(), String> {
    coordgen_interface::checks::check_keep(slot.len, start, keep)?;
    let moved: Vec<(usize, usize)> = keep.iter().enumerate().map(|(d, &s)| (start + d, start + s as usize)).filter(|(d, s)| d != s).collect();
    if !moved.is_empty() {
        let eb = (kv_dim * 2) as u64;
        let nl = slot.k.len();
        let tmp = Buffer::new(ctx, eb * moved.len() as u64 * 2 * nl as u64, Mem::Device, "a KV compaction buffer")?;
        let mut r = Recorder::new(ctx)?;
        let per_buf = eb * moved.len() as u64;
        for (bi, buf) in slot.k.iter().chain(&slot.v).enumerate() {
            let base = bi as u64 * per_buf;
            let out: Vec<_> = moved.iter().enumerate().map(|(i, &(_, s))| (s as u64 * eb, base + i as u64 * eb, eb)).collect();
            r.copies(buf, &tmp, &out);
        }
        for (bi, buf) in slot.k.iter().chain(&slot.v).enumerate() {
            let base = bi as u64 * per_buf;
            let back: Vec<_> = moved.iter().enumerate().map(|(i, &(d, _))| (base + i as u64 * eb, d as u64 * eb, eb)).collect();
            r.copies(&tmp, buf, &back);
        }
        r.submit()?;
    }
    slot.len = start + keep.len();
    Ok(())
}

/// Copies the first `len` entries of `src` into `dst` (same model).
pub fn copy_prefix(ctx: &Arc<Ctx>, src: &Slot, dst: &mut Slot, kv_dim: usize, len: usize) -> Result<(), String> {
    let bytes = (len * kv_dim * 2) as u64;
    let mut r = Recorder::new(ctx)?;
    for (s, d) in src.k.iter().zip(&dst.k).chain(src.v.iter().zip(&dst.v)) {
        r.copy(s, 0, d, 0, bytes);
    }
    r.submit()?;
    dst.len = len;
    Ok(())
}
