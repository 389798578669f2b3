//! ggml tensor types: block layouts (`#[repr(C)]` with size asserts), scalar dequantizers
//! that serve as the reference for every SIMD kernel, and simple quantizers used to write
//! synthetic test models and to check round trips.

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

pub const QK: usize = 32;
pub const QK_K: usize = 256;

#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// Size of the field `f` points at (for [`field!`]: the field's byte length).
const fn field_size<T, F>(_f: fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// The bytes of field `$f` of block struct `$B` within one block's bytes `$b`: the offsets
/// the dequantizers and quantizers read and write come from the `repr(C)` structs above.
macro_rules! field {
    ($b:expr, $B:ty, $f:ident) => {{
        const START: usize = std::mem::offset_of!($B, $f);
        const END: usize = START + field_size(|x: &$B| &x.$f);
        &$b[START..END]
    }};
}

/// The f16 field `$f` of block struct `$B` in block bytes `$b`, as f32.
macro_rules! f16_field {
    ($b:expr, $B:ty, $f:ident) => {
        f16_at($b, std::mem::offset_of!($B, $f))
    };
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
        }
    }
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => QK,
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
            Self::Q4_1 => std::mem::size_of::<BlockQ4_1>(),
            Self::Q5_0 => std::mem::size_of::<BlockQ5_0>(),
            Self::Q5_1 => std::mem::size_of::<BlockQ5_1>(),
            Self::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            Self::Q4K => std::mem::size_of::<BlockQ4K>(),
            Self::Q5K => std::mem::size_of::<BlockQ5K>(),
            Self::Q6K => std::mem::size_of::<BlockQ6K>(),
        }
    }
    /// Bytes taken by a row of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.block_bytes()
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block, 6 bits each.
#[inline]
pub fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantizes a row: `src` holds `out.len()` elements of type `ty`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let bs = ty.block_size();
    let bb = ty.block_bytes();
    assert_eq!(out.len() % bs, 0, "row length must be a multiple of the block size");
    assert!(src.len() >= out.len() / bs * bb, "source too short for {} elements", out.len());
    for (b, o) in out.chunks_exact_mut(bs).enumerate() {
        dequantize_block(ty, &src[b * bb..(b + 1) * bb], o);
    }
}

