//! Helpers for writing a drafter plugin in plain Rust: implement [`DraftSource`] and export it
//! with [`export_drafter!`](crate::export_drafter); every entry point is wrapped in [`guard`]
//! so errors and panics reach the host as errors. [`load_backend_library`] lets a drafter run
//! its own model on a backend plugin library (the small-model drafter does).

use abi_stable::std_types::{RResult, RSlice, RString};

use crate::{guard, BackendBox, BackendModRef, Calibration, DraftBudget, DraftFeedback, DraftTree, DrafterFfi};

/// The plain-Rust side of a drafter plugin (see [`DrafterFfi`] for the call order).
pub trait DraftSource: Send + 'static {
    fn begin(&mut self, prompt: &[u32]) -> Result<(), String>;
    /// Returns an empty tree when there is nothing worth drafting.
    fn propose(&mut self, sequence: &[u32], budget: DraftBudget) -> Result<DraftTree, String>;
    fn observe(&mut self, feedback: &DraftFeedback) -> Result<(), String>;
    /// Model file whose tokenizer the drafter's ids come from ("" = token-agnostic).
    fn vocabulary(&self) -> String {
        String::new()
    }
    /// Top predictions per prompt position wanted from the target (0 = none).
    fn calibration_top_k(&self) -> u32 {
        0
    }
    fn calibrate(&mut self, _calibration: &Calibration) -> Result<(), String> {
        Ok(())
    }
    fn finish(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// Wraps a [`DraftSource`] as the FFI trait object, guarding every call.
pub struct Guarded<T>(pub T);

impl<T: DraftSource> DrafterFfi for Guarded<T> {
    fn begin(&mut self, prompt: RSlice<'_, u32>) -> RResult<(), RString> {
        guard(|| self.0.begin(prompt.as_slice()))
    }
    fn propose(&mut self, sequence: RSlice<'_, u32>, budget: DraftBudget) -> RResult<DraftTree, RString> {
        guard(|| self.0.propose(sequence.as_slice(), budget))
    }
    fn observe(&mut self, feedback: &DraftFeedback) -> RResult<(), RString> {
        guard(|| self.0.observe(feedback))
    }
    fn vocabulary(&self) -> RResult<RString, RString> {
        guard(|| Ok(self.0.vocabulary().into()))
    }
    fn calibration_top_k(&self) -> RResult<u32, RString> {
        guard(|| Ok(self.0.calibration_top_k()))
    }
    fn calibrate(&mut self, calibration: &Calibration) -> RResult<(), RString> {
        guard(|| self.0.calibrate(calibration))
    }
    fn finish(&mut self) -> RResult<(), RString> {
        guard(|| self.0.finish())
    }
}

/// Builds a linear draft (each token the child of the previous one).
pub fn linear_draft(tokens: &[u32]) -> DraftTree {
    DraftTree {
        tokens: tokens.iter().copied().collect(),
        parents: (0..tokens.len() as i32).map(|i| i - 1).collect(),
        scores: Default::default(),
    }
}

/// Builds a draft tree by inserting token paths; shared prefixes are merged, and nodes past
/// the budget (node count or depth) are left out.
pub struct TreeBuilder {
    tokens: Vec<u32>,
    parents: Vec<i32>,
    scores: Vec<f32>,
    depths: Vec<u32>,
    budget: DraftBudget,
}

impl TreeBuilder {
    pub fn new(budget: DraftBudget) -> Self {
        TreeBuilder { tokens: Vec::new(), parents: Vec::new(), scores: Vec::new(), depths: Vec::new(), budget }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.tokens.len() >= self.budget.max_nodes as usize
    }

    /// The child of `parent` (-1 = root) with `token`, if present.
    pub fn child(&self, parent: i32, token: u32) -> Option<usize> {
        (0..self.tokens.len()).find(|&i| self.parents[i] == parent && self.tokens[i] == token)
    }

    /// Adds one node under `parent` (or finds it); returns its index, or None when the
    /// budget does not allow it.
    pub fn add(&mut self, parent: i32, token: u32, score: f32) -> Option<usize> {
        if let Some(i) = self.child(parent, token) {
            self.scores[i] = self.scores[i].max(score);
            return Some(i);
        }
        let depth = if parent < 0 { 1 } else { self.depths[parent as usize] + 1 };
        if self.is_full() || depth > self.budget.max_depth {
            return None;
        }
        self.tokens.push(token);
        self.parents.push(parent);
        self.scores.push(score);
        self.depths.push(depth);
        Some(self.tokens.len() - 1)
    }

    /// Inserts a path from the root; returns how many of its tokens are in the tree.
    pub fn insert_path(&mut self, path: &[u32], score: f32) -> usize {
        let mut parent = -1i32;
        for (k, &t) in path.iter().enumerate() {
            match self.add(parent, t, score) {
                Some(i) => parent = i as i32,
                None => return k,
            }
        }
        path.len()
    }

    pub fn build(self) -> DraftTree {
        DraftTree { tokens: self.tokens.into(), parents: self.parents.into(), scores: self.scores.into() }
    }
}

/// Loads a backend plugin library (a path to its `.so`) and creates a backend with the
/// given JSON options, for drafters that run a model of their own.
pub fn load_backend_library(path: &std::path::Path, options_json: &str) -> Result<BackendBox, String> {
    let header = abi_stable::library::lib_header_from_path(path).map_err(|e| format!("cannot load backend {}: {e}", path.display()))?;
    let module = header
        .init_root_module::<BackendModRef>()
        .map_err(|e| format!("{} is not a compatible backend plugin: {e}", path.display()))?;
    let info = (module.info())();
    if info.interface_version != crate::INTERFACE_VERSION {
        return Err(format!("{} speaks plugin interface {}, expected {}", path.display(), info.interface_version, crate::INTERFACE_VERSION));
    }
    (module.create())(options_json.into()).into_result().map_err(|e| format!("backend {} could not start: {e}", path.display()))
}

/// Exports a drafter plugin's root module. `$create` is `fn(&str) -> Result<T, String>`
/// taking the options JSON, with `T:` [`DraftSource`].
#[macro_export]
macro_rules! export_drafter {
    ($name:expr, $description:expr, $create:path) => {
        extern "C" fn __coordgen_info() -> $crate::PluginInfo {
            $crate::PluginInfo {
                name: $name.into(),
                kind: $crate::PluginKind::Drafter,
                interface_version: $crate::INTERFACE_VERSION,
                version: env!("CARGO_PKG_VERSION").into(),
                description: $description.into(),
            }
        }

        extern "C" fn __coordgen_create(
            options: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<$crate::DrafterBox, $crate::abi_stable::std_types::RString> {
            $crate::guard(|| {
                let d = $create(options.as_str())?;
                Ok($crate::DrafterFfi_TO::from_value($crate::Guarded(d), $crate::abi_stable::sabi_trait::TD_Opaque))
            })
        }

        #[$crate::abi_stable::export_root_module]
        pub fn get_library() -> $crate::DrafterModRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::DrafterMod { info: __coordgen_info, create: __coordgen_create }.leak_into_prefix()
        }
    };
}
