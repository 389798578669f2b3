//! SIMD twins of `qgemm::unpack_row` for x86_64 with AVX-512 (F, BW, VL): each block is
//! expanded to natural-order bytes, every 256 weights are transposed into the interleaved
//! tile layout, and scales are decoded with vector code. Output is byte-for-byte the scalar
//! unpacker's (tested in `qgemm`). Also the in-register expansion of packed 32-weight block
//! tiles ([`small_packed_tile`]) that the fused kernels use.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use coordgen_model::quant::GgmlType;

use crate::qgemm::layout::{URow, TILE};
use crate::repack::SmallTile;

fn has_avx512() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("f16c")
    })
}

/// Whether this CPU has a SIMD unpacker for `ty`.
pub fn supports(ty: GgmlType) -> bool {
    has_avx512() && !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Unpacks with SIMD.
///
/// # Safety
/// The CPU must have the features [`supports`] checks for `ty`.
pub unsafe fn unpack_row(ty: GgmlType, src: &[u8], row: &mut URow) {
    match ty {
        GgmlType::Q4K | GgmlType::Q5K => kquant45(ty, src, row),
        GgmlType::Q6K => q6k(src, row),
        _ => legacy(ty, src, row),
    }
}

#[target_feature(enable = "avx512f,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)))
}

/// Transposes natural-order bytes of one tile (four 64-byte vectors) into the interleaved
/// layout and stores them at `dst`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_tile(r: [__m512i; 4], dst: *mut u8) {
    for v in 0..4i32 {
        let idx = _mm512_setr_epi32(v, 4 + v, 8 + v, 12 + v, 16 + v, 20 + v, 24 + v, 28 + v, 0, 0, 0, 0, 0, 0, 0, 0);
        let t01 = _mm512_permutex2var_epi32(r[0], idx, r[1]);
        let t23 = _mm512_permutex2var_epi32(r[2], idx, r[3]);
        let out = _mm512_inserti64x4(t01, _mm512_castsi512_si256(t23), 1);
        _mm512_storeu_si512(dst.add(v as usize * 64) as *mut _, out);
    }
}

#[inline(always)]
unsafe fn join(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)
}

#[target_feature(enable = "avx2")]
unsafe fn nibbles16(qs: *const u8) -> __m256i {
    let v = _mm_loadu_si128(qs as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m))
}

/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: eight 32-weight blocks per tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn legacy(ty: GgmlType, src: &[u8], row: &mut URow) {
    let k = row.k;
    let bb = ty.block_bytes();
    let nblocks = k / 32;
    let sixteen = _mm256_set1_epi8(0x10);
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    for tile in 0..k.div_ceil(TILE) {
        let mut ymm = [_mm256_setzero_si256(); 8];
        for (i, y) in ymm.iter_mut().enumerate() {
            let b = tile * 8 + i;
            if b >= nblocks {
                break;
            }
            let blk = src.as_ptr().add(b * bb);
            let d = f16_at(blk);
            let (q, bias) = match ty {
                GgmlType::Q4_0 => (nibbles16(blk.add(2)), -8.0 * d),
                GgmlType::Q4_1 => (nibbles16(blk.add(4)), f16_at(blk.add(2))),
                GgmlType::Q5_0 | GgmlType::Q5_1 => {
                    let (qh_at, qs_at) = if ty == GgmlType::Q5_0 { (2, 6) } else { (4, 8) };
                    let qh = std::ptr::read_unaligned(blk.add(qh_at) as *const u32);
                    let q = _mm256_or_si256(nibbles16(blk.add(qs_at)), _mm256_maskz_mov_epi8(qh, sixteen));
                    (q, if ty == GgmlType::Q5_0 { -16.0 * d } else { f16_at(blk.add(2)) })
                }
                _ => (_mm256_xor_si256(_mm256_loadu_si256(blk.add(2) as *const __m256i), flip), -128.0 * d),
            };
            *y = q;
            row.scale16[b * 2] = d;
            row.scale16[b * 2 + 1] = d;
            row.bias16[b * 2] = bias;
            row.bias16[b * 2 + 1] = bias;
        }
        let r = [join(ymm[0], ymm[1]), join(ymm[2], ymm[3]), join(ymm[4], ymm[5]), join(ymm[6], ymm[7])];
        store_tile(r, row.q.as_mut_ptr().add(tile * TILE));
    }
}

/// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K block as two u64 of bytes, from the
/// packed 12 bytes: words w0,w1,w2 hold sc0-3, m0-3, and the low nibbles of sc4-7 / high
/// nibbles of m4-7, whose top two bits live in the top bits of w0 (scales) and w1 (mins).
#[inline(always)]
fn k_scale_bytes(q: &[u8]) -> (u64, u64) {
    let w0 = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
    let w1 = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
    let w2 = u32::from_le_bytes([q[8], q[9], q[10], q[11]]);
    let sc_lo = w0 & 0x3f3f_3f3f;
    let mn_lo = w1 & 0x3f3f_3f3f;
    let sc_hi = (w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4);
    (sc_lo as u64 | (sc_hi as u64) << 32, mn_lo as u64 | (mn_hi as u64) << 32)
}

