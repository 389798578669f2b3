//! NEON integer kernel (aarch64): one unpacked weight row ([`URow`]) times quantized
//! activations, with the dot-product extension (`sdot`) where the CPU has it and widening
//! multiplies (`smull` + pairwise adds) where it does not.
//!
//! Both compute every group's exact integer sum and then the scalar oracle's float steps in
//! the same order ([`crate::qgemm::dot_scalar`]: per group `fma(float(isum), scale_w *
//! scale_a, acc)`, `fma(bias, dsum, acc)`, then the fixed 16-lane reduction), so their
//! results are bitwise the oracle's and batch invariant like the x86 paths.
//!
//! **Layout.** A tile's 256 bytes are four 64-byte vectors whose byte `g*4 + e` belongs to
//! group `g` ([`crate::qgemm`]); a 16-byte NEON load at `v*64 + 16 k` covers groups
//! `4k..4k + 4`, four bytes each, which is exactly the lane layout of `sdot`: lane `i` of
//! accumulator `k` collects group `4k + i` over the four vectors.
//!
//! **Signs.** Both instructions multiply signed bytes, and unpacked weights are unsigned
//! (Q8_0's are `w + 128`, up to 255). A row is split as `q = 128 * (q >> 7) + (q & 127)`
//! only when it has bytes of 128 and more (Q8_0), which costs those rows a second pass;
//! every other type's weights (at most 63) go in as they are. The sums stay exact integers.
//!
//! This file is compiled for aarch64 and, in tests on other machines, against the
//! plain-Rust stand-ins of [`crate::neon_emu`], which test the kernel's logic against the
//! oracle on any machine. `scripts/test_aarch64.sh` (part of the test command) builds it for
//! aarch64 and runs the backend's tests under qemu-user, on an emulated CPU with the
//! dot-product extension and on one without, so the `sdot` assembly and the intrinsics'
//! code generation are checked there too (for results, not speed).

#[cfg(target_arch = "aarch64")]
use core::arch::aarch64::*;

#[cfg(not(target_arch = "aarch64"))]
use crate::neon_emu::*;

use crate::qgemm::acts::{ActBits, QActs};
use crate::qgemm::layout::{URow, TILE};
use crate::qgemm::scalar::reduce16;

