//! AVX-512 attention kernels for one work item of [`crate::attention`]: scores for 16 keys
//! per call with a fixed transpose-and-add reduction, a vectorised softmax, and the weighted
//! value sum with up to six query rows' accumulators in registers. f32 and f16 caches share
//! the code; f16 rows are widened with `vcvtph2ps` as they are loaded.
//!
//! The portable path in `attention.rs` is the oracle the tests compare against.

use std::arch::x86_64::*;

use crate::attention::TILE;
use crate::kv::KvElem;
use crate::ops::SharedMut;

/// Largest number of query rows whose value sums stay in registers together.
const MAX_ROWS: usize = 6;
/// Output dimensions per pass over the values (four registers per row).
const DIMS: usize = 64;

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<E: KvElem>(p: *const E) -> __m512 {
    if E::IS_F16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

/// Lane `k` of the result is the sum of the 16 lanes of `a[k]`, by the same addition tree
/// for every `k`: within each 128-bit chunk `(e0 + e2) + (e1 + e3)`, then across chunks
/// `(c0 + c2) + (c1 + c3)`.
#[inline]
#[allow(clippy::needless_range_loop)] // fixed-size register arrays, unrolled
#[target_feature(enable = "avx512f")]
unsafe fn reduce_16x16(a: &[__m512; 16]) -> __m512 {
    let mut t = [_mm512_setzero_ps(); 8];
    for i in 0..8 {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    let mut u = [_mm512_setzero_ps(); 4];
    for j in 0..4 {
        let (x, y) = (t[2 * j], t[2 * j + 1]);
        u[j] = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y));
    }
    let s01 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(u[0], u[1]), _mm512_shuffle_f32x4::<0xEE>(u[0], u[1]));
    let s23 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(u[2], u[3]), _mm512_shuffle_f32x4::<0xEE>(u[2], u[3]));
    _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(s01, s23), _mm512_shuffle_f32x4::<0xDD>(s01, s23))
}

/// `out[k] = scale * dot(q, keys[k])` for 16 keys of `hd` (a multiple of 16) elements.
#[inline]
#[allow(clippy::needless_range_loop)] // fixed-size register arrays, unrolled
#[target_feature(enable = "avx512f")]
unsafe fn qk_tile<E: KvElem>(q: *const f32, keys: &[*const E; TILE], hd: usize, scale: f32, out: *mut f32) {
    let q0 = _mm512_loadu_ps(q);
    let mut acc = [_mm512_setzero_ps(); 16];
    for k in 0..16 {
        acc[k] = _mm512_mul_ps(q0, load16(keys[k]));
    }
    let mut c = 16;
    while c < hd {
        let qc = _mm512_loadu_ps(q.add(c));
        for k in 0..16 {
            acc[k] = _mm512_fmadd_ps(qc, load16(keys[k].add(c)), acc[k]);
        }
        c += 16;
    }
    _mm512_storeu_ps(out, _mm512_mul_ps(reduce_16x16(&acc), _mm512_set1_ps(scale)));
}

/// `exp(x)` for `x <= 0` (inputs below -104 give 0): `2^n * p(r)` with `x = n ln 2 + r`,
/// `|r| <= ln 2 / 2`, and `p` the degree-6 Taylor polynomial (relative error ~2e-7).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// Softmax in place over `s`, summing `exp` by lane (index mod 16) then by a fixed tree.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax(s: &mut [f32]) {
    let n = s.len();
    let p = s.as_mut_ptr();
    let full = n / 16 * 16;
    let tail: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
    }
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, p.add(full)));
    let mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    let mut vsum = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mx));
        _mm512_storeu_ps(p.add(i), e);
        vsum = _mm512_add_ps(vsum, e);
    }
    let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), mx));
    _mm512_mask_storeu_ps(p.add(full), tail, e);
    vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
    for i in (0..full).step_by(16) {
        _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
    }
    _mm512_mask_storeu_ps(p.add(full), tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), inv));
}

/// Weighted value sum over ordinals `0..n` (cache positions equal ordinals) for `R` rows and
/// `D` registers of output dimensions: `out[r] = sum_o p[r][o] * v[o]`, starting from zero.
/// `v` points at position 0's first dimension of this pass; rows are `kv_dim` apart.
#[inline]
#[allow(clippy::needless_range_loop)] // fixed-size register arrays, unrolled
#[target_feature(enable = "avx512f")]
unsafe fn pv_shared<E: KvElem, const R: usize, const D: usize>(
    p: &[*const f32; R],
    v: *const E,
    kv_dim: usize,
    n: usize,
    out: &[*mut f32; R],
) {
    let mut acc = [[_mm512_setzero_ps(); D]; R];
    for o in 0..n {
        let vp = v.add(o * kv_dim);
        let mut vd = [_mm512_setzero_ps(); D];
        for d in 0..D {
            vd[d] = load16(vp.add(16 * d));
        }
        for r in 0..R {
            let pr = _mm512_set1_ps(*p[r].add(o));
            for d in 0..D {
                acc[r][d] = _mm512_fmadd_ps(pr, vd[d], acc[r][d]);
            }
        }
    }
    for r in 0..R {
        for d in 0..D {
            _mm512_storeu_ps(out[r].add(16 * d), acc[r][d]);
        }
    }
}

