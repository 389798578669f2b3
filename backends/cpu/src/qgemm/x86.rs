//! The x86_64 kernels: AVX2 and AVX-512 VNNI dot products over unpacked rows and over the
//! load-time packed layout, with activation quantization's SIMD twin.

use super::*;
use std::arch::x86_64::*;
use std::sync::OnceLock;

pub fn has_vnni() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
            && crate::simd::isa_override() != "avx2"
    })
}

pub fn has_avx512bw() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && !matches!(crate::simd::isa_override(), "avx2" | "scalar"))
}

/// SIMD twin of [`quantize_block`](super::quantize_block): the same multiply, the same
/// rounding (truncate, then step away from zero when the exact remainder is >= 0.5) and
/// exact integer sums, so the bytes and scales are bitwise the scalar ones.
///
/// # Safety
/// The CPU must support AVX-512 F/BW; `x` must hold block `b` and the slices one token's
/// padded buffers.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_block_avx512(x: &[f32], b: usize, hi: &mut [i8], lo: &mut [i8], sc: &mut [f32], ds: &mut [f32], bits: ActBits) {
    let qmax = if bits == ActBits::Eight { 127.0 } else { QA_MAX };
    let xb = &x[b * 32..b * 32 + 32];
    let v = [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))];
    // max(|x|) is exact in any order; NaN lanes are ignored, as `f32::max` does.
    let abs_ord = |x: __m512| _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x), _mm512_abs_ps(x));
    let qm = _mm512_set1_epi32(qmax as i32);
    let one = _mm512_set1_epi32(1);
    let tile_base = (b * 32 / TILE) * TILE;
    let within = b * 32 % TILE;
    for hf in 0..2 {
        // One scale per 16 values (one group), as the scalar quantizer.
        let d = _mm512_reduce_max_ps(abs_ord(v[hf])) / qmax;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let y = _mm512_mul_ps(v[hf], _mm512_set1_ps(id));
        let tr = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let frac = _mm512_sub_ps(y, tr);
        let mut q = _mm512_cvttps_epi32(y);
        // NaN: the scalar `as i32` gives 0.
        q = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y), q);
        q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5)), q, one);
        q = _mm512_mask_sub_epi32(q, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(frac, _mm512_set1_ps(-0.5)), q, one);
        q = _mm512_max_epi32(_mm512_min_epi32(q, qm), _mm512_sub_epi32(_mm512_setzero_si512(), qm));
        let sum = _mm512_reduce_add_epi32(q);
        let (hb, lb) = if bits == ActBits::Eight {
            (_mm512_cvtepi32_epi8(q), _mm_setzero_si128())
        } else {
            (_mm512_cvtepi32_epi8(_mm512_srai_epi32::<7>(q)), _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(127))))
        };
        let (mut hbytes, mut lbytes) = ([0u32; 4], [0u32; 4]);
        _mm_storeu_si128(hbytes.as_mut_ptr() as *mut __m128i, hb);
        _mm_storeu_si128(lbytes.as_mut_ptr() as *mut __m128i, lb);
        // 16 values = one group: bytes 4v..4v+4 go to tile offset v*64 + g*4.
        let g = (within + hf * 16) / 16;
        for vv in 0..4 {
            let pos = tile_base + vv * 64 + g * 4;
            (hi.as_mut_ptr().add(pos) as *mut u32).write_unaligned(hbytes[vv]);
            if bits != ActBits::Eight {
                (lo.as_mut_ptr().add(pos) as *mut u32).write_unaligned(lbytes[vv]);
            }
        }
        sc[b * 2 + hf] = d;
        ds[b * 2 + hf] = d * sum as f32;
    }
}

/// [`reduce16`]'s tree in registers (same additions in the same order, so the same
/// bits): lanes i + 8, then i + 4, then i + 2, then i + 1.
///
/// # Safety
/// Call only from functions with AVX-512 F enabled.
#[inline(always)]
unsafe fn reduce512(v: __m512) -> f32 {
    // (extractf64x4 is AVX-512 F; extractf32x8 would need DQ, not enabled here.)
    let a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
}

