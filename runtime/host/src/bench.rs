//! `coordgen bench` measurements: forward latency per token width over a context, decode
//! and prefill throughput (like llama-bench's tg128 / pp512), and a memory read-bandwidth
//! probe so decode speed can be reported as a fraction of the machine's roofline.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::engine::Session;

#[derive(Clone, Debug, Serialize)]
pub struct WidthResult {
    pub width: usize,
    pub ms: f64,
    pub ratio: f64,
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Deterministic filler tokens (avoid special tokens at the low/high ends of the vocab).
fn filler(n: usize, n_vocab: usize, seed: usize) -> Vec<u32> {
    let span = (n_vocab / 2).max(1);
    (0..n).map(|i| (100 + (i * 7919 + seed * 104729) % span) as u32).collect()
}

/// Latency of one forward of each width (logits for every row) after `context` tokens.
pub fn widths(s: &mut Session, widths: &[usize], context: usize, reps: usize) -> Result<Vec<WidthResult>> {
    let ctx_tokens = filler(context, s.model().n_vocab, 1);
    s.reset()?;
    for c in ctx_tokens.chunks(s.prefill_chunk()) {
        s.append(c, &[])?;
    }
    let mut out = Vec::new();
    for &w in widths {
        let toks = filler(w, s.model().n_vocab, 2);
        let pos: Vec<u32> = (context as u32..(context + w) as u32).collect();
        let rows: Vec<u32> = (0..w as u32).collect();
        let mut times = Vec::new();
        for r in 0..reps + 1 {
            let t = Instant::now();
            s.forward(&toks, &pos, &[], &rows)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            s.truncate(context)?;
            if r > 0 {
                times.push(ms); // the first run warms caches and page mappings
            }
        }
        out.push(WidthResult { width: w, ms: median(&mut times), ratio: 0.0 });
    }
    let base = out.iter().find(|r| r.width == 1).map(|r| r.ms).unwrap_or(out[0].ms);
    for r in &mut out {
        r.ratio = r.ms / base;
    }
    Ok(out)
}

/// Tokens per second decoding `n` tokens one at a time after a short prompt.
pub fn decode_tps(s: &mut Session, n: usize) -> Result<f64> {
    s.reset()?;
    let prompt = filler(16, s.model().n_vocab, 3);
    let pos: Vec<u32> = (0..16).collect();
    s.forward(&prompt, &pos, &[], &[15])?;
    let t = Instant::now();
    let mut tok = prompt[15];
    for i in 0..n {
        let logits = s.forward(&[tok], &[16 + i as u32], &[], &[0])?;
        tok = crate::sampling::argmax(&logits);
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Tokens per second prefilling `n` tokens in the session's chunk size.
pub fn prefill_tps(s: &mut Session, n: usize) -> Result<f64> {
    s.reset()?;
    let toks = filler(n, s.model().n_vocab, 4);
    let pos: Vec<u32> = (0..n as u32).collect();
    let t = Instant::now();
    let chunks = toks.len().div_ceil(s.prefill_chunk());
    for (i, (c, p)) in toks.chunks(s.prefill_chunk()).zip(pos.chunks(s.prefill_chunk())).enumerate() {
        let rows: Vec<u32> = if i + 1 == chunks { vec![c.len() as u32 - 1] } else { vec![] };
        s.forward(c, p, &[], &rows)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Read bandwidth in GB/s with `threads` threads summing a buffer much larger than the
/// caches: the best of several passes (on a shared machine, slower passes measure the
/// neighbours, not the memory).
pub fn read_bandwidth_gbs(threads: usize, bytes: usize) -> f64 {
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let threads = threads.max(1);
    let mut passes = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf
                .chunks(n.div_ceil(threads))
                .map(|c| {
                    sc.spawn(move || {
                        // Four independent sums keep several loads in flight.
                        let mut acc = [0u64; 4];
                        for q in c.chunks_exact(4) {
                            for k in 0..4 {
                                acc[k] = acc[k].wrapping_add(q[k]);
                            }
                        }
                        acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold(0u64, |a, b| a.wrapping_add(b))
        });
        std::hint::black_box(total);
        passes.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    passes.iter().copied().fold(0.0, f64::max)
}
