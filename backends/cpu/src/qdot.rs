//! Integer dot products of quantized weights with 8-bit activations.
//!
//! Every quantized weight type is *unpacked* row by row into one common form: a byte per
//! weight (`q`, unsigned 0..63, or signed for Q8_0), a scale per 4-weight lane, and an
//! additive bias per 16 weights, so that `w[i] = lane_scale[i/4] * q[i] + bias16[i/16]`.
//! Activations are quantized per token to 15-bit integers in 32-element blocks
//! (`a[i] = d[i/32] * qa[i]`, `|qa| <= 16256`), stored as two bytes `qa = 128 * hi + lo`
//! (`hi` signed, `lo` in 0..128) so the u8 x i8 instructions serve both halves: 8-bit
//! activations alone cost several points of top-1 agreement with the float reference on
//! small models, 15 bits none. A dot product is then
//!   `sum_lanes lane_scale * d * (128 * isum4(hi) + isum4(lo))  +  sum_g16 bias16 * d * sum16(qa)`,
//! where the 4-element integer sums are exact, so a row's result depends only on the fixed
//! float accumulation order below, never on how many tokens share the unpacked row: this is
//! what keeps the CPU backend batch invariant while a weight row is read once for all tokens.
//!
//! Paths: a scalar oracle, AVX2 (`maddubs`), AVX-512 with VNNI (`vpdpbusd`); one is chosen
//! per process at run time.

use coordgen_model::quant::{k_scale_min, GgmlType};
use half::f16;

use crate::simd::Isa;

/// Largest activation magnitude: keeps `hi` in -127..=127 so it can be negated in i8.
pub const QA_MAX: f32 = 16256.0;

/// Activations of `n` tokens, `k` features each, quantized to 15 bits as two bytes.
pub struct QActs {
    pub k: usize,
    pub n: usize,
    /// `qa >> 7` (arithmetic), -127..=127.
    pub hi: Vec<i8>,
    /// `qa & 127`, 0..=127.
    pub lo: Vec<i8>,
    /// Per 4-element lane: the block scale `d` (so kernels multiply lane-wise).
    pub lane_scale: Vec<f32>,
    /// Per 16 elements: `d * sum(qa)`.
    pub dsum16: Vec<f32>,
}

impl QActs {
    pub fn new() -> Self {
        QActs { k: 0, n: 0, hi: Vec::new(), lo: Vec::new(), lane_scale: Vec::new(), dsum16: Vec::new() }
    }

    /// Quantizes `x` (`n x k`) token by token. Rows whose length is not a multiple of 32
    /// cannot meet quantized weights (their rows are whole blocks) and are left empty.
    pub fn quantize(&mut self, x: &[f32], n: usize, k: usize) {
        assert_eq!(x.len(), n * k);
        if k % 32 != 0 {
            self.k = k;
            self.n = 0;
            return;
        }
        self.k = k;
        self.n = n;
        self.hi.resize(n * k, 0);
        self.lo.resize(n * k, 0);
        self.lane_scale.resize(n * k / 4, 0.0);
        self.dsum16.resize(n * k / 16, 0.0);
        let mut qa = [0i32; 32];
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / QA_MAX;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (i, &v) in xb.iter().enumerate() {
                let q = ((v * id).round() as i32).clamp(-(QA_MAX as i32), QA_MAX as i32);
                qa[i] = q;
                self.hi[b * 32 + i] = (q >> 7) as i8;
                self.lo[b * 32 + i] = (q & 127) as i8;
            }
            self.lane_scale[b * 8..b * 8 + 8].fill(d);
            for h in 0..2 {
                let s: i32 = qa[h * 16..h * 16 + 16].iter().sum();
                self.dsum16[b * 2 + h] = d * s as f32;
            }
        }
    }

    /// (hi, lo, lane scales, d * sum16) of token `t`.
    pub fn row(&self, t: usize) -> (&[i8], &[i8], &[f32], &[f32]) {
        let k = self.k;
        (
            &self.hi[t * k..(t + 1) * k],
            &self.lo[t * k..(t + 1) * k],
            &self.lane_scale[t * k / 4..(t + 1) * k / 4],
            &self.dsum16[t * k / 16..(t + 1) * k / 16],
        )
    }
}

impl Default for QActs {
    fn default() -> Self {
        Self::new()
    }
}

