//! Masked multi-head attention over a KV slot.
//!
//! Work is split into items of (block of batch tokens, KV head, share of that head's query
//! heads). Inside an item every query row (token x query head) is scored against each cached
//! key while that key is in L1, so a verification or prefill batch streams the cache once per
//! token block instead of once per token and query head; that stream is what bounds decoding
//! over a long context.
//!
//! Batch invariance: a row's keys are numbered by *ordinal* (the cache prefix `0..start`
//! first, then the batch entries it may see, in batch order), and every step is a fixed
//! function of that ordinal sequence: each score is an independent dot product; the softmax
//! sums by ordinal (lane = ordinal mod 16 in the SIMD path); the weighted value sum is one
//! multiply-add chain per output element in ordinal order, split into a shared part and a
//! per-row tail only through an exact store and reload. A position therefore gets the same
//! bits alone, in a prefill chunk or inside a token tree, whatever the thread count.

use std::cell::RefCell;

use crate::kv::KvElem;
use crate::ops::SharedMut;
use crate::pool::{split_range, ThreadPool};
use crate::simd::{self, Isa};

/// Geometry of one attention call.
#[derive(Clone, Copy)]
pub struct AttnShape {
    pub n_tok: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Cache entries before the batch (visible from each token's window start on).
    pub start: usize,
    /// The cache is a ring of this many entries, each stored at rows `i % ring` and
    /// `i % ring + ring` (see `kv::Slot`); 0: entry `i` at row `i`.
    pub ring: usize,
}

/// Batch tokens whose query rows share one pass over the cache.
const TOKEN_BLOCK: usize = 8;
/// Keys scored per kernel call (one AVX-512 register of scores).
pub const TILE: usize = 16;

thread_local! {
    /// Per-thread score rows, kept between calls (the pool's threads are persistent).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether this process uses the AVX-512 kernels for heads of `head_dim`.
pub fn uses_avx512(isa: Isa, head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512 && head_dim.is_multiple_of(16)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, head_dim);
        false
    }
}

/// One work item's rows and keys.
pub(crate) struct Item<'a> {
    pub s: &'a AttnShape,
    /// Batch tokens `t0..t0 + n_t`, query heads `kvh * group + g0 ..+ n_g`.
    pub t0: usize,
    pub n_t: usize,
    pub g0: usize,
    pub n_g: usize,
    pub kvh: usize,
    /// Per token of the item, the cache positions of the batch entries it sees.
    pub own: &'a [Vec<usize>],
    /// Score row length: the most keys a row has, rounded up to whole tiles.
    pub stride: usize,
}

impl Item<'_> {
    pub fn rows(&self) -> usize {
        self.n_t * self.n_g
    }
    /// Token (index within the item) of row `r`.
    pub fn tok(&self, r: usize) -> usize {
        r / self.n_g
    }
    /// Keys row `r` sees.
    pub fn keys(&self, r: usize) -> usize {
        self.s.start + self.own[self.tok(r)].len()
    }
    /// Cache position of row `r`'s key of ordinal `o`.
    pub fn pos(&self, r: usize, o: usize) -> usize {
        if o < self.s.start {
            o
        } else {
            self.own[self.tok(r)][o - self.s.start]
        }
    }
    /// Offset of row `r`'s query (and output) vector.
    pub fn row_off(&self, r: usize) -> usize {
        let (hd, group) = (self.s.head_dim, self.s.n_head / self.s.n_head_kv);
        (self.t0 + self.tok(r)) * self.s.n_head * hd + (self.kvh * group + self.g0 + r % self.n_g) * hd
    }
    /// The factor applied to every score.
    pub fn scale(&self) -> f32 {
        1.0 / (self.s.head_dim as f32).sqrt()
    }
}

