//! The scalar oracle: the plain unpacker of every quantized type and the plain dot product.
//! The SIMD twins (x86, NEON, the packed layout) must give bit for bit what these give.

use coordgen_model::quant::{k_scale_min, GgmlType};

use super::acts::ActBits;
use super::layout::*;

/// Scalar unpacker (the oracle of the SIMD twins): natural order per block, then
/// scattered into the interleaved layout.
pub fn unpack_row(ty: GgmlType, src: &[u8], row: &mut URow) {
    let k = row.k;
    let bs = ty.block_size();
    let bb = ty.block_bytes();
    let mut q = [0u8; 256];
    for b in 0..k / bs {
        let blk = &src[b * bb..(b + 1) * bb];
        let start = b * bs;
        let mut scales = [0f32; 16];
        let mut biases = [0f32; 16];
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                let d = h(blk, 0);
                let bias = match ty {
                    GgmlType::Q4_0 => {
                        for j in 0..16 {
                            q[j] = blk[2 + j] & 0xF;
                            q[j + 16] = blk[2 + j] >> 4;
                        }
                        -8.0 * d
                    }
                    GgmlType::Q4_1 => {
                        for j in 0..16 {
                            q[j] = blk[4 + j] & 0xF;
                            q[j + 16] = blk[4 + j] >> 4;
                        }
                        h(blk, 2)
                    }
                    GgmlType::Q5_0 | GgmlType::Q5_1 => {
                        let (qh_at, qs_at) = if ty == GgmlType::Q5_0 { (2, 6) } else { (4, 8) };
                        let qh = u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]);
                        for j in 0..16 {
                            q[j] = (blk[qs_at + j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                            q[j + 16] = (blk[qs_at + j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                        }
                        if ty == GgmlType::Q5_0 {
                            -16.0 * d
                        } else {
                            h(blk, 2)
                        }
                    }
                    _ => {
                        for j in 0..32 {
                            q[j] = (blk[2 + j] as i8 as i32 + 128) as u8;
                        }
                        -128.0 * d
                    }
                };
                scales[..2].fill(d);
                biases[..2].fill(bias);
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (qh, qs) = if ty == GgmlType::Q5K { (&blk[16..48], &blk[48..176]) } else { (&blk[0..0], &blk[16..144]) };
                for c in 0..4 {
                    for l in 0..32 {
                        q[c * 64 + l] = qs[c * 32 + l] & 0xF;
                        q[c * 64 + 32 + l] = qs[c * 32 + l] >> 4;
                        if ty == GgmlType::Q5K {
                            q[c * 64 + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                            q[c * 64 + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        }
                    }
                }
                k_block_scales(ty, blk, &mut scales, &mut biases);
            }
            GgmlType::Q6K => {
                for n in 0..2 {
                    let ql = &blk[n * 64..n * 64 + 64];
                    let qh = &blk[128 + n * 32..128 + n * 32 + 32];
                    for l in 0..32 {
                        q[n * 128 + l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        q[n * 128 + l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        q[n * 128 + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        q[n * 128 + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                k_block_scales(ty, blk, &mut scales, &mut biases);
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("float weights do not use the integer path"),
        }
        for i in 0..bs {
            let n = start + i;
            row.q[(n / TILE) * TILE + interleave(n % TILE)] = q[i];
        }
        for g in 0..bs / 16 {
            row.scale16[start / 16 + g] = scales[g];
            row.bias16[start / 16 + g] = biases[g];
        }
    }
}

/// The 16 group scales and biases (`w = scale * q + bias`) of a Q4_K, Q5_K or Q6_K block
/// from its header and scale bytes in the file's layout (the packed Q6_K layout of
/// [`crate::repack`] keeps them at the same offsets, so its scalar unpacker shares this;
/// the packed Q4_K layout re-encodes them).
pub fn k_block_scales(ty: GgmlType, blk: &[u8], sc: &mut [f32], bi: &mut [f32]) {
    match ty {
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (h(blk, 0), h(blk, 2));
            for j in 0..8 {
                let (s, m) = k_scale_min(j, &blk[4..16]);
                sc[2 * j..2 * j + 2].fill(d * s as f32);
                bi[2 * j..2 * j + 2].fill(-dmin * m as f32);
            }
        }
        GgmlType::Q6K => {
            let d = h(blk, 208);
            for g in 0..16 {
                let s = d * (blk[192 + g] as i8) as f32;
                sc[g] = s;
                bi[g] = -32.0 * s;
            }
        }
        _ => unreachable!("not a k-quant with 16 group scales"),
    }
}

/// The fixed reduction tree over 16 lanes that every path uses.
#[inline(always)]
pub fn reduce16(l: &[f32; 16]) -> f32 {
    let mut a = [0f32; 8];
    for i in 0..8 {
        a[i] = l[i] + l[i + 8];
    }
    let mut b = [0f32; 4];
    for i in 0..4 {
        b[i] = a[i] + a[i + 4];
    }
    let c0 = b[0] + b[2];
    let c1 = b[1] + b[3];
    c0 + c1
}

/// Scalar oracle for one token (`lo` is ignored for 8-bit activations).
pub fn dot_scalar(row: &URow, bits: ActBits, hi: &[i8], lo: &[i8], sa: &[f32], ds: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for tile in 0..row.q.len() / TILE {
        let base = tile * TILE;
        for g in 0..GROUPS {
            let (mut sh, mut sl) = (0i32, 0i32);
            for v in 0..4 {
                for e in 0..4 {
                    let p = base + v * 64 + g * 4 + e;
                    sh += row.q[p] as i32 * hi[p] as i32;
                    sl += row.q[p] as i32 * lo[p] as i32;
                }
            }
            let isum = if bits == ActBits::Eight { sh } else { (sh << 7) + sl };
            let gi = tile * GROUPS + g;
            let s = row.scale16[gi] * sa[gi];
            acc[g] = (isum as f32).mul_add(s, acc[g]);
            acc[g] = row.bias16[gi].mul_add(ds[gi], acc[g]);
        }
    }
    reduce16(&acc)
}

