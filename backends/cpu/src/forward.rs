//! The transformer forward pass (llama / qwen2 / qwen3 / gemma3) over a batch of
//! tokens with explicit positions and an attention mask.

use crate::model::CpuModel;
use crate::attention::{self, AttnShape};
use crate::kv::{KvBuf, Slot};
use crate::ops;
use crate::pool::ThreadPool;
use crate::qgemm::{ActBits, QActs};
use crate::simd::Isa;


/// One forward's inputs (the interface kit's plain-slice form).
pub use coordgen_interface::backend_kit::Batch;

/// Runs the model over the batch, appending its KV entries to the slot; returns the logits
/// of the requested rows (`rows x n_vocab`).
pub fn forward(pool: &ThreadPool, isa: Isa, bits: ActBits, m: &CpuModel, slot: &mut Slot, b: &Batch<'_>) -> Result<Vec<f32>, String> {
    Ok(forward_slots(pool, isa, bits, m, &mut [slot], std::slice::from_ref(b))?.pop().unwrap_or_default())
}

/// Runs batch `i` appended to `slots[i]` for every `i` in one pass over the weights: the
/// rows of all batches go through each matrix together (the weights are read once for all),
/// while rotary embedding, the KV writes and attention stay per slot. Every row's result is
/// the one it gets alone, because each kernel computes a row independently of the others
/// in its batch. Everything is checked before any slot is written.
pub fn forward_slots(pool: &ThreadPool, isa: Isa, bits: ActBits, m: &CpuModel, slots: &mut [&mut Slot], batches: &[Batch<'_>]) -> Result<Vec<Vec<f32>>, String> {
    let hp = &m.hp;
    if slots.len() != batches.len() {
        return Err(format!("{} batches for {} slots", batches.len(), slots.len()));
    }
    for (s, b) in slots.iter().zip(batches) {
        coordgen_interface::checks::check_batch(b.tokens, b.positions, b.mask, b.logit_rows, hp.n_vocab, s.len(), s.n_ctx())?;
        check_window(hp, s, b)?;
    }
    // Segment i covers rows offs[i]..offs[i+1] of the joint batch.
    let mut offs = vec![0usize];
    for b in batches {
        offs.push(offs.last().unwrap() + b.tokens.len());
    }
    let w = *offs.last().unwrap();
    let (e, hd) = (hp.n_embd, hp.head_dim);
    let q_dim = hp.n_head * hd;
    let kv_dim = m.kv_dim();

    let mut x = vec![0f32; w * e];
    for (t, &tok) in batches.iter().flat_map(|b| b.tokens).enumerate() {
        let row = &mut x[t * e..(t + 1) * e];
        ops::get_row(&m.tok_embd, tok as usize, row);
        if hp.extras.embd_scale != 1.0 {
            row.iter_mut().for_each(|v| *v *= hp.extras.embd_scale);
        }
    }
    let mut xn = vec![0f32; w * e];
    let mut q = vec![0f32; w * q_dim];
    let mut k = vec![0f32; w * kv_dim];
    let mut v = vec![0f32; w * kv_dim];
    let mut attn = vec![0f32; w * q_dim];
    let mut proj = vec![0f32; w * e];
    let mut gate = vec![0f32; w * hp.n_ff];
    let mut up = vec![0f32; w * hp.n_ff];
    let mut qa = QActs::new();

    // Per batch, each token's first visible cache entry on the sliding-window layers (the
    // same for all of them, so computed once).
    let window = hp.extras.sliding_window;
    let windowed_lo: Vec<Vec<usize>> = batches
        .iter()
        .map(|b| if window == 0 { Vec::new() } else { b.positions.iter().map(|&p| (p as usize + 1).saturating_sub(window)).collect() })
        .collect();
    for (li, l) in m.layers.iter().enumerate() {
        ops::rms_norm(&x, &l.attn_norm, hp.rms_eps, &mut xn);
        qa.quantize_on(Some(pool), &xn, w, e, bits);
        ops::linear_many(pool, isa, &[&l.wq, &l.wk, &l.wv], &xn, &qa, w, &mut [&mut q, &mut k, &mut v]);
        for (buf, bias) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
            if let Some(bias) = bias {
                for row in buf.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
                }
            }
        }
        if let Some(g) = &l.q_norm {
            ops::rms_norm_heads(&mut q, g, hp.rms_eps);
        }
        if let Some(g) = &l.k_norm {
            ops::rms_norm_heads(&mut k, g, hp.rms_eps);
        }
        let swa = hp.is_swa(li);
        let inv_freq = if swa { &m.rope_inv_freq_swa } else { &m.rope_inv_freq };
        for (si, (slot, b)) in slots.iter_mut().zip(batches).enumerate() {
            let (r0, r1) = (offs[si], offs[si + 1]);
            let n = r1 - r0;
            for t in 0..n {
                let (pos, row) = (b.positions[t], r0 + t);
                ops::rope(&mut q[row * q_dim..(row + 1) * q_dim], hd, pos, inv_freq, hp.rope_neox);
                ops::rope(&mut k[row * kv_dim..(row + 1) * kv_dim], hd, pos, inv_freq, hp.rope_neox);
            }
            let start = slot.len();
            slot.write_layer(li, start, &k[r0 * kv_dim..r1 * kv_dim], &v[r0 * kv_dim..r1 * kv_dim]);
            let (mask, positions) = (b.mask, b.positions);
            // A sliding-window layer hides keys `window` or more positions back. Cache entry
            // i holds position i (the host keeps the committed sequence in order from 0), so
            // the window over the cache is a first visible entry per token.
            let window = if swa { window } else { 0 };
            let in_window = move |t: usize, j: usize| window == 0 || positions[t].saturating_sub(positions[j]) < window as u32;
            let visible = move |t: usize, j: usize| (if mask.is_empty() { j <= t } else { mask[t * n + j] != 0 }) && in_window(t, j);
            let cache_lo: &[usize] = if swa { &windowed_lo[si] } else { &[] };
            let shape = AttnShape { n_tok: n, n_head: hp.n_head, n_head_kv: hp.n_head_kv, head_dim: hd, start, ring: slot.ring(li) };
            let (qs, out) = (&q[r0 * q_dim..r1 * q_dim], &mut attn[r0 * q_dim..r1 * q_dim]);
            match slot.layer(li) {
                (KvBuf::F32(kc), KvBuf::F32(vc)) => attention::attention(pool, isa, &shape, qs, kc, vc, &visible, cache_lo, out),
                (KvBuf::F16(kc), KvBuf::F16(vc)) => attention::attention(pool, isa, &shape, qs, kc, vc, &visible, cache_lo, out),
                _ => return Err("forward: keys and values of a slot have different types".into()),
            }
        }
        qa.quantize_on(Some(pool), &attn, w, q_dim, bits);
        ops::linear(pool, isa, &l.wo, &attn, &qa, w, &mut proj);
        if let Some(g) = &l.post_attn_norm {
            ops::rms_norm_heads(&mut proj, g, hp.rms_eps);
        }
        x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

        ops::rms_norm(&x, &l.ffn_norm, hp.rms_eps, &mut xn);
        qa.quantize_on(Some(pool), &xn, w, e, bits);
        ops::linear_many(pool, isa, &[&l.w_gate, &l.w_up], &xn, &qa, w, &mut [&mut gate, &mut up]);
        ops::glu(hp.extras.activation, &mut gate, &up);
        qa.quantize_on(Some(pool), &gate, w, hp.n_ff, bits);
        ops::linear(pool, isa, &l.w_down, &gate, &qa, w, &mut proj);
        if let Some(g) = &l.post_ffn_norm {
            ops::rms_norm_heads(&mut proj, g, hp.rms_eps);
        }
        x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
    }
    for (slot, b) in slots.iter_mut().zip(batches) {
        slot.advance(b.tokens.len());
    }

    // The requested rows of every segment go through the output matrix together.
    let rows: Vec<usize> = batches.iter().zip(&offs).flat_map(|(b, &o)| b.logit_rows.iter().map(move |&r| o + r as usize)).collect();
    let nr = rows.len();
    let mut outs: Vec<Vec<f32>> = Vec::with_capacity(batches.len());
    if nr == 0 {
        outs.resize(batches.len(), Vec::new());
        return Ok(outs);
    }
    let mut sel = vec![0f32; nr * e];
    for (i, &r) in rows.iter().enumerate() {
        sel[i * e..(i + 1) * e].copy_from_slice(&x[r * e..(r + 1) * e]);
    }
    let mut seln = vec![0f32; nr * e];
    ops::rms_norm(&sel, &m.out_norm, hp.rms_eps, &mut seln);
    let mut logits = vec![0f32; nr * hp.n_vocab];
    qa.quantize_on(Some(pool), &seln, nr, e, bits);
    ops::linear(pool, isa, &m.output, &seln, &qa, nr, &mut logits);
    if let Some(cap) = hp.extras.final_softcap {
        logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
    }
    if batches.len() == 1 {
        outs.push(logits);
        return Ok(outs);
    }
    let mut at = 0;
    for b in batches {
        let n = b.logit_rows.len() * hp.n_vocab;
        outs.push(logits[at..at + n].to_vec());
        at += n;
    }
    Ok(outs)
}

/// A batch a slot with sliding-window rings can serve: at most the rings' slack of tokens,
/// each at or past the cache's end (so its window lies in what the rings still hold).
fn check_window(hp: &coordgen_model::HParams, s: &Slot, b: &Batch<'_>) -> Result<(), String> {
    if b.tokens.len() > s.max_batch() {
        return Err(format!(
            "a forward of {} tokens exceeds the {} this slot's sliding-window layers take at once (split the batch)",
            b.tokens.len(),
            s.max_batch()
        ));
    }
    let cap = (0..hp.n_layer).map(|l| s.ring(l)).max().unwrap_or(0);
    if cap == 0 {
        return Ok(());
    }
    let (start, n) = (s.len(), b.tokens.len());
    for &p in b.positions {
        let lo = (p as usize + 1).saturating_sub(hp.extras.sliding_window).min(start);
        if lo < s.intact_from() || start + n - lo > cap {
            return Err(format!(
                "position {p} (cache of {start} entries) looks back past what the sliding-window layers hold (entries {}.. of a {cap}-entry ring)",
                s.intact_from()
            ));
        }
    }
    Ok(())
}
