//! Integer matrix kernels: quantized weight rows times 8- or 15-bit activations.
//!
//! **Common unpacked form.** Every quantized type is unpacked row by row into bytes `q`
//! (unsigned, 0..=255), a float scale and a float bias per 16 weights ("group"), so that
//! `w = scale16[g] * q + bias16[g]`. Signed Q8_0 weights are stored as `q = w + 128` with
//! bias `-128 * d`.
//!
//! **Activations** are quantized per token with one scale per 16 values (one group), by
//! default to 8 bits (`ActBits::Eight`: `qa` in -127..=127 in `hi`, `lo` unused), about
//! llama.cpp's precision: one or two points of top-1 agreement with the float reference
//! on small models. `ActBits::Fifteen` stores 15-bit integers `qa = 128 * hi + lo` (`hi` in -127..=127, `lo` in 0..=127), so
//! u8 x i8 instructions serve both bytes, at twice the integer work: it keeps the float
//! reference's results. Both are batch invariant.
//!
//! **Tiles.** Rows are processed in tiles of 256 weights = 16 groups, stored *interleaved*:
//! byte `v*64 + g*4 + e` holds weight `g*16 + v*4 + e`, so 32-bit lane `g` of each of the
//! four 64-byte vectors belongs to group `g`. A VNNI `vpdpbusd` chain then yields the exact
//! integer dot product of every group in its own lane, and the float work per tile and
//! token is one conversion and two FMAs for 16 groups at once. Activations use the same
//! interleave; rows are zero-padded to whole tiles.
//!
//! **Determinism.** Integer group sums are exact, and the float operations (per group:
//! `acc = fma(float(isum), scale_w * scale_a, acc)`, `acc = fma(bias, d*sum(qa), acc)`, then a
//! fixed reduction tree over the 16 lanes) are the same in the scalar oracle, the AVX2 path
//! and the AVX-512 VNNI path. Results are therefore bitwise identical across paths and
//! independent of how many tokens share an unpacked row: the CPU backend is batch invariant.

//!
//! Files: `layout` (the tile layout and [`URow`], a leaf), `acts` (activation
//! quantization), `scalar` (the oracle), `x86` (AVX2 / AVX-512 VNNI); this module picks a
//! kernel per call from the run-time [`Isa`].

use coordgen_model::quant::GgmlType;

use crate::simd::Isa;

/// Runs `$body` with `$f` bound (as a const) to the packed format of `$ty`, so each format
/// gets its own monomorphized kernel.
#[cfg(target_arch = "x86_64")]
macro_rules! by_format {
    ($ty:expr, $f:ident => $body:expr) => {{
        use $crate::qgemm::x86::fmt;
        match $ty {
            GgmlType::Q4K => { const $f: u8 = fmt::Q4K; $body }
            GgmlType::Q6K => { const $f: u8 = fmt::Q6K; $body }
            GgmlType::Q4_0 => { const $f: u8 = fmt::Q4_0; $body }
            GgmlType::Q4_1 => { const $f: u8 = fmt::Q4_1; $body }
            GgmlType::Q5_0 => { const $f: u8 = fmt::Q5_0; $body }
            GgmlType::Q5_1 => { const $f: u8 = fmt::Q5_1; $body }
            GgmlType::Q8_0 => { const $f: u8 = fmt::Q8_0; $body }
            other => unreachable!("{} rows are never packed", other.name()),
        }
    }};
}

pub mod acts;
pub mod layout;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timing;

pub use acts::*;
pub use layout::*;
pub use scalar::*;

/// Unpacks with the SIMD twin when the CPU has one (and `isa` is not scalar).
pub fn unpack_row_isa(isa: Isa, ty: GgmlType, src: &[u8], row: &mut URow) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && crate::unpack_x86::supports(ty) {
        // SAFETY: `supports` checked the CPU features.
        unsafe { crate::unpack_x86::unpack_row(ty, src, row) };
        return;
    }
    let _ = isa;
    unpack_row(ty, src, row)
}

