//! SIMD twins of `qdot::unpack_row` for x86_64: AVX2 for the 4/6/8-bit types and
//! AVX-512BW/VL for the 5-bit ones (their high bits become a byte mask in one step).
//! Each produces exactly the bytes and scales the scalar unpacker does (tested).

use std::arch::x86_64::*;

use coordgen_model::quant::{k_scale_min, GgmlType};
use half::f16;

use crate::qdot::URow;

#[inline(always)]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Whether this CPU has a SIMD unpacker for `ty`.
pub fn supports(ty: GgmlType) -> bool {
    let avx2 = is_x86_feature_detected!("avx2");
    let bw = is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl");
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K => avx2,
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => bw && avx2,
        _ => false,
    }
}

/// Unpacks with SIMD. Callers check [`supports`] first.
pub unsafe fn unpack_row(ty: GgmlType, src: &[u8], row: &mut URow) {
    let k = row.q.len();
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            for b in 0..k / 32 {
                small_block(ty, &src[b * ty.block_bytes()..(b + 1) * ty.block_bytes()], row, b);
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for b in 0..k / 32 {
                q5_block(ty, &src[b * ty.block_bytes()..(b + 1) * ty.block_bytes()], row, b);
            }
        }
        GgmlType::Q4K => {
            for b in 0..k / 256 {
                k4_block(&src[b * 144..(b + 1) * 144], row, b * 256);
            }
        }
        GgmlType::Q5K => {
            for b in 0..k / 256 {
                k5_block(&src[b * 176..(b + 1) * 176], row, b * 256);
            }
        }
        GgmlType::Q6K => {
            for b in 0..k / 256 {
                q6k_block(&src[b * 210..(b + 1) * 210], row, b * 256);
            }
        }
        _ => unreachable!(),
    }
}

#[target_feature(enable = "avx2")]
unsafe fn nibbles16(qs: *const u8) -> __m256i {
    // 16 bytes -> low nibbles in bytes 0..16, high nibbles in bytes 16..32.
    let v = _mm_loadu_si128(qs as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(v, m);
    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    _mm256_set_m128i(hi, lo)
}

#[inline(always)]
unsafe fn block_scales(row: &mut URow, b: usize, d: f32, bias: f32) {
    _mm256_storeu_ps(row.lane_scale.as_mut_ptr().add(b * 8), _mm256_set1_ps(d));
    row.bias16[b * 2] = bias;
    row.bias16[b * 2 + 1] = bias;
}

#[target_feature(enable = "avx2")]
unsafe fn small_block(ty: GgmlType, blk: &[u8], row: &mut URow, b: usize) {
    let d = h(blk, 0);
    let dst = row.q.as_mut_ptr().add(b * 32) as *mut __m256i;
    let bias = match ty {
        GgmlType::Q4_0 => {
            _mm256_storeu_si256(dst, nibbles16(blk.as_ptr().add(2)));
            -8.0 * d
        }
        GgmlType::Q4_1 => {
            _mm256_storeu_si256(dst, nibbles16(blk.as_ptr().add(4)));
            h(blk, 2)
        }
        _ => {
            _mm256_storeu_si256(dst, _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i));
            0.0
        }
    };
    block_scales(row, b, d, bias);
}

#[target_feature(enable = "avx2,avx512bw,avx512vl")]
unsafe fn q5_block(ty: GgmlType, blk: &[u8], row: &mut URow, b: usize) {
    let d = h(blk, 0);
    let dst = row.q.as_mut_ptr().add(b * 32) as *mut __m256i;
    let (qh_at, qs_at) = if ty == GgmlType::Q5_0 { (2, 6) } else { (4, 8) };
    let qh = u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]);
    let high = _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10));
    _mm256_storeu_si256(dst, _mm256_or_si256(nibbles16(blk.as_ptr().add(qs_at)), high));
    let bias = if ty == GgmlType::Q5_0 { -16.0 * d } else { h(blk, 2) };
    block_scales(row, b, d, bias);
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

/// Vectorized scales of a Q4_K/Q5_K block: 8 group scales expanded to 64 lanes, 16 biases.
/// Two consecutive f16 values with the hardware converter (F16C comes with AVX-512F).
#[target_feature(enable = "avx512f,f16c")]
unsafe fn two_f16(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn k_scales_512(blk: &[u8], row: &mut URow, base: usize) {
    let (d, dmin) = two_f16(blk.as_ptr());
    let (sc, mn) = k_scale_bytes(&blk[4..16]);
    let scf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc as i64))), _mm256_set1_ps(d));
    let mnf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64))), _mm256_set1_ps(-dmin));
    let s512 = _mm512_castps256_ps512(scf);
    let ls = row.lane_scale.as_mut_ptr().add(base / 4);
    for p in 0..4 {
        // Lanes 0..8 get group 2p, lanes 8..16 group 2p+1.
        let idx = _mm512_set_epi32(
            2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1,
            2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p,
        );
        _mm512_storeu_ps(ls.add(p as usize * 16), _mm512_permutexvar_ps(idx, s512));
    }
    // Each group's bias covers two 16-element entries.
    let idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    _mm512_storeu_ps(row.bias16.as_mut_ptr().add(base / 16), _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(mnf)));
}

fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl"))
}

#[inline(always)]
unsafe fn k_scales(blk: &[u8], row: &mut URow, base: usize) {
    if has_avx512() {
        return k_scales_512(blk, row, base);
    }
    let d = h(blk, 0);
    let dmin = h(blk, 2);
    let scales = &blk[4..16];
    for j in 0..8 {
        let (sc, mn) = k_scale_min(j, scales);
        _mm256_storeu_ps(row.lane_scale.as_mut_ptr().add((base + j * 32) / 4), _mm256_set1_ps(d * sc as f32));
        let bias = -dmin * mn as f32;
        row.bias16[(base + j * 32) / 16] = bias;
        row.bias16[(base + j * 32) / 16 + 1] = bias;
    }
}

#[target_feature(enable = "avx2")]
unsafe fn k4_block(blk: &[u8], row: &mut URow, base: usize) {
    let m = _mm256_set1_epi8(0x0F);
    for c in 0..4 {
        let v = _mm256_loadu_si256(blk.as_ptr().add(16 + c * 32) as *const __m256i);
        let dst = row.q.as_mut_ptr().add(base + c * 64);
        _mm256_storeu_si256(dst as *mut __m256i, _mm256_and_si256(v, m));
        _mm256_storeu_si256(dst.add(32) as *mut __m256i, _mm256_and_si256(_mm256_srli_epi16(v, 4), m));
    }
    k_scales(blk, row, base);
}

#[target_feature(enable = "avx2,avx512bw,avx512vl")]
unsafe fn k5_block(blk: &[u8], row: &mut URow, base: usize) {
    let m = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(0x10);
    let qh = _mm256_loadu_si256(blk.as_ptr().add(16) as *const __m256i);
    for c in 0..4 {
        let v = _mm256_loadu_si256(blk.as_ptr().add(48 + c * 32) as *const __m256i);
        let mlo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << (2 * c)) as i8));
        let mhi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((2u8 << (2 * c)) as i8));
        let lo = _mm256_or_si256(_mm256_and_si256(v, m), _mm256_maskz_mov_epi8(mlo, sixteen));
        let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), _mm256_maskz_mov_epi8(mhi, sixteen));
        let dst = row.q.as_mut_ptr().add(base + c * 64);
        _mm256_storeu_si256(dst as *mut __m256i, lo);
        _mm256_storeu_si256(dst.add(32) as *mut __m256i, hi);
    }
    k_scales(blk, row, base);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q6k_scales_512(blk: &[u8], row: &mut URow, base: usize) {
    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(blk[208] as i32 | (blk[209] as i32) << 8)));
    let sc = _mm_loadu_si128(blk.as_ptr().add(192) as *const __m128i);
    let s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)), _mm512_set1_ps(d));
    _mm512_storeu_ps(row.bias16.as_mut_ptr().add(base / 16), _mm512_mul_ps(s, _mm512_set1_ps(-32.0)));
    let ls = row.lane_scale.as_mut_ptr().add(base / 4);
    for p in 0..4 {
        // 16 lanes = 4 groups of 16 weights, 4 lanes each.
        let g = 4 * p;
        let idx = _mm512_set_epi32(
            g + 3, g + 3, g + 3, g + 3, g + 2, g + 2, g + 2, g + 2,
            g + 1, g + 1, g + 1, g + 1, g, g, g, g,
        );
        _mm512_storeu_ps(ls.add(p as usize * 16), _mm512_permutexvar_ps(idx, s));
    }
}

#[target_feature(enable = "avx2")]
unsafe fn q6k_block(blk: &[u8], row: &mut URow, base: usize) {
    let m4 = _mm256_set1_epi8(0x0F);
    for n in 0..2 {
        let ql0 = _mm256_loadu_si256(blk.as_ptr().add(n * 64) as *const __m256i);
        let ql1 = _mm256_loadu_si256(blk.as_ptr().add(n * 64 + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(blk.as_ptr().add(128 + n * 32) as *const __m256i);
        let q1 = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4));
        let q2 = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2));
        let q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
        let q4 = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
            _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)), 2),
        );
        let dst = row.q.as_mut_ptr().add(base + n * 128) as *mut __m256i;
        _mm256_storeu_si256(dst, q1);
        _mm256_storeu_si256(dst.add(1), q2);
        _mm256_storeu_si256(dst.add(2), q3);
        _mm256_storeu_si256(dst.add(3), q4);
    }
    if has_avx512() {
        return q6k_scales_512(blk, row, base);
    }
    let d = h(blk, 208);
    for g in 0..16 {
        let s = d * (blk[192 + g] as i8) as f32;
        _mm_storeu_ps(row.lane_scale.as_mut_ptr().add((base + g * 16) / 4), _mm_set1_ps(s));
        row.bias16[(base + g * 16) / 16] = -32.0 * s;
    }
}
