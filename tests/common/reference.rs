//! The naive f64 reference forward (Hugging Face conventions) the backends are checked
//! against on synthetic models, and the comparison helpers.

use std::path::Path;

use coordgen::plugins::{Backend, Forward};

use super::synthetic::{Arch, Spec, Weights};

fn rms(x: &[f64], g: &[f32], eps: f64) -> Vec<f64> {
    let ss = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ss + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * s * *g as f64).collect()
}

fn matvec(w: &(Vec<usize>, Vec<f32>), x: &[f64]) -> Vec<f64> {
    let (rows, cols) = (w.0[0], w.0[1]);
    (0..rows).map(|r| (0..cols).map(|c| w.1[r * cols + c] as f64 * x[c]).sum()).collect()
}

/// Naive f64 forward with Hugging Face conventions (rotate-half rope, causal attention,
/// gemma3's window, norms and GELU): logits of every position of `tokens`.
pub fn reference_logits(s: &Spec, w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let g = |n: &str| &w[n];
    let (e, hd) = (s.n_embd, s.head_dim);
    let half = hd / 2;
    let gemma = s.arch == Arch::Gemma3;
    // Gemma 3's sliding-window layers rotate with base 10 000 (and no scaling).
    let (inv_global, inv_local) = (s.inv_freq(s.rope_theta), Spec { llama3_rope: None, ..s.clone() }.inv_freq(10000.0));
    let rope = |v: &mut [f64], pos: usize, inv: &[f64]| {
        for h in v.chunks_mut(hd) {
            for i in 0..half {
                let (sn, cs) = (pos as f64 * inv[i]).sin_cos();
                let (a, b) = (h[i], h[i + half]);
                h[i] = a * cs - b * sn;
                h[i + half] = a * sn + b * cs;
            }
        }
    };
    let emb = g("model.embed_tokens.weight");
    let scale = if gemma { (e as f64).sqrt() } else { 1.0 };
    let mut xs: Vec<Vec<f64>> =
        tokens.iter().map(|&t| emb.1[t as usize * e..(t as usize + 1) * e].iter().map(|&v| v as f64 * scale).collect()).collect();
    let group = s.n_head / s.n_head_kv;
    for l in 0..s.n_layer {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let swa = s.is_swa(l);
        let inv = if swa { &inv_local } else { &inv_global };
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, &g(&p("input_layernorm.weight")).1, s.eps);
            let mut q = matvec(g(&p("self_attn.q_proj.weight")), &h);
            let mut k = matvec(g(&p("self_attn.k_proj.weight")), &h);
            let mut v = matvec(g(&p("self_attn.v_proj.weight")), &h);
            if s.arch == Arch::Qwen2 {
                for (buf, b) in [(&mut q, "q"), (&mut k, "k"), (&mut v, "v")] {
                    let bias = &g(&p(&format!("self_attn.{b}_proj.bias"))).1;
                    buf.iter_mut().zip(bias).for_each(|(a, b)| *a += *b as f64);
                }
            }
            if matches!(s.arch, Arch::Qwen3 | Arch::Gemma3) {
                let qn = &g(&p("self_attn.q_norm.weight")).1;
                let kn = &g(&p("self_attn.k_norm.weight")).1;
                q = q.chunks(hd).flat_map(|c| rms(c, qn, s.eps)).collect();
                k = k.chunks(hd).flat_map(|c| rms(c, kn, s.eps)).collect();
            }
            rope(&mut q, pos, inv);
            rope(&mut k, pos, inv);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (t, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; s.n_head * hd];
            for h in 0..s.n_head {
                let kvh = h / group;
                let q = &qs[t][h * hd..(h + 1) * hd];
                // Keys at positions t - window + 1 ..= t on a sliding-window layer.
                let first = if swa { (t + 1).saturating_sub(s.window) } else { 0 };
                let sc: Vec<f64> = (first..=t).map(|j| q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()).collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                let sum: f64 = ex.iter().sum();
                for (i, j) in (first..=t).enumerate() {
                    for d in 0..hd {
                        att[h * hd + d] += ex[i] / sum * vs[j][kvh * hd + d];
                    }
                }
            }
            let mut o = matvec(g(&p("self_attn.o_proj.weight")), &att);
            if gemma {
                o = rms(&o, &g(&p("post_attention_layernorm.weight")).1, s.eps);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let ffn_norm = if gemma { "pre_feedforward_layernorm.weight" } else { "post_attention_layernorm.weight" };
            let h = rms(x, &g(&p(ffn_norm)).1, s.eps);
            let gt = matvec(g(&p("mlp.gate_proj.weight")), &h);
            let up = matvec(g(&p("mlp.up_proj.weight")), &h);
            let act: Vec<f64> = if gemma {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                gt.iter().zip(&up).map(|(g, u)| 0.5 * g * (1.0 + (c * (g + 0.044715 * g * g * g)).tanh()) * u).collect()
            } else {
                gt.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
            };
            let mut d = matvec(g(&p("mlp.down_proj.weight")), &act);
            if gemma {
                d = rms(&d, &g(&p("post_feedforward_layernorm.weight")).1, s.eps);
            }
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    let out = if s.tied { g("model.embed_tokens.weight") } else { g("lm_head.weight") };
    xs.iter().map(|x| matvec(out, &rms(x, &g("model.norm.weight").1, s.eps))).collect()
}

/// Token ids of the synthetic-model checks (a 320-token vocabulary).
pub const TOKENS: [u32; 9] = [17, 200, 3, 45, 45, 310, 99, 0, 256];

/// Logits of every position of `tokens` from the backend (one causal forward), and n_vocab.
pub fn backend_logits(b: &mut Box<dyn Backend>, path: &Path, tokens: &[u32]) -> (Vec<Vec<f32>>, usize) {
    let m = b.load_model(path).unwrap();
    let slot = b.create_slot(m.handle, 64).unwrap();
    let pos: Vec<u32> = (0..tokens.len() as u32).collect();
    let rows = pos.clone();
    let out = b.forward(&Forward { slot, tokens, positions: &pos, mask: &[], logit_rows: &rows }).unwrap();
    b.free_slot(slot).unwrap();
    (out.chunks(m.n_vocab).map(|c| c.to_vec()).collect(), m.n_vocab)
}

/// Asserts the largest logit error relative to each row's largest reference logit is
/// below `tol`, and returns that error.
pub fn assert_close(name: &str, ours: &[Vec<f32>], reference: &[Vec<f64>], tol: f64) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let mut worst = 0f64;
    for (o, r) in ours.iter().zip(reference) {
        assert_eq!(o.len(), r.len(), "{name}: vocab size");
        let scale = r.iter().fold(0f64, |m, v| m.max(v.abs())).max(1.0);
        for (a, b) in o.iter().zip(r) {
            worst = worst.max((*a as f64 - b).abs() / scale);
        }
    }
    assert!(worst < tol, "{name}: max relative logit error {worst:.2e} >= {tol:.0e}");
    worst
}