/// One weight row in the common unpacked form.
pub struct URow {
    pub q: Vec<u8>,
    pub lane_scale: Vec<f32>,
    pub bias16: Vec<f32>,
    /// `q` holds signed bytes (Q8_0) and `bias16` is zero.
    pub signed: bool,
}

impl URow {
    pub fn new(k: usize) -> Self {
        URow { q: vec![0; k], lane_scale: vec![0.0; k / 4], bias16: vec![0.0; k / 16], signed: false }
    }
}

/// Whether a type runs through the integer path.
pub fn is_quantized(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

#[inline]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Unpacks a row of `ty` (`src` holds `row.q.len()` weights) with the SIMD twin when the
/// CPU has one (and `isa` is not scalar).
pub fn unpack_row_isa(isa: Isa, ty: GgmlType, src: &[u8], row: &mut URow) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && simd_unpack(ty) {
        row.signed = ty == GgmlType::Q8_0;
        // SAFETY: `simd_unpack` checked the CPU features.
        unsafe { crate::unpack_x86::unpack_row(ty, src, row) };
        return;
    }
    let _ = isa;
    unpack_row(ty, src, row)
}

#[cfg(target_arch = "x86_64")]
fn simd_unpack(ty: GgmlType) -> bool {
    use std::sync::OnceLock;
    static S: OnceLock<[bool; 11]> = OnceLock::new();
    let table = S.get_or_init(|| {
        let mut t = [false; 11];
        for (i, ty) in GgmlType::ALL.iter().enumerate() {
            t[i] = crate::unpack_x86::supports(*ty);
        }
        t
    });
    GgmlType::ALL.iter().position(|t| *t == ty).map(|i| table[i]).unwrap_or(false)
}

