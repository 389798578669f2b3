//! Criterion micro-benchmarks of the CPU kernels: row unpacking per quantized type, the
//! integer dot at several token widths, activation quantization, and the float dot.
//! `cargo bench -p coordgen-backend-cpu` (results depend on the machine; compare runs
//! made on the same one).

use coordgen_backend_cpu::qgemm::{dot_tokens, unpack_row_isa, ActBits, QActs, URow};
use coordgen_backend_cpu::simd;
use coordgen_backend_cpu::testdata::signal;
use coordgen_model::quant::{quantize_row, GgmlType};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const K: usize = 4096;


fn quantized() -> Vec<GgmlType> {
    GgmlType::ALL.into_iter().filter(|t| !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)).collect()
}

fn unpack(c: &mut Criterion) {
    let isa = simd::detect();
    let mut g = c.benchmark_group("unpack_row");
    g.throughput(Throughput::Elements(K as u64));
    for ty in quantized() {
        let q = quantize_row(ty, &signal(K, 1));
        let mut row = URow::new(K);
        g.bench_function(BenchmarkId::from_parameter(ty.name()), |b| b.iter(|| unpack_row_isa(isa, ty, &q, &mut row)));
    }
    g.finish();
}

fn dot(c: &mut Criterion) {
    let isa = simd::detect();
    for bits in [ActBits::Fifteen, ActBits::Eight] {
        let mut g = c.benchmark_group(format!("dot_q4_k_{bits:?}"));
        let q = quantize_row(GgmlType::Q4K, &signal(K, 2));
        let mut row = URow::new(K);
        unpack_row_isa(isa, GgmlType::Q4K, &q, &mut row);
        for width in [1usize, 4, 16] {
            let mut acts = QActs::new();
            acts.quantize(&signal(width * K, 3), width, K, bits);
            let mut out = vec![0f32; width];
            g.throughput(Throughput::Elements((K * width) as u64));
            g.bench_function(BenchmarkId::from_parameter(width), |b| b.iter(|| dot_tokens(isa, &row, &acts, 0, width, &mut out)));
        }
        g.finish();
    }
}

fn activations(c: &mut Criterion) {
    let x = signal(K, 4);
    let mut acts = QActs::new();
    let mut g = c.benchmark_group("quantize_activations");
    g.throughput(Throughput::Elements(K as u64));
    g.bench_function("15bit", |b| b.iter(|| acts.quantize(&x, 1, K, ActBits::Fifteen)));
    g.bench_function("8bit", |b| b.iter(|| acts.quantize(&x, 1, K, ActBits::Eight)));
    g.finish();
}

fn float_dot(c: &mut Criterion) {
    let isa = simd::detect();
    let (a, b2) = (signal(K, 5), signal(K, 6));
    let mut g = c.benchmark_group("f32_dot");
    g.throughput(Throughput::Elements(K as u64));
    g.bench_function(isa.name(), |b| b.iter(|| simd::dot(isa, &a, &b2)));
    g.bench_function("scalar", |b| b.iter(|| simd::dot_scalar(&a, &b2)));
    g.finish();
}

criterion_group!(benches, unpack, dot, activations, float_dot);
criterion_main!(benches);
