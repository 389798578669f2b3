//! Masked multi-head attention over a KV slot, grouped by KV head: the query heads that share
//! a KV head (GQA) are processed together, so each cached key and value row is read once
//! per group instead of once per query head. Work items are (token, KV head) pairs split
//! over the pool.
//!
//! Every query head's scores, softmax and weighted sum follow one fixed operation sequence
//! (keys in cache order, the same SIMD path per process), whatever the batch, the grouping
//! or the thread split, so the backend stays batch invariant.

use crate::ops::SharedMut;
use crate::pool::{split_range, ThreadPool};
use crate::simd::{self, Isa};

/// Geometry of one attention call.
pub struct AttnShape {
    pub n_tok: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Cache entries before the batch (always visible).
    pub start: usize,
}

/// `q` is `n_tok x (n_head*head_dim)`; `k_cache`/`v_cache` hold at least `start + n_tok`
/// rows of `n_head_kv*head_dim` (the batch's own rows included); `visible(t, j)` says
/// whether batch token `t` sees batch token `j`. Writes `n_tok x (n_head*head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    isa: Isa,
    s: &AttnShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    visible: &(dyn Fn(usize, usize) -> bool + Sync),
    out: &mut [f32],
) {
    let hd = s.head_dim;
    let kv_dim = s.n_head_kv * hd;
    let q_dim = s.n_head * hd;
    let group = s.n_head / s.n_head_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let items = s.n_tok * s.n_head_kv;
    let outp = SharedMut(out.as_mut_ptr());
    let nt = pool.threads();
    pool.run(&|ti| {
        let o = outp;
        let mut keys: Vec<usize> = Vec::with_capacity(s.start + s.n_tok);
        // scores[g * n_keys + e]
        let mut scores: Vec<f32> = Vec::new();
        let mut acc = vec![0f32; group * hd];
        for item in split_range(items, nt, ti) {
            let (t, kvh) = (item / s.n_head_kv, item % s.n_head_kv);
            keys.clear();
            keys.extend(0..s.start);
            keys.extend((0..s.n_tok).filter(|&j| visible(t, j)).map(|j| s.start + j));
            let nk = keys.len();
            scores.resize(group * nk, 0.0);
            let qg = &q[t * q_dim + kvh * group * hd..t * q_dim + (kvh + 1) * group * hd];
            for (ei, &e) in keys.iter().enumerate() {
                let kr = &k_cache[e * kv_dim + kvh * hd..e * kv_dim + (kvh + 1) * hd];
                for g in 0..group {
                    scores[g * nk + ei] = simd::dot(isa, &qg[g * hd..(g + 1) * hd], kr) * scale;
                }
            }
            for g in 0..group {
                let sc = &mut scores[g * nk..(g + 1) * nk];
                let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for v in sc.iter_mut() {
                    *v = (*v - mx).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                for v in sc.iter_mut() {
                    *v *= inv;
                }
            }
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (ei, &e) in keys.iter().enumerate() {
                let vr = &v_cache[e * kv_dim + kvh * hd..e * kv_dim + (kvh + 1) * hd];
                for g in 0..group {
                    simd::axpy(isa, scores[g * nk + ei], vr, &mut acc[g * hd..(g + 1) * hd]);
                }
            }
            for g in 0..group {
                let h = kvh * group + g;
                // SAFETY: each (t, h) output slice is written by exactly one work item.
                unsafe { std::ptr::copy_nonoverlapping(acc[g * hd..].as_ptr(), o.0.add(t * q_dim + h * hd), hd) };
            }
        }
    });
}
