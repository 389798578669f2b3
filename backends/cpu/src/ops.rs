//! Compute kernels of the forward pass: quantized matrix x activations, RMS norm, rotary
//! embedding, masked attention over a KV slot, SwiGLU.
//!
//! Batch invariance is a design rule here: every output element of a token row is computed
//! by the same sequence of floating-point operations whatever the batch width, the tiling
//! or the thread split (work is split over independent outputs, never over a reduction).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use coordgen_model::quant::dequantize_row;

use crate::model::Matrix;
use crate::qgemm::{self, QActs, URow};
use crate::pool::ThreadPool;
use crate::simd::{self, Isa};

/// Token rows per tile: a tile of activations stays in L2 while a weight row is reused.
const TOKEN_TILE: usize = 32;

/// A raw pointer that may be shared across the pool's threads; each thread writes disjoint
/// elements.
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);
// SAFETY: users guarantee disjoint writes per thread and that the buffer outlives the region.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Shared driver of the matrix kernels: rows are handed out to the pool's threads in
/// chunks, and each thread runs `work(rows, out)` for every chunk it takes, storing results
/// through `out` (only rows of that chunk).
///
/// Chunks are taken from a shared counter and shrink as the matrix runs out (each is a share
/// of what is left, at least [`MIN_CHUNK`] rows): a static split into equal halves left one
/// core spinning at the end of every matrix whenever the other ran slower (a shared machine,
/// a busier cache), several percent of decode. Which thread computes a row never changes its
/// value, so batch invariance and determinism are unaffected.
fn par_rows(pool: &ThreadPool, rows: usize, n_tok: usize, out: &mut [f32], work: impl Fn(Range<usize>, &ChunkOut) + Sync) {
    par_rows_many(pool, n_tok, &mut [(rows, out)], |_, range, out| work(range, out));
}

/// [`par_rows`] over several matrices' rows in one parallel region (`outs[m]` = rows of
/// matrix `m` and its `n_tok x rows` output): chunks are taken over the rows of all of them
/// in turn and never straddle two, and `work(m, rows, out)` computes rows of matrix `m`.
/// One region instead of one per matrix saves a barrier each (the q, k and v projections,
/// gate and up), and the small k and v matrices no longer leave a core idle on their own.
fn par_rows_many(pool: &ThreadPool, n_tok: usize, outs: &mut [(usize, &mut [f32])], work: impl Fn(usize, Range<usize>, &ChunkOut) + Sync) {
    // Matrix m owns rows starts[m]..starts[m + 1] of the combined row space.
    let mut starts = vec![0];
    let mut ptrs = Vec::with_capacity(outs.len());
    for (rows, out) in outs.iter_mut() {
        assert_eq!(out.len(), n_tok * *rows);
        starts.push(starts.last().unwrap() + *rows);
        ptrs.push(SharedMut(out.as_mut_ptr()));
    }
    let total = *starts.last().unwrap();
    let nt = pool.threads();
    let next = AtomicUsize::new(0);
    pool.run(&|_| {
        while let Some(chunk) = take_chunk(&next, total, nt) {
            // Split the chunk at matrix boundaries.
            let mut at = chunk.start;
            while at < chunk.end {
                let m = starts.partition_point(|&s| s <= at) - 1;
                let end = chunk.end.min(starts[m + 1]);
                let owned = at - starts[m]..end - starts[m];
                work(m, owned.clone(), &ChunkOut { ptr: ptrs[m], rows: starts[m + 1] - starts[m], n_tok, owned });
                at = end;
            }
        }
    });
}

/// Where one chunk's results go: `out[t, r]` of an `n_tok x rows` matrix, for the rows the
/// chunk owns (each chunk is taken by one thread, so writes never overlap).
struct ChunkOut {
    ptr: SharedMut,
    rows: usize,
    n_tok: usize,
    owned: Range<usize>,
}

impl ChunkOut {
    /// `out[t0 + i, r] = vals[i]`.
    #[inline]
    fn row(&self, r: usize, t0: usize, vals: &[f32]) {
        assert!(self.owned.contains(&r) && t0 + vals.len() <= self.n_tok);
        for (i, &v) in vals.iter().enumerate() {
            // SAFETY: row r belongs to this chunk (asserted), which only this thread took;
            // the index is in bounds by the assert.
            unsafe { *self.ptr.0.add((t0 + i) * self.rows + r) = v };
        }
    }

