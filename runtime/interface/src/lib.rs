//! Stable-ABI plugin interfaces of CoordGen: the root modules and traits that compute
//! backends, drafters and schedulers implement, and the plain data that crosses them.
//!
//! Only plain `#[repr(C)]` data crosses this boundary (no channels, runtime handles or
//! logging globals). Every entry point returns `RResult<_, RString>`; plugins wrap their
//! bodies in [`guard`] so a panic becomes an error instead of unwinding across FFI.
//!
//! A plugin library exports exactly one root module (one of [`BackendModRef`],
//! [`DrafterModRef`], [`SchedulerModRef`]). abi_stable checks at load time that the
//! library was built against a compatible version of this crate and that every type's
//! layout matches; [`INTERFACE_VERSION`] is checked by the host on top of that, so an
//! intentional semantic break can be signalled without a layout change.

#![allow(non_local_definitions)]

pub mod backend;
pub mod backend_kit;
pub mod checks;
pub mod cost_model;
pub mod drafter;
pub mod drafter_kit;
pub mod scheduler;

pub use abi_stable;
pub use backend::*;
pub use backend_kit::{BackendImpl, GuardedBackend};
pub use cost_model::CostModel;
pub use drafter::*;
pub use drafter_kit::*;
pub use scheduler::*;

use abi_stable::std_types::{RResult, RString};
use abi_stable::StableAbi;

/// Version of the plugin contract. Bumped on any semantic change of the traits below.
/// 4: backends gained `forward_slots` (one forward over several KV slots).
/// 5: every method returns `RResult` (`capabilities`, `stats_json`, `vocabulary` and
///    `calibration_top_k` did not, so a panic in them could not be caught and turned into
///    an error).
/// 6: `unload_model` and `BackendCaps::width_switch_cost_us` removed (the host never called or
///    read them); the host now honours `BackendCaps::widths` (it pads batches to them).
pub const INTERFACE_VERSION: u32 = 6;

/// What kind of plugin a library holds.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    Backend,
    Drafter,
    Scheduler,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Backend => "backend",
            PluginKind::Drafter => "drafter",
            PluginKind::Scheduler => "scheduler",
        }
    }
}

/// Self-description every plugin returns from its root module.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginInfo {
    /// Short name, e.g. `cpu`.
    pub name: RString,
    pub kind: PluginKind,
    /// The [`INTERFACE_VERSION`] the plugin was compiled against.
    pub interface_version: u32,
    /// The plugin's own version string.
    pub version: RString,
    pub description: RString,
}

/// Runs a plugin entry point, turning an `Err` or a panic into an `RErr` with a message.
/// Every method a plugin exposes through this interface should be wrapped in it.
pub fn guard<T>(f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(RString::from(e)),
        Err(payload) => {
            let msg = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic payload".to_string()
            };
            RResult::RErr(RString::from(format!("plugin panicked: {msg}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_turns_panics_and_errors_into_rerr() {
        let ok = guard(|| Ok::<_, String>(3));
        assert_eq!(ok.unwrap(), 3);
        let err = guard(|| Err::<u32, _>("bad".to_string()));
        assert_eq!(err.unwrap_err().as_str(), "bad");
        let panicked = guard(|| -> Result<u32, String> { panic!("boom {}", 7) });
        assert!(panicked.unwrap_err().as_str().contains("boom 7"));
    }
}