/// Where a kernel gets each tile's four weight vectors and 16 group scales and biases:
/// an unpacked row (loads) or a packed file row (expanded in registers).
pub trait TileSrc: Copy {
    /// # Safety
    /// AVX-512 F/BW must be enabled in the caller; `tile` must be in the row.
    unsafe fn tile(self, tile: usize) -> ([__m512i; 4], __m512, __m512);
    fn kp(self) -> usize;
    /// Whether `tile` computes (expands packed bits) rather than only loads: then more
    /// than 4 tokens run [`tiles_outer_vnni`], which expands each tile once. Loading an
    /// unpacked tile again per 4 tokens saves nothing to trade for the accumulators'
    /// round trips through memory.
    const EXPANDS: bool;
}

impl TileSrc for &URow {
    #[inline(always)]
    unsafe fn tile(self, tile: usize) -> ([__m512i; 4], __m512, __m512) {
        let wq = self.q.as_ptr().add(tile * TILE);
        let w = [0, 1, 2, 3].map(|v| _mm512_loadu_si512(wq.add(v * 64) as *const _));
        (w, _mm512_loadu_ps(self.scale16.as_ptr().add(tile * 16)), _mm512_loadu_ps(self.bias16.as_ptr().add(tile * 16)))
    }
    fn kp(self) -> usize {
        self.q.len()
    }
    const EXPANDS: bool = false;
}

/// Packed row formats, as the const parameter of [`Packed`]: each format gets its own
/// kernel instance, so the per-tile expansion has no branch on the type (measured on one
/// Zen 4 core, in cache: a Q4_K tile took 14 ns with a run-time Q4_K/Q6_K flag, 8 ns
/// without; a run-time match over all formats made 1.5B decode a third slower).
pub mod fmt {
    pub const Q4K: u8 = 0;
    pub const Q6K: u8 = 1;
    pub const Q4_0: u8 = 2;
    pub const Q4_1: u8 = 3;
    pub const Q5_0: u8 = 4;
    pub const Q5_1: u8 = 5;
    pub const Q8_0: u8 = 6;
}

/// The type of packed format `F`.
#[inline(always)]
pub const fn fmt_type(f: u8) -> GgmlType {
    match f {
        fmt::Q4K => GgmlType::Q4K,
        fmt::Q6K => GgmlType::Q6K,
        fmt::Q4_0 => GgmlType::Q4_0,
        fmt::Q4_1 => GgmlType::Q4_1,
        fmt::Q5_0 => GgmlType::Q5_0,
        fmt::Q5_1 => GgmlType::Q5_1,
        _ => GgmlType::Q8_0,
    }
}

/// A row in the load-time packed layout of [`crate::repack`], of format `F` ([`fmt`]).
#[derive(Clone, Copy)]
pub struct Packed<const F: u8> {
    pub ptr: *const u8,
    /// The row's length padded to whole tiles.
    pub k: usize,
    /// The row's length (32-weight block types may end in a partial tile).
    pub cols: usize,
    /// Bytes from this row to the one to prefetch (into L2) while this row computes
    /// (the compute between loads otherwise leaves too few misses in flight to stream
    /// from memory at full speed). 0 = none.
    pub ahead: usize,
}

impl<const F: u8> Packed<F> {
    pub fn new(ptr: *const u8, cols: usize, ahead: usize) -> Self {
        Packed { ptr, k: cols.div_ceil(TILE) * TILE, cols, ahead }
    }

    /// Prefetches (into L2) `lines` cache lines from `ahead` bytes past `at`.
    #[inline(always)]
    unsafe fn prefetch(self, at: *const u8, lines: usize) {
        if self.ahead > 0 {
            let pf = at.wrapping_add(self.ahead);
            for l in 0..lines {
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(l * 64) as *const i8);
            }
        }
    }
}