/// `q` is `n_tok x (n_head*head_dim)`; `k_cache`/`v_cache` hold at least `start + n_tok`
/// rows of `n_head_kv*head_dim` (the batch's own rows included); `visible(t, j)` says
/// whether batch token `t` sees batch token `j`. `cache_lo[t]`, when given, is the first
/// cache entry token `t` sees (a sliding window; entries `cache_lo[t]..start` are visible,
/// and the window over batch entries is `visible`'s job); empty means all of `0..start`.
/// Writes `n_tok x (n_head*head_dim)`.
///
/// A windowed row is computed as if the cache began at its `cache_lo`: its keys are
/// renumbered from there, so its ordinal sequence (and result) depends only on which
/// entries it sees, as without a window.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: KvElem>(
    pool: &ThreadPool,
    isa: Isa,
    s: &AttnShape,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    visible: &(dyn Fn(usize, usize) -> bool + Sync),
    cache_lo: &[usize],
    out: &mut [f32],
) {
    let group = s.n_head / s.n_head_kv;
    let kv_dim = s.n_head_kv * s.head_dim;
    let q_len = s.n_tok * s.n_head * s.head_dim;
    assert!(q.len() >= q_len && out.len() >= q_len, "attention: query or output buffer too small");
    assert!(cache_lo.is_empty() || cache_lo.len() == s.n_tok, "attention: one window start per token");
    let lo = |t: usize| cache_lo.get(t).copied().unwrap_or(0).min(s.start);
    let rows = if s.ring > 0 { 2 * s.ring } else { s.start + s.n_tok };
    assert!(k_cache.len() >= rows * kv_dim && v_cache.len() >= rows * kv_dim, "attention: cache buffers too small");
    // A ring serves a token only the run of entries from its window start to the batch's end.
    assert!(s.ring == 0 || (0..s.n_tok).all(|t| s.start + s.n_tok - lo(t) <= s.ring), "attention: the batch outruns the ring");
    let first_row = |base: usize| if s.ring > 0 { base % s.ring } else { base };
    // Cache positions of the batch entries each token sees, relative to its window start.
    let own: Vec<Vec<usize>> =
        (0..s.n_tok).map(|t| (0..s.n_tok).filter(|&j| visible(t, j)).map(|j| s.start + j - lo(t)).collect()).collect();

    // Enough items for every thread: smaller token blocks first, then split query heads.
    // A block holds tokens of one window start only (they share the cache pass).
    let nt = pool.threads();
    let mut tb = TOKEN_BLOCK.min(s.n_tok);
    while tb > 1 && s.n_tok.div_ceil(tb) * s.n_head_kv < nt {
        tb = tb.div_ceil(2);
    }
    let mut blocks: Vec<(usize, usize)> = Vec::new();
    for t in 0..s.n_tok {
        match blocks.last_mut() {
            Some((t0, n)) if *n < tb && lo(*t0) == lo(t) => *n += 1,
            _ => blocks.push((t, 1)),
        }
    }
    let n_tb = blocks.len();
    let mut parts = 1;
    while parts < group && n_tb * s.n_head_kv * parts < nt {
        parts += 1;
    }
    let items = n_tb * s.n_head_kv * parts;
    let outp = SharedMut(out.as_mut_ptr());
    let fast = uses_avx512(isa, s.head_dim);
    pool.run(&|ti| {
        let o = outp;
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            for it in split_range(items, nt, ti) {
                let (part, rest) = (it % parts, it / parts);
                let (kvh, blk) = (rest % s.n_head_kv, rest / s.n_head_kv);
                let (t0, n_t) = blocks[blk];
                let base = lo(t0);
                let shifted = AttnShape { start: s.start - base, ring: 0, ..*s };
                let row0 = first_row(base) * kv_dim;
                let gs = split_range(group, parts, part);
                let own = &own[t0..t0 + n_t];
                let stride = (shifted.start + own.iter().map(Vec::len).max().unwrap_or(0)).div_ceil(TILE) * TILE;
                let item = Item { s: &shifted, t0, n_t, g0: gs.start, n_g: gs.len(), kvh, own, stride };
                scores.resize(item.rows() * stride, 0.0);
                run_item(isa, fast, &item, q, &k_cache[row0..], &v_cache[row0..], &mut scores, o);
            }
        });
    });
}

