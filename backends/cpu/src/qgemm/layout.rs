//! The unpacked weight layout every integer kernel shares (a leaf: kernels, the repacker and
//! the SIMD unpackers import it, and it imports none of them): tiles of 256 weights in 16
//! groups, stored interleaved, and one unpacked row ([`URow`]).

use coordgen_model::quant::GgmlType;
use half::f16;

pub const TILE: usize = 256;
pub(crate) const GROUPS: usize = 16;

/// Position of natural index `n` (within a tile) in the interleaved layout.
#[inline(always)]
pub fn interleave(n: usize) -> usize {
    let (g, v, e) = (n / 16, (n % 16) / 4, n % 4);
    v * 64 + g * 4 + e
}

/// Largest activation magnitude: keeps `hi` in -127..=127.
pub const QA_MAX: f32 = 16256.0;

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

