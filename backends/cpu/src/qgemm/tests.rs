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
