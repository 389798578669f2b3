//! `plugins.toml`: which plugin libraries to load, their options, and which backend runs the
//! target model. Parse errors name the file, line and column.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// Name other entries and the CLI refer to.
    pub name: String,
    /// `backend`, `drafter` or `scheduler`.
    pub kind: String,
    /// A path (absolute, or relative to the config file) or a bare library name resolved
    /// next to the `coordgen` binary (`name` -> `libname.so` / `name.dll` / `libname.dylib`).
    pub library: String,
    /// Options handed to the plugin as a JSON object.
    #[serde(default)]
    pub options: toml::Table,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Name of the backend plugin that runs the target model.
    pub target_backend: String,
    /// Drafter(s) used by default for generation: a plugin name, or several joined by `,`
    /// (asked in order; the first with a draft wins). Absent = plain decoding.
    #[serde(default)]
    pub drafter: Option<String>,
    /// Scheduler: a `kind = "scheduler"` plugin name or the built-in `fixed`. Absent = the
    /// plugin named `adaptive` if there is one, else `fixed`.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Which drafting techniques are on (all by default).
    #[serde(default)]
    pub techniques: crate::techniques::Techniques,
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginEntry>,
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub source: String,
}

impl PluginsConfig {
    /// The scheduler to use when the command line names none.
    pub fn default_scheduler(&self) -> String {
        match &self.scheduler {
            Some(s) => s.clone(),
            None if self.entry("adaptive").is_some_and(|e| e.kind == "scheduler") => "adaptive".into(),
            None => "fixed".into(),
        }
    }
}

pub const DEFAULT_CONFIG: &str = r#"
target_backend = "cpu"

[[plugin]]
name = "cpu"
kind = "backend"
library = "coordgen_backend_cpu"
"#;

impl PluginsConfig {
    pub fn parse(text: &str, source: &str, base_dir: &Path) -> Result<Self> {
        let mut cfg: PluginsConfig = toml::from_str(text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    (before.matches('\n').count() + 1, before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1)
                })
                .unwrap_or((0, 0));
            anyhow!("{source}: line {line}, column {col}: {}", e.message())
        })?;
        cfg.base_dir = base_dir.to_path_buf();
        cfg.source = source.to_string();
        for p in &cfg.plugins {
            if !matches!(p.kind.as_str(), "backend" | "drafter" | "scheduler") {
                bail!("{source}: plugin '{}' has kind '{}' (expected backend, drafter or scheduler)", p.name, p.kind);
            }
        }
        let mut names: Vec<&str> = cfg.plugins.iter().map(|p| p.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("{source}: plugin name '{}' is used twice", w[0]);
        }
        match cfg.entry(&cfg.target_backend) {
            Some(e) if e.kind == "backend" => {}
            Some(e) => bail!("{source}: target_backend '{}' is a {} plugin, not a backend", e.name, e.kind),
            None => bail!("{source}: target_backend '{}' is not among the [[plugin]] entries", cfg.target_backend),
        }
        if let Some(d) = &cfg.drafter {
            for name in d.split(',').map(str::trim) {
                match cfg.entry(name) {
                    Some(e) if e.kind == "drafter" => {}
                    Some(e) => bail!("{source}: drafter '{}' is a {} plugin, not a drafter", e.name, e.kind),
                    None => bail!("{source}: drafter '{name}' is not among the [[plugin]] entries"),
                }
            }
        }
        if let Some(name) = &cfg.scheduler {
            match cfg.entry(name) {
                Some(e) if e.kind == "scheduler" => {}
                Some(e) => bail!("{source}: scheduler '{}' is a {} plugin, not a scheduler", e.name, e.kind),
                None if name == "fixed" => {}
                None => bail!("{source}: scheduler '{name}' is not among the [[plugin]] entries (nor the built-in 'fixed')"),
            }
        }
        Ok(cfg)
    }

    /// Loads `path`, or when `None`: `$COORDGEN_CONFIG`, `./plugins.toml`, `plugins.toml`
    /// next to the binary, then the built-in default (the CPU backend).
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let explicit = path.map(PathBuf::from).or_else(|| std::env::var_os("COORDGEN_CONFIG").map(PathBuf::from));
        if let Some(p) = explicit {
            let text = std::fs::read_to_string(&p).map_err(|e| anyhow!("cannot read plugin config {}: {e}", p.display()))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            return Self::parse(&text, &p.display().to_string(), &base);
        }
        let mut candidates = vec![PathBuf::from("plugins.toml")];
        if let Some(dir) = exe_dir() {
            candidates.push(dir.join("plugins.toml"));
        }
        for c in candidates {
            if c.is_file() {
                let text = std::fs::read_to_string(&c)?;
                let base = c.parent().map(Path::to_path_buf).unwrap_or_default();
                return Self::parse(&text, &c.display().to_string(), &base);
            }
        }
        Self::parse(DEFAULT_CONFIG, "built-in default config", Path::new("."))
    }

    pub fn entry(&self, name: &str) -> Option<&PluginEntry> {
        self.plugins.iter().find(|p| p.name == name)
    }
}

