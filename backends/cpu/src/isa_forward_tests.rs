//! Whole-forward checks of every kernel path this CPU has, on a tiny model whose matrices
//! cover every tensor type: the SIMD paths agree with the scalar forward, and the native
//! path is batch invariant. The kernel tests compare one matrix row at a time; these run
//! the loader (repacking or not), the thread pool, attention and every linear layer together,
//! which on aarch64 (under emulation, `scripts/test_aarch64.sh`) is the only end-to-end run
//! of the NEON paths.

use coordgen_model::gguf::{GgufWriter, Value};
use coordgen_model::quant::{quantize_row, GgmlType};

use crate::forward::{forward, Batch};
use crate::kv::Slot;
use crate::kv::KvType;
use crate::model::CpuModel;
use crate::pool::ThreadPool;
use crate::qgemm::ActBits;
use crate::simd::{self, Isa};
use crate::testdata::signal;

const VOCAB: usize = 320;
const EMBD: usize = 256;
const FF: usize = 512;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;

/// Each layer's seven matrices, in the order q, k, v, output, gate, up, down: every type
/// the backend reads appears at least once (Q5_K and the float types on unpacked rows
/// everywhere, the others packed where the CPU has the fused kernels).
const LAYER_TYPES: [[GgmlType; 7]; 2] = [
    [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q5K, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0],
    [GgmlType::Q5_1, GgmlType::F16, GgmlType::BF16, GgmlType::F32, GgmlType::Q6K, GgmlType::Q4K, GgmlType::Q8_0],
];

