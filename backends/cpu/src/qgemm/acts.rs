//! Activations in the integer kernels' format: per token, one scale per group of 16 values,
//! 8-bit or 15-bit integers ([`ActBits`]), interleaved as the weights are ([`QActs`]).

use super::layout::*;
use crate::pool::{split_range, ThreadPool};

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
pub(crate) struct TokenPtrs {
    hi: *mut i8,
    lo: *mut i8,
    sc: *mut f32,
    ds: *mut f32,
}
// SAFETY: used only to hand disjoint per-token slices to the pool's threads.
unsafe impl Send for TokenPtrs {}
unsafe impl Sync for TokenPtrs {}

/// Interleaved position of every index of a tile.
pub(crate) static POS: [u16; TILE] = {
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
pub(crate) fn round_half_away(x: f32) -> i32 {
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
pub(crate) fn quantize_blocks(x: &[f32], blocks: std::ops::Range<usize>, hi: &mut [i8], lo: &mut [i8], sc: &mut [f32], ds: &mut [f32], bits: ActBits) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx512bw() {
        for b in blocks {
            // SAFETY: AVX-512 F/BW checked; `b` is a whole block of `x` and the slices are a
            // token's padded buffers.
            unsafe { super::x86::quantize_block_avx512(x, b, hi, lo, sc, ds, bits) };
        }
        return;
    }
    for b in blocks {
        quantize_block(x, b, hi, lo, sc, ds, bits);
    }
}

/// Scalar oracle: quantizes block `b` (32 values) of one token.
pub(crate) fn quantize_block(x: &[f32], b: usize, hi: &mut [i8], lo: &mut [i8], sc: &mut [f32], ds: &mut [f32], bits: ActBits) {
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

