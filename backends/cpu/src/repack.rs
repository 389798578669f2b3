//! Load-time repacking of quantized rows (Q4_K, Q6_K and the 32-weight block types) into the
//! kernels' tile order.
//!
//! The integer kernels want each 256-weight tile as four 64-byte vectors in the interleaved
//! order of [`crate::qgemm`] (lane `g` of a VNNI sum = group `g`). Unpacking a file row into
//! that order at run time costs an in-register transpose per tile, about as much as the dot
//! products themselves at width 1. Repacking once at load stores the same bits in that order,
//! in blocks of exactly the file's size (so the bytes read per token do not change):
//!
//! - **Q4_K** (144 bytes): d and dmin as in the file, then the eight 6-bit scales and eight
//!   6-bit mins as one little-endian 96-bit field (scale `j` at bit `6 j`, min `j` at bit
//!   `48 + 6 j`: two 64-bit loads and a variable shift decode all of them, where the file's
//!   split 4+2-bit packing costs a dozen scalar steps per block), then two 64-byte nibble
//!   vectors: byte `j` of the first holds interleaved weights `j` (low nibble) and `64 + j`
//!   (high nibble), of the second `128 + j` and `192 + j`.
//! - **Q6_K** (210 bytes): the low four bits as the two nibble vectors above (128 bytes), then
//!   64 bytes whose bit pairs `2v, 2v + 1` of byte `j` are the top two bits of interleaved
//!   weight `64 v + j`, then the 16 scales and d as in the file.
//!
//! Expanding a packed tile is a few masks and shifts with no cross-lane moves, so the fused
//! kernels expand weights in registers. [`unpack_row`] is the scalar oracle of that expansion.
//!
//! The 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are packed per tile of up to eight
//! blocks (the last tile of a row whose length is not a multiple of 256 holds fewer, `nb`);
//! each tile takes exactly its blocks' bytes in the file, at the same offset. With
//! `w = 8 nb` bytes of each interleaved vector in use (groups `0..2 nb`), a tile is:
//! - Q8_0: the four vectors' first `w` bytes, signed as in the file (`4 w`), then the `nb` d's;
//! - Q4_x/Q5_x: nibbles as above on `w`-byte halves (`2 w`: byte `j` of the first holds vector
//!   0 byte `j` low and vector 1 high, of the second vectors 2 and 3), for Q5_x the fifth bits
//!   as four `nb`-byte bit fields (bit `j` of field `v` = vector `v` byte `j`), then the `nb`
//!   d's and, for Q4_1/Q5_1, the `nb` m's.
//!
//! A packed 32-block tile expands with masked loads, a mask-add of the fifth bits and a lane
//! permute of the d's; no transpose.

use coordgen_model::quant::{k_scale_min, GgmlType};

use crate::qgemm::layout::{h, URow, TILE};
use crate::qgemm::scalar::k_block_scales;
use crate::qgemm;
use crate::simd::Isa;

/// Whether rows of `ty` are repacked at load.
pub fn supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q6K) || small_block(ty)
}

/// Whether `ty` is a 32-weight block type, packed per tile of up to eight blocks.
pub fn small_block(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0)
}

/// Where the parts of a packed 32-block tile of `nb` blocks start (see the module header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmallTile {
    /// Blocks in the tile (1..=8); `8 nb` bytes of each interleaved vector are in use.
    pub nb: usize,
    /// The fifth-bit fields (Q5_0/Q5_1 only).
    pub hbits: usize,
    /// The `nb` f16 d's.
    pub d: usize,
    /// The `nb` f16 m's (Q4_1/Q5_1 only).
    pub m: usize,
}

impl SmallTile {
    /// Layout of tile `tile` of a row of `cols` weights of `ty`, and the tile's byte offset.
    #[inline(always)]
    pub fn of(ty: GgmlType, cols: usize, tile: usize) -> (SmallTile, usize) {
        let nb = (cols / 32 - tile * 8).min(8);
        let quants = if ty == GgmlType::Q8_0 { 32 * nb } else { 16 * nb };
        let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
        let d = quants + if five { 4 * nb } else { 0 };
        (SmallTile { nb, hbits: quants, d, m: d + 2 * nb }, tile * 8 * ty.block_bytes())
    }
}