/// Continues one row's sum in `out` (16 dimensions at `dim`) over its remaining keys: the
/// probabilities `p[i]` of cache positions `keys[i]`.
#[target_feature(enable = "avx512f")]
unsafe fn pv_tail<E: KvElem>(p: &[f32], keys: &[usize], v: *const E, kv_dim: usize, out: *mut f32) {
    let mut acc = _mm512_loadu_ps(out);
    for (&pr, &k) in p.iter().zip(keys) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(pr), load16(v.add(k * kv_dim)), acc);
    }
    _mm512_storeu_ps(out, acc);
}

macro_rules! pv_rows {
    ($n:expr, $d:literal, $e:ty, $p:expr, $v:expr, $kv:expr, $len:expr, $out:expr) => {
        match $n {
            1 => pv_shared::<$e, 1, $d>(&[$p[0]], $v, $kv, $len, &[$out[0]]),
            2 => pv_shared::<$e, 2, $d>(&[$p[0], $p[1]], $v, $kv, $len, &[$out[0], $out[1]]),
            3 => pv_shared::<$e, 3, $d>(&[$p[0], $p[1], $p[2]], $v, $kv, $len, &[$out[0], $out[1], $out[2]]),
            4 => pv_shared::<$e, 4, $d>(&[$p[0], $p[1], $p[2], $p[3]], $v, $kv, $len, &[$out[0], $out[1], $out[2], $out[3]]),
            5 => pv_shared::<$e, 5, $d>(
                &[$p[0], $p[1], $p[2], $p[3], $p[4]],
                $v,
                $kv,
                $len,
                &[$out[0], $out[1], $out[2], $out[3], $out[4]],
            ),
            _ => pv_shared::<$e, 6, $d>(
                &[$p[0], $p[1], $p[2], $p[3], $p[4], $p[5]],
                $v,
                $kv,
                $len,
                &[$out[0], $out[1], $out[2], $out[3], $out[4], $out[5]],
            ),
        }
    };
}

/// The whole item: scores, softmax and value sums for its rows (see `attention.rs`).
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn run_item<E: KvElem>(
    it: &crate::attention::Item<'_>,
    q: &[f32],
    k: &[E],
    v: &[E],
    scores: &mut [f32],
    out: SharedMut,
) {
    let s = it.s;
    let (hd, stride, scale) = (s.head_dim, it.stride, it.scale());
    let kv_dim = s.n_head_kv * hd;
    let head = it.kvh * hd;
    let rows = it.rows();
    let zero = vec![E::ZERO; hd];
    let (qp, kp, vp, sp) = (q.as_ptr(), k.as_ptr().add(head), v.as_ptr().add(head), scores.as_mut_ptr());

    // Scores: tiles wholly inside the shared prefix for all rows, then each row's own tiles.
    let shared_tiles = s.start / TILE;
    let mut keys = [zero.as_ptr(); TILE];
    for tile in 0..shared_tiles {
        for (l, key) in keys.iter_mut().enumerate() {
            *key = kp.add((tile * TILE + l) * kv_dim);
        }
        for r in 0..rows {
            qk_tile(qp.add(it.row_off(r)), &keys, hd, scale, sp.add(r * stride + tile * TILE));
        }
    }
    for r in 0..rows {
        let nk = it.keys(r);
        for tile in shared_tiles..nk.div_ceil(TILE) {
            for (l, key) in keys.iter_mut().enumerate() {
                let o = tile * TILE + l;
                *key = if o < nk { kp.add(it.pos(r, o) * kv_dim) } else { zero.as_ptr() };
            }
            qk_tile(qp.add(it.row_off(r)), &keys, hd, scale, sp.add(r * stride + tile * TILE));
        }
        softmax(std::slice::from_raw_parts_mut(sp.add(r * stride), nk));
    }

    // Value sums: passes of up to MAX_ROWS rows over the shared prefix, then row tails.
    let passes = rows.div_ceil(MAX_ROWS);
    for pass in 0..passes {
        let rs = crate::pool::split_range(rows, passes, pass);
        let n = rs.len();
        let mut p = [std::ptr::null::<f32>(); MAX_ROWS];
        let mut o = [std::ptr::null_mut::<f32>(); MAX_ROWS];
        for (i, r) in rs.clone().enumerate() {
            p[i] = sp.add(r * stride);
            o[i] = out.0.add(it.row_off(r));
        }
        let mut d0 = 0;
        while d0 < hd {
            let od: [*mut f32; MAX_ROWS] = std::array::from_fn(|i| if i < n { o[i].add(d0) } else { o[i] });
            if hd - d0 >= DIMS {
                pv_rows!(n, 4, E, p, vp.add(d0), kv_dim, s.start, od);
                d0 += DIMS;
            } else {
                pv_rows!(n, 1, E, p, vp.add(d0), kv_dim, s.start, od);
                d0 += 16;
            }
        }
    }
    let mut tail_keys = Vec::new();
    for r in 0..rows {
        let nk = it.keys(r);
        tail_keys.clear();
        tail_keys.extend((s.start..nk).map(|o| it.pos(r, o)));
        let pr = std::slice::from_raw_parts(sp.add(r * stride + s.start), nk - s.start);
        let orow = out.0.add(it.row_off(r));
        for d0 in (0..hd).step_by(16) {
            pv_tail(pr, &tail_keys, vp.add(d0), kv_dim, orow.add(d0));
        }
    }
}