/// The 16 group scales `d * sc` and biases `-dmin * m` of a Q4_K/Q5_K block in the file's
/// layout (its first 16 bytes; the packed layout has its own, [`k4_packed_scales`]). No
/// closures, so it inlines into callers with AVX-512 enabled.
///
/// # Safety
/// Call only from functions with AVX-512 F and F16C enabled; `blk` must hold 16 bytes.
#[inline(always)]
unsafe fn k45_scales(blk: *const u8) -> (__m512, __m512) {
    let d = f16_at(blk);
    let dmin = f16_at(blk.add(2));
    let (sc, mn) = k_scale_bytes(std::slice::from_raw_parts(blk.add(4), 12));
    let pair = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let scf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_cvtsi64_si128(sc as i64))), _mm512_set1_ps(d));
    let mnf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64))), _mm512_set1_ps(-dmin));
    (_mm512_permutexvar_ps(pair, scf), _mm512_permutexvar_ps(pair, mnf))
}

/// As [`k45_scales`] for a block in the packed Q4_K layout of [`crate::repack`] (d, dmin,
/// then the scales and mins as 6-bit fields at bits `6 j` and `48 + 6 j` of bytes 4..16):
/// each pair of 32-bit lanes (one 64-bit lane) shifts its own field down, then the low half
/// is copied into the high one.
///
/// # Safety
/// Call only from functions with AVX-512 F and F16C enabled; `blk` must hold 18 bytes (the
/// second load reads two bytes past the header, into the block's weights).
#[inline(always)]
pub(crate) unsafe fn k4_packed_scales(blk: *const u8) -> (__m512, __m512) {
    let dd = _mm512_cvtph_ps(_mm256_set1_epi32(std::ptr::read_unaligned(blk as *const i32)));
    let (d, dmin) = (_mm512_shuffle_ps::<0x00>(dd, dd), _mm512_shuffle_ps::<0x55>(dd, dd));
    let shifts = _mm512_setr_epi64(0, 6, 12, 18, 24, 30, 36, 42);
    let six = _mm512_set1_epi32(63);
    // No closure for the two fields: it would not inherit the caller's target features.
    let mut f = [_mm512_setzero_ps(); 2];
    for (i, at) in [4usize, 10].into_iter().enumerate() {
        let v = _mm512_srlv_epi64(_mm512_set1_epi64(std::ptr::read_unaligned(blk.add(at) as *const i64)), shifts);
        f[i] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_shuffle_epi32::<0xA0>(v), six));
    }
    let sc = _mm512_mul_ps(f[0], d);
    // -(dmin * m) is (-dmin) * m exactly: rounding is symmetric in sign.
    let bi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(f[1], dmin)), _mm512_set1_epi32(i32::MIN)));
    (sc, bi)
}

/// The 16 group scales `d * sc` and biases `-32 * d * sc` of a Q6_K block (scales at byte
/// 192, d at 208 in both the file and the packed layout).
///
/// # Safety
/// As [`k45_scales`]; `blk` must hold 210 bytes.
#[inline(always)]
pub(crate) unsafe fn q6k_scales(blk: *const u8) -> (__m512, __m512) {
    let d = _mm512_set1_ps(f16_at(blk.add(208)));
    let s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(192) as *const __m128i))), d);
    (s, _mm512_mul_ps(s, _mm512_set1_ps(-32.0)))
}

/// `nb` f16 values at `p` (one per 32-weight block) as 16 group lanes, each value in the two
/// lanes of its block; lanes past `2 nb` are +0 (as the unpacked form's padding).
///
/// # Safety
/// Call only from functions with AVX-512 F and F16C enabled; `p` must hold `2 nb` bytes.
#[inline(always)]
unsafe fn block_halves(p: *const u8, nb: usize) -> __m512 {
    let raw = _mm512_castsi512_si128(_mm512_maskz_loadu_epi8((1u64 << (2 * nb)) - 1, p as *const i8));
    let pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(_mm256_cvtph_ps(raw)))
}