#[allow(clippy::too_many_arguments)]
fn run_item<E: KvElem>(isa: Isa, fast: bool, it: &Item<'_>, q: &[f32], k: &[E], v: &[E], scores: &mut [f32], out: SharedMut) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is only true when AVX-512F was detected; every pointer below stays
        // inside `q`, `k`, `v`, `scores` or this item's own output rows.
        unsafe { crate::attn_x86::run_item(it, q, k, v, scores, out) };
        return;
    }
    let _ = fast;
    let s = it.s;
    let (hd, stride, scale) = (s.head_dim, it.stride, it.scale());
    let kv_dim = s.n_head_kv * hd;
    let head = it.kvh * hd;

    // Portable path: per key, one dot product per row (simd::dot), then a scalar softmax and
    // per key one multiply-add per row (simd::axpy).
    let mut kbuf = vec![0f32; hd];
    let row_of = |buf: &[E], p: usize, tmp: &mut Vec<f32>| -> *const f32 {
        let src = &buf[p * kv_dim + head..p * kv_dim + head + hd];
        if E::IS_F16 {
            tmp.iter_mut().zip(src).for_each(|(d, x)| *d = x.to_f32());
            tmp.as_ptr()
        } else {
            src.as_ptr() as *const f32
        }
    };
    let rows = it.rows();
    for o in 0..s.start {
        // SAFETY: `row_of` points at `hd` valid f32s (the cache row, or `kbuf`).
        let kr = unsafe { std::slice::from_raw_parts(row_of(k, o, &mut kbuf), hd) };
        for r in 0..rows {
            let qo = it.row_off(r);
            scores[r * stride + o] = simd::dot(isa, &q[qo..qo + hd], kr) * scale;
        }
    }
    for r in 0..rows {
        let qo = it.row_off(r);
        for o in s.start..it.keys(r) {
            let kr = unsafe { std::slice::from_raw_parts(row_of(k, it.pos(r, o), &mut kbuf), hd) };
            scores[r * stride + o] = simd::dot(isa, &q[qo..qo + hd], kr) * scale;
        }
        softmax_scalar(&mut scores[r * stride..r * stride + it.keys(r)]);
    }
    // SAFETY: each item owns its rows' output vectors (disjoint tokens x query heads).
    let out_row = |r: usize| unsafe { std::slice::from_raw_parts_mut(out.0.add(it.row_off(r)), hd) };
    for r in 0..rows {
        out_row(r).fill(0.0);
    }
    for o in 0..s.start {
        let vr = unsafe { std::slice::from_raw_parts(row_of(v, o, &mut kbuf), hd) };
        for r in 0..rows {
            simd::axpy(isa, scores[r * stride + o], vr, out_row(r));
        }
    }
    for r in 0..rows {
        for o in s.start..it.keys(r) {
            let vr = unsafe { std::slice::from_raw_parts(row_of(v, it.pos(r, o), &mut kbuf), hd) };
            simd::axpy(isa, scores[r * stride + o], vr, out_row(r));
        }
    }
}

