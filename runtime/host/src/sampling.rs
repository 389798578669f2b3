//! Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, driven by
//! a small seeded generator so the same seed gives the same output.

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// xoshiro256** seeded through splitmix64.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit (the lowest index among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` most likely tokens of `logits` (ties: lower index first) with their softmax
/// probabilities over the whole vocabulary.
pub fn top_k_probs(logits: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    let mut floor = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if top.len() < k || v > floor {
            let at = top.iter().position(|&(_, x)| v > x).unwrap_or(top.len());
            top.insert(at, (i as u32, v));
            top.truncate(k);
            floor = top.last().map(|x| x.1).unwrap_or(f32::NEG_INFINITY);
        }
    }
    let mx = top.first().map(|x| x.1).unwrap_or(0.0);
    let sum: f32 = logits.iter().map(|&v| (v - mx).exp()).sum();
    (top.iter().map(|x| x.0).collect(), top.iter().map(|x| (x.1 - mx).exp() / sum).collect())
}

pub struct Sampler {
    pub params: SamplingParams,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params }
    }

    /// Applies the repetition penalty (llama.cpp's rule: divide positive logits, multiply
    /// negative ones) for tokens among the last `repeat_last_n` of `history`.
    fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        let p = self.params.repeat_penalty;
        if p == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let from = history.len().saturating_sub(self.params.repeat_last_n);
        let mut seen = std::collections::HashSet::new();
        for &t in &history[from..] {
            if seen.insert(t) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
    }

    /// The probability distribution the sampler draws from (after every filter), as
    /// (token, probability) pairs; greedy gives a single pair.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        let mut l = logits.to_vec();
        self.penalize(&mut l, history);
        if self.params.is_greedy() {
            return vec![(argmax(&l), 1.0)];
        }
        let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        cand.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 && self.params.top_k < cand.len() {
            cand.truncate(self.params.top_k);
        }
        let t = self.params.temperature;
        let mx = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| ((c.1 - mx) / t).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.params.min_p > 0.0 {
            let thr = probs[0] * self.params.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= thr).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        cand[..keep].iter().zip(&probs[..keep]).map(|(c, p)| (c.0, p / total)).collect()
    }

    /// The uniform draw in [0, 1) that decides the token at sequence position `pos`: a
    /// function of the seed and the position alone (not of how many draws came before), so
    /// the same seed gives the same text whether the tokens came from plain steps or from
    /// verified drafts, in whichever slot or merged batch they were computed.
    pub fn uniform_at(&self, pos: usize) -> f64 {
        let key = Rng::new(pos as u64 ^ 0xD1B5_4A32_D192_ED03).next_u64();
        Rng::new(self.params.seed ^ key).next_f64()
    }

    /// The token of `dist` (as [`Sampler::distribution`] gives it) that the draw of
    /// position `pos` picks.
    pub fn pick(&self, dist: &[(u32, f32)], pos: usize) -> u32 {
        if dist.len() == 1 {
            return dist[0].0;
        }
        let total: f64 = dist.iter().map(|x| x.1 as f64).sum();
        let r = self.uniform_at(pos) * total;
        let mut acc = 0.0;
        for &(tok, p) in dist {
            acc += p as f64;
            if r < acc {
                return tok;
            }
        }
        dist.last().map(|x| x.0).unwrap_or(0)
    }

    /// Samples the token after `history` (at position `history.len()`).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.pick(&self.distribution(logits, history), history.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_probs_are_the_largest_with_softmax_mass() {
        let l = [0.0f32, 2.0, 1.0, 2.0, -1.0];
        let (t, p) = top_k_probs(&l, 3);
        assert_eq!(t, vec![1, 3, 2]);
        let z: f32 = l.iter().map(|v| v.exp()).sum();
        assert!((p[0] - 2f32.exp() / z).abs() < 1e-6 && (p[2] - 1f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_tie() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_apply() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = SamplingParams { temperature: 0.8, top_k: 10, top_p: 0.9, seed: 42, ..Default::default() };
        // One draw per position: histories of lengths 0..100.
        let hist: Vec<u32> = vec![0; 100];
        let run = || {
            let mut s = Sampler::new(p.clone());
            (0..100).map(|n| s.sample(&logits, &hist[..n])).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let s = Sampler::new(p.clone());
        let allowed: Vec<u32> = s.distribution(&logits, &[]).iter().map(|x| x.0).collect();
        assert!(allowed.len() <= 10);
        assert!(a.iter().all(|t| allowed.contains(t)));
        let mut other = Sampler::new(SamplingParams { seed: 43, ..p });
        assert_ne!(a, (0..100).map(|n| other.sample(&logits, &hist[..n])).collect::<Vec<_>>());
    }

    #[test]
    fn min_p_and_penalty() {
        let logits = [5.0f32, 4.9, 0.0, -2.0];
        let s = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.5, ..Default::default() });
        let d = s.distribution(&logits, &[]);
        assert_eq!(d.len(), 2);
        let s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..Default::default() });
        // Token 0 was just generated; the penalty halves its logit so token 1 wins.
        assert_eq!(s.distribution(&logits, &[0])[0].0, 1);
    }
}