/// Dot products of one unpacked row with tokens `t0..t1`; `out[i]` gets token `t0 + i`.
pub fn dot_tokens(isa: Isa, row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
    debug_assert_eq!(acts.kp, row.q.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if x86::has_vnni() => unsafe { x86::dot_tokens_vnni(row, acts, t0, t1, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::dot_tokens_avx2(row, acts, t0, t1, out) },
        // SAFETY: `Isa::Neon` is chosen only on aarch64 CPUs with NEON.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { crate::qgemm_neon::dot_tokens(row, acts, t0, t1, out) },
        _ => {
            for t in t0..t1 {
                let (hi, lo, sa, ds) = acts.row(t);
                out[t - t0] = dot_scalar(row, acts.bits, hi, lo, sa, ds);
            }
        }
    }
}

/// How far ahead (in rows) the matrix kernels prefetch weights, into L2. Decode on the 1.5B
/// model (2 threads, Zen 4): about 22 tokens/s at 4-16 rows into L2, 17-18 at 2 rows into L1
/// (the fill buffers of L1 then bound the misses in flight), 12.8 without prefetching.
pub const PREFETCH_ROWS: usize = 8;

/// Hints the CPU to bring `bytes` into L2 (one prefetch per 64-byte line; no-op elsewhere).
#[inline]
pub fn prefetch_l2(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes.len()).step_by(64) {
        // SAFETY: prefetching is a hint with no architectural effect, on an in-bounds address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(bytes.as_ptr().add(off) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Whether this CPU runs the fused kernels on packed rows (so models are repacked at load).
pub fn packed_kernels(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && x86::has_vnni() {
        return true;
    }
    let _ = isa;
    false
}

/// Unpacks a row in the packed layout of [`crate::repack`].
pub fn unpack_packed_isa(isa: Isa, ty: GgmlType, src: &[u8], row: &mut URow) {
    #[cfg(target_arch = "x86_64")]
    if packed_kernels(isa) {
        // SAFETY: features checked; `src` holds the row's packed blocks.
        unsafe { x86::unpack_packed(ty, src, row) };
        return;
    }
    let _ = isa;
    crate::repack::unpack_row(ty, src, row)
}

/// Dot products of `R` packed rows with tokens `t0..t1` (`out[r][i]` = row `r`, token
/// `t0 + i`), expanding the weights in registers; bitwise the unpacked path's results.
pub fn dot_packed<const R: usize>(isa: Isa, ty: GgmlType, srcs: [&[u8]; R], acts: &QActs, t0: usize, t1: usize, out: [&mut [f32]; R]) {
    assert!(srcs.iter().all(|s| s.len() == ty.row_bytes(acts.k)) && out.iter().all(|o| o.len() >= t1 - t0));
    #[cfg(target_arch = "x86_64")]
    if packed_kernels(isa) {
        // Rows of a matrix lie back to back: prefetch the next R rows, which the next call
        // reads (callers that go through whole matrices use `dot_packed_rows`).
        let ahead = R * srcs[0].len();
        let out = out.map(|o| o.as_mut_ptr());
        // SAFETY: features checked; row and output lengths asserted above.
        by_format!(ty, F => unsafe { x86::dot_packed_vnni::<R, F>(srcs.map(|s| x86::Packed::<F>::new(s.as_ptr(), acts.k, ahead)), acts, t0, t1, out) });
        return;
    }
    let mut row = URow::new(acts.k);
    for (src, o) in srcs.into_iter().zip(out) {
        unpack_packed_isa(isa, ty, src, &mut row);
        dot_tokens(isa, &row, acts, t0, t1, o);
    }
}

/// Rows `rows` of a packed matrix `data` (`ty`, rows of `acts.k` weights) for every token
/// of `acts`: `out[(r - rows.start) * acts.n + t]`. One call per thread's share of a matrix
/// keeps the per-row overhead out of decode, where a row pair takes only a few tiles; each
/// result is bitwise [`dot_packed`]'s.
pub fn dot_packed_rows(isa: Isa, ty: GgmlType, data: &[u8], rows: std::ops::Range<usize>, acts: &QActs, out: &mut [f32]) {
    let rb = ty.row_bytes(acts.k);
    let n = acts.n;
    assert!(data.len() >= rows.end * rb && out.len() >= rows.len() * n);
    #[cfg(target_arch = "x86_64")]
    if packed_kernels(isa) {
        // SAFETY: features checked; matrix and output lengths asserted above.
        unsafe { x86::packed_rows_vnni(ty, data.as_ptr(), rb, rows.start, rows.end, acts, out.as_mut_ptr()) };
        return;
    }
    for (i, r) in rows.enumerate() {
        dot_packed::<1>(isa, ty, [&data[r * rb..(r + 1) * rb]], acts, 0, n, [&mut out[i * n..(i + 1) * n]]);
    }
}

/// As [`dot_tokens`] for two rows of the same length at once (`out0` for `row0`, `out1` for
/// `row1`); each result is bitwise the one-row result.
pub fn dot_tokens2(isa: Isa, row0: &URow, row1: &URow, acts: &QActs, t0: usize, t1: usize, out0: &mut [f32], out1: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if x86::has_vnni() => unsafe { x86::dot_tokens_vnni2(row0, row1, acts, t0, t1, out0, out1) },
        _ => {
            dot_tokens(isa, row0, acts, t0, t1, out0);
            dot_tokens(isa, row1, acts, t0, t1, out1);
        }
    }
}