/// Scalar unpacker (the oracle of the SIMD twins).
pub fn unpack_row(ty: GgmlType, src: &[u8], row: &mut URow) {
    let k = row.q.len();
    let bb = ty.block_bytes();
    row.signed = ty == GgmlType::Q8_0;
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            for b in 0..k / 32 {
                let blk = &src[b * bb..(b + 1) * bb];
                let q = &mut row.q[b * 32..b * 32 + 32];
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
                        q.copy_from_slice(&blk[2..34]);
                        0.0
                    }
                };
                row.lane_scale[b * 8..b * 8 + 8].fill(d);
                row.bias16[b * 2] = bias;
                row.bias16[b * 2 + 1] = bias;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for b in 0..k / 256 {
                let blk = &src[b * bb..(b + 1) * bb];
                let d = h(blk, 0);
                let dmin = h(blk, 2);
                let scales = &blk[4..16];
                let (qh, qs) = if ty == GgmlType::Q5K { (&blk[16..48], &blk[48..176]) } else { (&blk[0..0], &blk[16..144]) };
                let base = b * 256;
                for c in 0..4 {
                    let qc = &qs[c * 32..c * 32 + 32];
                    let lo = &mut row.q[base + c * 64..base + c * 64 + 64];
                    for l in 0..32 {
                        lo[l] = qc[l] & 0xF;
                        lo[l + 32] = qc[l] >> 4;
                    }
                    if ty == GgmlType::Q5K {
                        for l in 0..32 {
                            lo[l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                            lo[l + 32] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        }
                    }
                    for s in 0..2 {
                        let j = 2 * c + s;
                        let (sc, m) = k_scale_min(j, scales);
                        let g = (base + j * 32) / 4;
                        row.lane_scale[g..g + 8].fill(d * sc as f32);
                        let bias = -dmin * m as f32;
                        row.bias16[(base + j * 32) / 16] = bias;
                        row.bias16[(base + j * 32) / 16 + 1] = bias;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for b in 0..k / 256 {
                let blk = &src[b * bb..(b + 1) * bb];
                let d = h(blk, 208);
                let base = b * 256;
                for n in 0..2 {
                    let ql = &blk[n * 64..n * 64 + 64];
                    let qh = &blk[128 + n * 32..128 + n * 32 + 32];
                    let q = &mut row.q[base + n * 128..base + n * 128 + 128];
                    for l in 0..32 {
                        q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                for g in 0..16 {
                    let s = d * (blk[192 + g] as i8) as f32;
                    let at = (base + g * 16) / 4;
                    row.lane_scale[at..at + 4].fill(s);
                    row.bias16[(base + g * 16) / 16] = -32.0 * s;
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("float weights do not use the integer path"),
    }
}

/// Scalar oracle: the same lane structure as the SIMD paths (16 float lanes, each summing
/// 4-element integer dot products), reduced in a fixed order.
pub fn dot_scalar(row: &URow, hi: &[i8], lo: &[i8], ls: &[f32], ds: &[f32]) -> f32 {
    let k = row.q.len();
    let mut acc = [0f32; 16];
    for lane in 0..k / 4 {
        let (mut sh, mut sl) = (0i32, 0i32);
        for i in lane * 4..lane * 4 + 4 {
            let w = if row.signed { row.q[i] as i8 as i32 } else { row.q[i] as i32 };
            sh += w * hi[i] as i32;
            sl += w * lo[i] as i32;
        }
        let isum = (sh << 7) + sl;
        acc[lane % 16] += isum as f32 * (row.lane_scale[lane] * ls[lane]);
    }
    let mut bias = 0f32;
    for g in 0..k / 16 {
        bias += row.bias16[g] * ds[g];
    }
    acc.iter().sum::<f32>() + bias
}

/// Dot products of one unpacked row with tokens `t0..t1` of `acts`; `out[i]` gets token
/// `t0 + i`.
pub fn dot_tokens(isa: Isa, row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if x86::has_vnni() => unsafe { x86::dot_tokens_vnni(row, acts, t0, t1, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::dot_tokens_avx2(row, acts, t0, t1, out) },
        _ => {
            for t in t0..t1 {
                let (hi, lo, ls, ds) = acts.row(t);
                out[t - t0] = dot_scalar(row, hi, lo, ls, ds);
            }
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
                && std::env::var("COORDGEN_ISA").map(|v| v != "avx2").unwrap_or(true)
        })
    }

    /// Bias term: `sum_g bias16[g] * ds[g]` with 16-wide accumulation.
    #[target_feature(enable = "avx512f")]
    unsafe fn bias_sum_512(b: &[f32], ds: &[f32]) -> __m512 {
        let n = b.len();
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(b.as_ptr().add(i)), _mm512_loadu_ps(ds.as_ptr().add(i)), acc);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, ds.as_ptr().add(i)), acc);
        }
        acc
    }

    /// AVX-512 VNNI: 64 weights per step; up to 4 tokens share each weight load.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_tokens_vnni(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
        let mut t = t0;
        while t < t1 {
            let n = (t1 - t).min(4);
            match n {
                4 => tile_vnni::<4>(row, acts, t, out.as_mut_ptr().add(t - t0)),
                3 => tile_vnni::<3>(row, acts, t, out.as_mut_ptr().add(t - t0)),
                2 => tile_vnni::<2>(row, acts, t, out.as_mut_ptr().add(t - t0)),
                _ => tile_vnni::<1>(row, acts, t, out.as_mut_ptr().add(t - t0)),
            }
            t += n;
        }
    }

    /// Per 4-element lane: `128 * sum(w * hi) + sum(w * lo)`, exact in i32.
    #[inline(always)]
    unsafe fn isum_vnni(signed: bool, w: __m512i, ah: __m512i, al: __m512i) -> __m512i {
        let z = _mm512_setzero_si512();
        if signed {
            // u8 x i8 product of signed weights: |w| times the activation with w's sign.
            let neg = _mm512_movepi8_mask(w);
            let wa = _mm512_abs_epi8(w);
            let h = _mm512_dpbusd_epi32(z, wa, _mm512_mask_sub_epi8(ah, neg, z, ah));
            _mm512_dpbusd_epi32(_mm512_slli_epi32(h, 7), wa, _mm512_mask_sub_epi8(al, neg, z, al))
        } else {
            let h = _mm512_dpbusd_epi32(z, w, ah);
            _mm512_dpbusd_epi32(_mm512_slli_epi32(h, 7), w, al)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_vnni<const N: usize>(row: &URow, acts: &QActs, t: usize, out: *mut f32) {
        // Two accumulators per token (even and odd chunks) break the FMA latency chain;
        // every width uses the same split, so results stay batch invariant.
        let k = row.q.len();
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        let mut qh = [std::ptr::null::<i8>(); N];
        let mut ql = [std::ptr::null::<i8>(); N];
        let mut la = [std::ptr::null::<f32>(); N];
        for j in 0..N {
            let (h, l, s, _) = acts.row(t + j);
            qh[j] = h.as_ptr();
            ql[j] = l.as_ptr();
            la[j] = s.as_ptr();
        }
        let wq = row.q.as_ptr();
        let wl = row.lane_scale.as_ptr();
        let full = k / 64;
        let mut c = 0;
        while c + 2 <= full {
            let w0 = _mm512_loadu_si512(wq.add(c * 64) as *const _);
            let w1 = _mm512_loadu_si512(wq.add(c * 64 + 64) as *const _);
            let ws0 = _mm512_loadu_ps(wl.add(c * 16));
            let ws1 = _mm512_loadu_ps(wl.add(c * 16 + 16));
            for j in 0..N {
                let i0 = isum_vnni(row.signed, w0, _mm512_loadu_si512(qh[j].add(c * 64) as *const _), _mm512_loadu_si512(ql[j].add(c * 64) as *const _));
                let i1 = isum_vnni(row.signed, w1, _mm512_loadu_si512(qh[j].add(c * 64 + 64) as *const _), _mm512_loadu_si512(ql[j].add(c * 64 + 64) as *const _));
                let s0 = _mm512_mul_ps(ws0, _mm512_loadu_ps(la[j].add(c * 16)));
                let s1 = _mm512_mul_ps(ws1, _mm512_loadu_ps(la[j].add(c * 16 + 16)));
                acc[j][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), s0, acc[j][0]);
                acc[j][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), s1, acc[j][1]);
            }
            c += 2;
        }
        if c < full {
            let w = _mm512_loadu_si512(wq.add(c * 64) as *const _);
            let ws = _mm512_loadu_ps(wl.add(c * 16));
            for j in 0..N {
                let i0 = isum_vnni(row.signed, w, _mm512_loadu_si512(qh[j].add(c * 64) as *const _), _mm512_loadu_si512(ql[j].add(c * 64) as *const _));
                let s = _mm512_mul_ps(ws, _mm512_loadu_ps(la[j].add(c * 16)));
                acc[j][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), s, acc[j][0]);
            }
            c += 1;
        }
        if k % 64 != 0 {
            // A trailing 32-weight block: masked to the low half.
            let mb: __mmask64 = (1u64 << 32) - 1;
            let ml: __mmask16 = 0xFF;
            let w = _mm512_maskz_loadu_epi8(mb, wq.add(c * 64) as *const _);
            let ws = _mm512_maskz_loadu_ps(ml, wl.add(c * 16));
            for j in 0..N {
                let ah = _mm512_maskz_loadu_epi8(mb, qh[j].add(c * 64) as *const _);
                let al = _mm512_maskz_loadu_epi8(mb, ql[j].add(c * 64) as *const _);
                let isum = isum_vnni(row.signed, w, ah, al);
                let s = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(ml, la[j].add(c * 16)));
                acc[j][c % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc[j][c % 2]);
            }
        }
        for j in 0..N {
            let (_, _, _, ds) = acts.row(t + j);
            let b = bias_sum_512(&row.bias16, ds);
            *out.add(j) = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1])) + _mm512_reduce_add_ps(b);
        }
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    /// AVX2: 32 weights per step with `maddubs` (no saturation: weights <= 63, or |w| <= 127
    /// times |a| <= 127 for signed rows); up to 4 tokens share each weight load.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tokens_avx2(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
        let k = row.q.len();
        let ones = _mm256_set1_epi16(1);
        let mut t = t0;
        while t < t1 {
            let n = (t1 - t).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let rows: Vec<(&[i8], &[i8], &[f32], &[f32])> = (0..n).map(|j| acts.row(t + j)).collect();
            for c in 0..k / 32 {
                let w = _mm256_loadu_si256(row.q.as_ptr().add(c * 32) as *const _);
                let ws = _mm256_loadu_ps(row.lane_scale.as_ptr().add(c * 8));
                let wabs = if row.signed { _mm256_sign_epi8(w, w) } else { w };
                for j in 0..n {
                    let mut ah = _mm256_loadu_si256(rows[j].0.as_ptr().add(c * 32) as *const _);
                    let mut al = _mm256_loadu_si256(rows[j].1.as_ptr().add(c * 32) as *const _);
                    if row.signed {
                        ah = _mm256_sign_epi8(ah, w);
                        al = _mm256_sign_epi8(al, w);
                    }
                    let ih = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, ah), ones);
                    let il = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, al), ones);
                    let isum = _mm256_add_epi32(_mm256_slli_epi32(ih, 7), il);
                    let s = _mm256_mul_ps(ws, _mm256_loadu_ps(rows[j].2.as_ptr().add(c * 8)));
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc[j]);
                }
            }
            for j in 0..n {
                let ds = rows[j].3;
                let mut b = _mm256_setzero_ps();
                let g = row.bias16.len();
                let mut i = 0;
                while i + 8 <= g {
                    b = _mm256_fmadd_ps(_mm256_loadu_ps(row.bias16.as_ptr().add(i)), _mm256_loadu_ps(ds.as_ptr().add(i)), b);
                    i += 8;
                }
                let mut bs = hsum256(b);
                while i < g {
                    bs += row.bias16[i] * ds[i];
                    i += 1;
                }
                out[t - t0 + j] = hsum256(acc[j]) + bs;
            }
            t += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordgen_model::quant::{dequantize_row, quantize_row};

    fn signal(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The SIMD unpackers produce exactly the scalar unpacker's bytes and scales.
    #[test]
    fn simd_unpack_equals_scalar() {
        let k = 768;
        let x = signal(k, 9);
        for ty in GgmlType::ALL.into_iter().filter(|t| is_quantized(*t)) {
            let q = quantize_row(ty, &x);
            let mut a = URow::new(k);
            let mut b = URow::new(k);
            unpack_row(ty, &q, &mut a);
            unpack_row_isa(crate::simd::detect(), ty, &q, &mut b);
            assert_eq!(a.q, b.q, "{}", ty.name());
            assert_eq!(a.lane_scale, b.lane_scale, "{}", ty.name());
            assert_eq!(a.bias16, b.bias16, "{}", ty.name());
            assert_eq!(a.signed, b.signed);
        }
    }

    /// Unpacking reproduces the dequantized weights exactly (up to float rounding).
    #[test]
    fn unpacked_rows_equal_dequantized_rows() {
        let k = 512;
        let x = signal(k, 5);
        for ty in GgmlType::ALL.into_iter().filter(|t| is_quantized(*t)) {
            let q = quantize_row(ty, &x);
            let mut deq = vec![0f32; k];
            dequantize_row(ty, &q, &mut deq);
            let mut row = URow::new(k);
            unpack_row(ty, &q, &mut row);
            for i in 0..k {
                let w = if row.signed { row.q[i] as i8 as f32 } else { row.q[i] as f32 };
                let v = row.lane_scale[i / 4] * w + row.bias16[i / 16];
                assert!((v - deq[i]).abs() <= 1e-5 * (1.0 + deq[i].abs()), "{}: element {i}: {v} vs {}", ty.name(), deq[i]);
            }
        }
    }

    /// Every SIMD path agrees with the scalar oracle, and the oracle with a float dot of
    /// the dequantized weights and activations; widths 1..9 give identical per-token results.
    #[test]
    fn simd_dots_match_scalar_and_are_width_independent() {
        for k in [256usize, 288, 896, 1536] {
            let n = 9;
            let x = signal(n * k, 11);
            let mut acts = QActs::new();
            acts.quantize(&x, n, k);
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
                        let (hi, lo, ls, ds) = acts.row(t);
                        dot_scalar(&row, hi, lo, ls, ds)
                    })
                    .collect();
                for t in 0..n {
                    // The oracle equals the float dot of the dequantized weights and the
                    // float activations (15-bit activations lose almost nothing).
                    let exact: f64 = (0..k).map(|i| deq[i] as f64 * x[t * k + i] as f64).sum();
                    let mag: f64 = (0..k).map(|i| (deq[i] as f64 * x[t * k + i] as f64).abs()).sum();
                    assert!((oracle[t] as f64 - exact).abs() < 1e-4 * (1.0 + mag), "{} k={k}: {} vs {exact}", ty.name(), oracle[t]);
                }
                let mut isas = vec![Isa::Scalar];
                #[cfg(target_arch = "x86_64")]
                {
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        isas.push(Isa::Avx2);
                    }
                    if x86::has_vnni() {
                        isas.push(Isa::Avx512);
                    }
                }
                for isa in isas {
                    let mut all = vec![0f32; n];
                    dot_tokens(isa, &row, &acts, 0, n, &mut all);
                    for t in 0..n {
                        assert!((all[t] - oracle[t]).abs() <= 1e-4 * (1.0 + oracle[t].abs()), "{} {isa:?} k={k} t={t}: {} vs {}", ty.name(), all[t], oracle[t]);
                        let mut one = [0f32];
                        dot_tokens(isa, &row, &acts, t, t + 1, &mut one);
                        assert_eq!(one[0].to_bits(), all[t].to_bits(), "{} {isa:?}: token {t} alone differs from in a batch", ty.name());
                    }
                }
            }
        }
    }
}