    /// Rows `r0..r0 + vals.len() / n_tok`, every token: `out[t, r0 + j] = vals[j * n_tok + t]`.
    /// One call per block of rows: at width 1 a call per row was 3% of decode.
    #[inline]
    fn rows(&self, r0: usize, vals: &[f32]) {
        let n = vals.len() / self.n_tok;
        assert!(vals.len() == n * self.n_tok && r0 >= self.owned.start && r0 + n <= self.owned.end);
        for t in 0..self.n_tok {
            // SAFETY: rows r0..r0 + n belong to this chunk (asserted), token t < n_tok.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.0.add(t * self.rows + r0), n) };
            if self.n_tok == 1 {
                dst.copy_from_slice(vals);
            } else {
                dst.iter_mut().enumerate().for_each(|(j, d)| *d = vals[j * self.n_tok + t]);
            }
        }
    }
}

/// Smallest chunk of rows [`par_rows`] hands out (even, so row pairs stay whole).
const MIN_CHUNK: usize = 16;

/// Takes the next chunk of `0..rows` from `next`: a `1 / (2 threads)` share of the rows left,
/// rounded to an even count and at least [`MIN_CHUNK`] (or all that is left).
fn take_chunk(next: &AtomicUsize, rows: usize, threads: usize) -> Option<Range<usize>> {
    let mut start = next.load(Ordering::Relaxed);
    loop {
        if start >= rows {
            return None;
        }
        let left = rows - start;
        let want = (left / (2 * threads.max(1))).next_multiple_of(2).max(MIN_CHUNK).min(left);
        match next.compare_exchange_weak(start, start + want, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(start..start + want),
            Err(now) => start = now,
        }
    }
}

/// `out[t, r] = sum_k W[r, k] * x[t, k]` for `w` rows `r`, `x` of `n_tok x cols`,
/// `out` of `n_tok x rows` (float path: each row dequantized once per token tile).
pub fn matmul(pool: &ThreadPool, isa: Isa, w: &Matrix, x: &[f32], n_tok: usize, out: &mut [f32]) {
    let cols = w.cols;
    assert_eq!(x.len(), n_tok * cols);
    let (data, rb) = (w.data(), w.row_bytes());
    par_rows(pool, w.rows, n_tok, out, |range, out| {
        let mut buf = vec![0f32; cols];
        let mut dst = vec![0f32; TOKEN_TILE.min(n_tok)];
        for t0 in (0..n_tok).step_by(TOKEN_TILE) {
            let t1 = (t0 + TOKEN_TILE).min(n_tok);
            for r in range.clone() {
                dequantize_row(w.ty, &data[r * rb..(r + 1) * rb], &mut buf);
                for t in t0..t1 {
                    dst[t - t0] = simd::dot(isa, &buf, &x[t * cols..(t + 1) * cols]);
                }
                out.row(r, t0, &dst[..t1 - t0]);
            }
        }
    });
}

/// Token rows per tile of the integer path: one unpacked weight row serves a whole tile.
const QTOKEN_TILE: usize = 64;

/// `out = x W^T` for a quantized `w` with activations already quantized in `acts`.
///
/// Rows are split over the pool and taken two at a time, so each activation vector read
/// serves two unpacked rows (the results equal the one-row kernel's bit for bit).
pub fn qmatmul(pool: &ThreadPool, isa: Isa, w: &Matrix, acts: &QActs, out: &mut [f32]) {
    assert_eq!(acts.k, w.cols);
    par_rows(pool, w.rows, acts.n, out, |range, out| qmatmul_rows(isa, w, acts, range, out));
}

/// [`qmatmul`] of several matrices over the same activations in one parallel region
/// (`mats[m]` with output `outs[m]`); each result is bitwise [`qmatmul`]'s.
pub fn qmatmul_many(pool: &ThreadPool, isa: Isa, mats: &[&Matrix], acts: &QActs, outs: &mut [&mut [f32]]) {
    assert_eq!(mats.len(), outs.len());
    assert!(mats.iter().all(|w| w.cols == acts.k && qgemm::is_quantized(w.ty)));
    let mut outs: Vec<(usize, &mut [f32])> = mats.iter().map(|w| w.rows).zip(outs.iter_mut().map(|o| &mut **o)).collect();
    par_rows_many(pool, acts.n, &mut outs, |m, range, out| qmatmul_rows(isa, mats[m], acts, range, out));
}