/// Directory of the default model files: `$COORDGEN_MODELS` or `models/`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("COORDGEN_MODELS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("models"))
}

/// Resolves the default model names (smollm2, qwen-0.5b, qwen-1.5b, gemma3-270m) to files under
/// [`models_dir`]; anything else is taken as a path.
pub fn resolve_model(m: &str) -> PathBuf {
    let file = match m {
        "smollm2" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen-0.5b" => "qwen2.5-coder-0.5b-instruct.gguf",
        "qwen-1.5b" => "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "gemma3-270m" => "gemma-3-270m-q4_k_m.gguf",
        _ => return PathBuf::from(m),
    };
    models_dir().join(file)
}

/// Where drafters keep what they learn across runs: `$COORDGEN_CACHE`,
/// `$XDG_CACHE_HOME/coordgen` or `~/.cache/coordgen`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("COORDGEN_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("coordgen");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache/coordgen");
    }
    std::env::temp_dir().join("coordgen-cache")
}

pub fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe().ok()?.parent().map(Path::to_path_buf)
}

fn lib_file_name(name: &str) -> String {
    if cfg!(target_os = "windows") {
        format!("{name}.dll")
    } else if cfg!(target_os = "macos") {
        format!("lib{name}.dylib")
    } else {
        format!("lib{name}.so")
    }
}

/// Where a plugin's library is: an explicit path, or a bare name searched in
/// `$COORDGEN_PLUGIN_DIR`, next to the binary, and one directory up (cargo's `deps/`).
pub fn resolve_library(entry: &PluginEntry, base_dir: &Path) -> Result<PathBuf> {
    let lib = &entry.library;
    let looks_like_path = lib.contains('/') || lib.contains('\\') || lib.ends_with(".so") || lib.ends_with(".dll") || lib.ends_with(".dylib");
    if looks_like_path {
        let p = PathBuf::from(lib);
        let p = if p.is_absolute() { p } else { base_dir.join(p) };
        if !p.is_file() {
            bail!("plugin '{}': library {} does not exist", entry.name, p.display());
        }
        return Ok(p);
    }
    let file = lib_file_name(lib);
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("COORDGEN_PLUGIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(d) = exe_dir() {
        dirs.push(d.clone());
        if let Some(up) = d.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    for d in &dirs {
        let p = d.join(&file);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "plugin '{}': library '{}' ({file}) not found in {}",
        entry.name,
        lib,
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        let c = PluginsConfig::parse(DEFAULT_CONFIG, "default", Path::new(".")).unwrap();
        assert_eq!(c.target_backend, "cpu");
        assert_eq!(c.plugins[0].kind, "backend");
    }

    #[test]
    fn malformed_config_reports_line() {
        let text = "target_backend = \"cpu\"\n\n[[plugin]]\nname = \"cpu\"\nkind = backend\n";
        let e = PluginsConfig::parse(text, "plugins.toml", Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("plugins.toml: line 5"), "{e}");
        let text = "target_backend = \"cpu\"\n[[plugin]]\nname = \"cpu\"\nkind = \"backend\"\nlibrary = \"x\"\nbogus = 1\n";
        let e = PluginsConfig::parse(text, "p.toml", Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("line 6") && e.contains("bogus"), "{e}");
        let text = "target_backend = \"gpu\"\n[[plugin]]\nname = \"cpu\"\nkind = \"backend\"\nlibrary = \"x\"\n";
        let e = PluginsConfig::parse(text, "p.toml", Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("'gpu' is not among"), "{e}");
    }
}
