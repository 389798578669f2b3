//! Loading plugin libraries named in `plugins.toml`: find the entry and its library, check
//! its root module and interface version (one generic [`open`] for the three kinds), start
//! the plugin object with its options, and wrap it in its native adapter.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibHeader, RootModule};
use abi_stable::std_types::{RResult, RStr, RString};
use coordgen_interface::{BackendBox, BackendModRef, DrafterBox, DrafterModRef, PluginInfo, SchedulerBox, SchedulerModRef, INTERFACE_VERSION};

use super::fixed_widths::FixedWidths;
use super::foreign::{call, caps_of, ForeignBackend, ForeignDrafter};
use super::options::drafter_options;
use super::traits::{Backend, Drafter, PResult, PluginError};
use crate::config::{resolve_library, PluginEntry, PluginsConfig};

/// A loaded library, as `coordgen plugins` lists it.
#[derive(Clone, Debug)]
pub struct LoadedInfo {
    pub entry_name: String,
    pub info_name: String,
    pub kind: String,
    pub interface_version: u32,
    pub version: String,
    pub description: String,
    pub path: PathBuf,
}

pub(crate) fn load_err(plugin: &str, message: impl Into<String>) -> PluginError {
    PluginError::Load { plugin: plugin.to_string(), message: message.into() }
}

pub(crate) fn options_json(entry: &PluginEntry) -> String {
    serde_json::to_string(&entry.options).unwrap_or_else(|_| "{}".into())
}

/// Opens the library and checks that it holds a root module of the expected kind.
fn open_header(entry: &PluginEntry, path: &Path, expected_root: &str) -> PResult<&'static LibHeader> {
    let header = lib_header_from_path(path).map_err(|e| load_err(&entry.name, format!("cannot load {}: {e}", path.display())))?;
    let root = header.root_mod_consts().name();
    if root.as_str() != expected_root {
        let kind = root.as_str().strip_prefix("coordgen_").unwrap_or(root.as_str());
        return Err(load_err(&entry.name, format!("{} holds a '{kind}' plugin, but plugins.toml declares kind '{}'", path.display(), entry.kind)));
    }
    Ok(header)
}

fn check_info(entry: &PluginEntry, path: &Path, info: &PluginInfo) -> PResult<LoadedInfo> {
    if info.interface_version != INTERFACE_VERSION {
        return Err(load_err(
            &entry.name,
            format!(
                "{} was built against plugin interface version {}, but this coordgen speaks version {INTERFACE_VERSION}; rebuild the plugin",
                path.display(),
                info.interface_version
            ),
        ));
    }
    Ok(LoadedInfo {
        entry_name: entry.name.clone(),
        info_name: info.name.to_string(),
        kind: info.kind.as_str().to_string(),
        interface_version: info.interface_version,
        version: info.version.to_string(),
        description: info.description.to_string(),
        path: path.to_path_buf(),
    })
}

fn version_msg(e: impl std::fmt::Display) -> String {
    format!("incompatible plugin (built against another interface version or layout): {e}")
}

/// The config entry `name` of kind `kind` and the path of its library (`missing` is added
/// to the error when there is no such entry).
pub(crate) fn entry_of_kind<'a>(cfg: &'a PluginsConfig, name: &str, kind: &str, missing: &str) -> PResult<(&'a PluginEntry, PathBuf)> {
    let entry = cfg.entry(name).ok_or_else(|| load_err(name, format!("no [[plugin]] named '{name}' in {}{missing}", cfg.source)))?;
    if entry.kind != kind {
        return Err(load_err(name, format!("is a {} plugin, not a {kind}", entry.kind)));
    }
    let path = resolve_library(entry, &cfg.base_dir).map_err(|e| load_err(name, e.to_string()))?;
    Ok((entry, path))
}

/// A file's size and modification time (seconds since the epoch), `(0, 0)` where unknown:
/// what says a file was replaced or rebuilt, for cache keys.
pub fn file_stamp(path: &Path) -> (u64, u64) {
    std::fs::metadata(path)
        .map(|m| (m.len(), m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0)))
        .unwrap_or((0, 0))
}

/// A plugin kind's root module: what [`open`] needs to check a library of that kind, and
/// what [`start`] needs to create its object.
pub(crate) trait PluginModule: RootModule {
    /// The kind `plugins.toml` declares for it.
    const PLUGIN_KIND: &'static str;
    /// The plugin object its `create` returns.
    type Object;
    fn plugin_info(&self) -> PluginInfo;
    fn create_object(&self, options_json: &str) -> RResult<Self::Object, RString>;
}

impl PluginModule for BackendModRef {
    const PLUGIN_KIND: &'static str = "backend";
    type Object = BackendBox;
    fn plugin_info(&self) -> PluginInfo {
        (self.info())()
    }
    fn create_object(&self, options_json: &str) -> RResult<BackendBox, RString> {
        (self.create())(RStr::from(options_json))
    }
}