/// How four-byte groups of products are summed into 32-bit lanes.
pub trait Dot4 {
    /// Lane `i`: `acc[i] + sum_e a[4i + e] * b[4i + e]` (signed bytes, exact).
    unsafe fn dot4(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// The Armv8.2 dot-product extension (`sdot`).
pub struct Sdot;
/// Baseline NEON: widening multiplies and pairwise adds (products of two signed bytes fit in
/// 16 bits: at most 128 * 127).
pub struct Mull;

impl Dot4 for Sdot {
    #[inline(always)]
    unsafe fn dot4(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        sdot(acc, a, b)
    }
}

impl Dot4 for Mull {
    #[inline(always)]
    unsafe fn dot4(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
        let hi = vpaddlq_s16(vmull_high_s8(a, b));
        vaddq_s32(acc, vpaddq_s32(lo, hi))
    }
}

/// `sdot` through inline assembly: its intrinsic is not stable in the toolchain we build with.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    core::arch::asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Whether this CPU has the dot-product extension.
#[cfg(target_arch = "aarch64")]
pub fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// Dot products of `row` with tokens `t0..t1` of `acts` (`out[i]` = token `t0 + i`),
/// choosing `sdot` when the CPU has it.
///
/// # Safety
/// On aarch64 the CPU must have NEON (every aarch64 Linux CPU does).
pub unsafe fn dot_tokens(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
    #[cfg(target_arch = "aarch64")]
    if has_dotprod() {
        return dot_tokens_sdot(row, acts, t0, t1, out);
    }
    dot_tokens_with::<Mull>(row, acts, t0, t1, out)
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_tokens_sdot(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
    dot_tokens_with::<Sdot>(row, acts, t0, t1, out)
}

/// Exact group sums of one tile (`base`) of weights `q` with activation bytes `act`: lane `i`
/// of `[k]` is group `4k + i`. Not a closure: it must inline into the entry point whose
/// target features (`dotprod`) its instructions need.
#[inline(always)]
unsafe fn group_sums<D: Dot4>(q: *const u8, act: *const i8, base: usize, split: bool) -> [int32x4_t; 4] {
    let low7 = vdupq_n_u8(127);
    let mut s = [vdupq_n_s32(0); 4];
    let mut s_top = [vdupq_n_s32(0); 4];
    for v in 0..4 {
        for k in 0..4 {
            let off = base + v * 64 + 16 * k;
            let w = vld1q_u8(q.add(off));
            let a = vld1q_s8(act.add(off));
            if split {
                s[k] = D::dot4(s[k], vreinterpretq_s8_u8(vandq_u8(w, low7)), a);
                s_top[k] = D::dot4(s_top[k], vreinterpretq_s8_u8(vshrq_n_u8::<7>(w)), a);
            } else {
                s[k] = D::dot4(s[k], vreinterpretq_s8_u8(w), a);
            }
        }
    }
    if split {
        for k in 0..4 {
            s[k] = vaddq_s32(s[k], vshlq_n_s32::<7>(s_top[k]));
        }
    }
    s
}

/// The kernel for one way of summing byte products (see the module header); inlined into
/// each entry point so it gets that entry's target features.
///
/// # Safety
/// `D`'s instructions must exist on this CPU; `row` and `acts` must have the same padded
/// length.
#[inline(always)]
pub unsafe fn dot_tokens_with<D: Dot4>(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
    let kp = row.q.len();
    assert!(acts.kp == kp && kp % TILE == 0 && out.len() >= t1 - t0 && t1 <= acts.n);
    // Rows with bytes >= 128 (Q8_0) take the split of the module header.
    let mut top = 0u8;
    for c in (0..kp).step_by(16) {
        top = top.max(vmaxvq_u8(vld1q_u8(row.q.as_ptr().add(c))));
    }
    let split = top >= 128;
    let q = row.q.as_ptr();
    for t in t0..t1 {
        let (hi, lo, sa, ds) = acts.row(t);
        let mut acc = [vdupq_n_f32(0.0); 4];
        for tile in 0..kp / TILE {
            let base = tile * TILE;
            let sh = group_sums::<D>(q, hi.as_ptr(), base, split);
            let isum = if acts.bits == ActBits::Eight {
                sh
            } else {
                let sl = group_sums::<D>(q, lo.as_ptr(), base, split);
                let mut v = sh;
                for k in 0..4 {
                    v[k] = vaddq_s32(vshlq_n_s32::<7>(sh[k]), sl[k]);
                }
                v
            };
            for k in 0..4 {
                let gi = tile * 16 + 4 * k;
                let s = vmulq_f32(vld1q_f32(row.scale16.as_ptr().add(gi)), vld1q_f32(sa.as_ptr().add(gi)));
                acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(isum[k]), s);
                acc[k] = vfmaq_f32(acc[k], vld1q_f32(row.bias16.as_ptr().add(gi)), vld1q_f32(ds.as_ptr().add(gi)));
            }
        }
        let mut lanes = [0f32; 16];
        for (k, a) in acc.iter().enumerate() {
            vst1q_f32(lanes.as_mut_ptr().add(4 * k), *a);
        }
        out[t - t0] = reduce16(&lanes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qgemm::{dot_scalar, is_quantized, unpack_row};
    use crate::testdata::signal;
    use coordgen_model::quant::{quantize_row, GgmlType};

    /// `scripts/test_aarch64.sh` runs the tests on an emulated CPU with the dot-product
    /// extension and on one without, and says which in `COORDGEN_EXPECT_DOTPROD`: both
    /// kernels are then known to have run (the `sdot` one is skipped where it cannot run).
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn dotprod_detection_matches_the_emulated_cpu() {
        if let Ok(want) = std::env::var("COORDGEN_EXPECT_DOTPROD") {
            assert_eq!(has_dotprod(), want == "1", "COORDGEN_EXPECT_DOTPROD={want}");
        }
    }

    /// Both ways of summing give bitwise the scalar oracle's results, for every quantized
    /// type (Q8_0 exercises the signed split), both activation precisions, several tokens
    /// and a row length that ends in a partial tile.
    #[test]
    fn neon_kernel_equals_scalar_oracle() {
        for k in [256usize, 896] {
            for ty in GgmlType::ALL.into_iter().filter(|t| is_quantized(*t)) {
                if k % ty.block_size() != 0 {
                    continue;
                }
                let w = quantize_row(ty, &signal(k, 11));
                let mut row = URow::new(k);
                unpack_row(ty, &w, &mut row);
                for bits in [ActBits::Eight, ActBits::Fifteen] {
                    let n = 3;
                    let mut x = Vec::new();
                    for t in 0..n {
                        x.extend(signal(k, 40 + t as u32).into_iter().map(|v| v * (1.0 + t as f32)));
                    }
                    let mut acts = QActs::new();
                    acts.quantize(&x, n, k, bits);
                    let want: Vec<f32> = (0..n)
                        .map(|t| {
                            let (h, l, s, d) = acts.row(t);
                            dot_scalar(&row, bits, h, l, s, d)
                        })
                        .collect();
                    for (name, got) in [
                        ("mull", {
                            let mut o = vec![0f32; n];
                            unsafe { dot_tokens_with::<Mull>(&row, &acts, 0, n, &mut o) };
                            o
                        }),
                        ("sdot", {
                            let mut o = vec![0f32; n];
                            // On an aarch64 CPU without the extension `sdot` does not exist.
                            #[cfg(target_arch = "aarch64")]
                            let run = has_dotprod();
                            #[cfg(not(target_arch = "aarch64"))]
                            let run = true;
                            if run {
                                unsafe { dot_tokens_with::<Sdot>(&row, &acts, 0, n, &mut o) };
                            } else {
                                o.clone_from(&want);
                            }
                            o
                        }),
                        ("entry", {
                            let mut o = vec![0f32; n];
                            unsafe { dot_tokens(&row, &acts, 0, n, &mut o) };
                            o
                        }),
                    ] {
                        let bitsof = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bitsof(&got), bitsof(&want), "{ty:?} k {k} {bits:?} {name}");
                    }
                    // A token range that does not start at 0 writes from out[0].
                    let mut o = vec![0f32; 2];
                    unsafe { dot_tokens_with::<Mull>(&row, &acts, 1, 3, &mut o) };
                    assert_eq!(o[0].to_bits(), want[1].to_bits());
                }
            }
        }
    }
}