/// Dequantizes one block (`out.len() == ty.block_size()`).
pub fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16_at(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_field!(b, BlockQ4_0, d);
            let qs = field!(b, BlockQ4_0, qs);
            for j in 0..16 {
                y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_field!(b, BlockQ4_1, d);
            let m = f16_field!(b, BlockQ4_1, m);
            let qs = field!(b, BlockQ4_1, qs);
            for j in 0..16 {
                y[j] = (qs[j] & 0xF) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = f16_field!(b, BlockQ5_0, d);
            let h = field!(b, BlockQ5_0, qh);
            let qh = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let qs = field!(b, BlockQ5_0, qs);
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }
        GgmlType::Q5_1 => {
            let d = f16_field!(b, BlockQ5_1, d);
            let m = f16_field!(b, BlockQ5_1, m);
            let h = field!(b, BlockQ5_1, qh);
            let qh = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let qs = field!(b, BlockQ5_1, qs);
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((qs[j] & 0xF) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_field!(b, BlockQ8_0, d);
            let qs = field!(b, BlockQ8_0, qs);
            for j in 0..32 {
                y[j] = (qs[j] as i8) as f32 * d;
            }
        }
        GgmlType::Q4K => {
            let d = f16_field!(b, BlockQ4K, d);
            let dmin = f16_field!(b, BlockQ4K, dmin);
            let scales = field!(b, BlockQ4K, scales);
            let qs = field!(b, BlockQ4K, qs);
            for c in 0..4 {
                let (s1, m1) = k_scale_min(2 * c, scales);
                let (s2, m2) = k_scale_min(2 * c + 1, scales);
                let (d1, mm1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * s2 as f32, dmin * m2 as f32);
                let q = &qs[c * 32..c * 32 + 32];
                for l in 0..32 {
                    y[c * 64 + l] = d1 * (q[l] & 0xF) as f32 - mm1;
                    y[c * 64 + 32 + l] = d2 * (q[l] >> 4) as f32 - mm2;
                }
            }
        }
        GgmlType::Q5K => {
            let d = f16_field!(b, BlockQ5K, d);
            let dmin = f16_field!(b, BlockQ5K, dmin);
            let scales = field!(b, BlockQ5K, scales);
            let qh = field!(b, BlockQ5K, qh);
            let qs = field!(b, BlockQ5K, qs);
            for c in 0..4 {
                let (s1, m1) = k_scale_min(2 * c, scales);
                let (s2, m2) = k_scale_min(2 * c + 1, scales);
                let (d1, mm1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * s2 as f32, dmin * m2 as f32);
                let u1 = 1u8 << (2 * c);
                let u2 = 2u8 << (2 * c);
                let q = &qs[c * 32..c * 32 + 32];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[c * 64 + l] = d1 * ((q[l] & 0xF) + h1) as f32 - mm1;
                    y[c * 64 + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - mm2;
                }
            }
        }
        GgmlType::Q6K => {
            let ql = field!(b, BlockQ6K, ql);
            let qh = field!(b, BlockQ6K, qh);
            let sc = field!(b, BlockQ6K, scales);
            let d = f16_field!(b, BlockQ6K, d);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[n * 64..], &qh[n * 32..], &sc[n * 8..]);
                let y = &mut y[n * 128..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Quantizes a row (length a multiple of the block size). These are straightforward
/// round-to-nearest quantizers for tests and synthetic models, not tuned for quality.
pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let bs = ty.block_size();
    assert_eq!(x.len() % bs, 0);
    let mut out = Vec::with_capacity(ty.row_bytes(x.len()));
    for blk in x.chunks_exact(bs) {
        quantize_block(ty, blk, &mut out);
    }
    out
}

fn amax_signed(x: &[f32]) -> f32 {
    // The value with the largest magnitude, keeping its sign (as ggml does).
    x.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn quantize_block(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    match ty {
        GgmlType::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => put_f16(out, x[0]),
        GgmlType::BF16 => out.extend_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let (levels, off) = if ty == GgmlType::Q4_0 { (-8.0, 8.5) } else { (-16.0, 16.5) };
            let maxq = if ty == GgmlType::Q4_0 { 15 } else { 31 };
            let d = amax_signed(x) / levels;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<u8> = x.iter().map(|v| ((v * id + off) as i32).clamp(0, maxq) as u8).collect();
            put_f16(out, d);
            pack_codes(&q, ty == GgmlType::Q5_0, out);
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let maxq = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
            let mn = x.iter().copied().fold(f32::INFINITY, f32::min);
            let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (mx - mn) / maxq;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<u8> = x.iter().map(|v| (((v - mn) * id + 0.5) as i32).clamp(0, maxq as i32) as u8).collect();
            put_f16(out, d);
            put_f16(out, mn);
            pack_codes(&q, ty == GgmlType::Q5_1, out);
        }
        GgmlType::Q8_0 => {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(out, d);
            for v in x {
                out.push(((v * id).round() as i32).clamp(-127, 127) as i8 as u8);
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => quantize_k45(ty, x, out),
        GgmlType::Q6K => quantize_q6k(x, out),
    }
}

/// Writes 32 codes of a legacy block: the 5th bits as a u32 first when `five`, then
/// element j in the low nibble and element j+16 in the high nibble of byte j.
fn pack_codes(q: &[u8], five: bool, out: &mut Vec<u8>) {
    if five {
        let qh = (0..32).fold(0u32, |h, j| h | ((((q[j] >> 4) & 1) as u32) << j));
        out.extend_from_slice(&qh.to_le_bytes());
    }
    for j in 0..16 {
        out.push((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
    }
}

fn quantize_k45(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    let maxq = if ty == GgmlType::Q4K { 15.0 } else { 31.0 };
    // Per 32-element sub-block: scale and (non-negative) min, then 6-bit codes for both.
    let mut sc = [0f32; 8];
    let mut mn = [0f32; 8];
    for j in 0..8 {
        let s = &x[j * 32..j * 32 + 32];
        let lo = s.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
        let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        sc[j] = (hi - lo) / maxq;
        mn[j] = -lo;
    }
    let max_sc = sc.iter().copied().fold(0.0, f32::max);
    let max_mn = mn.iter().copied().fold(0.0, f32::max);
    let d = max_sc / 63.0;
    let dmin = max_mn / 63.0;
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = if d > 0.0 { ((sc[j] / d).round() as i32).clamp(0, 63) as u8 } else { 0 };
        lm[j] = if dmin > 0.0 { ((mn[j] / dmin).round() as i32).clamp(0, 63) as u8 } else { 0 };
    }
    let mut scales = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            scales[j - 4] |= (ls[j] >> 4) << 6;
            scales[j] |= (lm[j] >> 4) << 6;
        }
    }
    let dh = f16::from_f32(d).to_f32();
    let dminh = f16::from_f32(dmin).to_f32();
    let mut q = [0u8; 256];
    for j in 0..8 {
        let (s, m) = k_scale_min(j, &scales);
        let dd = dh * s as f32;
        let mm = dminh * m as f32;
        for l in 0..32 {
            let v = x[j * 32 + l];
            q[j * 32 + l] = if dd > 0.0 { (((v + mm) / dd).round() as i32).clamp(0, maxq as i32) as u8 } else { 0 };
        }
    }
    put_f16(out, d);
    put_f16(out, dmin);
    out.extend_from_slice(&scales);
    if ty == GgmlType::Q5K {
        let mut qh = [0u8; 32];
        for c in 0..4 {
            for l in 0..32 {
                if q[c * 64 + l] & 16 != 0 {
                    qh[l] |= 1 << (2 * c);
                }
                if q[c * 64 + 32 + l] & 16 != 0 {
                    qh[l] |= 2 << (2 * c);
                }
            }
        }
        out.extend_from_slice(&qh);
    }
    for c in 0..4 {
        for l in 0..32 {
            out.push((q[c * 64 + l] & 0xF) | ((q[c * 64 + 32 + l] & 0xF) << 4));
        }
    }
}

fn quantize_q6k(x: &[f32], out: &mut Vec<u8>) {
    let mut sub = [0f32; 16];
    for (j, s) in sub.iter_mut().enumerate() {
        *s = amax_signed(&x[j * 16..j * 16 + 16]) / -32.0;
    }
    let max_abs = sub.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = max_abs / -128.0;
    let dh = f16::from_f32(d).to_f32();
    let mut scales = [0i8; 16];
    let mut q = [0u8; 256];
    for j in 0..16 {
        scales[j] = if d != 0.0 { ((sub[j] / d).round() as i32).clamp(-128, 127) as i8 } else { 0 };
        let dd = dh * scales[j] as f32;
        for l in 0..16 {
            let v = x[j * 16 + l];
            q[j * 16 + l] = if dd != 0.0 { ((v / dd).round() as i32 + 32).clamp(0, 63) as u8 } else { 32 };
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for n in 0..2 {
        for l in 0..32 {
            let b = n * 128;
            let (q1, q2, q3, q4) = (q[b + l], q[b + l + 32], q[b + l + 64], q[b + l + 96]);
            ql[n * 64 + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[n * 64 + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[n * 32 + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(scales.iter().map(|&s| s as u8));
    put_f16(out, d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                ((s % 20000) as f32 / 10000.0 - 1.0) * (1.0 + (i % 7) as f32 * 0.3)
            })
            .collect()
    }

    /// Round trip of every type: the dequantized row stays within the type's resolution.
    #[test]
    fn quantize_dequantize_round_trip_every_type() {
        let x = signal(1024, 7);
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for ty in GgmlType::ALL {
            let q = quantize_row(ty, &x);
            assert_eq!(q.len(), ty.row_bytes(x.len()), "{}", ty.name());
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &q, &mut y);
            let rmse = (x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / x.len() as f32).sqrt();
            let bound = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => 1e-3,
                GgmlType::BF16 => 1e-2,
                GgmlType::Q8_0 => 0.01,
                GgmlType::Q6K => 0.03,
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => 0.06,
                _ => 0.12,
            } * amax;
            assert!(rmse <= bound, "{}: rmse {rmse} > {bound}", ty.name());
            // A second round trip of already-quantized values must be nearly stable.
            let q2 = quantize_row(ty, &y);
            let mut y2 = vec![0f32; x.len()];
            dequantize_row(ty, &q2, &mut y2);
            let drift = y.iter().zip(&y2).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(drift <= bound * 2.0 + 1e-6, "{}: requantization drift {drift}", ty.name());
        }
    }

    #[test]
    fn q4_0_known_block() {
        // d = 0.5, nibbles 0..15 low and 15..0 high.
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut y = [0f32; 32];
        dequantize_block(GgmlType::Q4_0, &b, &mut y);
        assert_eq!(y[0], -4.0);
        assert_eq!(y[15], 3.5);
        assert_eq!(y[16], 3.5);
        assert_eq!(y[31], -4.0);
    }

    #[test]
    fn ids_round_trip() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        assert_eq!(GgmlType::from_id(9), None); // Q8_1 is not a storage type we accept
    }
}
