//! Which of CoordGen's decoding techniques are on: the `[techniques]` table of
//! `plugins.toml`, narrowed per command by `--no-calibration` and the like, and carried into
//! every request's [`crate::engine::GenerateParams`]. One type for all three, so a switch
//! added here is a config key, a request field and a decoder input at once.

use serde::Deserialize;

use crate::session::Session;

/// Switches for the techniques of context-heavy decoding (scheduling itself is chosen by the
/// session's scheduler).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Techniques {
    /// Context-aligned drafting: the target's predictions over the prompt feed drafters
    /// that ask for them.
    pub calibration: bool,
    /// Offer the agreeing tail of rejected drafts again.
    pub reuse: bool,
    /// Grow drafts into trees up to the nearly free verify width.
    pub extension: bool,
    /// Predictions every this many prompt positions (0 = chosen from the cost model so the
    /// extra logits cost at most about 10% of the prefill).
    pub calibration_stride: u32,
    /// Overlapped drafting (see [`crate::spec::ahead`]): the drafter drafts the next step
    /// while the target verifies, and a drafter that runs a model of its own gets its
    /// threads from the target's for the request's decoding.
    pub overlap: bool,
    /// Threads such a drafter gets while overlapping (the target keeps the rest); read when
    /// the drafter is loaded.
    pub overlap_draft_threads: u32,
}

impl Default for Techniques {
    fn default() -> Self {
        Techniques { calibration: true, reuse: true, extension: true, calibration_stride: 0, overlap: false, overlap_draft_threads: 1 }
    }
}

impl Techniques {
    /// Every technique off: plain speculative decoding with the drafter's own drafts.
    pub fn none() -> Self {
        Techniques { calibration: false, reuse: false, extension: false, ..Techniques::default() }
    }

    /// The calibration stride for session `s`: the configured one, or (0) the cost model's.
    pub fn stride(&self, s: &Session) -> u32 {
        match self.calibration_stride {
            0 => s.calibration_stride(0.10),
            x => x,
        }
    }
}
