//! A backend's cost model: the latency of one forward as a function of its token width and
//! of the context length already in the KV cache, from calibration samples, corrected online
//! by live measurements. Plain Rust (nothing here crosses the plugin boundary); the host and
//! scheduler plugins share it so they read the same numbers the same way.

use crate::CostSample;

#[derive(Clone, Debug, Default)]
pub struct CostModel {
    /// Calibration samples grouped by context: (context, sorted (width, ms)).
    by_ctx: Vec<(u32, Vec<(u32, f64)>)>,
    /// Live correction factor per width (measured / modelled), smoothed; index = width.
    correction: Vec<f64>,
}

impl CostModel {
    pub fn new(samples: &[CostSample]) -> CostModel {
        let mut m = CostModel::default();
        m.add_calibration(samples);
        m
    }

    pub fn is_empty(&self) -> bool {
        self.by_ctx.is_empty()
    }

    /// Adds calibration samples (a repeated (width, context) keeps the smaller latency: noise
    /// on a shared machine only ever adds time).
    pub fn add_calibration(&mut self, samples: &[CostSample]) {
        for s in samples {
            let ms = s.micros as f64 / 1e3;
            let i = match self.by_ctx.iter().position(|(c, _)| *c == s.context) {
                Some(i) => i,
                None => {
                    self.by_ctx.push((s.context, Vec::new()));
                    self.by_ctx.len() - 1
                }
            };
            let row = &mut self.by_ctx[i].1;
            match row.iter_mut().find(|(w, _)| *w == s.width) {
                Some(e) => e.1 = e.1.min(ms),
                None => row.push((s.width, ms)),
            }
            row.sort_by_key(|e| e.0);
        }
        self.by_ctx.sort_by_key(|e| e.0);
    }

    /// Widest calibrated width.
    pub fn max_width(&self) -> u32 {
        self.by_ctx.iter().flat_map(|(_, r)| r.iter().map(|e| e.0)).max().unwrap_or(0)
    }

    /// Latency at width `w` from one context's row: linear between measured widths, the
    /// slope of the two widest beyond them.
    fn row_latency(row: &[(u32, f64)], w: u32) -> f64 {
        let w = w.max(1) as f64;
        match row.len() {
            0 => 1.0 + 0.15 * (w - 1.0),
            1 => row[0].1 * (1.0 + 0.15 * (w - row[0].0 as f64)).max(0.1),
            _ => {
                let i = row.iter().position(|e| e.0 as f64 >= w).unwrap_or(row.len() - 1).max(1);
                let (a, b) = (row[i - 1], row[i]);
                let slope = ((b.1 - a.1) / (b.0 as f64 - a.0 as f64)).max(0.0);
                (a.1 + slope * (w - a.0 as f64)).max(0.0)
            }
        }
    }

    /// Attention cost per (batch token x context token), ms: the least-squares slope of
    /// `L(w, c1) - L(w, c0) = s * w * (c1 - c0)` over every width measured at the first two
    /// contexts (pooling the widths keeps one noisy sample from bending the model, which
    /// matters because it is extrapolated to contexts many times longer). Never negative.
    fn context_slope(&self) -> f64 {
        if self.by_ctx.len() < 2 {
            return 0.0;
        }
        let (c0, r0) = (&self.by_ctx[0].0, &self.by_ctx[0].1);
        let (c1, r1) = (&self.by_ctx[1].0, &self.by_ctx[1].1);
        let dc = (*c1 as f64 - *c0 as f64).max(1.0);
        let (mut num, mut den) = (0.0, 0.0);
        for &(w, l0) in r0 {
            if let Some(&(_, l1)) = r1.iter().find(|e| e.0 == w) {
                let x = w as f64 * dc;
                num += (l1 - l0) * x;
                den += x * x;
            }
        }
        if den > 0.0 {
            (num / den).max(0.0)
        } else {
            0.0
        }
    }

    /// Modelled latency (ms) of a forward of `w` tokens after `ctx` cached ones, before the
    /// live correction: the nearest calibrated context at or below `ctx` (the first one below
    /// all of them), plus the attention term `s * w * (ctx - that context)`.
    pub fn calibrated(&self, w: u32, ctx: u32) -> f64 {
        if self.by_ctx.is_empty() {
            return 1.0 + 0.15 * (w.max(1) - 1) as f64;
        }
        let i = self.by_ctx.iter().rposition(|e| e.0 <= ctx).unwrap_or(0);
        let (c, row) = (&self.by_ctx[i].0, &self.by_ctx[i].1);
        let base = Self::row_latency(row, w);
        base + self.context_slope() * w.max(1) as f64 * (ctx as f64 - *c as f64).max(0.0)
    }

    /// Latency (ms) with the live correction for that width applied.
    pub fn latency(&self, w: u32, ctx: u32) -> f64 {
        let c = self.correction.get(w as usize).copied().filter(|c| *c > 0.0).unwrap_or_else(|| self.nearest_correction(w));
        self.calibrated(w, ctx) * c
    }

