//! Speculative generation: draft trees from drafter plugins, verified in one forward of the
//! target model, accepted losslessly. `tree` checks and lays out drafts and decides
//! acceptance, `policy` keeps the acceptance statistics the scheduler sizes each step's draft
//! from, `reuse` keeps the agreeing tail of rejected drafts, `stage` runs drafters on their own thread,
//! `ahead` overlaps drafting the next step with verifying this one, `emit` streams accepted
//! text, `decoder` is one request's decode loop (plan / verify / accept / feedback), `run`
//! drives it from [`crate::session::Session::generate`], `stats` keeps its figures.

pub mod ahead;
mod decoder;
pub mod emit;
pub mod policy;
pub mod reuse;
pub mod run;
pub mod stage;
pub mod stats;
pub mod tree;

pub use stats::{summary, SpecStats};
pub use stage::Chain;
