//! Speculative generation: draft trees from drafter plugins, verified in one forward of the
//! target model, accepted losslessly. `tree` checks and lays out drafts and decides
//! acceptance, `policy` keeps the acceptance statistics the scheduler sizes each step's draft
//! from, `reuse` keeps the agreeing tail of rejected drafts, `stage` runs drafters on their own thread,
//! `ahead` overlaps drafting the next step with verifying this one, `emit` streams accepted
//! text, `run` is the generation loop.

pub mod ahead;
pub mod emit;
pub mod policy;
pub mod reuse;
pub mod run;
pub mod stage;
pub mod tree;

pub use run::SpecStats;
pub use stage::Chain;