impl<const F: u8> TileSrc for Packed<F> {
    // No closures here: a closure would not inherit the caller's target features, and
    // its intrinsics would become calls.
    #[inline(always)]
    unsafe fn tile(self, tile: usize) -> ([__m512i; 4], __m512, __m512) {
        let m = _mm512_set1_epi8(0x0F);
        // Every format stores tile `t` at `t` times its tile bytes (the 32-weight block
        // types' partial last tile included).
        let ty = fmt_type(F);
        let tile_bytes = TILE / ty.block_size() * ty.block_bytes();
        let blk = self.ptr.add(tile * tile_bytes);
        self.prefetch(blk, tile_bytes.div_ceil(64));
        match F {
            fmt::Q6K => {
                let n0 = _mm512_loadu_si512(blk as *const _);
                let n1 = _mm512_loadu_si512(blk.add(64) as *const _);
                let h = _mm512_loadu_si512(blk.add(128) as *const _);
                // Masked before shifting, so no bit crosses into the neighbouring byte.
                let h0 = _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(0x03)), 4);
                let h1 = _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(0x0C)), 2);
                let h2 = _mm512_and_si512(h, _mm512_set1_epi8(0x30));
                let h3 = _mm512_srli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(0xC0u8 as i8)), 2);
                let w = [
                    _mm512_or_si512(_mm512_and_si512(n0, m), h0),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(n0, 4), m), h1),
                    _mm512_or_si512(_mm512_and_si512(n1, m), h2),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(n1, 4), m), h3),
                ];
                let (s, b) = crate::unpack_x86::q6k_scales(blk);
                (w, s, b)
            }
            fmt::Q4K => {
                let n0 = _mm512_loadu_si512(blk.add(16) as *const _);
                let n1 = _mm512_loadu_si512(blk.add(80) as *const _);
                let w = [
                    _mm512_and_si512(n0, m),
                    _mm512_and_si512(_mm512_srli_epi16(n0, 4), m),
                    _mm512_and_si512(n1, m),
                    _mm512_and_si512(_mm512_srli_epi16(n1, 4), m),
                ];
                let (s, b) = crate::unpack_x86::k4_packed_scales(blk);
                (w, s, b)
            }
            _ => crate::unpack_x86::small_packed_tile(ty, self.ptr, self.cols, tile),
        }
    }
    fn kp(self) -> usize {
        self.k
    }
    const EXPANDS: bool = true;
}

/// Expands a packed row into the unpacked form (the stores of the fused kernels' loads).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI and F16C; `src` must hold a packed row of `ty`
/// of `row.k` weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn unpack_packed(ty: GgmlType, src: &[u8], row: &mut URow) {
    by_format!(ty, F => unpack_packed_as(Packed::<F>::new(src.as_ptr(), row.k, 0), row))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn unpack_packed_as<const F: u8>(p: Packed<F>, row: &mut URow) {
    for tile in 0..p.k / TILE {
        let (w, sc, bi) = p.tile(tile);
        for (v, wv) in w.iter().enumerate() {
            _mm512_storeu_si512(row.q.as_mut_ptr().add(tile * TILE + v * 64) as *mut _, *wv);
        }
        _mm512_storeu_ps(row.scale16.as_mut_ptr().add(tile * 16), sc);
        _mm512_storeu_ps(row.bias16.as_mut_ptr().add(tile * 16), bi);
    }
}

/// AVX-512 VNNI; up to 4 tokens share each weight tile.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI ([`has_vnni`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn dot_tokens_vnni(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
    let o = out.as_mut_ptr();
    tokens_vnni::<1, _>([row], acts, t0, t1, [o]);
}

/// AVX-512 VNNI over two weight rows at once: each activation vector is loaded once for
/// both rows, which halves the activation traffic from L2 (the bound at widths >= 4).
/// `out0[i]` / `out1[i]` get token `t0 + i` of `row0` / `row1`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI ([`has_vnni`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn dot_tokens_vnni2(row0: &URow, row1: &URow, acts: &QActs, t0: usize, t1: usize, out0: &mut [f32], out1: &mut [f32]) {
    debug_assert_eq!(row0.q.len(), row1.q.len());
    tokens_vnni::<2, _>([row0, row1], acts, t0, t1, [out0.as_mut_ptr(), out1.as_mut_ptr()]);
}

/// As [`dot_tokens_vnni2`] straight from two packed rows (no unpacked copy).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; each row must be a packed row of `acts.k`
/// weights, and each output hold `t1 - t0` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn dot_packed_vnni<const R: usize, const F: u8>(rows: [Packed<F>; R], acts: &QActs, t0: usize, t1: usize, out: [*mut f32; R]) {
    tokens_vnni::<R, Packed<F>>(rows, acts, t0, t1, out);
}

