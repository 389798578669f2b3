//! KV cache storage: one preallocated buffer per layer for keys and one for values, in f32
//! or f16 (the `kv_type` backend option). f16 halves the bytes attention streams per token,
//! which is what bounds decoding over a long context; values are rounded to nearest even
//! once, when written, so every later read of an entry sees the same numbers.

/// An element type the cache can hold.
pub trait KvElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    /// True for [`F16`]; the SIMD kernels pick their load instruction from it.
    const IS_F16: bool;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const ZERO: Self = 0.0;
    const IS_F16: bool = false;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// IEEE half precision, stored as its bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl KvElem for F16 {
    const ZERO: Self = F16(0);
    const IS_F16: bool = true;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        F16(half::f16::from_f32(x).to_bits())
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
}

/// Element type of a slot's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F32,
    F16,
}

impl KvType {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            other => Err(format!("kv_type must be \"f32\" or \"f16\", not {other:?}")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

/// One layer's keys or values: `n_ctx x kv_dim` elements (zero pages are only committed
/// when written).
pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<F16>),
}

impl KvBuf {
    pub fn new(ty: KvType, len: usize) -> Self {
        match ty {
            KvType::F32 => KvBuf::F32(vec![0.0; len]),
            KvType::F16 => KvBuf::F16(vec![F16::ZERO; len]),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            KvBuf::F32(b) => b.len() * 4,
            KvBuf::F16(b) => b.len() * 2,
        }
    }

    /// Stores `src` at element offset `at`.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(b) => b[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(b) => b[at..at + src.len()].iter_mut().zip(src).for_each(|(d, &s)| *d = F16::from_f32(s)),
        }
    }

    /// `copy_within` on the elements.
    pub fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            KvBuf::F32(b) => b.copy_within(src, dst),
            KvBuf::F16(b) => b.copy_within(src, dst),
        }
    }

    /// Copies the first `n` elements of `src` (which must have the same type).
    pub fn copy_prefix_from(&mut self, src: &KvBuf, n: usize) -> Result<(), String> {
        match (self, src) {
            (KvBuf::F32(d), KvBuf::F32(s)) => d[..n].copy_from_slice(&s[..n]),
            (KvBuf::F16(d), KvBuf::F16(s)) => d[..n].copy_from_slice(&s[..n]),
            _ => return Err("copy_prefix: slots hold different KV types".into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_rounds_to_nearest_even() {
        let mut b = KvBuf::new(KvType::F16, 5);
        // f16 keeps 10 mantissa bits: 1 + 2^-11 and 1 + 3 * 2^-11 are ties, and the even
        // mantissa wins (1, then 1 + 2^-9).
        b.write(1, &[1.0, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, 65504.0]);
        let KvBuf::F16(v) = &b else { panic!("wrong type") };
        let got: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got, [0.0, 1.0, 1.0, 1.0 + 1.0 / 512.0, 65504.0]);
        assert_eq!(b.bytes(), 10);
        assert!(KvType::parse("q8").unwrap_err().contains("kv_type"));
    }
}