/// Repacks a whole matrix of `rows` rows of `cols` weights (the file's bytes) into a new
/// buffer of the same size, spread over `threads` scoped threads.
pub fn repack_matrix(isa: Isa, ty: GgmlType, src: &[u8], rows: usize, cols: usize, threads: usize) -> Vec<u8> {
    debug_assert!(supported(ty));
    let rb = ty.row_bytes(cols);
    assert_eq!(src.len(), rows * rb);
    let mut out = vec![0u8; src.len()];
    let per = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (ci, chunk) in out.chunks_mut(per * rb).enumerate() {
            s.spawn(move || {
                let mut row = URow::new(cols);
                for (i, dst) in chunk.chunks_exact_mut(rb).enumerate() {
                    let r = ci * per + i;
                    let file_row = &src[r * rb..(r + 1) * rb];
                    qgemm::unpack_row_isa(isa, ty, file_row, &mut row);
                    pack_row(ty, file_row, &row, dst);
                }
            });
        }
    });
    out
}

/// Writes one row in the packed layout from its file bytes and its unpacked form.
fn pack_row(ty: GgmlType, src: &[u8], row: &URow, dst: &mut [u8]) {
    if small_block(ty) {
        return pack_small_row(ty, src, row, dst);
    }
    let bb = ty.block_bytes();
    for b in 0..row.k / 256 {
        let q = &row.q[b * TILE..(b + 1) * TILE];
        let (s, d) = (&src[b * bb..(b + 1) * bb], &mut dst[b * bb..(b + 1) * bb]);
        let nib = |d: &mut [u8]| {
            for j in 0..64 {
                d[j] = (q[j] & 15) | (q[64 + j] & 15) << 4;
                d[64 + j] = (q[128 + j] & 15) | (q[192 + j] & 15) << 4;
            }
        };
        match ty {
            GgmlType::Q4K => {
                d[..4].copy_from_slice(&s[..4]);
                let mut bits = 0u128;
                for j in 0..8 {
                    let (sc, mn) = k_scale_min(j, &s[4..16]);
                    bits |= (sc as u128) << (6 * j) | (mn as u128) << (48 + 6 * j);
                }
                d[4..16].copy_from_slice(&bits.to_le_bytes()[..12]);
                nib(&mut d[16..144]);
            }
            GgmlType::Q6K => {
                nib(&mut d[..128]);
                for j in 0..64 {
                    d[128 + j] = (q[j] >> 4) | (q[64 + j] >> 4) << 2 | (q[128 + j] >> 4) << 4 | (q[192 + j] >> 4) << 6;
                }
                d[192..210].copy_from_slice(&s[192..210]);
            }
            _ => unreachable!("not a repacked type"),
        }
    }
}

/// Packs a row of a 32-weight block type, tile by tile (the unpacked `q` is already in the
/// interleaved order; Q8_0's are stored back as signed bytes).
fn pack_small_row(ty: GgmlType, src: &[u8], row: &URow, dst: &mut [u8]) {
    let bb = ty.block_bytes();
    for tile in 0..row.k.div_ceil(TILE) {
        let (l, at) = SmallTile::of(ty, row.k, tile);
        let (q, d) = (&row.q[tile * TILE..(tile + 1) * TILE], &mut dst[at..at + l.nb * bb]);
        let w = 8 * l.nb;
        if ty == GgmlType::Q8_0 {
            for v in 0..4 {
                for j in 0..w {
                    d[v * w + j] = q[v * 64 + j] ^ 0x80;
                }
            }
        } else {
            for j in 0..w {
                d[j] = q[j] & 15 | (q[64 + j] & 15) << 4;
                d[w + j] = q[128 + j] & 15 | (q[192 + j] & 15) << 4;
            }
            if matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1) {
                d[l.hbits..l.hbits + 4 * l.nb].fill(0);
                for v in 0..4 {
                    for j in 0..w {
                        d[l.hbits + v * l.nb + j / 8] |= (q[v * 64 + j] >> 4) << (j % 8);
                    }
                }
            }
        }
        for b in 0..l.nb {
            let blk = &src[at + b * bb..];
            d[l.d + 2 * b..l.d + 2 * b + 2].copy_from_slice(&blk[..2]);
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                d[l.m + 2 * b..l.m + 2 * b + 2].copy_from_slice(&blk[2..4]);
            }
        }
    }
}

