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

use coordgen_model::quant::{k_scale_min, GgmlType};
use half::f16;

use crate::pool::{split_range, ThreadPool};
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

pub const TILE: usize = 256;
const GROUPS: usize = 16;

/// Position of natural index `n` (within a tile) in the interleaved layout.
#[inline(always)]
pub fn interleave(n: usize) -> usize {
    let (g, v, e) = (n / 16, (n % 16) / 4, n % 4);
    v * 64 + g * 4 + e
}

/// Largest activation magnitude: keeps `hi` in -127..=127.
pub const QA_MAX: f32 = 16256.0;

/// Activation precision of the integer path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ActBits {
    /// 15-bit activations as two bytes: matches the float reference.
    Fifteen,
    /// 8-bit activations (the default): half the integer work, llama.cpp's accuracy.
    #[default]
    Eight,
}

/// Quantized activations of `n` tokens, each padded to `kp` (a multiple of [`TILE`]).
pub struct QActs {
    pub k: usize,
    pub kp: usize,
    pub n: usize,
    pub bits: ActBits,
    pub hi: Vec<i8>,
    pub lo: Vec<i8>,
    /// Per group: the activation block scale.
    pub scale16: Vec<f32>,
    /// Per group: `d * sum(qa)` over the group.
    pub dsum16: Vec<f32>,
}

impl Default for QActs {
    fn default() -> Self {
        Self::new()
    }
}

impl QActs {
    pub fn new() -> Self {
        QActs { k: 0, kp: 0, n: 0, bits: ActBits::Fifteen, hi: Vec::new(), lo: Vec::new(), scale16: Vec::new(), dsum16: Vec::new() }
    }

    /// Quantizes `x` (`n x k`). Rows whose length is not a multiple of 32 cannot meet
    /// quantized weights (whose rows are whole blocks) and are left empty.
    pub fn quantize(&mut self, x: &[f32], n: usize, k: usize, bits: ActBits) {
        self.quantize_on(None, x, n, k, bits)
    }

    /// As [`QActs::quantize`], spreading tokens over the pool's threads when there are
    /// several (each token is quantized alone, so the result does not depend on the split).
    pub fn quantize_on(&mut self, pool: Option<&ThreadPool>, x: &[f32], n: usize, k: usize, bits: ActBits) {
        assert_eq!(x.len(), n * k);
        self.k = k;
        self.bits = bits;
        if k % 32 != 0 {
            self.n = 0;
            return;
        }
        let kp = k.div_ceil(TILE) * TILE;
        self.kp = kp;
        self.n = n;
        for (v, len) in [(&mut self.hi, n * kp), (&mut self.lo, n * kp)] {
            v.clear();
            v.resize(len, 0);
        }
        for (v, len) in [(&mut self.scale16, n * kp / 16), (&mut self.dsum16, n * kp / 16)] {
            v.clear();
            v.resize(len, 0.0);
        }
        let ptrs = TokenPtrs { hi: self.hi.as_mut_ptr(), lo: self.lo.as_mut_ptr(), sc: self.scale16.as_mut_ptr(), ds: self.dsum16.as_mut_ptr() };
        // Work unit = one tile (8 blocks of 32) of one token: decode (one token) spreads over
        // the threads too. Each block is quantized alone, so the split changes nothing.
        let tiles = kp / TILE;
        let run = |u: usize| {
            let (t, tile) = (u / tiles, u % tiles);
            let b0 = tile * (TILE / 32);
            let b1 = (b0 + TILE / 32).min(k / 32);
            let p = ptrs;
            // SAFETY: unit u's blocks are disjoint from every other unit's, in bounds of the
            // buffers sized above, and the buffers outlive this call.
            unsafe {
                quantize_blocks(
                    &x[t * k..(t + 1) * k],
                    b0..b1,
                    std::slice::from_raw_parts_mut(p.hi.add(t * kp), kp),
                    std::slice::from_raw_parts_mut(p.lo.add(t * kp), kp),
                    std::slice::from_raw_parts_mut(p.sc.add(t * kp / 16), kp / 16),
                    std::slice::from_raw_parts_mut(p.ds.add(t * kp / 16), kp / 16),
                    bits,
                )
            }
        };
        let units = n * tiles;
        match pool {
            Some(pool) if units > 1 && pool.threads() > 1 => {
                let nt = pool.threads();
                pool.run(&|ti| split_range(units, nt, ti).for_each(run));
            }
            _ => (0..units).for_each(run),
        }
    }

    /// (hi, lo, scale16, dsum16) of token `t`.
    #[inline]
    pub fn row(&self, t: usize) -> (&[i8], &[i8], &[f32], &[f32]) {
        let kp = self.kp;
        (&self.hi[t * kp..(t + 1) * kp], &self.lo[t * kp..(t + 1) * kp], &self.scale16[t * kp / 16..(t + 1) * kp / 16], &self.dsum16[t * kp / 16..(t + 1) * kp / 16])
    }
}

#[derive(Clone, Copy)]
struct TokenPtrs {
    hi: *mut i8,
    lo: *mut i8,
    sc: *mut f32,
    ds: *mut f32,
}
// SAFETY: used only to hand disjoint per-token slices to the pool's threads.
unsafe impl Send for TokenPtrs {}
unsafe impl Sync for TokenPtrs {}

/// Interleaved position of every index of a tile.
static POS: [u16; TILE] = {
    let mut t = [0u16; TILE];
    let mut n = 0;
    while n < TILE {
        t[n] = ((n % 16) / 4 * 64 + n / 16 * 4 + n % 4) as u16;
        n += 1;
    }
    t
};

/// `x.round() as i32` (half away from zero) for |x| < 2^23, without a libm call (the
/// baseline x86_64 target has no rounding instruction).
#[inline(always)]
fn round_half_away(x: f32) -> i32 {
    let i = x as i32;
    let frac = x - i as f32; // exact: x and i differ by less than 1 and |x| < 2^23
    if frac >= 0.5 {
        i + 1
    } else if frac <= -0.5 {
        i - 1
    } else {
        i
    }
}

