//! KV cache storage: one preallocated buffer per layer for keys and one for values, in f32
//! or f16 (the `kv_type` backend option). f16 halves the bytes attention streams per token,
//! which is what bounds decoding over a long context; values are rounded to nearest even
//! once, when written, so every later read of an entry sees the same numbers. A [`Slot`] is
//! one sequence's cache over all layers.

use crate::model::CpuModel;

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

/// One sequence's KV cache: preallocated, with a fill count, so rollback is lowering `len`.
/// The fields are private: `len` changes only through [`Slot::advance`] (after a forward
/// wrote the entries), [`Slot::truncate`], [`Slot::keep_entries`] and
/// [`Slot::copy_prefix_from`], each of which checks its bounds.
pub struct Slot {
    model: u64,
    n_ctx: usize,
    len: usize,
    kv_dim: usize,
    /// Per layer, `n_ctx x kv_dim` keys and values.
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
}

impl Slot {
    pub fn new(model_id: u64, m: &CpuModel, n_ctx: usize, ty: KvType) -> Self {
        let kv = m.kv_dim();
        Slot {
            model: model_id,
            n_ctx,
            len: 0,
            kv_dim: kv,
            k: (0..m.hp.n_layer).map(|_| KvBuf::new(ty, n_ctx * kv)).collect(),
            v: (0..m.hp.n_layer).map(|_| KvBuf::new(ty, n_ctx * kv)).collect(),
        }
    }

    /// The model whose KV entries this slot holds.
    pub fn model(&self) -> u64 {
        self.model
    }
    /// Entries filled.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Entries it holds at most.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Keys and values of layer `li`.
    pub fn layer(&self, li: usize) -> (&KvBuf, &KvBuf) {
        (&self.k[li], &self.v[li])
    }

    /// Writes keys and values of layer `li` for entries from `start` on (a forward does so
    /// for every layer, then [`Slot::advance`]s the fill count once).
    pub fn write_layer(&mut self, li: usize, start: usize, k: &[f32], v: &[f32]) {
        self.k[li].write(start * self.kv_dim, k);
        self.v[li].write(start * self.kv_dim, v);
    }

    /// Counts `n` more entries as filled (the forward's checks keep this within `n_ctx`).
    pub fn advance(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.n_ctx);
        self.len += n;
    }

    /// Drops every entry past the first `len` (rolling back is lowering the fill count).
    pub fn truncate(&mut self, len: usize) -> Result<(), String> {
        if len > self.len {
            return Err(format!("cannot truncate a slot of length {} to {len}", self.len));
        }
        self.len = len;
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvBuf::bytes).sum()
    }

    /// What [`Slot::new`] would allocate, computed without allocating (saturating).
    pub fn planned_bytes(m: &CpuModel, n_ctx: usize, ty: KvType) -> u64 {
        (n_ctx as u64).saturating_mul(m.kv_dim() as u64).saturating_mul(m.hp.n_layer as u64).saturating_mul(2 * ty.bytes() as u64)
    }

    /// Copies the first `len` entries of `src` (same model and KV type) into this slot.
    pub fn copy_prefix_from(&mut self, src: &Slot, len: usize) -> Result<(), String> {
        coordgen_interface::checks::check_copy_prefix(src.model, self.model, len, src.len, self.n_ctx)?;
        for (d, s) in self.k.iter_mut().zip(&src.k).chain(self.v.iter_mut().zip(&src.v)) {
            d.copy_prefix_from(s, len * self.kv_dim)?;
        }
        self.len = len;
        Ok(())
    }

    /// Keeps entries `0..start`, then `start + keep[k]` moved to `start + k`.
    pub fn keep_entries(&mut self, start: usize, keep: &[u32]) -> Result<(), String> {
        let kv_dim = self.kv_dim;
        coordgen_interface::checks::check_keep(self.len, start, keep)?;
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            for (dst, &src) in keep.iter().enumerate() {
                let (d, s) = (start + dst, start + src as usize);
                if d != s {
                    layer.copy_within(s * kv_dim..(s + 1) * kv_dim, d * kv_dim);
                }
            }
        }
        self.len = start + keep.len();
        Ok(())
    }
}