/// Rows `r0..r1` of a packed matrix (`rb` bytes per row from `base`) for all tokens of
/// `acts`, two rows at a time, in one call: `out[(r - r0) * acts.n + t]`. Each result is
/// bitwise [`dot_packed_vnni`]'s.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; `base` must hold `r1 * rb` bytes of packed
/// rows of `acts.k` weights of `ty`, and `out` `(r1 - r0) * acts.n` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn packed_rows_vnni(ty: GgmlType, base: *const u8, rb: usize, r0: usize, r1: usize, acts: &QActs, out: *mut f32) {
    by_format!(ty, F => packed_rows_as::<F>(base, rb, r0, r1, acts, out))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn packed_rows_as<const F: u8>(base: *const u8, rb: usize, r0: usize, r1: usize, acts: &QActs, out: *mut f32) {
    let n = acts.n;
    let row = |r: usize, ahead: usize| Packed::<F>::new(base.add(r * rb), acts.k, ahead);
    let mut r = r0;
    while r + 1 < r1 {
        // Prefetch rows PREFETCH_ROWS ahead into L2 while this pair computes (past the
        // matrix's end this only wastes a hint: prefetches never fault).
        let o = out.add((r - r0) * n);
        let ahead = PREFETCH_ROWS * rb;
        tokens_vnni::<2, Packed<F>>([row(r, ahead), row(r + 1, ahead)], acts, 0, n, [o, o.add(n)]);
        r += 2;
    }
    if r < r1 {
        tokens_vnni::<1, Packed<F>>([row(r, 0)], acts, 0, n, [out.add((r - r0) * n)]);
    }
}

/// Tokens `t0..t1` of `R` rows. Up to 4 tokens keep their accumulators in registers
/// ([`tile_vnni`]); more tokens of packed rows run [`tiles_outer_vnni`], which expands
/// each weight tile once for all of them. Both make the same operations per (row,
/// token), so the split never changes a result.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tokens_vnni<const R: usize, S: TileSrc>(rows: [S; R], acts: &QActs, t0: usize, t1: usize, out: [*mut f32; R]) {
    let mut t = t0;
    while t < t1 {
        let o = out.map(|p| p.add(t - t0));
        let n = (t1 - t).min(if S::EXPANDS { OUTER_ACCS / R } else { 4 });
        match n {
            5.. => tiles_outer_vnni::<R, S>(rows, acts, t, t + n, o),
            4 => tile_vnni::<R, 4, S>(rows, acts, t, o),
            3 => tile_vnni::<R, 3, S>(rows, acts, t, o),
            2 => tile_vnni::<R, 2, S>(rows, acts, t, o),
            _ => tile_vnni::<R, 1, S>(rows, acts, t, o),
        }
        t += n;
    }
}

/// Accumulators (rows x tokens) of one [`tiles_outer_vnni`] call: 4 KB, in L1 beside the
/// activations of one tile of its tokens.
const OUTER_ACCS: usize = 64;

/// Tile `tile` of each of `R` rows: weight vectors, group scales, group biases.
#[inline(always)]
unsafe fn row_tiles<const R: usize, S: TileSrc>(rows: [S; R], tile: usize) -> ([[__m512i; 4]; R], [__m512; R], [__m512; R]) {
    let mut w = [[_mm512_setzero_si512(); 4]; R];
    let mut ws = [_mm512_setzero_ps(); R];
    let mut wb = [_mm512_setzero_ps(); R];
    for r in 0..R {
        (w[r], ws[r], wb[r]) = rows[r].tile(tile);
    }
    (w, ws, wb)
}

/// A token's activation vectors, scales and group sums at one tile.
struct TokenTile {
    hv: [__m512i; 4],
    lo: *const i8,
    sa: __m512,
    da: __m512,
}