/// Scalar oracle: expands a packed row into the common unpacked form (byte for byte what
/// [`qgemm::unpack_row`] gives for the file's row).
pub fn unpack_row(ty: GgmlType, src: &[u8], row: &mut URow) {
    if small_block(ty) {
        return unpack_small_row(ty, src, row);
    }
    let bb = ty.block_bytes();
    for b in 0..row.k / 256 {
        let blk = &src[b * bb..(b + 1) * bb];
        let q = &mut row.q[b * TILE..(b + 1) * TILE];
        let nibbles = if ty == GgmlType::Q4K { &blk[16..144] } else { &blk[..128] };
        for j in 0..64 {
            q[j] = nibbles[j] & 15;
            q[64 + j] = nibbles[j] >> 4;
            q[128 + j] = nibbles[64 + j] & 15;
            q[192 + j] = nibbles[64 + j] >> 4;
        }
        if ty == GgmlType::Q6K {
            for j in 0..64 {
                for v in 0..4 {
                    q[64 * v + j] |= ((blk[128 + j] >> (2 * v)) & 3) << 4;
                }
            }
        }
        let (sc, bi) = (&mut row.scale16[b * 16..b * 16 + 16], &mut row.bias16[b * 16..b * 16 + 16]);
        if ty == GgmlType::Q4K {
            let (d, dmin) = (h(blk, 0), h(blk, 2));
            let mut b16 = [0u8; 16];
            b16[..12].copy_from_slice(&blk[4..16]);
            let bits = u128::from_le_bytes(b16);
            for j in 0..8 {
                let (s, m) = ((bits >> (6 * j)) & 63, (bits >> (48 + 6 * j)) & 63);
                sc[2 * j..2 * j + 2].fill(d * s as f32);
                bi[2 * j..2 * j + 2].fill(-dmin * m as f32);
            }
        } else {
            // Q6_K's scale bytes and d are the file's, at the file's offsets.
            k_block_scales(ty, blk, sc, bi);
        }
    }
}