/// Quantizes blocks `blocks` (of 32) of one token into its (interleaved, padded) slices,
/// with the SIMD twin where the CPU has one (bitwise the scalar result).
fn quantize_blocks(x: &[f32], blocks: std::ops::Range<usize>, hi: &mut [i8], lo: &mut [i8], sc: &mut [f32], ds: &mut [f32], bits: ActBits) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx512bw() {
        for b in blocks {
            // SAFETY: AVX-512 F/BW checked; `b` is a whole block of `x` and the slices are a
            // token's padded buffers.
            unsafe { x86::quantize_block_avx512(x, b, hi, lo, sc, ds, bits) };
        }
        return;
    }
    for b in blocks {
        quantize_block(x, b, hi, lo, sc, ds, bits);
    }
}

/// Scalar oracle: quantizes block `b` (32 values) of one token.
fn quantize_block(x: &[f32], b: usize, hi: &mut [i8], lo: &mut [i8], sc: &mut [f32], ds: &mut [f32], bits: ActBits) {
    let qmax = if bits == ActBits::Eight { 127.0 } else { QA_MAX };
    let xb = &x[b * 32..b * 32 + 32];
    // One scale per 16 values (one group): the kernels apply activation scales per group
    // anyway, and a scale per 16 halves the values an outlier coarsens (at 8 bits this keeps
    // the 135M test model's answers; per 32 it went astray).
    let mut d = [0f32; 2];
    let mut id = [0f32; 2];
    for hf in 0..2 {
        let amax = xb[hf * 16..hf * 16 + 16].iter().fold(0f32, |m, v| m.max(v.abs()));
        d[hf] = amax / qmax;
        id[hf] = if d[hf] > 0.0 { 1.0 / d[hf] } else { 0.0 };
    }
    let mut sums = [0i32; 2];
    let tile_base = (b * 32 / TILE) * TILE;
    let within = b * 32 % TILE;
    for (i, &v) in xb.iter().enumerate() {
        let q = round_half_away(v * id[i / 16]).clamp(-(qmax as i32), qmax as i32);
        sums[i / 16] += q;
        let pos = tile_base + POS[within + i] as usize;
        if bits == ActBits::Eight {
            hi[pos] = q as i8;
        } else {
            hi[pos] = (q >> 7) as i8;
            lo[pos] = (q & 127) as i8;
        }
    }
    for hf in 0..2 {
        sc[b * 2 + hf] = d[hf];
        ds[b * 2 + hf] = d[hf] * sums[hf] as f32;
    }
}

/// One weight row in the common unpacked, interleaved form.
pub struct URow {
    pub k: usize,
    pub q: Vec<u8>,
    pub scale16: Vec<f32>,
    pub bias16: Vec<f32>,
}

impl URow {
    pub fn new(k: usize) -> Self {
        let kp = k.div_ceil(TILE) * TILE;
        URow { k, q: vec![0; kp], scale16: vec![0.0; kp / 16], bias16: vec![0.0; kp / 16] }
    }
}

