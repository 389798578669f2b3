//! Plugins: the native traits the engine uses (`traits`), loading libraries named in
//! `plugins.toml` with abi_stable on top of libloading (`loader`), the host-side adapters
//! over the FFI objects (`foreign`), the padding a backend of fixed widths needs
//! (`fixed_widths`), and the options a drafter starts with (`options`). Only `loader` and
//! `foreign` see FFI types.

mod fixed_widths;
mod foreign;
mod loader;
mod options;
mod traits;

pub(crate) use foreign::call;
pub(crate) use loader::{open_named, options_json, start};
pub use loader::{describe_all, file_stamp, load_backend, load_drafter, load_drafters, LoadedInfo};
pub use traits::*;
