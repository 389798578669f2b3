//! The figures of one request's speculation ([`SpecStats`]: steps, acceptance by depth and
//! by draft confidence, time per stage, what each technique contributed) and the one-line
//! summary the CLI prints.

use serde::Serialize;

use super::policy::CLASSES;
use super::tree::Tree;

/// What speculation did during one request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SpecStats {
    pub drafter: String,
    /// Verification forwards (each also produces the target's own token).
    pub steps: u64,
    /// Steps that verified a non-empty draft.
    pub draft_steps: u64,
    pub drafted: u64,
    /// Drafted tokens accepted.
    pub accepted: u64,
    /// Mean drafted tokens accepted per verification step.
    pub mean_accepted: f64,
    /// Mean tokens produced per verification step (accepted drafts + the target's token).
    pub tokens_per_step: f64,
    /// Per draft depth d (index d-1): steps whose draft reached depth d with depth d-1 accepted,
    /// and how many of those accepted depth d.
    pub offered_by_depth: Vec<u64>,
    pub accepted_by_depth: Vec<u64>,
    pub acceptance_by_depth: Vec<f64>,
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub accept_ms: f64,
    /// The scheduler that planned the steps, and the prefill chunk it chose.
    pub scheduler: String,
    pub prefill_chunk: usize,
    /// Prompt positions with the target's predictions handed to the drafter (calibration),
    /// and the stride between them.
    pub calibrated_positions: usize,
    pub calibration_stride: u32,
    /// Drafted tokens accepted from reused segments of earlier rejected drafts.
    pub reused: u64,
    /// Per draft confidence class (the drafter's score of its best first token in five
    /// buckets of [0, 1], then reused segments alone): verified drafts and accepted tokens.
    pub drafts_by_confidence: Vec<u64>,
    pub accepted_by_confidence: Vec<u64>,
    /// Drafts looked at (one-token proposals) but not verified, because the scheduler found
    /// a plain step better for drafts of their confidence.
    pub unverified_drafts: u64,
    /// Overlapped drafting: threads the target lends the drafter while it drafts ahead (0 =
    /// none), steps whose draft was drafted during the previous verification, and the time
    /// spent waiting for those drafts once verification was done.
    pub overlap_threads: u32,
    pub overlapped_steps: u64,
    pub overlap_wait_ms: f64,
    /// Set when the drafter failed and the request went on with plain decoding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drafter_error: Option<String>,
}

impl SpecStats {
    pub(super) fn finish(&mut self) {
        if self.steps > 0 {
            self.mean_accepted = self.accepted as f64 / self.steps as f64;
            self.tokens_per_step = (self.accepted + self.steps) as f64 / self.steps as f64;
        }
        self.acceptance_by_depth =
            self.offered_by_depth.iter().zip(&self.accepted_by_depth).map(|(&o, &a)| if o > 0 { a as f64 / o as f64 } else { 0.0 }).collect();
    }
    pub(super) fn record(&mut self, t: &Tree, class: Option<usize>, n_accepted: usize) {
        self.steps += 1;
        if t.is_empty() {
            return;
        }
        if let Some(c) = class {
            self.drafts_by_confidence.resize(CLASSES + 1, 0);
            self.accepted_by_confidence.resize(CLASSES + 1, 0);
            self.drafts_by_confidence[c] += 1;
            self.accepted_by_confidence[c] += n_accepted as u64;
        }
        self.draft_steps += 1;
        self.drafted += t.len() as u64;
        self.accepted += n_accepted as u64;
        let reached = (n_accepted as u32 + 1).min(t.max_depth()) as usize;
        if self.offered_by_depth.len() < reached {
            self.offered_by_depth.resize(reached, 0);
            self.accepted_by_depth.resize(reached, 0);
        }
        for d in 0..reached {
            self.offered_by_depth[d] += 1;
            if d < n_accepted {
                self.accepted_by_depth[d] += 1;
            }
        }
    }
}

/// One line for humans: acceptance and time per stage.
pub fn summary(s: &SpecStats) -> String {
    let acc: Vec<String> = s.acceptance_by_depth.iter().map(|a| format!("{:.0}%", a * 100.0)).collect();
    let mut line = format!(
        "drafter {}: {} steps, {} drafted, {} accepted, {:.2} accepted per step ({:.2} tokens per step); acceptance by depth [{}]; draft {:.0} ms, verify {:.0} ms, accept {:.0} ms",
        s.drafter, s.steps, s.drafted, s.accepted, s.mean_accepted, s.tokens_per_step, acc.join(" "), s.draft_ms, s.verify_ms, s.accept_ms
    );
    line.push_str(&format!("; scheduler {}, prefill chunk {}", s.scheduler, s.prefill_chunk));
    if s.calibrated_positions > 0 {
        line.push_str(&format!(", {} calibrated prompt positions (every {})", s.calibrated_positions, s.calibration_stride));
    }
    if s.reused > 0 {
        line.push_str(&format!(", {} reused draft tokens accepted", s.reused));
    }
    if s.overlapped_steps > 0 || s.overlap_threads > 0 {
        line.push_str(&format!(
            ", {} steps drafted during the previous verification ({} ms waited; threads lent to the drafter: {})",
            s.overlapped_steps, s.overlap_wait_ms.round(), s.overlap_threads
        ));
    }
    if !s.drafts_by_confidence.is_empty() {
        let per: Vec<String> = s.drafts_by_confidence.iter().zip(&s.accepted_by_confidence).map(|(&d, &a)| format!("{a}/{d}")).collect();
        line.push_str(&format!("; accepted/drafts by confidence [{}], {} drafts not verified", per.join(" "), s.unverified_drafts));
    }
    if let Some(e) = &s.drafter_error {
        line.push_str(&format!("; drafter failed: {e}"));
    }
    line
}