impl PluginModule for DrafterModRef {
    const PLUGIN_KIND: &'static str = "drafter";
    type Object = DrafterBox;
    fn plugin_info(&self) -> PluginInfo {
        (self.info())()
    }
    fn create_object(&self, options_json: &str) -> RResult<DrafterBox, RString> {
        (self.create())(RStr::from(options_json))
    }
}

impl PluginModule for SchedulerModRef {
    const PLUGIN_KIND: &'static str = "scheduler";
    type Object = SchedulerBox;
    fn plugin_info(&self) -> PluginInfo {
        (self.info())()
    }
    fn create_object(&self, options_json: &str) -> RResult<SchedulerBox, RString> {
        (self.create())(RStr::from(options_json))
    }
}

/// Opens `entry`'s library at `path` as a plugin of kind `M`: the root module must be of
/// that kind and built against this interface version and layout.
pub(crate) fn open<M: PluginModule>(entry: &PluginEntry, path: &Path) -> PResult<(M, LoadedInfo)> {
    let header = open_header(entry, path, M::NAME)?;
    let module = header.init_root_module::<M>().map_err(|e| load_err(&entry.name, version_msg(e)))?;
    let info = check_info(entry, path, &module.plugin_info())?;
    Ok((module, info))
}

/// The config entry `name`, of kind `M`, opened (see [`open`]); `missing` is added to the
/// error when there is no such entry.
pub(crate) fn open_named<'a, M: PluginModule>(cfg: &'a PluginsConfig, name: &str, missing: &str) -> PResult<(&'a PluginEntry, PathBuf, M, LoadedInfo)> {
    let (entry, path) = entry_of_kind(cfg, name, M::PLUGIN_KIND, missing)?;
    let (module, info) = open::<M>(entry, &path)?;
    Ok((entry, path, module, info))
}

/// Creates the plugin object of `module` (the plugin named `name`) with its options; a
/// failure is a load error that names it.
pub(crate) fn start<M: PluginModule>(module: &M, name: &str, options_json: &str) -> PResult<M::Object> {
    module.create_object(options_json).into_result().map_err(|e| load_err(name, format!("could not start: {e}")))
}

/// Loads a backend plugin named in the config.
pub fn load_backend(cfg: &PluginsConfig, name: &str) -> PResult<(Box<dyn Backend>, LoadedInfo)> {
    let (entry, path, module, info) = open_named::<BackendModRef>(cfg, name, "")?;
    let options = options_json(entry);
    let obj = start(&module, name, &options)?;
    let (size, mtime) = file_stamp(&path);
    let identity = format!("{}:{}:{size}:{mtime}:{options}", entry.name, path.display());
    let caps = call(&entry.name, obj.capabilities()).map_err(|e| load_err(name, format!("could not report its capabilities: {e}")))?;
    let b = ForeignBackend::new(entry.name.clone(), identity, obj, caps_of(caps));
    Ok((FixedWidths::wrap(Box::new(b))?, info))
}

/// Loads a drafter plugin named in the config.
pub fn load_drafter(cfg: &PluginsConfig, name: &str) -> PResult<(Box<dyn Drafter>, LoadedInfo)> {
    let (entry, _, module, info) = open_named::<DrafterModRef>(cfg, name, "")?;
    let (options, own_threads) = drafter_options(cfg, entry)?;
    let obj = start(&module, name, &options)?;
    let vocab = call(&entry.name, obj.vocabulary()).map_err(|e| load_err(name, format!("could not name its vocabulary: {e}")))?.into_string();
    let vocabulary = (!vocab.is_empty()).then(|| PathBuf::from(vocab));
    let calibration_top_k = call(&entry.name, obj.calibration_top_k()).map_err(|e| load_err(name, format!("could not say what calibration it wants: {e}")))?;
    Ok((Box::new(ForeignDrafter::new(entry.name.clone(), obj, own_threads, vocabulary, calibration_top_k)), info))
}

/// Loads the drafter(s) named by `spec`: one plugin name, or several joined by `,` which are
/// combined into a [`crate::spec::Chain`] (asked in order, the first draft wins).
pub fn load_drafters(cfg: &PluginsConfig, spec: &str) -> PResult<Box<dyn Drafter>> {
    let mut parts = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        parts.push(load_drafter(cfg, name)?.0);
    }
    match parts.len() {
        0 => Err(load_err(spec, "no drafter named")),
        1 => Ok(parts.pop().expect("one")),
        _ => Ok(Box::new(crate::spec::Chain::new(parts))),
    }
}

/// Loads every plugin of the config and reports what each is (for `coordgen plugins`).
pub fn describe_all(cfg: &PluginsConfig) -> Vec<Result<LoadedInfo, PluginError>> {
    cfg.plugins
        .iter()
        .map(|entry| {
            let path = resolve_library(entry, &cfg.base_dir).map_err(|e| load_err(&entry.name, e.to_string()))?;
            match entry.kind.as_str() {
                "backend" => open::<BackendModRef>(entry, &path).map(|(_, info)| info),
                "drafter" => open::<DrafterModRef>(entry, &path).map(|(_, info)| info),
                _ => open::<SchedulerModRef>(entry, &path).map(|(_, info)| info),
            }
        })
        .collect()
}