    fn nearest_correction(&self, w: u32) -> f64 {
        let w = w as usize;
        let below = (0..w.min(self.correction.len())).rev().find(|&i| self.correction[i] > 0.0);
        let above = (w + 1..self.correction.len()).find(|&i| self.correction[i] > 0.0);
        match (below, above) {
            (Some(a), Some(b)) => if w - a <= b - w { self.correction[a] } else { self.correction[b] },
            (Some(a), None) => self.correction[a],
            (None, Some(b)) => self.correction[b],
            (None, None) => 1.0,
        }
    }

    /// Records a live forward of `w` tokens after `ctx` that took `ms`.
    pub fn observe(&mut self, w: u32, ctx: u32, ms: f64) {
        let model = self.calibrated(w, ctx);
        if model <= 0.0 || !ms.is_finite() {
            return;
        }
        let w = w as usize;
        if self.correction.len() <= w {
            self.correction.resize(w + 1, 0.0);
        }
        let r = ms / model;
        let c = &mut self.correction[w];
        *c = if *c > 0.0 { 0.8 * *c + 0.2 * r } else { r };
    }

    /// The widest `w <= max` whose latency is at most `factor` times a one-token forward's at
    /// this context (1 when even width 2 costs more).
    pub fn free_width(&self, ctx: u32, factor: f64, max: u32) -> u32 {
        let base = self.latency(1, ctx);
        (1..=max.max(1)).filter(|&w| self.latency(w, ctx) <= factor * base).max().unwrap_or(1)
    }

    /// Of the calibrated widths up to `max`, the one with the most tokens per ms at `ctx`.
    pub fn best_throughput_width(&self, ctx: u32, max: u32) -> Option<u32> {
        let mut widths: Vec<u32> = self.by_ctx.iter().flat_map(|(_, r)| r.iter().map(|e| e.0)).filter(|&w| w <= max).collect();
        widths.sort_unstable();
        widths.dedup();
        widths.into_iter().map(|w| (w, w as f64 / self.calibrated(w, ctx))).max_by(|a, b| a.1.total_cmp(&b.1)).map(|x| x.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(width: u32, context: u32, ms: f64) -> CostSample {
        CostSample { width, context, rows: width, micros: (ms * 1e3) as u64 }
    }

    #[test]
    fn interpolates_in_width_and_context() {
        // Attention adds 0.005 ms per batch token per context token, on top of 10 + 1 ms per
        // extra token; one sample (width 4 at 300) is off by +2 ms.
        let at = |w: u32, c: u32| 10.0 + (w - 1) as f64 + 0.005 * w as f64 * c as f64;
        let mut samples = Vec::new();
        for c in [100u32, 300] {
            for w in [1u32, 4, 16] {
                samples.push(s(w, c, at(w, c) + if (w, c) == (4, 300) { 2.0 } else { 0.0 }));
            }
        }
        let m = CostModel::new(&samples);
        assert!((m.latency(2, 100) - at(2, 100)).abs() < 1e-3);
        // Beyond the widest width the last slope continues.
        assert!((m.latency(20, 100) - at(20, 100)).abs() < 1e-3);
        // The pooled context slope barely feels the noisy sample, even 10x further out.
        for w in [1u32, 4, 16] {
            let (got, want) = (m.latency(w, 3000), at(w, 3000));
            assert!((got - want).abs() < 0.05 * want, "w {w}: {got} vs {want}");
        }
        // Between calibrated contexts the lower one is the base.
        assert!((m.latency(1, 200) - at(1, 200)).abs() < 0.1);
        let m = CostModel::new(&[s(1, 100, 10.0), s(4, 100, 13.0), s(16, 100, 40.0)]);
        assert_eq!(m.free_width(100, 1.05, 32), 1);
        assert_eq!(m.free_width(100, 1.1, 32), 2);
        assert_eq!(m.free_width(100, 1.3, 32), 4);
        assert_eq!(m.best_throughput_width(100, 64), Some(16));
        assert_eq!(m.best_throughput_width(100, 8), Some(4));
    }

    #[test]
    fn live_measurements_correct_the_calibration() {
        let mut m = CostModel::new(&[s(1, 100, 10.0), s(8, 100, 20.0)]);
        m.observe(1, 100, 20.0);
        assert!((m.latency(1, 100) - 20.0).abs() < 1e-9);
        // Widths without their own measurement borrow the nearest correction.
        assert!((m.latency(2, 100) - 2.0 * m.calibrated(2, 100)).abs() < 1e-9);
        for _ in 0..50 {
            m.observe(8, 100, 20.0);
        }
        assert!((m.latency(8, 100) - 20.0).abs() < 1e-3);
        // Repeated calibration keeps the fastest sample.
        m.add_calibration(&[s(1, 100, 30.0)]);
        assert!((m.calibrated(1, 100) - 10.0).abs() < 1e-9);
    }
}
