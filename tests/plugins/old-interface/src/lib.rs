//! A backend plugin that reports an interface version the host does not speak, to test
//! that the host refuses it with a clear message.

use abi_stable::export_root_module;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{RResult, RStr, RString};
use coordgen_interface::{BackendBox, BackendMod, BackendModRef, PluginInfo, PluginKind, INTERFACE_VERSION};

extern "C" fn info() -> PluginInfo {
    PluginInfo {
        name: "old".into(),
        kind: PluginKind::Backend,
        interface_version: INTERFACE_VERSION + 100,
        version: "0.0.1".into(),
        description: "built against another interface version".into(),
    }
}

extern "C" fn create(_: RStr<'_>) -> RResult<BackendBox, RString> {
    RResult::RErr("must never be created".into())
}

#[export_root_module]
pub fn get_library() -> BackendModRef {
    BackendMod { info, create }.leak_into_prefix()
}