/// Rows `range` of `w` times every token of `acts`, into `out`.
fn qmatmul_rows(isa: Isa, w: &Matrix, acts: &QActs, range: Range<usize>, out: &ChunkOut) {
    let n_tok = acts.n;
    let (data, rb) = (w.data(), w.row_bytes());
    let src = |r: usize| &data[r * rb..(r + 1) * rb];
    if w.is_packed() && n_tok <= FUSED_MAX_TOKENS {
        // Few tokens: expand packed weights in registers, no unpacked copy; blocks of
        // rows per kernel call keep the per-call overhead out of decode.
        const ROW_BLOCK: usize = 64;
        let mut d = vec![0f32; ROW_BLOCK.min(range.len()) * n_tok];
        for b0 in range.clone().step_by(ROW_BLOCK) {
            let b1 = (b0 + ROW_BLOCK).min(range.end);
            qgemm::dot_packed_rows(isa, w.ty, data, b0..b1, acts, &mut d);
            out.rows(b0, &d[..(b1 - b0) * n_tok]);
        }
        return;
    }
    let tile = QTOKEN_TILE.min(n_tok);
    let (mut d0, mut d1) = (vec![0f32; tile], vec![0f32; tile]);
    let (mut u0, mut u1) = (URow::new(w.cols), URow::new(w.cols));
    let unpack = |r: usize, u: &mut URow| {
        // The row PREFETCH_ROWS ahead into L2 (as the fused kernels do): unpacking alone
        // leaves too few misses in flight to stream from memory.
        if r + qgemm::PREFETCH_ROWS < range.end {
            qgemm::prefetch_l2(src(r + qgemm::PREFETCH_ROWS));
        }
        if w.is_packed() {
            qgemm::unpack_packed_isa(isa, w.ty, src(r), u)
        } else {
            qgemm::unpack_row_isa(isa, w.ty, src(r), u)
        }
    };
    for t0 in (0..n_tok).step_by(QTOKEN_TILE) {
        let t1 = (t0 + QTOKEN_TILE).min(n_tok);
        let nt = t1 - t0;
        let mut r = range.start;
        while r + 1 < range.end {
            unpack(r, &mut u0);
            unpack(r + 1, &mut u1);
            qgemm::dot_tokens2(isa, &u0, &u1, acts, t0, t1, &mut d0[..nt], &mut d1[..nt]);
            out.row(r, t0, &d0[..nt]);
            out.row(r + 1, t0, &d1[..nt]);
            r += 2;
        }
        if r < range.end {
            unpack(r, &mut u0);
            qgemm::dot_tokens(isa, &u0, acts, t0, t1, &mut d0[..nt]);
            out.row(r, t0, &d0[..nt]);
        }
    }
}

/// Widest batch that runs the fused kernels on packed rows; wider ones (prefill chunks)
/// unpack each row once per token tile instead of expanding it once per 4 tokens (on the
/// 1.5B model both run prefill at about the same speed, and the fused path is 1.1-1.6x
/// faster at widths 1-16).
const FUSED_MAX_TOKENS: usize = QTOKEN_TILE;

/// `out = x W^T`, through the integer path for quantized weights (using `acts`, which must
/// hold `x` quantized) and the float path otherwise.
pub fn linear(pool: &ThreadPool, isa: Isa, w: &Matrix, x: &[f32], acts: &QActs, n_tok: usize, out: &mut [f32]) {
    if qgemm::is_quantized(w.ty) {
        qmatmul(pool, isa, w, acts, out)
    } else {
        matmul(pool, isa, w, x, n_tok, out)
    }
}

/// [`linear`] of several matrices over the same input `x` (`mats[m]` into `outs[m]`): one
/// parallel region when all are quantized, else one [`linear`] each; the same results.
pub fn linear_many(pool: &ThreadPool, isa: Isa, mats: &[&Matrix], x: &[f32], acts: &QActs, n_tok: usize, outs: &mut [&mut [f32]]) {
    if mats.iter().all(|w| qgemm::is_quantized(w.ty)) {
        qmatmul_many(pool, isa, mats, acts, outs)
    } else {
        for (w, out) in mats.iter().zip(outs.iter_mut()) {
            linear(pool, isa, w, x, acts, n_tok, out)
        }
    }
}

/// Dequantizes row `r` of `w` (embedding lookup).
pub fn get_row(w: &Matrix, r: usize, out: &mut [f32]) {
    let rb = w.row_bytes();
    dequantize_row(w.ty, &w.data()[r * rb..(r + 1) * rb], out);
}

