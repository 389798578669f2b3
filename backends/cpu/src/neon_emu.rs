//! Plain-Rust stand-ins for the few `core::arch::aarch64` intrinsics the NEON integer kernel
//! uses, with the same names and signatures, so that kernel's code compiles and is tested
//! against the scalar oracle on machines without an aarch64 toolchain (test builds only).
//! Each follows the Arm definition of its instruction lane by lane.

#![allow(non_camel_case_types)]

#[derive(Clone, Copy)]
pub struct uint8x16_t([u8; 16]);
#[derive(Clone, Copy)]
pub struct int8x16_t([i8; 16]);
#[derive(Clone, Copy)]
pub struct int8x8_t([i8; 8]);
#[derive(Clone, Copy)]
pub struct int16x8_t([i16; 8]);
#[derive(Clone, Copy)]
pub struct int32x4_t([i32; 4]);
#[derive(Clone, Copy)]
pub struct float32x4_t([f32; 4]);

pub unsafe fn vld1q_u8(p: *const u8) -> uint8x16_t {
    uint8x16_t(std::array::from_fn(|i| *p.add(i)))
}
pub unsafe fn vld1q_s8(p: *const i8) -> int8x16_t {
    int8x16_t(std::array::from_fn(|i| *p.add(i)))
}
pub unsafe fn vld1q_f32(p: *const f32) -> float32x4_t {
    float32x4_t(std::array::from_fn(|i| *p.add(i)))
}
pub unsafe fn vst1q_f32(p: *mut f32, a: float32x4_t) {
    for (i, v) in a.0.into_iter().enumerate() {
        *p.add(i) = v;
    }
}
pub unsafe fn vdupq_n_u8(v: u8) -> uint8x16_t {
    uint8x16_t([v; 16])
}
pub unsafe fn vdupq_n_s32(v: i32) -> int32x4_t {
    int32x4_t([v; 4])
}
pub unsafe fn vdupq_n_f32(v: f32) -> float32x4_t {
    float32x4_t([v; 4])
}
pub unsafe fn vandq_u8(a: uint8x16_t, b: uint8x16_t) -> uint8x16_t {
    uint8x16_t(std::array::from_fn(|i| a.0[i] & b.0[i]))
}
pub unsafe fn vshrq_n_u8<const N: i32>(a: uint8x16_t) -> uint8x16_t {
    uint8x16_t(a.0.map(|x| x >> N))
}
pub unsafe fn vmaxvq_u8(a: uint8x16_t) -> u8 {
    a.0.into_iter().max().unwrap()
}
pub unsafe fn vreinterpretq_s8_u8(a: uint8x16_t) -> int8x16_t {
    int8x16_t(a.0.map(|x| x as i8))
}
pub unsafe fn vget_low_s8(a: int8x16_t) -> int8x8_t {
    int8x8_t(std::array::from_fn(|i| a.0[i]))
}
pub unsafe fn vmull_s8(a: int8x8_t, b: int8x8_t) -> int16x8_t {
    int16x8_t(std::array::from_fn(|i| a.0[i] as i16 * b.0[i] as i16))
}
pub unsafe fn vmull_high_s8(a: int8x16_t, b: int8x16_t) -> int16x8_t {
    int16x8_t(std::array::from_fn(|i| a.0[8 + i] as i16 * b.0[8 + i] as i16))
}
pub unsafe fn vpaddlq_s16(a: int16x8_t) -> int32x4_t {
    int32x4_t(std::array::from_fn(|i| a.0[2 * i] as i32 + a.0[2 * i + 1] as i32))
}
/// Pairwise add: the pairs of `a`, then the pairs of `b`.
pub unsafe fn vpaddq_s32(a: int32x4_t, b: int32x4_t) -> int32x4_t {
    let (a, b) = (a.0, b.0);
    int32x4_t([a[0].wrapping_add(a[1]), a[2].wrapping_add(a[3]), b[0].wrapping_add(b[1]), b[2].wrapping_add(b[3])])
}
pub unsafe fn vaddq_s32(a: int32x4_t, b: int32x4_t) -> int32x4_t {
    int32x4_t(std::array::from_fn(|i| a.0[i].wrapping_add(b.0[i])))
}
pub unsafe fn vshlq_n_s32<const N: i32>(a: int32x4_t) -> int32x4_t {
    int32x4_t(a.0.map(|x| x.wrapping_shl(N as u32)))
}
pub unsafe fn vcvtq_f32_s32(a: int32x4_t) -> float32x4_t {
    float32x4_t(a.0.map(|x| x as f32))
}
pub unsafe fn vmulq_f32(a: float32x4_t, b: float32x4_t) -> float32x4_t {
    float32x4_t(std::array::from_fn(|i| a.0[i] * b.0[i]))
}
/// `a + b * c`, fused (one rounding), as FMLA.
pub unsafe fn vfmaq_f32(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
    float32x4_t(std::array::from_fn(|i| b.0[i].mul_add(c.0[i], a.0[i])))
}

/// SDOT (by vector): lane `i` of `acc` plus the dot product of bytes `4i..4i + 4` of `a` and
/// `b`, as the `sdot` instruction the aarch64 build issues through inline assembly.
pub unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    int32x4_t(std::array::from_fn(|i| {
        (0..4).fold(acc.0[i], |s, e| s.wrapping_add(a.0[4 * i + e] as i32 * b.0[4 * i + e] as i32))
    }))
}
