//! Deterministic pseudo-random test vectors shared by the kernel tests and benchmarks.

/// `n` values in [-1, 1] from a xorshift generator seeded with `seed`.
pub fn signal(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}