#[inline(always)]
unsafe fn token_tile(acts: &QActs, t: usize, tile: usize) -> TokenTile {
    let off = t * acts.kp + tile * TILE;
    let h = acts.hi.as_ptr().add(off);
    let g = t * acts.kp / 16 + tile * 16;
    TokenTile {
        hv: [0, 1, 2, 3].map(|v| _mm512_loadu_si512(h.add(v * 64) as *const _)),
        lo: acts.lo.as_ptr().add(off),
        sa: _mm512_loadu_ps(acts.scale16.as_ptr().add(g)),
        da: _mm512_loadu_ps(acts.dsum16.as_ptr().add(g)),
    }
}

/// One (row, token) pair of a tile: the exact integer group sums of the row's four
/// weight vectors `w` against the token's activations, then the oracle's float steps
/// into `acc`. `split`: (15-bit only) independent chains, for callers with little other
/// work in flight; integer addition is exact, so the sums are the same either way.
#[inline(always)]
unsafe fn pair_step(w: &[__m512i; 4], ws: __m512, wb: __m512, a: &TokenTile, eight: bool, split: bool, acc: __m512) -> __m512 {
    let z = _mm512_setzero_si512();
    let hv = &a.hv;
    let lo = |v: usize| _mm512_loadu_si512(a.lo.add(v * 64) as *const _);
    let isum = if eight {
        let h01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[0], hv[0]), w[1], hv[1]);
        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(h01, w[2], hv[2]), w[3], hv[3])
    } else if split {
        let h01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[0], hv[0]), w[1], hv[1]);
        let h23 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[2], hv[2]), w[3], hv[3]);
        let l01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[0], lo(0)), w[1], lo(1));
        let l23 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w[2], lo(2)), w[3], lo(3));
        _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h01, h23), 7), _mm512_add_epi32(l01, l23))
    } else {
        // One chain, fewest instructions (the shifted high-byte sums seed the low-byte
        // chain).
        let mut acc_i = _mm512_dpbusd_epi32(z, w[0], hv[0]);
        acc_i = _mm512_dpbusd_epi32(acc_i, w[1], hv[1]);
        acc_i = _mm512_dpbusd_epi32(acc_i, w[2], hv[2]);
        acc_i = _mm512_dpbusd_epi32(acc_i, w[3], hv[3]);
        acc_i = _mm512_slli_epi32(acc_i, 7);
        acc_i = _mm512_dpbusd_epi32(acc_i, w[0], lo(0));
        acc_i = _mm512_dpbusd_epi32(acc_i, w[1], lo(1));
        acc_i = _mm512_dpbusd_epi32(acc_i, w[2], lo(2));
        _mm512_dpbusd_epi32(acc_i, w[3], lo(3))
    };
    let s = _mm512_mul_ps(ws, a.sa);
    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc);
    _mm512_fmadd_ps(wb, a.da, acc)
}

/// `R` rows x `N` tokens: per tile, each row's four weight vectors stay in registers and
/// each token's activation vectors are read once for all `R` rows. Every (row, token)
/// pair goes through the same integer chain and float steps as the scalar oracle.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile_vnni<const R: usize, const N: usize, S: TileSrc>(rows: [S; R], acts: &QActs, t: usize, out: [*mut f32; R]) {
    let kp = rows[0].kp();
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let eight = acts.bits == ActBits::Eight;
    for tile in 0..kp / TILE {
        let (w, ws, wb) = row_tiles(rows, tile);
        for j in 0..N {
            let a = token_tile(acts, t + j, tile);
            for r in 0..R {
                acc[r][j] = pair_step(&w[r], ws[r], wb[r], &a, eight, R * N <= 2, acc[r][j]);
            }
        }
    }
    for r in 0..R {
        for j in 0..N {
            *out[r].add(j) = reduce512(acc[r][j]);
        }
    }
}

