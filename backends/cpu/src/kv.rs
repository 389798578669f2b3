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

/// Tokens one forward may add to a slot whose sliding-window layers keep a ring: a ring
/// holds the window plus this many entries, so a batch's keys and the window before it are
/// always stored (prefill chunks are 128 by default; verification trees are far smaller).
pub const RING_SLACK: usize = 512;

/// One sequence's KV cache: preallocated, with a fill count, so rollback is lowering `len`.
/// The fields are private: `len` changes only through [`Slot::advance`] (after a forward
/// wrote the entries), [`Slot::truncate`], [`Slot::keep_entries`] and
/// [`Slot::copy_prefix_from`], each of which checks its bounds.
///
/// Sliding-window layers (gemma3) need only the last `window` keys, so where the context
/// is long their buffers are rings of `cap = window + RING_SLACK` entries instead of
/// `n_ctx`. Entry `i` is stored twice, at rows `i % cap` and `i % cap + cap`, so any run of
/// up to `cap` consecutive entries is one contiguous slice (what the attention kernels
/// read). Writing entry `i` overwrites entry `i - cap`; `intact_from` is the lowest entry
/// every ring still holds, and truncating so far back that the window before the new end
/// is gone is refused (the host then recomputes from the start).
pub struct Slot {
    model: u64,
    n_ctx: usize,
    len: usize,
    kv_dim: usize,
    /// Per layer, keys and values: `n_ctx x kv_dim`, or `2 cap x kv_dim` for a ring.
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
    /// Per layer, its ring's `cap` (0: a linear buffer of `n_ctx` entries).
    ring: Vec<usize>,
    window: usize,
    intact_from: usize,
}

impl Slot {
    /// Per layer, the ring capacity a slot of `n_ctx` entries gets (0: none).
    fn rings(m: &CpuModel, n_ctx: usize) -> Vec<usize> {
        let w = m.hp.extras.sliding_window;
        let cap = w + RING_SLACK;
        (0..m.hp.n_layer).map(|l| if m.hp.is_swa(l) && 2 * cap < n_ctx { cap } else { 0 }).collect()
    }

    fn rows(ring: usize, n_ctx: usize) -> usize {
        if ring > 0 {
            2 * ring
        } else {
            n_ctx
        }
    }

    pub fn new(model_id: u64, m: &CpuModel, n_ctx: usize, ty: KvType) -> Self {
        let kv = m.kv_dim();
        let ring = Self::rings(m, n_ctx);
        Slot {
            model: model_id,
            n_ctx,
            len: 0,
            kv_dim: kv,
            k: ring.iter().map(|&r| KvBuf::new(ty, Self::rows(r, n_ctx) * kv)).collect(),
            v: ring.iter().map(|&r| KvBuf::new(ty, Self::rows(r, n_ctx) * kv)).collect(),
            ring,
            window: m.hp.extras.sliding_window,
            intact_from: 0,
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

    /// Layer `li`'s ring capacity (0: linear, entry `i` at row `i`).
    pub fn ring(&self, li: usize) -> usize {
        self.ring[li]
    }

    /// The lowest entry every ring layer still holds (0 without rings).
    pub fn intact_from(&self) -> usize {
        self.intact_from
    }

    /// Whether every ring still holds the window of a token at position `len` (the entries
    /// `len + 1 - window .. len`). Always true without rings.
    fn holds_window_before(&self, len: usize) -> bool {
        self.intact_from == 0 || len + 1 >= self.intact_from + self.window
    }

    /// The most tokens one forward may add (the rings' slack; `n_ctx` without rings).
    pub fn max_batch(&self) -> usize {
        if self.ring.iter().any(|&r| r > 0) {
            RING_SLACK + 1
        } else {
            self.n_ctx
        }
    }

    /// Writes keys and values of layer `li` for entries from `start` on (a forward does so
    /// for every layer, then [`Slot::advance`]s the fill count once).
    pub fn write_layer(&mut self, li: usize, start: usize, k: &[f32], v: &[f32]) {
        let (kv, cap) = (self.kv_dim, self.ring[li]);
        if cap == 0 {
            self.k[li].write(start * kv, k);
            self.v[li].write(start * kv, v);
            return;
        }
        let n = k.len() / kv;
        for i in 0..n {
            let row = (start + i) % cap;
            for r in [row, row + cap] {
                self.k[li].write(r * kv, &k[i * kv..(i + 1) * kv]);
                self.v[li].write(r * kv, &v[i * kv..(i + 1) * kv]);
            }
        }
        self.intact_from = self.intact_from.max((start + n).saturating_sub(cap));
    }

    /// Counts `n` more entries as filled (the forward's checks keep this within `n_ctx`).
    pub fn advance(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.n_ctx);
        self.len += n;
    }

    /// Drops every entry past the first `len` (rolling back is lowering the fill count).
    /// Refused where the rings no longer hold the window before `len`.
    pub fn truncate(&mut self, len: usize) -> Result<(), String> {
        if len > self.len {
            return Err(format!("cannot truncate a slot of length {} to {len}", self.len));
        }
        if len == 0 {
            self.intact_from = 0;
        } else if !self.holds_window_before(len) {
            return Err(format!(
                "cannot truncate to {len} entries: the sliding-window layers keep only entries from {} on, and the window before {len} starts at {}",
                self.intact_from,
                (len + 1).saturating_sub(self.window)
            ));
        }
        self.len = len;
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvBuf::bytes).sum()
    }

