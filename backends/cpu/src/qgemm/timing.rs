use super::*;
use coordgen_model::quant::quantize_row;

/// Not a test of speed (CI runs no timing assertions): prints ns per 256 weights per token
/// for a manual look with `cargo test --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_dot_throughput() {
    let k = 1536;
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let x = crate::testdata::signal(n * k, 3);
    let bits = if std::env::var("BITS").as_deref() == Ok("8") { ActBits::Eight } else { ActBits::Fifteen };
    let mut acts = QActs::new();
    acts.quantize(&x, n, k, bits);
    let q = quantize_row(GgmlType::Q4K, &crate::testdata::signal(k, 5));
    let mut row = URow::new(k);
    unpack_row(GgmlType::Q4K, &q, &mut row);
    let isa = crate::simd::detect();
    let mut out = vec![0f32; n];
    let reps = 1_280_000 / n;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        dot_tokens(isa, &row, &acts, 0, n, &mut out);
        std::hint::black_box(&out);
    }
    let ns = t.elapsed().as_nanos() as f64 / (reps * n * (k / 256)) as f64;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        unpack_row_isa(isa, GgmlType::Q4K, &q, &mut row);
        std::hint::black_box(&row.q);
    }
    let ns_unpack = t.elapsed().as_nanos() as f64 / (reps * (k / 256)) as f64;
    println!("{isa:?}: dot {ns:.2} ns per 256 weights per token; unpack {ns_unpack:.2} ns per 256 weights");
}