/// Writes the tiny qwen2 model (attention biases included) and returns its path.
fn write_model(name: &str) -> std::path::PathBuf {
    let mut g = GgufWriter::new();
    let a = "qwen2";
    g.kv("general.architecture", Value::Str(a.into()))
        .kv(&format!("{a}.block_count"), Value::U32(LAYER_TYPES.len() as u32))
        .kv(&format!("{a}.context_length"), Value::U32(256))
        .kv(&format!("{a}.embedding_length"), Value::U32(EMBD as u32))
        .kv(&format!("{a}.feed_forward_length"), Value::U32(FF as u32))
        .kv(&format!("{a}.attention.head_count"), Value::U32(HEADS as u32))
        .kv(&format!("{a}.attention.head_count_kv"), Value::U32(KV_HEADS as u32))
        .kv(&format!("{a}.rope.freq_base"), Value::F32(10000.0))
        .kv(&format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6));
    let mut seed = 1u32;
    let mut add = |g: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType, scale: f32, offset: f32| {
        seed += 1;
        let v: Vec<f32> = signal(rows * cols, seed).into_iter().map(|x| offset + scale * x).collect();
        let dims: Vec<u64> = if rows == 1 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
        g.tensor(name, &dims, ty, quantize_row(ty, &v));
    };
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    add(&mut g, "token_embd.weight", VOCAB, EMBD, GgmlType::Q8_0, 1.0, 0.0);
    for (l, types) in LAYER_TYPES.iter().enumerate() {
        let n = |s: &str| format!("blk.{l}.{s}");
        add(&mut g, &n("attn_norm.weight"), 1, EMBD, GgmlType::F32, 0.2, 1.0);
        add(&mut g, &n("ffn_norm.weight"), 1, EMBD, GgmlType::F32, 0.2, 1.0);
        for (name, rows, cols, ty, scale) in [
            ("attn_q.weight", q, EMBD, types[0], 0.15),
            ("attn_k.weight", kv, EMBD, types[1], 0.15),
            ("attn_v.weight", kv, EMBD, types[2], 0.15),
            ("attn_output.weight", EMBD, q, types[3], 0.1),
            ("ffn_gate.weight", FF, EMBD, types[4], 0.1),
            ("ffn_up.weight", FF, EMBD, types[5], 0.1),
            ("ffn_down.weight", EMBD, FF, types[6], 0.08),
        ] {
            add(&mut g, &n(name), rows, cols, ty, scale, 0.0);
        }
        for (name, len) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
            add(&mut g, &n(name), 1, len, GgmlType::F32, 0.3, 0.0);
        }
    }
    add(&mut g, "output_norm.weight", 1, EMBD, GgmlType::F32, 0.2, 1.0);
    add(&mut g, "output.weight", VOCAB, EMBD, GgmlType::Q6K, 0.5, 0.0);
    let dir = std::env::temp_dir().join(format!("coordgen-cpu-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    g.write(&path).unwrap();
    path
}

const PROMPT: [u32; 9] = [3, 41, 7, 300, 12, 12, 99, 150, 5];

/// A tree after the prompt: node 0 is the pending token, nodes 1-2 its two children, node 3
/// a child of 1, node 4 a child of 3. Returns (tokens, positions, mask).
fn tree() -> (Vec<u32>, Vec<u32>, Vec<u8>) {
    let parent = [None, Some(0), Some(0), Some(1), Some(3)];
    let tokens = vec![17, 230, 8, 64, 311];
    let p0 = PROMPT.len() as u32;
    let mut depth = vec![0u32; parent.len()];
    let w = parent.len();
    let mut mask = vec![0u8; w * w];
    for i in 0..w {
        let mut j = Some(i);
        while let Some(a) = j {
            mask[i * w + a] = 1;
            j = parent[a];
            if j.is_some() {
                depth[i] += 1;
            }
        }
    }
    (tokens, depth.iter().map(|d| p0 + d).collect(), mask)
}

/// Logits of every prompt position, then of every tree node (rows in that order).
fn run(path: &std::path::Path, isa: Isa, bits: ActBits, threads: usize) -> Vec<f32> {
    let pool = ThreadPool::new(threads);
    let m = CpuModel::load(path.to_str().unwrap(), isa, threads).unwrap();
    let mut slot = Slot::new(0, &m, 64, KvType::F32);
    let pos: Vec<u32> = (0..PROMPT.len() as u32).collect();
    let rows: Vec<u32> = pos.clone();
    let mut out = forward(&pool, isa, bits, &m, &mut slot, &Batch { tokens: &PROMPT, positions: &pos, mask: &[], logit_rows: &rows }).unwrap();
    let (tokens, positions, mask) = tree();
    let rows: Vec<u32> = (0..tokens.len() as u32).collect();
    out.extend(forward(&pool, isa, bits, &m, &mut slot, &Batch { tokens: &tokens, positions: &positions, mask: &mask, logit_rows: &rows }).unwrap());
    out
}

/// Every SIMD path's whole forward (prompt and tree) stays near the scalar forward. The
/// integer kernels are bitwise the oracle's, but attention and the float-type rows sum in
/// another order, and every layer's input is quantized again: with 15-bit activations that
/// keeps the paths within 1e-4 of the largest logit here; with 8-bit ones a difference of one
/// part in 10^6 occasionally moves an activation across a rounding step (1/127 of its
/// group's largest value), which shifts every later logit of that sequence by up to about 1%
/// on this random model. The bounds are far below what a wrong kernel gives (errors of the
/// order of the logits themselves).
#[test]
fn every_path_agrees_with_the_scalar_forward() {
    let path = write_model("paths");
    for (bits, bound) in [(ActBits::Fifteen, 2e-3), (ActBits::Eight, 5e-2)] {
        let oracle = run(&path, Isa::Scalar, bits, 1);
        assert_eq!(oracle.len(), (PROMPT.len() + 5) * VOCAB);
        assert!(oracle.iter().all(|x| x.is_finite()));
        let scale = oracle.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(scale > 1.0, "logits are degenerate: max |logit| {scale}");
        for isa in simd::test_paths() {
            let got = run(&path, isa, bits, 2);
            let diff = got.iter().zip(&oracle).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(diff <= bound * scale, "{isa:?} {bits:?}: max |diff| {diff} vs max |logit| {scale}");
        }
    }
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

/// On the native path a position's logits are bit-identical whether it is computed in the
/// prompt batch, alone, or as a node of a tree batch with distractor branches.
#[test]
fn native_forward_is_batch_invariant() {
    let path = write_model("invariance");
    let isa = simd::detect();
    let m = CpuModel::load(path.to_str().unwrap(), isa, 2).unwrap();
    let pool = ThreadPool::new(2);
    let bits = ActBits::Eight;
    let batched = run(&path, isa, bits, 2);
    // One token at a time: the prompt, then the tree's path 0 -> 1 -> 3 -> 4.
    let (tokens, positions, _) = tree();
    let mut slot = Slot::new(0, &m, 64, KvType::F32);
    let mut alone = Vec::new();
    let path_nodes = [0usize, 1, 3, 4];
    let seq: Vec<(u32, u32)> = PROMPT.iter().enumerate().map(|(i, &t)| (t, i as u32)).chain(path_nodes.iter().map(|&n| (tokens[n], positions[n]))).collect();
    for (t, p) in seq {
        alone.extend(forward(&pool, isa, bits, &m, &mut slot, &Batch { tokens: &[t], positions: &[p], mask: &[], logit_rows: &[0] }).unwrap());
    }
    let bitsof = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let n = PROMPT.len() * VOCAB;
    assert_eq!(bitsof(&alone[..n]), bitsof(&batched[..n]), "{isa:?}: prompt rows");
    for (k, &node) in path_nodes.iter().enumerate() {
        let a = &alone[n + k * VOCAB..n + (k + 1) * VOCAB];
        let b = &batched[n + node * VOCAB..n + (node + 1) * VOCAB];
        assert_eq!(bitsof(a), bitsof(b), "{isa:?}: tree node {node}");
    }
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}