/// Softmax in place: max, `exp(x - max)` summed in order, then scaled by the inverse sum.
pub fn softmax_scalar(s: &mut [f32]) {
    let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in s.iter_mut() {
        *v = (*v - mx).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::F16;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        s: AttnShape,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        /// `W x W`, row t sees j when set.
        mask: Vec<bool>,
    }

    /// A token tree over a cache prefix: token t's parent is `(t - 1) / 2`.
    fn tree_case(hd: usize, start: usize, w: usize) -> Case {
        let s = AttnShape { n_tok: w, n_head: 6, n_head_kv: 2, head_dim: hd, start, ring: 0 };
        let kv_dim = 2 * hd;
        let mut mask = vec![false; w * w];
        for t in 0..w {
            let mut a = t;
            loop {
                mask[t * w + a] = true;
                if a == 0 {
                    break;
                }
                a = (a - 1) / 2;
            }
        }
        Case {
            q: noise(w * 6 * hd, 1).iter().map(|x| x * 3.0).collect(),
            k: noise((start + w) * kv_dim, 2),
            v: noise((start + w) * kv_dim, 3),
            mask,
            s,
        }
    }

    fn run<E: KvElem>(pool: &ThreadPool, isa: Isa, c: &Case) -> Vec<f32> {
        let k: Vec<E> = c.k.iter().map(|&x| E::from_f32(x)).collect();
        let v: Vec<E> = c.v.iter().map(|&x| E::from_f32(x)).collect();
        let w = c.s.n_tok;
        let mut out = vec![f32::NAN; c.q.len()];
        attention(pool, isa, &c.s, &c.q, &k, &v, &|t, j| c.mask[t * w + j], &[], &mut out);
        out
    }

    /// Token `t` of `c` alone, after the cache was compacted to its visible entries.
    fn alone(c: &Case, t: usize) -> Case {
        let (w, hd) = (c.s.n_tok, c.s.head_dim);
        let kv_dim = c.s.n_head_kv * hd;
        let q_dim = c.s.n_head * hd;
        let anc: Vec<usize> = (0..w).filter(|&j| c.mask[t * w + j]).collect();
        let mut k = c.k[..c.s.start * kv_dim].to_vec();
        let mut v = c.v[..c.s.start * kv_dim].to_vec();
        for &j in &anc {
            let p = c.s.start + j;
            k.extend_from_slice(&c.k[p * kv_dim..(p + 1) * kv_dim]);
            v.extend_from_slice(&c.v[p * kv_dim..(p + 1) * kv_dim]);
        }
        Case {
            s: AttnShape { n_tok: 1, start: c.s.start + anc.len() - 1, ..c.s },
            q: c.q[t * q_dim..(t + 1) * q_dim].to_vec(),
            k,
            v,
            mask: vec![true],
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn simd_path_matches_the_portable_oracle() {
        let pool = ThreadPool::new(2);
        let isa = simd::detect();
        // 80 = one 64-dimension pass plus a 16-dimension one; 37 keys = two tiles plus a tail.
        for (hd, start, w) in [(128, 37, 11), (80, 5, 3), (64, 0, 9), (32, 100, 1)] {
            let c = tree_case(hd, start, w);
            let fast = run::<f32>(&pool, isa, &c);
            let oracle = run::<f32>(&pool, Isa::Scalar, &c);
            assert!(fast.iter().all(|x| x.is_finite()));
            assert!(max_diff(&fast, &oracle) < 2e-6, "hd {hd}: {}", max_diff(&fast, &oracle));
            let fast16 = run::<F16>(&pool, isa, &c);
            let oracle16 = run::<F16>(&pool, Isa::Scalar, &c);
            assert!(max_diff(&fast16, &oracle16) < 2e-6, "f16 hd {hd}: {}", max_diff(&fast16, &oracle16));
            // f16 storage changes the result by about its rounding, not more.
            let d = max_diff(&fast16, &fast);
            assert!(d > 0.0 && d < 2e-3, "f16 vs f32 hd {hd}: {d}");
        }
    }

    /// A row's output is bit-identical inside a tree batch, alone after compaction, and with
    /// any thread count, for both cache types and both paths.
    #[test]
    fn rows_are_batch_and_thread_invariant() {
        let isa = simd::detect();
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            for (hd, start, w) in [(128, 45, 13), (64, 16, 20)] {
                let c = tree_case(hd, start, w);
                let q_dim = c.s.n_head * hd;
                for path in [isa, Isa::Scalar] {
                    let all = run::<f32>(&pool, path, &c);
                    let all16 = run::<F16>(&pool, path, &c);
                    for t in [0, 1, 6, w - 1] {
                        let a = alone(&c, t);
                        let row = &all[t * q_dim..(t + 1) * q_dim];
                        assert_eq!(run::<f32>(&pool, path, &a), row, "{path:?} hd {hd} token {t}");
                        let row16 = &all16[t * q_dim..(t + 1) * q_dim];
                        assert_eq!(run::<F16>(&pool, path, &a), row16, "f16 {path:?} hd {hd} token {t}");
                    }
                }
            }
        }
    }

    /// A windowed row (first visible cache entry `lo`) equals the same row over a cache that
    /// begins at `lo`, in a batch whose tokens have different windows, on both paths, and
    /// the same again when the cache is a ring (entries stored twice, see `kv::Slot`).
    #[test]
    fn windowed_rows_equal_rows_over_the_window_alone() {
        let pool = ThreadPool::new(2);
        let isa = simd::detect();
        let (hd, start, w) = (64, 100, 9);
        let c = tree_case(hd, start, w);
        let kv_dim = c.s.n_head_kv * hd;
        let q_dim = c.s.n_head * hd;
        let lo: Vec<usize> = (0..w).map(|t| 50 + 3 * t).collect();
        for path in [isa, Isa::Scalar] {
            let mut out = vec![f32::NAN; c.q.len()];
            attention(&pool, path, &c.s, &c.q, &c.k, &c.v, &|t, j| c.mask[t * w + j], &lo, &mut out);
            // The same cache as a ring of 64 entries, every entry at i % 64 and i % 64 + 64
            // (written in order, so it ends holding 45..109): each window runs across the
            // ring's end into the second copies.
            let ring = 64;
            let mut rk = vec![0f32; 2 * ring * kv_dim];
            let mut rv = rk.clone();
            for i in 0..start + w {
                for r in [i % ring, i % ring + ring] {
                    rk[r * kv_dim..(r + 1) * kv_dim].copy_from_slice(&c.k[i * kv_dim..(i + 1) * kv_dim]);
                    rv[r * kv_dim..(r + 1) * kv_dim].copy_from_slice(&c.v[i * kv_dim..(i + 1) * kv_dim]);
                }
            }
            let mut ring_out = vec![f32::NAN; c.q.len()];
            let rs = AttnShape { ring, ..c.s };
            attention(&pool, path, &rs, &c.q, &rk, &rv, &|t, j| c.mask[t * w + j], &lo, &mut ring_out);
            assert_eq!(ring_out, out, "{path:?}: ring");
            for t in 0..w {
                let mut a = alone(&c, t);
                a.k.drain(..lo[t] * kv_dim);
                a.v.drain(..lo[t] * kv_dim);
                a.s.start -= lo[t];
                assert_eq!(run::<f32>(&pool, path, &a), &out[t * q_dim..(t + 1) * q_dim], "{path:?} token {t}");
            }
        }
    }

    #[test]
    fn simd_exp_is_accurate() {
        if !uses_avx512(simd::detect(), 16) {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let mut worst = 0f64;
            // Down to -87, where results stop being normal floats (below, f32 itself loses
            // relative precision; the kernel returns 0 from -104 on).
            for i in 0..17_400 {
                let x = -(i as f32) * 0.005;
                // SAFETY: AVX-512F was detected above.
                let got = unsafe {
                    let mut o = [0f32; 16];
                    _mm512_storeu_ps(o.as_mut_ptr(), crate::attn_x86::exp16(_mm512_set1_ps(x)));
                    o[0]
                };
                let want = (x as f64).exp();
                worst = worst.max(((got as f64 - want) / want).abs());
            }
            assert!(worst < 5e-7, "relative error {worst}");
        }
    }
}