/// `out = x / rms(x) * g` per row of length `g.len()`.
pub fn rms_norm(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let n = g.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut ss = 0f32;
        for v in xr {
            ss += v * v;
        }
        let scale = 1.0 / (ss / n as f32 + eps).sqrt();
        for i in 0..n {
            or[i] = xr[i] * scale * g[i];
        }
    }
}

/// In-place RMS norm of each `g.len()`-sized head vector (qwen3 QK-norm).
pub fn rms_norm_heads(x: &mut [f32], g: &[f32], eps: f32) {
    let n = g.len();
    for h in x.chunks_exact_mut(n) {
        let mut ss = 0f32;
        for v in h.iter() {
            ss += v * v;
        }
        let scale = 1.0 / (ss / n as f32 + eps).sqrt();
        for i in 0..n {
            h[i] = h[i] * scale * g[i];
        }
    }
}

/// Rotary embedding of every head of one token row at position `pos`.
pub fn rope(row: &mut [f32], head_dim: usize, pos: u32, inv_freq: &[f32], neox: bool) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let theta = pos as f32 * inv_freq[i];
            let (s, c) = theta.sin_cos();
            let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + (-*g).exp());
        *g = s * u;
    }
}

/// `gate = gelu_tanh(gate) * up` (gemma's GeGLU, the tanh approximation of GELU).
pub fn geglu_tanh(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let t = (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh();
        *g = 0.5 * x * (1.0 + t) * u;
    }
}

/// The feed-forward's gated activation of the model.
pub fn glu(act: coordgen_model::Activation, gate: &mut [f32], up: &[f32]) {
    match act {
        coordgen_model::Activation::Silu => swiglu(gate, up),
        coordgen_model::Activation::GeluTanh => geglu_tanh(gate, up),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geglu_matches_the_tanh_gelu_formula() {
        let xs = [-6.0f32, -1.5, -0.3, 0.0, 0.2, 1.0, 3.7];
        let mut g = xs.to_vec();
        geglu_tanh(&mut g, &[2.0; 7]);
        for (x, got) in xs.iter().zip(&g) {
            let x = *x as f64;
            let want = 2.0 * 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!((*got as f64 - want).abs() < 1e-5, "x {x}: {got} vs {want}");
        }
    }

    #[test]
    fn chunks_cover_every_row_once_in_even_steps() {
        for rows in [0, 1, 15, 16, 17, 256, 1536, 8961] {
            for threads in 1..5 {
                let next = AtomicUsize::new(0);
                let mut at = 0;
                while let Some(c) = take_chunk(&next, rows, threads) {
                    assert_eq!(c.start, at, "chunks are contiguous");
                    assert!(!c.is_empty());
                    assert!(c.end == rows || (c.len() % 2 == 0 && c.len() >= MIN_CHUNK));
                    at = c.end;
                }
                assert_eq!(at, rows);
            }
        }
    }

    #[test]
    fn many_matrices_in_one_region_write_each_output_once() {
        let n_tok = 3;
        for threads in 1..4 {
            let pool = ThreadPool::new(threads);
            let sizes = [37usize, 0, 256, 5, 100];
            let mut bufs: Vec<Vec<f32>> = sizes.iter().map(|&r| vec![-1.0; r * n_tok]).collect();
            let mut outs: Vec<(usize, &mut [f32])> = sizes.iter().copied().zip(bufs.iter_mut().map(|b| b.as_mut_slice())).collect();
            par_rows_many(&pool, n_tok, &mut outs, |m, range, out| {
                assert!(range.end <= sizes[m]);
                for r in range {
                    let vals: Vec<f32> = (0..n_tok).map(|t| (m * 100_000 + r * 10 + t) as f32).collect();
                    out.row(r, 0, &vals);
                }
            });
            for (m, b) in bufs.iter().enumerate() {
                for r in 0..sizes[m] {
                    for t in 0..n_tok {
                        assert_eq!(b[t * sizes[m] + r], (m * 100_000 + r * 10 + t) as f32, "matrix {m} row {r} token {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn block_writes_transpose_rows_into_token_major_output() {
        let pool = ThreadPool::new(2);
        let (rows, n_tok) = (70, 2);
        let mut out = vec![0f32; rows * n_tok];
        par_rows(&pool, rows, n_tok, &mut out, |range, out| {
            let vals: Vec<f32> = range.clone().flat_map(|r| (0..n_tok).map(move |t| (r * 10 + t) as f32)).collect();
            out.rows(range.start, &vals);
        });
        for r in 0..rows {
            for t in 0..n_tok {
                assert_eq!(out[t * rows + r], (r * 10 + t) as f32);
            }
        }
    }
}