/// Whether a type runs through the integer path.
pub fn is_quantized(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// The little-endian f16 at byte `i` of `b`, as f32.
#[inline]
pub(crate) fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scalar unpacker (the oracle of the SIMD twins): natural order per block, then
/// scattered into the interleaved layout.
pub fn unpack_row(ty: GgmlType, src: &[u8], row: &mut URow) {
    let k = row.k;
    let bs = ty.block_size();
    let bb = ty.block_bytes();
    let mut q = [0u8; 256];
    for b in 0..k / bs {
        let blk = &src[b * bb..(b + 1) * bb];
        let start = b * bs;
        let mut scales = [0f32; 16];
        let mut biases = [0f32; 16];
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                let d = h(blk, 0);
                let bias = match ty {
                    GgmlType::Q4_0 => {
                        for j in 0..16 {
                            q[j] = blk[2 + j] & 0xF;
                            q[j + 16] = blk[2 + j] >> 4;
                        }
                        -8.0 * d
                    }
                    GgmlType::Q4_1 => {
                        for j in 0..16 {
                            q[j] = blk[4 + j] & 0xF;
                            q[j + 16] = blk[4 + j] >> 4;
                        }
                        h(blk, 2)
                    }
                    GgmlType::Q5_0 | GgmlType::Q5_1 => {
                        let (qh_at, qs_at) = if ty == GgmlType::Q5_0 { (2, 6) } else { (4, 8) };
                        let qh = u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]);
                        for j in 0..16 {
                            q[j] = (blk[qs_at + j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                            q[j + 16] = (blk[qs_at + j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                        }
                        if ty == GgmlType::Q5_0 {
                            -16.0 * d
                        } else {
                            h(blk, 2)
                        }
                    }
                    _ => {
                        for j in 0..32 {
                            q[j] = (blk[2 + j] as i8 as i32 + 128) as u8;
                        }
                        -128.0 * d
                    }
                };
                scales[..2].fill(d);
                biases[..2].fill(bias);
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (qh, qs) = if ty == GgmlType::Q5K { (&blk[16..48], &blk[48..176]) } else { (&blk[0..0], &blk[16..144]) };
                for c in 0..4 {
                    for l in 0..32 {
                        q[c * 64 + l] = qs[c * 32 + l] & 0xF;
                        q[c * 64 + 32 + l] = qs[c * 32 + l] >> 4;
                        if ty == GgmlType::Q5K {
                            q[c * 64 + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                            q[c * 64 + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        }
                    }
                }
                k_block_scales(ty, blk, &mut scales, &mut biases);
            }
            GgmlType::Q6K => {
                for n in 0..2 {
                    let ql = &blk[n * 64..n * 64 + 64];
                    let qh = &blk[128 + n * 32..128 + n * 32 + 32];
                    for l in 0..32 {
                        q[n * 128 + l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        q[n * 128 + l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        q[n * 128 + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        q[n * 128 + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                k_block_scales(ty, blk, &mut scales, &mut biases);
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("float weights do not use the integer path"),
        }
        for i in 0..bs {
            let n = start + i;
            row.q[(n / TILE) * TILE + interleave(n % TILE)] = q[i];
        }
        for g in 0..bs / 16 {
            row.scale16[start / 16 + g] = scales[g];
            row.bias16[start / 16 + g] = biases[g];
        }
    }
}

/// The 16 group scales and biases (`w = scale * q + bias`) of a Q4_K, Q5_K or Q6_K block
/// from its header and scale bytes in the file's layout (the packed Q6_K layout of
/// [`crate::repack`] keeps them at the same offsets, so its scalar unpacker shares this;
/// the packed Q4_K layout re-encodes them).
pub fn k_block_scales(ty: GgmlType, blk: &[u8], sc: &mut [f32], bi: &mut [f32]) {
    match ty {
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (h(blk, 0), h(blk, 2));
            for j in 0..8 {
                let (s, m) = k_scale_min(j, &blk[4..16]);
                sc[2 * j..2 * j + 2].fill(d * s as f32);
                bi[2 * j..2 * j + 2].fill(-dmin * m as f32);
            }
        }
        GgmlType::Q6K => {
            let d = h(blk, 208);
            for g in 0..16 {
                let s = d * (blk[192 + g] as i8) as f32;
                sc[g] = s;
                bi[g] = -32.0 * s;
            }
        }
        _ => unreachable!("not a k-quant with 16 group scales"),
    }
}

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

/// The fixed reduction tree over 16 lanes that every path uses.
#[inline(always)]
pub fn reduce16(l: &[f32; 16]) -> f32 {
    let mut a = [0f32; 8];
    for i in 0..8 {
        a[i] = l[i] + l[i + 8];
    }
    let mut b = [0f32; 4];
    for i in 0..4 {
        b[i] = a[i] + a[i + 4];
    }
    let c0 = b[0] + b[2];
    let c1 = b[1] + b[3];
    c0 + c1
}

/// Scalar oracle for one token (`lo` is ignored for 8-bit activations).
pub fn dot_scalar(row: &URow, bits: ActBits, hi: &[i8], lo: &[i8], sa: &[f32], ds: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for tile in 0..row.q.len() / TILE {
        let base = tile * TILE;
        for g in 0..GROUPS {
            let (mut sh, mut sl) = (0i32, 0i32);
            for v in 0..4 {
                for e in 0..4 {
                    let p = base + v * 64 + g * 4 + e;
                    sh += row.q[p] as i32 * hi[p] as i32;
                    sl += row.q[p] as i32 * lo[p] as i32;
                }
            }
            let isum = if bits == ActBits::Eight { sh } else { (sh << 7) + sl };
            let gi = tile * GROUPS + g;
            let s = row.scale16[gi] * sa[gi];
            acc[g] = (isum as f32).mul_add(s, acc[g]);
            acc[g] = row.bias16[gi].mul_add(ds[gi], acc[g]);
        }
    }
    reduce16(&acc)
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

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::*;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn has_vnni() -> bool {
        static V: OnceLock<bool> = OnceLock::new();
        *V.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
                && std::env::var("COORDGEN_ISA").map(|v| v != "avx2").unwrap_or(true)
        })
    }

    pub fn has_avx512bw() -> bool {
        static V: OnceLock<bool> = OnceLock::new();
        *V.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && std::env::var("COORDGEN_ISA").map(|v| v != "avx2" && v != "scalar").unwrap_or(true))
    }

    /// SIMD twin of [`quantize_block`](super::quantize_block): the same multiply, the same
    /// rounding (truncate, then step away from zero when the exact remainder is >= 0.5) and
    /// exact integer sums, so the bytes and scales are bitwise the scalar ones.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW; `x` must hold block `b` and the slices one token's
    /// padded buffers.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_block_avx512(x: &[f32], b: usize, hi: &mut [i8], lo: &mut [i8], sc: &mut [f32], ds: &mut [f32], bits: ActBits) {
        let qmax = if bits == ActBits::Eight { 127.0 } else { QA_MAX };
        let xb = &x[b * 32..b * 32 + 32];
        let v = [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))];
        // max(|x|) is exact in any order; NaN lanes are ignored, as `f32::max` does.
        let abs_ord = |x: __m512| _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x), _mm512_abs_ps(x));
        let qm = _mm512_set1_epi32(qmax as i32);
        let one = _mm512_set1_epi32(1);
        let tile_base = (b * 32 / TILE) * TILE;
        let within = b * 32 % TILE;
        for hf in 0..2 {
            // One scale per 16 values (one group), as the scalar quantizer.
            let d = _mm512_reduce_max_ps(abs_ord(v[hf])) / qmax;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let y = _mm512_mul_ps(v[hf], _mm512_set1_ps(id));
            let tr = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let frac = _mm512_sub_ps(y, tr);
            let mut q = _mm512_cvttps_epi32(y);
            // NaN: the scalar `as i32` gives 0.
            q = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y), q);
            q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5)), q, one);
            q = _mm512_mask_sub_epi32(q, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(frac, _mm512_set1_ps(-0.5)), q, one);
            q = _mm512_max_epi32(_mm512_min_epi32(q, qm), _mm512_sub_epi32(_mm512_setzero_si512(), qm));
            let sum = _mm512_reduce_add_epi32(q);
            let (hb, lb) = if bits == ActBits::Eight {
                (_mm512_cvtepi32_epi8(q), _mm_setzero_si128())
            } else {
                (_mm512_cvtepi32_epi8(_mm512_srai_epi32::<7>(q)), _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(127))))
            };
            let (mut hbytes, mut lbytes) = ([0u32; 4], [0u32; 4]);
            _mm_storeu_si128(hbytes.as_mut_ptr() as *mut __m128i, hb);
            _mm_storeu_si128(lbytes.as_mut_ptr() as *mut __m128i, lb);
            // 16 values = one group: bytes 4v..4v+4 go to tile offset v*64 + g*4.
            let g = (within + hf * 16) / 16;
            for vv in 0..4 {
                let pos = tile_base + vv * 64 + g * 4;
                (hi.as_mut_ptr().add(pos) as *mut u32).write_unaligned(hbytes[vv]);
                if bits != ActBits::Eight {
                    (lo.as_mut_ptr().add(pos) as *mut u32).write_unaligned(lbytes[vv]);
                }
            }
            sc[b * 2 + hf] = d;
            ds[b * 2 + hf] = d * sum as f32;
        }
    }

    /// [`reduce16`]'s tree in registers (same additions in the same order, so the same
    /// bits): lanes i + 8, then i + 4, then i + 2, then i + 1.
    ///
    /// # Safety
    /// Call only from functions with AVX-512 F enabled.
    #[inline(always)]
    unsafe fn reduce512(v: __m512) -> f32 {
        // (extractf64x4 is AVX-512 F; extractf32x8 would need DQ, not enabled here.)
        let a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
    }

    /// Where a kernel gets each tile's four weight vectors and 16 group scales and biases:
    /// an unpacked row (loads) or a packed file row (expanded in registers).
    pub trait TileSrc: Copy {
        /// # Safety
        /// AVX-512 F/BW must be enabled in the caller; `tile` must be in the row.
        unsafe fn tile(self, tile: usize) -> ([__m512i; 4], __m512, __m512);
        fn kp(self) -> usize;
        /// Whether `tile` computes (expands packed bits) rather than only loads: then more
        /// than 4 tokens run [`tiles_outer_vnni`], which expands each tile once. Loading an
        /// unpacked tile again per 4 tokens saves nothing to trade for the accumulators'
        /// round trips through memory.
        const EXPANDS: bool;
    }

    impl TileSrc for &URow {
        #[inline(always)]
        unsafe fn tile(self, tile: usize) -> ([__m512i; 4], __m512, __m512) {
            let wq = self.q.as_ptr().add(tile * TILE);
            let w = [0, 1, 2, 3].map(|v| _mm512_loadu_si512(wq.add(v * 64) as *const _));
            (w, _mm512_loadu_ps(self.scale16.as_ptr().add(tile * 16)), _mm512_loadu_ps(self.bias16.as_ptr().add(tile * 16)))
        }
        fn kp(self) -> usize {
            self.q.len()
        }
        const EXPANDS: bool = false;
    }

    /// Packed row formats, as the const parameter of [`Packed`]: each format gets its own
    /// kernel instance, so the per-tile expansion has no branch on the type (measured on one
    /// Zen 4 core, in cache: a Q4_K tile took 14 ns with a run-time Q4_K/Q6_K flag, 8 ns
    /// without; a run-time match over all formats made 1.5B decode a third slower).
    pub mod fmt {
        pub const Q4K: u8 = 0;
        pub const Q6K: u8 = 1;
        pub const Q4_0: u8 = 2;
        pub const Q4_1: u8 = 3;
        pub const Q5_0: u8 = 4;
        pub const Q5_1: u8 = 5;
        pub const Q8_0: u8 = 6;
    }

    /// The type of packed format `F`.
    #[inline(always)]
    pub const fn fmt_type(f: u8) -> GgmlType {
        match f {
            fmt::Q4K => GgmlType::Q4K,
            fmt::Q6K => GgmlType::Q6K,
            fmt::Q4_0 => GgmlType::Q4_0,
            fmt::Q4_1 => GgmlType::Q4_1,
            fmt::Q5_0 => GgmlType::Q5_0,
            fmt::Q5_1 => GgmlType::Q5_1,
            _ => GgmlType::Q8_0,
        }
    }

    /// A row in the load-time packed layout of [`crate::repack`], of format `F` ([`fmt`]).
    #[derive(Clone, Copy)]
    pub struct Packed<const F: u8> {
        pub ptr: *const u8,
        /// The row's length padded to whole tiles.
        pub k: usize,
        /// The row's length (32-weight block types may end in a partial tile).
        pub cols: usize,
        /// Bytes from this row to the one to prefetch (into L2) while this row computes
        /// (the compute between loads otherwise leaves too few misses in flight to stream
        /// from memory at full speed). 0 = none.
        pub ahead: usize,
    }

    impl<const F: u8> Packed<F> {
        pub fn new(ptr: *const u8, cols: usize, ahead: usize) -> Self {
            Packed { ptr, k: cols.div_ceil(TILE) * TILE, cols, ahead }
        }

        /// Prefetches (into L2) `lines` cache lines from `ahead` bytes past `at`.
        #[inline(always)]
        unsafe fn prefetch(self, at: *const u8, lines: usize) {
            if self.ahead > 0 {
                let pf = at.wrapping_add(self.ahead);
                for l in 0..lines {
                    _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(l * 64) as *const i8);
                }
            }
        }
    }

    impl<const F: u8> TileSrc for Packed<F> {
        // No closures here: a closure would not inherit the caller's target features, and
        // its intrinsics would become calls.
        #[inline(always)]
        unsafe fn tile(self, tile: usize) -> ([__m512i; 4], __m512, __m512) {
            let m = _mm512_set1_epi8(0x0F);
            // Every format stores tile `t` at `t` times its tile bytes (the 32-weight block
            // types' partial last tile included).
            let ty = fmt_type(F);
            let tile_bytes = TILE / ty.block_size() * ty.block_bytes();
            let blk = self.ptr.add(tile * tile_bytes);
            self.prefetch(blk, tile_bytes.div_ceil(64));
            match F {
                fmt::Q6K => {
                    let n0 = _mm512_loadu_si512(blk as *const _);
                    let n1 = _mm512_loadu_si512(blk.add(64) as *const _);
                    let h = _mm512_loadu_si512(blk.add(128) as *const _);
                    // Masked before shifting, so no bit crosses into the neighbouring byte.
                    let h0 = _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(0x03)), 4);
                    let h1 = _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(0x0C)), 2);
                    let h2 = _mm512_and_si512(h, _mm512_set1_epi8(0x30));
                    let h3 = _mm512_srli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(0xC0u8 as i8)), 2);
                    let w = [
                        _mm512_or_si512(_mm512_and_si512(n0, m), h0),
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(n0, 4), m), h1),
                        _mm512_or_si512(_mm512_and_si512(n1, m), h2),
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(n1, 4), m), h3),
                    ];
                    let (s, b) = crate::unpack_x86::q6k_scales(blk);
                    (w, s, b)
                }
                fmt::Q4K => {
                    let n0 = _mm512_loadu_si512(blk.add(16) as *const _);
                    let n1 = _mm512_loadu_si512(blk.add(80) as *const _);
                    let w = [
                        _mm512_and_si512(n0, m),
                        _mm512_and_si512(_mm512_srli_epi16(n0, 4), m),
                        _mm512_and_si512(n1, m),
                        _mm512_and_si512(_mm512_srli_epi16(n1, 4), m),
                    ];
                    let (s, b) = crate::unpack_x86::k4_packed_scales(blk);
                    (w, s, b)
                }
                _ => crate::unpack_x86::small_packed_tile(ty, self.ptr, self.cols, tile),
            }
        }
        fn kp(self) -> usize {
            self.k
        }
        const EXPANDS: bool = true;
    }

    /// Expands a packed row into the unpacked form (the stores of the fused kernels' loads).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VNNI and F16C; `src` must hold a packed row of `ty`
    /// of `row.k` weights.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn unpack_packed(ty: GgmlType, src: &[u8], row: &mut URow) {
        by_format!(ty, F => unpack_packed_as(Packed::<F>::new(src.as_ptr(), row.k, 0), row))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn unpack_packed_as<const F: u8>(p: Packed<F>, row: &mut URow) {
        for tile in 0..p.k / TILE {
            let (w, sc, bi) = p.tile(tile);
            for (v, wv) in w.iter().enumerate() {
                _mm512_storeu_si512(row.q.as_mut_ptr().add(tile * TILE + v * 64) as *mut _, *wv);
            }
            _mm512_storeu_ps(row.scale16.as_mut_ptr().add(tile * 16), sc);
            _mm512_storeu_ps(row.bias16.as_mut_ptr().add(tile * 16), bi);
        }
    }

    /// AVX-512 VNNI; up to 4 tokens share each weight tile.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VNNI ([`has_vnni`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn dot_tokens_vnni(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
        let o = out.as_mut_ptr();
        tokens_vnni::<1, _>([row], acts, t0, t1, [o]);
    }

    /// AVX-512 VNNI over two weight rows at once: each activation vector is loaded once for
    /// both rows, which halves the activation traffic from L2 (the bound at widths >= 4).
    /// `out0[i]` / `out1[i]` get token `t0 + i` of `row0` / `row1`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VNNI ([`has_vnni`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn dot_tokens_vnni2(row0: &URow, row1: &URow, acts: &QActs, t0: usize, t1: usize, out0: &mut [f32], out1: &mut [f32]) {
        debug_assert_eq!(row0.q.len(), row1.q.len());
        tokens_vnni::<2, _>([row0, row1], acts, t0, t1, [out0.as_mut_ptr(), out1.as_mut_ptr()]);
    }

    /// As [`dot_tokens_vnni2`] straight from two packed rows (no unpacked copy).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VNNI; each row must be a packed row of `acts.k`
    /// weights, and each output hold `t1 - t0` floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn dot_packed_vnni<const R: usize, const F: u8>(rows: [Packed<F>; R], acts: &QActs, t0: usize, t1: usize, out: [*mut f32; R]) {
        tokens_vnni::<R, Packed<F>>(rows, acts, t0, t1, out);
    }

    /// Rows `r0..r1` of a packed matrix (`rb` bytes per row from `base`) for all tokens of
    /// `acts`, two rows at a time, in one call: `out[(r - r0) * acts.n + t]`. Each result is
    /// bitwise [`dot_packed_vnni`]'s.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VNNI; `base` must hold `r1 * rb` bytes of packed
    /// rows of `acts.k` weights of `ty`, and `out` `(r1 - r0) * acts.n` floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn packed_rows_vnni(ty: GgmlType, base: *const u8, rb: usize, r0: usize, r1: usize, acts: &QActs, out: *mut f32) {
        by_format!(ty, F => packed_rows_as::<F>(base, rb, r0, r1, acts, out))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn packed_rows_as<const F: u8>(base: *const u8, rb: usize, r0: usize, r1: usize, acts: &QActs, out: *mut f32) {
        let n = acts.n;
        let row = |r: usize, ahead: usize| Packed::<F>::new(base.add(r * rb), acts.k, ahead);
        let mut r = r0;
        while r + 1 < r1 {
            // Prefetch rows PREFETCH_ROWS ahead into L2 while this pair computes (past the
            // matrix's end this only wastes a hint: prefetches never fault).
            let o = out.add((r - r0) * n);
            let ahead = PREFETCH_ROWS * rb;
            tokens_vnni::<2, Packed<F>>([row(r, ahead), row(r + 1, ahead)], acts, 0, n, [o, o.add(n)]);
            r += 2;
        }
        if r < r1 {
            tokens_vnni::<1, Packed<F>>([row(r, 0)], acts, 0, n, [out.add((r - r0) * n)]);
        }
    }

    /// Tokens `t0..t1` of `R` rows. Up to 4 tokens keep their accumulators in registers
    /// ([`tile_vnni`]); more tokens of packed rows run [`tiles_outer_vnni`], which expands
    /// each weight tile once for all of them. Both make the same operations per (row,
    /// token), so the split never changes a result.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tokens_vnni<const R: usize, S: TileSrc>(rows: [S; R], acts: &QActs, t0: usize, t1: usize, out: [*mut f32; R]) {
        let mut t = t0;
        while t < t1 {
            let o = out.map(|p| p.add(t - t0));
            let n = (t1 - t).min(if S::EXPANDS { OUTER_ACCS / R } else { 4 });
            match n {
                5.. => tiles_outer_vnni::<R, S>(rows, acts, t, t + n, o),
                4 => tile_vnni::<R, 4, S>(rows, acts, t, o),
                3 => tile_vnni::<R, 3, S>(rows, acts, t, o),
                2 => tile_vnni::<R, 2, S>(rows, acts, t, o),
                _ => tile_vnni::<R, 1, S>(rows, acts, t, o),
            }
            t += n;
        }
    }

    /// Accumulators (rows x tokens) of one [`tiles_outer_vnni`] call: 4 KB, in L1 beside the
    /// activations of one tile of its tokens.
    const OUTER_ACCS: usize = 64;

    /// Tile `tile` of each of `R` rows: weight vectors, group scales, group biases.
    #[inline(always)]
    unsafe fn row_tiles<const R: usize, S: TileSrc>(rows: [S; R], tile: usize) -> ([[__m512i; 4]; R], [__m512; R], [__m512; R]) {
        let mut w = [[_mm512_setzero_si512(); 4]; R];
        let mut ws = [_mm512_setzero_ps(); R];
        let mut wb = [_mm512_setzero_ps(); R];
        for r in 0..R {
            (w[r], ws[r], wb[r]) = rows[r].tile(tile);
        }
        (w, ws, wb)
    }

    /// A token's activation vectors, scales and group sums at one tile.
    struct TokenTile {
        hv: [__m512i; 4],
        lo: *const i8,
        sa: __m512,
        da: __m512,
    }

    #[inline(always)]
    unsafe fn token_tile(acts: &QActs, t: usize, tile: usize) -> TokenTile {
        let off = t * acts.kp + tile * TILE;
        let h = acts.hi.as_ptr().add(off);
        let g = t * acts.kp / 16 + tile * 16;
        TokenTile {
            hv: [0, 1, 2, 3].map(|v| _mm512_loadu_si512(h.add(v * 64) as *const _)),
            lo: acts.lo.as_ptr().add(off),
            sa: _mm512_loadu_ps(acts.scale16.as_ptr().add(g)),
            da: _mm512_loadu_ps(acts.dsum16.as_ptr().add(g)),
        }
    }

    /// One (row, token) pair of a tile: the exact integer group sums of the row's four
    /// weight vectors `w` against the token's activations, then the oracle's float steps
    /// into `acc`. `split`: (15-bit only) independent chains, for callers with little other
    /// work in flight; integer addition is exact, so the sums are the same either way.
    #[inline(always)]
    unsafe fn pair_step(w: &[__m512i; 4], ws: __m512, wb: __m512, a: &TokenTile, eight: bool, split: bool, acc: __m512) -> __m512 {
        let z = _mm512_setzero_si512();
        let hv = &a.hv;
        let lo = |v: usize| _mm512_loadu_si512(a.lo.add(v * 64) as *const _);
        let isum = if eight {
            let h01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[0], hv[0]), w[1], hv[1]);
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(h01, w[2], hv[2]), w[3], hv[3])
        } else if split {
            let h01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[0], hv[0]), w[1], hv[1]);
            let h23 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[2], hv[2]), w[3], hv[3]);
            let l01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[0], lo(0)), w[1], lo(1));
            let l23 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[2], lo(2)), w[3], lo(3));
            _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h01, h23), 7), _mm512_add_epi32(l01, l23))
        } else {
            // One chain, fewest instructions (the shifted high-byte sums seed the low-byte
            // chain).
            let mut acc_i = _mm512_dpbusd_epi32(z, w[0], hv[0]);
            acc_i = _mm512_dpbusd_epi32(acc_i, w[1], hv[1]);
            acc_i = _mm512_dpbusd_epi32(acc_i, w[2], hv[2]);
            acc_i = _mm512_dpbusd_epi32(acc_i, w[3], hv[3]);
            acc_i = _mm512_slli_epi32(acc_i, 7);
            acc_i = _mm512_dpbusd_epi32(acc_i, w[0], lo(0));
            acc_i = _mm512_dpbusd_epi32(acc_i, w[1], lo(1));
            acc_i = _mm512_dpbusd_epi32(acc_i, w[2], lo(2));
            _mm512_dpbusd_epi32(acc_i, w[3], lo(3))
        };
        let s = _mm512_mul_ps(ws, a.sa);
        let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc);
        _mm512_fmadd_ps(wb, a.da, acc)
    }

    /// `R` rows x `N` tokens: per tile, each row's four weight vectors stay in registers and
    /// each token's activation vectors are read once for all `R` rows. Every (row, token)
    /// pair goes through the same integer chain and float steps as the scalar oracle.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tile_vnni<const R: usize, const N: usize, S: TileSrc>(rows: [S; R], acts: &QActs, t: usize, out: [*mut f32; R]) {
        let kp = rows[0].kp();
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let eight = acts.bits == ActBits::Eight;
        for tile in 0..kp / TILE {
            let (w, ws, wb) = row_tiles(rows, tile);
            for j in 0..N {
                let a = token_tile(acts, t + j, tile);
                for r in 0..R {
                    acc[r][j] = pair_step(&w[r], ws[r], wb[r], &a, eight, R * N <= 2, acc[r][j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..N {
                *out[r].add(j) = reduce512(acc[r][j]);
            }
        }
    }

    /// As [`tile_vnni`] for `t1 - t0` tokens (at most [`OUTER_ACCS`] / `R`), with the tile
    /// loop outside the token loop: each weight tile is expanded once for all the tokens,
    /// and the accumulators live in an L1 buffer instead of registers. Expanding a packed
    /// tile costs about as much as 1.7 tokens' dot products (one Zen 4 core, in cache: Q4_K
    /// 5.0 ns per tile at 1 token, 10.6 at 4), which the 4-token kernel paid again for every
    /// 4 tokens.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tiles_outer_vnni<const R: usize, S: TileSrc>(rows: [S; R], acts: &QActs, t0: usize, t1: usize, out: [*mut f32; R]) {
        let n = t1 - t0;
        assert!(R * n <= OUTER_ACCS);
        let mut buf = [std::mem::MaybeUninit::<__m512>::uninit(); OUTER_ACCS];
        let acc = buf.as_mut_ptr() as *mut __m512;
        for i in 0..R * n {
            acc.add(i).write(_mm512_setzero_ps());
        }
        let eight = acts.bits == ActBits::Eight;
        for tile in 0..rows[0].kp() / TILE {
            let (w, ws, wb) = row_tiles(rows, tile);
            for j in 0..n {
                let a = token_tile(acts, t0 + j, tile);
                for r in 0..R {
                    let p = acc.add(r * n + j);
                    *p = pair_step(&w[r], ws[r], wb[r], &a, eight, false, *p);
                }
            }
        }
        for r in 0..R {
            for j in 0..n {
                *out[r].add(j) = reduce512(*acc.add(r * n + j));
            }
        }
    }

    /// AVX2: each group's integer sum through 16-bit multiplies (exact for bytes up to 255),
    /// then the same float steps as the other paths on two 8-lane halves.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tokens_avx2(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
        let kp = row.q.len();
        for t in t0..t1 {
            let (hi, lo, sa, ds) = acts.row(t);
            let mut acc = [_mm256_setzero_ps(); 2];
            for tile in 0..kp / TILE {
                let off = tile * TILE;
                for half in 0..2 {
                    // Lanes = groups 8*half .. 8*half+8.
                    let mut sh = _mm256_setzero_si256();
                    let mut sl = _mm256_setzero_si256();
                    for v in 0..4 {
                        let p = off + v * 64 + half * 32;
                        let w = _mm256_loadu_si256(row.q.as_ptr().add(p) as *const __m256i);
                        let wl = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w));
                        let wh = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1));
                        let ah = _mm256_loadu_si256(hi.as_ptr().add(p) as *const __m256i);
                        let al = _mm256_loadu_si256(lo.as_ptr().add(p) as *const __m256i);
                        // madd gives pairs; hadd of the two halves' pair sums gives 4-byte lanes
                        // in the order [0..4 of lo-half, 0..4 of hi-half] per 128-bit lane.
                        let ph0 = _mm256_madd_epi16(wl, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(ah)));
                        let ph1 = _mm256_madd_epi16(wh, _mm256_cvtepi8_epi16(_mm256_extracti128_si256(ah, 1)));
                        let pl0 = _mm256_madd_epi16(wl, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(al)));
                        let pl1 = _mm256_madd_epi16(wh, _mm256_cvtepi8_epi16(_mm256_extracti128_si256(al, 1)));
                        // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]:
                        // groups [0,1,4,5 | 2,3,6,7]; fixed below with a permute.
                        sh = _mm256_add_epi32(sh, _mm256_hadd_epi32(ph0, ph1));
                        sl = _mm256_add_epi32(sl, _mm256_hadd_epi32(pl0, pl1));
                    }
                    let fix = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
                    let sh = _mm256_permutevar8x32_epi32(sh, fix);
                    let sl = _mm256_permutevar8x32_epi32(sl, fix);
                    let isum = if acts.bits == ActBits::Eight { sh } else { _mm256_add_epi32(_mm256_slli_epi32(sh, 7), sl) };
                    let gi = tile * 16 + half * 8;
                    let s = _mm256_mul_ps(_mm256_loadu_ps(row.scale16.as_ptr().add(gi)), _mm256_loadu_ps(sa.as_ptr().add(gi)));
                    acc[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc[half]);
                    acc[half] = _mm256_fmadd_ps(_mm256_loadu_ps(row.bias16.as_ptr().add(gi)), _mm256_loadu_ps(ds.as_ptr().add(gi)), acc[half]);
                }
            }
            let mut l = [0f32; 16];
            _mm256_storeu_ps(l.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(l.as_mut_ptr().add(8), acc[1]);
            out[t - t0] = reduce16(&l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordgen_model::quant::{dequantize_row, quantize_row};

    use crate::testdata::signal as signal;

    #[test]
    fn fast_rounding_and_position_table_agree_with_the_definitions() {
        for i in -40000..40000 {
            for f in [0.0f32, 0.25, 0.49999997, 0.5, 0.5000001, 0.75] {
                let x = i as f32 * 0.5 + f * if i < 0 { -1.0 } else { 1.0 };
                if x.abs() < 16384.0 {
                    assert_eq!(round_half_away(x), x.round() as i32, "{x}");
                }
            }
        }
        for n in 0..TILE {
            assert_eq!(POS[n] as usize, interleave(n));
        }
    }

    /// The SIMD activation quantizer writes bitwise the scalar oracle's bytes and scales,
    /// including ties, values past the clamp, zeros, infinities and NaN.
    #[test]
    fn simd_activation_quantizer_equals_scalar() {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx512bw() {
            let k = 512;
            let mut x = signal(k, 21);
            for (i, v) in [0.5f32, -0.5, 1.5, -2.5, 0.0, f32::INFINITY, f32::NAN, 1e-30].into_iter().enumerate() {
                x[64 + i * 3] = v;
            }
            // A block whose values are exact multiples of d/2 (ties after scaling).
            for i in 0..32 {
                x[160 + i] = (i as f32 - 16.0) * 0.5;
            }
            x[256..288].fill(0.0);
            for bits in [ActBits::Fifteen, ActBits::Eight] {
                let bufs = || (vec![0i8; k], vec![0i8; k], vec![0f32; k / 16], vec![0f32; k / 16]);
                let (mut h1, mut l1, mut s1, mut d1) = bufs();
                let (mut h2, mut l2, mut s2, mut d2) = bufs();
                for b in 0..k / 32 {
                    quantize_block(&x, b, &mut h1, &mut l1, &mut s1, &mut d1, bits);
                    unsafe { x86::quantize_block_avx512(&x, b, &mut h2, &mut l2, &mut s2, &mut d2, bits) };
                }
                assert_eq!(h1, h2, "{bits:?}");
                assert_eq!(l1, l2, "{bits:?}");
                assert_eq!(s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{bits:?}");
                assert_eq!(d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{bits:?}");
            }
        }
    }

    fn natural(row: &URow, n: usize) -> f32 {
        let p = (n / TILE) * TILE + interleave(n % TILE);
        row.scale16[n / 16] * row.q[p] as f32 + row.bias16[n / 16]
    }

    /// Unpacking (scalar and SIMD) reproduces the dequantized weights; SIMD equals scalar
    /// byte for byte.
    #[test]
    fn unpacked_rows_equal_dequantized_rows() {
        for k in [256usize, 512, 896] {
            let x = signal(k, 5);
            for ty in GgmlType::ALL.into_iter().filter(|t| is_quantized(*t)) {
                if k % ty.block_size() != 0 {
                    continue;
                }
                let q = quantize_row(ty, &x);
                let mut deq = vec![0f32; k];
                dequantize_row(ty, &q, &mut deq);
                let mut row = URow::new(k);
                unpack_row(ty, &q, &mut row);
                for i in 0..k {
                    let v = natural(&row, i);
                    assert!((v - deq[i]).abs() <= 1e-5 * (1.0 + deq[i].abs()), "{}: element {i}: {v} vs {}", ty.name(), deq[i]);
                }
                for isa in crate::simd::test_paths() {
                    let mut r2 = URow::new(k);
                    unpack_row_isa(isa, ty, &q, &mut r2);
                    assert_eq!(row.q, r2.q, "{} {isa:?}", ty.name());
                    assert_eq!(row.scale16, r2.scale16, "{} {isa:?}", ty.name());
                    assert_eq!(row.bias16, r2.bias16, "{} {isa:?}", ty.name());
                }
            }
        }
    }

    /// Every path gives bitwise the scalar oracle's result, for any number of tokens
    /// sharing the row, and the oracle matches the float dot of weights and activations.
    #[test]
    fn all_paths_bitwise_equal_and_width_independent() {
        for (k, bits) in [(256usize, ActBits::Fifteen), (288, ActBits::Fifteen), (896, ActBits::Fifteen), (1536, ActBits::Fifteen), (896, ActBits::Eight), (1536, ActBits::Eight)] {
            let n = 9;
            let x = signal(n * k, 11);
            let mut acts = QActs::new();
            acts.quantize(&x, n, k, bits);
            for ty in GgmlType::ALL.into_iter().filter(|t| is_quantized(*t)) {
                if k % ty.block_size() != 0 {
                    continue;
                }
                let w = signal(k, 3);
                let q = quantize_row(ty, &w);
                let mut row = URow::new(k);
                unpack_row(ty, &q, &mut row);
                let mut deq = vec![0f32; k];
                dequantize_row(ty, &q, &mut deq);
                let oracle: Vec<f32> = (0..n)
                    .map(|t| {
                        let (hi, lo, sa, ds) = acts.row(t);
                        dot_scalar(&row, acts.bits, hi, lo, sa, ds)
                    })
                    .collect();
                for t in 0..n {
                    let exact: f64 = (0..k).map(|i| deq[i] as f64 * x[t * k + i] as f64).sum();
                    let mag: f64 = (0..k).map(|i| (deq[i] as f64 * x[t * k + i] as f64).abs()).sum();
                    let tol = if bits == ActBits::Eight { 1e-2 } else { 1e-4 };
                    assert!((oracle[t] as f64 - exact).abs() < tol * (1.0 + mag), "{} k={k} {bits:?}: {} vs {exact}", ty.name(), oracle[t]);
                }
                for isa in crate::simd::test_paths() {
                    let mut all = vec![0f32; n];
                    dot_tokens(isa, &row, &acts, 0, n, &mut all);
                    for t in 0..n {
                        assert_eq!(all[t].to_bits(), oracle[t].to_bits(), "{} {isa:?} k={k} t={t}: {} vs {}", ty.name(), all[t], oracle[t]);
                        let mut one = [0f32];
                        dot_tokens(isa, &row, &acts, t, t + 1, &mut one);
                        assert_eq!(one[0].to_bits(), all[t].to_bits(), "{} {isa:?}: token {t} alone differs", ty.name());
                    }
                    // Two rows at once: each equals its one-row result, for every token range.
                    let mut row2 = URow::new(k);
                    unpack_row(ty, &quantize_row(ty, &signal(k, 8)), &mut row2);
                    let oracle2: Vec<f32> = (0..n)
                        .map(|t| {
                            let (hi, lo, sa, ds) = acts.row(t);
                            dot_scalar(&row2, acts.bits, hi, lo, sa, ds)
                        })
                        .collect();
                    for (t0, t1) in [(0, n), (2, 3), (1, 7)] {
                        let (mut o1, mut o2) = (vec![0f32; t1 - t0], vec![0f32; t1 - t0]);
                        dot_tokens2(isa, &row, &row2, &acts, t0, t1, &mut o1, &mut o2);
                        for t in t0..t1 {
                            assert_eq!(o1[t - t0].to_bits(), oracle[t].to_bits(), "{} {isa:?} two rows, first, t={t}", ty.name());
                            assert_eq!(o2[t - t0].to_bits(), oracle2[t].to_bits(), "{} {isa:?} two rows, second, t={t}", ty.name());
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use coordgen_model::quant::quantize_row;

    /// Not a test of speed (CI runs no timing assertions): prints ns per 256 weights per token
    /// for a manual look with `cargo test --release -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn print_dot_throughput() {
        let k = 1536;
        let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
        let x = crate::testdata::signal(n * k, 3);
        let bits = if std::env::var("BITS").as_deref() == Ok("8") { ActBits::Eight } else { ActBits::Fifteen };
        let mut acts = QActs::new();
        acts.quantize(&x, n, k, bits);
        let q = quantize_row(GgmlType::Q4K, &crate::testdata::signal(k, 5));
        let mut row = URow::new(k);
        unpack_row(GgmlType::Q4K, &q, &mut row);
        let isa = crate::simd::detect();
        let mut out = vec![0f32; n];
        let reps = 1_280_000 / n;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            dot_tokens(isa, &row, &acts, 0, n, &mut out);
            std::hint::black_box(&out);
        }
        let ns = t.elapsed().as_nanos() as f64 / (reps * n * (k / 256)) as f64;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            unpack_row_isa(isa, GgmlType::Q4K, &q, &mut row);
            std::hint::black_box(&row.q);
        }
        let ns_unpack = t.elapsed().as_nanos() as f64 / (reps * (k / 256)) as f64;
        println!("{isa:?}: dot {ns:.2} ns per 256 weights per token; unpack {ns_unpack:.2} ns per 256 weights");
    }
}