/// As [`tile_vnni`] for `t1 - t0` tokens (at most [`OUTER_ACCS`] / `R`), with the tile
/// loop outside the token loop: each weight tile is expanded once for all the tokens,
/// and the accumulators live in an L1 buffer instead of registers. Expanding a packed
/// tile costs about as much as 1.7 tokens' dot products (one Zen 4 core, in cache: Q4_K
/// 5.0 ns per tile at 1 token, 10.6 at 4), which the 4-token kernel paid again for every
/// 4 tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tiles_outer_vnni<const R: usize, S: TileSrc>(rows: [S; R], acts: &QActs, t0: usize, t1: usize, out: [*mut f32; R]) {
    let n = t1 - t0;
    assert!(R * n <= OUTER_ACCS);
    let mut buf = [std::mem::MaybeUninit::<__m512>::uninit(); OUTER_ACCS];
    let acc = buf.as_mut_ptr() as *mut __m512;
    for i in 0..R * n {
        acc.add(i).write(_mm512_setzero_ps());
    }
    let eight = acts.bits == ActBits::Eight;
    for tile in 0..rows[0].kp() / TILE {
        let (w, ws, wb) = row_tiles(rows, tile);
        for j in 0..n {
            let a = token_tile(acts, t0 + j, tile);
            for r in 0..R {
                let p = acc.add(r * n + j);
                *p = pair_step(&w[r], ws[r], wb[r], &a, eight, false, *p);
            }
        }
    }
    for r in 0..R {
        for j in 0..n {
            *out[r].add(j) = reduce512(*acc.add(r * n + j));
        }
    }
}

/// AVX2: each group's integer sum through 16-bit multiplies (exact for bytes up to 255),
/// then the same float steps as the other paths on two 8-lane halves.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_tokens_avx2(row: &URow, acts: &QActs, t0: usize, t1: usize, out: &mut [f32]) {
    let kp = row.q.len();
    for t in t0..t1 {
        let (hi, lo, sa, ds) = acts.row(t);
        let mut acc = [_mm256_setzero_ps(); 2];
        for tile in 0..kp / TILE {
            let off = tile * TILE;
            for half in 0..2 {
                // Lanes = groups 8*half .. 8*half+8.
                let mut sh = _mm256_setzero_si256();
                let mut sl = _mm256_setzero_si256();
                for v in 0..4 {
                    let p = off + v * 64 + half * 32;
                    let w = _mm256_loadu_si256(row.q.as_ptr().add(p) as *const __m256i);
                    let wl = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w));
                    let wh = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1));
                    let ah = _mm256_loadu_si256(hi.as_ptr().add(p) as *const __m256i);
                    let al = _mm256_loadu_si256(lo.as_ptr().add(p) as *const __m256i);
                    // madd gives pairs; hadd of the two halves' pair sums gives 4-byte lanes
                    // in the order [0..4 of lo-half, 0..4 of hi-half] per 128-bit lane.
                    let ph0 = _mm256_madd_epi16(wl, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(ah)));
                    let ph1 = _mm256_madd_epi16(wh, _mm256_cvtepi8_epi16(_mm256_extracti128_si256(ah, 1)));
                    let pl0 = _mm256_madd_epi16(wl, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(al)));
                    let pl1 = _mm256_madd_epi16(wh, _mm256_cvtepi8_epi16(_mm256_extracti128_si256(al, 1)));
                    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]:
                    // groups [0,1,4,5 | 2,3,6,7]; fixed below with a permute.
                    sh = _mm256_add_epi32(sh, _mm256_hadd_epi32(ph0, ph1));
                    sl = _mm256_add_epi32(sl, _mm256_hadd_epi32(pl0, pl1));
                }
                let fix = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
                let sh = _mm256_permutevar8x32_epi32(sh, fix);
                let sl = _mm256_permutevar8x32_epi32(sl, fix);
                let isum = if acts.bits == ActBits::Eight { sh } else { _mm256_add_epi32(_mm256_slli_epi32(sh, 7), sl) };
                let gi = tile * 16 + half * 8;
                let s = _mm256_mul_ps(_mm256_loadu_ps(row.scale16.as_ptr().add(gi)), _mm256_loadu_ps(sa.as_ptr().add(gi)));
                acc[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc[half]);
                acc[half] = _mm256_fmadd_ps(_mm256_loadu_ps(row.bias16.as_ptr().add(gi)), _mm256_loadu_ps(ds.as_ptr().add(gi)), acc[half]);
            }
        }
        let mut l = [0f32; 16];
        _mm256_storeu_ps(l.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(l.as_mut_ptr().add(8), acc[1]);
        out[t - t0] = reduce16(&l);
    }
}