    /// What [`Slot::new`] would allocate, computed without allocating (saturating).
    pub fn planned_bytes(m: &CpuModel, n_ctx: usize, ty: KvType) -> u64 {
        let rows: u64 = Self::rings(m, n_ctx).iter().map(|&r| Self::rows(r, n_ctx) as u64).fold(0u64, u64::saturating_add);
        rows.saturating_mul(m.kv_dim() as u64).saturating_mul(2 * ty.bytes() as u64)
    }

    /// Copies the first `len` entries of `src` (same model and KV type) into this slot.
    /// Slots whose rings differ (other context sizes of a windowed model) are refused.
    pub fn copy_prefix_from(&mut self, src: &Slot, len: usize) -> Result<(), String> {
        coordgen_interface::checks::check_copy_prefix(src.model, self.model, len, src.len, self.n_ctx)?;
        if self.ring != src.ring {
            return Err("copy_prefix: the slots' sliding-window layers are sized differently (different context sizes)".into());
        }
        if len > 0 && !src.holds_window_before(len) {
            return Err(format!("copy_prefix: the source's sliding-window layers no longer hold the window before entry {len}"));
        }
        for (li, &cap) in self.ring.iter().enumerate() {
            let n = if cap > 0 { 2 * cap } else { len } * self.kv_dim;
            self.k[li].copy_prefix_from(&src.k[li], n)?;
            self.v[li].copy_prefix_from(&src.v[li], n)?;
        }
        self.intact_from = src.intact_from;
        self.len = len;
        Ok(())
    }

    /// Keeps entries `0..start`, then `start + keep[k]` moved to `start + k`.
    pub fn keep_entries(&mut self, start: usize, keep: &[u32]) -> Result<(), String> {
        let kv_dim = self.kv_dim;
        coordgen_interface::checks::check_keep(self.len, start, keep)?;
        for (li, layer) in self.k.iter_mut().enumerate().chain(self.v.iter_mut().enumerate()) {
            let cap = self.ring[li];
            for (dst, &src) in keep.iter().enumerate() {
                let (d, s) = (start + dst, start + src as usize);
                if d == s {
                    continue;
                }
                if cap == 0 {
                    layer.copy_within(s * kv_dim..(s + 1) * kv_dim, d * kv_dim);
                } else {
                    // Both copies of the entry (see the type's note on rings).
                    let (sr, dr) = (s % cap, d % cap);
                    layer.copy_within(sr * kv_dim..(sr + 1) * kv_dim, dr * kv_dim);
                    layer.copy_within(sr * kv_dim..(sr + 1) * kv_dim, (dr + cap) * kv_dim);
                }
            }
        }
        self.len = start + keep.len();
        Ok(())
    }
}