/// Tile `tile` of a packed row of a 32-weight block type (layout in [`crate::repack`]),
/// expanded in registers: the four interleaved weight vectors and the 16 group scales and
/// biases, all zero past the row's blocks, bitwise what the unpacked form holds.
///
/// # Safety
/// Call only from functions with AVX-512 F/BW and F16C enabled; `row` must hold a packed row
/// of `cols` weights of `ty` (a 32-block type).
#[inline(always)]
pub(crate) unsafe fn small_packed_tile(ty: GgmlType, row: *const u8, cols: usize, tile: usize) -> ([__m512i; 4], __m512, __m512) {
    let (l, at) = SmallTile::of(ty, cols, tile);
    let p = row.add(at);
    let w = 8 * l.nb;
    // Masked loads (no faults past the mask): a partial tile reads only its own bytes and
    // leaves the rest zero, without a branch or a copy for the last tile.
    let bytes: __mmask64 = if l.nb == 8 { !0 } else { (1u64 << w) - 1 };
    let mut q = [_mm512_setzero_si512(); 4];
    if ty == GgmlType::Q8_0 {
        for (v, qv) in q.iter_mut().enumerate() {
            // Signed file bytes + 128 (mod 256) = the unpacked unsigned form.
            *qv = _mm512_maskz_add_epi8(bytes, _mm512_maskz_loadu_epi8(bytes, p.add(v * w) as *const i8), _mm512_set1_epi8(-128));
        }
    } else {
        let m = _mm512_set1_epi8(0x0F);
        for h in 0..2 {
            let n = _mm512_maskz_loadu_epi8(bytes, p.add(h * w) as *const i8);
            q[2 * h] = _mm512_and_si512(n, m);
            q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(n, 4), m);
        }
        if matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1) {
            for (v, qv) in q.iter_mut().enumerate() {
                let hb = p.add(l.hbits + v * l.nb);
                let bits = _mm_cvtsi128_si64(_mm512_castsi512_si128(_mm512_maskz_loadu_epi8((1u64 << l.nb) - 1, hb as *const i8))) as u64;
                *qv = _mm512_mask_add_epi8(*qv, bits, *qv, _mm512_set1_epi8(16));
            }
        }
    }
    let d = block_halves(p.add(l.d), l.nb);
    // Padding lanes keep +0 biases (a multiply of +0 by a negative constant would give -0).
    let lanes: __mmask16 = ((1u32 << (2 * l.nb)) - 1) as u16;
    let bias = match ty {
        GgmlType::Q4_0 => _mm512_maskz_mul_ps(lanes, d, _mm512_set1_ps(-8.0)),
        GgmlType::Q5_0 => _mm512_maskz_mul_ps(lanes, d, _mm512_set1_ps(-16.0)),
        GgmlType::Q8_0 => _mm512_maskz_mul_ps(lanes, d, _mm512_set1_ps(-128.0)),
        _ => block_halves(p.add(l.m), l.nb),
    };
    (q, d, bias)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn kquant45(ty: GgmlType, src: &[u8], row: &mut URow) {
    let five = ty == GgmlType::Q5K;
    let bb = ty.block_bytes();
    let m = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(0x10);
    for b in 0..row.k / 256 {
        let blk = src.as_ptr().add(b * bb);
        let qs = blk.add(if five { 48 } else { 16 });
        let qh = if five { _mm256_loadu_si256(blk.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
        let mut r = [_mm512_setzero_si512(); 4];
        for (c, rc) in r.iter_mut().enumerate() {
            let v = _mm256_loadu_si256(qs.add(c * 32) as *const __m256i);
            let mut lo = _mm256_and_si256(v, m);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
            if five {
                let mlo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << (2 * c)) as i8));
                let mhi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((2u8 << (2 * c)) as i8));
                lo = _mm256_or_si256(lo, _mm256_maskz_mov_epi8(mlo, sixteen));
                hi = _mm256_or_si256(hi, _mm256_maskz_mov_epi8(mhi, sixteen));
            }
            *rc = join(lo, hi);
        }
        store_tile(r, row.q.as_mut_ptr().add(b * TILE));
        let (scf, mnf) = k45_scales(blk);
        _mm512_storeu_ps(row.scale16.as_mut_ptr().add(b * 16), scf);
        _mm512_storeu_ps(row.bias16.as_mut_ptr().add(b * 16), mnf);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn q6k(src: &[u8], row: &mut URow) {
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..row.k / 256 {
        let blk = src.as_ptr().add(b * 210);
        let mut y = [_mm256_setzero_si256(); 8];
        for n in 0..2 {
            let ql0 = _mm256_loadu_si256(blk.add(n * 64) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.add(n * 64 + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + n * 32) as *const __m256i);
            y[n * 4] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4));
            y[n * 4 + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2));
            y[n * 4 + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
            y[n * 4 + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)), 2),
            );
        }
        store_tile([join(y[0], y[1]), join(y[2], y[3]), join(y[4], y[5]), join(y[6], y[7])], row.q.as_mut_ptr().add(b * TILE));
        let (sc, bi) = q6k_scales(blk);
        _mm512_storeu_ps(row.scale16.as_mut_ptr().add(b * 16), sc);
        _mm512_storeu_ps(row.bias16.as_mut_ptr().add(b * 16), bi);
    }
}