/// [`unpack_row`] for the 32-weight block types.
fn unpack_small_row(ty: GgmlType, src: &[u8], row: &mut URow) {
    for tile in 0..row.k.div_ceil(TILE) {
        let (l, at) = SmallTile::of(ty, row.k, tile);
        let (d, q) = (&src[at..], &mut row.q[tile * TILE..(tile + 1) * TILE]);
        let w = 8 * l.nb;
        for v in 0..4 {
            for j in 0..w {
                q[v * 64 + j] = match ty {
                    GgmlType::Q8_0 => d[v * w + j] ^ 0x80,
                    _ => (d[(v / 2) * w + j] >> (4 * (v % 2))) & 15,
                };
                if matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1) {
                    q[v * 64 + j] |= ((d[l.hbits + v * l.nb + j / 8] >> (j % 8)) & 1) << 4;
                }
            }
        }
        for b in 0..l.nb {
            let dd = h(d, l.d + 2 * b);
            let bias = match ty {
                GgmlType::Q4_0 => -8.0 * dd,
                GgmlType::Q5_0 => -16.0 * dd,
                GgmlType::Q8_0 => -128.0 * dd,
                _ => h(d, l.m + 2 * b),
            };
            let g = tile * 16 + 2 * b;
            row.scale16[g..g + 2].fill(dd);
            row.bias16[g..g + 2].fill(bias);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qgemm::{ActBits, QActs};
    use coordgen_model::quant::quantize_row;

    const PACKED: [GgmlType; 7] = [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

    /// Row lengths to test: whole tiles, and for the 32-weight block types partial last tiles
    /// of every block count that the models use or that could go wrong (1, 3 and 4 blocks).
    fn widths(ty: GgmlType) -> Vec<usize> {
        if small_block(ty) {
            vec![32, 96, 512, 896, 1536 + 32]
        } else {
            vec![256, 1536]
        }
    }

    #[test]
    fn every_packed_type_is_supported_and_keeps_its_size() {
        for ty in PACKED {
            assert!(supported(ty), "{}", ty.name());
        }
        for ty in PACKED.into_iter().filter(|&t| small_block(t)) {
            for cols in [32usize, 96, 896] {
                let tiles = cols.div_ceil(TILE);
                let (last, at) = SmallTile::of(ty, cols, tiles - 1);
                let end = at + last.nb * ty.block_bytes();
                assert_eq!(end, ty.row_bytes(cols), "{} cols {cols}", ty.name());
                let parts_end = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) { last.m } else { last.d } + 2 * last.nb;
                assert_eq!(parts_end, last.nb * ty.block_bytes(), "{} cols {cols}: parts fill the tile", ty.name());
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Packed rows expand (scalar and SIMD) to exactly the file rows' unpacked form.
    #[test]
    fn packed_rows_expand_to_the_file_rows_unpacked_form() {
        for ty in PACKED {
            for k in widths(ty) {
                let rows = 3;
                let w = crate::testdata::signal(rows * k, 9);
                let src: Vec<u8> = w.chunks(k).flat_map(|r| quantize_row(ty, r)).collect();
                let packed = repack_matrix(crate::simd::detect(), ty, &src, rows, k, 2);
                assert_eq!(packed.len(), src.len());
                let rb = ty.row_bytes(k);
                for r in 0..rows {
                    let (mut want, mut got) = (URow::new(k), URow::new(k));
                    qgemm::unpack_row(ty, &src[r * rb..(r + 1) * rb], &mut want);
                    unpack_row(ty, &packed[r * rb..(r + 1) * rb], &mut got);
                    assert_eq!(want.q, got.q, "{} row {r}", ty.name());
                    // Bits, not values: a -0 bias in the padding would be a different float.
                    assert_eq!(bits(&want.scale16), bits(&got.scale16), "{} row {r}", ty.name());
                    assert_eq!(bits(&want.bias16), bits(&got.bias16), "{} row {r}", ty.name());
                    let mut simd = URow::new(k);
                    qgemm::unpack_packed_isa(crate::simd::detect(), ty, &packed[r * rb..(r + 1) * rb], &mut simd);
                    assert_eq!(want.q, simd.q, "{} row {r} (SIMD)", ty.name());
                    assert_eq!(bits(&want.scale16), bits(&simd.scale16), "{} row {r} (SIMD)", ty.name());
                    assert_eq!(bits(&want.bias16), bits(&simd.bias16), "{} row {r} (SIMD)", ty.name());
                }
            }
        }
    }

    /// The fused kernels on packed rows give bitwise the scalar oracle's dot products on the
    /// unpacked file rows, for one and two rows, row blocks and any token range, in both
    /// activation modes.
    #[test]
    fn fused_packed_dots_equal_the_scalar_oracle() {
        let isa = crate::simd::detect();
        for (ty, k) in PACKED.into_iter().flat_map(|ty| widths(ty).into_iter().map(move |k| (ty, k))) {
            for bits in [ActBits::Fifteen, ActBits::Eight] {
                // 35 tokens: a full 32-token call of the tile-outer kernel (two rows) and a
                // 3-token tail; the ranges below add one token and seven.
                let n = 35usize;
                let w = crate::testdata::signal(3 * k, 4);
                let src: Vec<u8> = w.chunks(k).flat_map(|r| quantize_row(ty, r)).collect();
                let packed = repack_matrix(isa, ty, &src, 3, k, 1);
                let rb = ty.row_bytes(k);
                let mut acts = QActs::new();
                acts.quantize(&crate::testdata::signal(n * k, 6), n, k, bits);
                let oracle: Vec<Vec<f32>> = (0..3)
                    .map(|r| {
                        let mut row = URow::new(k);
                        qgemm::unpack_row(ty, &src[r * rb..(r + 1) * rb], &mut row);
                        (0..n)
                            .map(|t| {
                                let (hi, lo, sa, ds) = acts.row(t);
                                qgemm::dot_scalar(&row, bits, hi, lo, sa, ds)
                            })
                            .collect()
                    })
                    .collect();
                // Row blocks (pairs and an odd tail) for every token at once.
                for rows in [0..3, 1..3, 2..3] {
                    let mut out = vec![0f32; rows.len() * n];
                    qgemm::dot_packed_rows(isa, ty, &packed, rows.clone(), &acts, &mut out);
                    for (i, r) in rows.enumerate() {
                        for t in 0..n {
                            assert_eq!(out[i * n + t].to_bits(), oracle[r][t].to_bits(), "{} {bits:?} rows block, row {r} t={t}", ty.name());
                        }
                    }
                }
                let (p0, p1) = (&packed[..rb], &packed[rb..2 * rb]);
                for (t0, t1) in [(0, n), (3, 4), (1, 8)] {
                    let (mut o0, mut o1) = (vec![0f32; t1 - t0], vec![0f32; t1 - t0]);
                    qgemm::dot_packed::<2>(isa, ty, [p0, p1], &acts, t0, t1, [&mut o0, &mut o1]);
                    let mut one = vec![0f32; t1 - t0];
                    qgemm::dot_packed::<1>(isa, ty, [p1], &acts, t0, t1, [&mut one]);
                    for t in t0..t1 {
                        let name = format!("{} {bits:?} t={t}", ty.name());
                        assert_eq!(o0[t - t0].to_bits(), oracle[0][t].to_bits(), "{name} row 0");
                        assert_eq!(o1[t - t0].to_bits(), oracle[1][t].to_bits(), "{name} row 1");
                        assert_eq!(one[t - t0].to_bits(), oracle[1][t].to_bits(), "{name} row 1 alone");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::qgemm::{ActBits, QActs};
    use coordgen_model::quant::quantize_row;

    /// Not a test of speed: prints the best-of-N time of one matrix (8960 x 1536) through the
    /// unpack path and the fused packed path, for a manual look with
    /// `cargo test --release -p coordgen-backend-cpu -- --ignored --nocapture packed`.
    #[test]
    #[ignore]
    fn print_packed_vs_unpacked() {
        let isa = crate::simd::detect();
        let rows: usize = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(8960);
        let k: usize = std::env::var("K").ok().and_then(|v| v.parse().ok()).unwrap_or(1536);
        for ty in [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q5_0, GgmlType::Q8_0] {
            if k % ty.block_size() != 0 {
                continue;
            }
            let w = crate::testdata::signal(k * 64, 5);
            let src: Vec<u8> = (0..rows).flat_map(|r| quantize_row(ty, &w[(r % 64) * k..(r % 64 + 1) * k])).collect();
            let packed = repack_matrix(isa, ty, &src, rows, k, 1);
            let rb = ty.row_bytes(k);
            for n in [1usize, 2, 4, 5, 8, 16, 32] {
                let x = crate::testdata::signal(n * k, 3);
                let mut acts = QActs::new();
                let bits = if std::env::var("BITS").as_deref() == Ok("8") { ActBits::Eight } else { ActBits::Fifteen };
                acts.quantize(&x, n, k, bits);
                let mut out = vec![0f32; n];
                let mut o2 = vec![0f32; n];
                let mut dp = vec![0f32; 64 * n];
                let mut row = URow::new(k);
                let mut row2 = URow::new(k);
                let (mut best_u, mut best_p) = (f64::MAX, f64::MAX);
                for _ in 0..(7 * (1 + 20000 / rows)) {
                    let t = std::time::Instant::now();
                    for r in (0..rows).step_by(2) {
                        qgemm::unpack_row_isa(isa, ty, &src[r * rb..(r + 1) * rb], &mut row);
                        qgemm::unpack_row_isa(isa, ty, &src[(r + 1) * rb..(r + 2) * rb], &mut row2);
                        qgemm::dot_tokens2(isa, &row, &row2, &acts, 0, n, &mut out, &mut o2);
                    }
                    best_u = best_u.min(t.elapsed().as_secs_f64());
                    let t = std::time::Instant::now();
                    for r in (0..rows).step_by(64) {
                        qgemm::dot_packed_rows(isa, ty, &packed, r..(r + 64).min(rows), &acts, &mut dp);
                    }
                    best_p = best_p.min(t.elapsed().as_secs_f64());
                }
                let tiles = (rows * k / 256) as f64;
                println!("{} n={n}: unpack+dot {:.2} ns/tile, packed {:.2} ns/tile ({:.2}x)", ty.name(), best_u * 1e9 / tiles, best_p * 1e9 / tiles, best_u / best_p);
            }
        }
    }
}
