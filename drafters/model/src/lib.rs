//! The small-model drafter plugin: a draft model (by default Qwen2.5-Coder-0.5B for the
//! Qwen targets) run on a backend plugin library of its own. Its KV cache follows the
//! sequence: on each proposal the cache is cut back to the longest prefix it shares with the
//! sequence (rolling back rejected drafts is lowering the slot's fill count) and only the new
//! tokens are computed. Drafting follows the most likely token while its probability stays
//! above a confidence cut-off, and adds the runner-up as a sibling leaf where it is likely
//! enough, so the draft is a small tree.

use std::path::PathBuf;

use abi_stable::std_types::RVec;
use coordgen_interface::{
    load_backend_library, BackendBox, DraftBudget, DraftFeedback, DraftSource, DraftTree, ForwardBatch, LoadRequest, TreeBuilder,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// The draft model file (the host resolves default names such as `qwen-0.5b`).
    model: PathBuf,
    /// Path of the backend plugin library (the host fills it from `backend = "NAME"`).
    backend_library: Option<PathBuf>,
    #[allow(dead_code)]
    backend: Option<String>,
    /// The backend's own options (the host copies them from its plugin entry).
    #[serde(default)]
    backend_options: serde_json::Value,
    /// Threads for the draft model's backend (overrides backend_options.threads).
    threads: Option<u32>,
    /// Stop extending the draft below this probability of the draft model's best token.
    #[serde(default = "d_min_confidence")]
    min_confidence: f32,
    /// Add the runner-up token as a sibling when its probability is at least this.
    #[serde(default = "d_branch_min")]
    branch_min: f32,
    /// Tokens per prefill forward of the draft model.
    #[serde(default = "d_chunk")]
    prefill_chunk: usize,
    #[allow(dead_code)]
    cache_dir: Option<PathBuf>,
}

fn d_min_confidence() -> f32 {
    0.3
}
fn d_branch_min() -> f32 {
    0.15
}
fn d_chunk() -> usize {
    128
}

pub struct ModelDrafter {
    opts: Options,
    backend: BackendBox,
    model: u64,
    n_vocab: usize,
    slot: Option<(u32, usize)>,
    /// Tokens whose KV entries are in the slot.
    cached: Vec<u32>,
}

fn err(e: abi_stable::std_types::RString) -> String {
    e.into_string()
}

pub fn create(options: &str) -> Result<ModelDrafter, String> {
    let opts: Options = serde_json::from_str(options).map_err(|e| format!("model drafter options: {e}"))?;
    let lib = opts
        .backend_library
        .clone()
        .ok_or_else(|| "model drafter options: set backend = \"NAME\" (a backend plugin of plugins.toml) to run the draft model".to_string())?;
    let mut bopts = match &opts.backend_options {
        serde_json::Value::Object(m) => m.clone(),
        _ => Default::default(),
    };
    if let Some(t) = opts.threads {
        bopts.insert("threads".into(), t.into());
    }
    let mut backend = load_backend_library(&lib, &serde_json::Value::Object(bopts).to_string())?;
    // The drafter sends one token at a time and prompt chunks of any width; the host's
    // padding for backends of fixed widths does not reach inside a plugin.
    let caps = backend.capabilities().into_result().map_err(|e| format!("draft model backend: {e}"))?;
    if !caps.widths.is_empty() {
        return Err(format!("model drafter: its backend runs only the widths {:?}; a draft model needs a backend of any width (e.g. backend = \"cpu\")", caps.widths.as_slice()));
    }
    let desc = backend
        .load_model(&LoadRequest { path: opts.model.display().to_string().into(), options_json: Default::default() })
        .into_result()
        .map_err(|e| format!("draft model {}: {}", opts.model.display(), e))?;
    Ok(ModelDrafter { model: desc.handle, n_vocab: desc.n_vocab as usize, opts, backend, slot: None, cached: Vec::new() })
}

/// Softmax probabilities of the best and second-best tokens.
fn top2(logits: &[f32]) -> ((u32, f32), (u32, f32)) {
    let (mut b1, mut b2) = ((0usize, f32::NEG_INFINITY), (0usize, f32::NEG_INFINITY));
    for (i, &v) in logits.iter().enumerate() {
        if v > b1.1 {
            b2 = b1;
            b1 = (i, v);
        } else if v > b2.1 {
            b2 = (i, v);
        }
    }
    let sum: f64 = logits.iter().map(|&v| ((v - b1.1) as f64).exp()).sum();
    let p = |v: f32| (((v - b1.1) as f64).exp() / sum) as f32;
    ((b1.0 as u32, p(b1.1)), (b2.0 as u32, p(b2.1)))
}

impl ModelDrafter {
    fn ensure_slot(&mut self, need: usize) -> Result<u32, String> {
        if let Some((s, cap)) = self.slot {
            if cap >= need {
                return Ok(s);
            }
            self.backend.free_slot(s).into_result().map_err(err)?;
            self.slot = None;
            self.cached.clear();
        }
        let cap = need.next_power_of_two().max(4096);
        let s = self.backend.create_slot(self.model, cap as u32).into_result().map_err(err)?;
        self.slot = Some((s, cap));
        Ok(s)
    }

    /// Runs `tokens` after the cache; returns the logits of the last one.
    fn feed(&mut self, slot: u32, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let mut last = Vec::new();
        let n = tokens.len();
        for (ci, chunk) in tokens.chunks(self.opts.prefill_chunk.max(1)).enumerate() {
            let start = self.cached.len() as u32;
            let is_last = (ci + 1) * self.opts.prefill_chunk.max(1) >= n;
            let batch = ForwardBatch {
                slot,
                tokens: RVec::from_slice(chunk),
                positions: (start..start + chunk.len() as u32).collect(),
                mask: RVec::new(),
                logit_rows: if is_last { RVec::from_slice(&[chunk.len() as u32 - 1]) } else { RVec::new() },
            };
            let out = self.backend.forward(&batch).into_result().map_err(err)?;
            self.cached.extend_from_slice(chunk);
            if is_last {
                last = out.logits.into_vec();
            }
        }
        Ok(last)
    }

    /// Makes the cache hold `seq` (reusing the shared prefix) and returns the last logits.
    fn sync(&mut self, seq: &[u32], room: usize) -> Result<Vec<f32>, String> {
        let slot = self.ensure_slot(seq.len() + room + 1)?;
        let common = self.cached.iter().zip(seq).take_while(|(a, b)| a == b).count().min(seq.len() - 1);
        self.backend.truncate(slot, common as u32).into_result().map_err(err)?;
        self.cached.truncate(common);
        self.feed(slot, &seq[common..])
    }
}

impl DraftSource for ModelDrafter {
    fn begin(&mut self, prompt: &[u32]) -> Result<(), String> {
        if prompt.is_empty() {
            return Ok(());
        }
        // Prefill the draft model now; this runs while the target prefills.
        self.sync(prompt, 64).map(|_| ())
    }

    fn propose(&mut self, seq: &[u32], budget: DraftBudget) -> Result<DraftTree, String> {
        let mut tb = TreeBuilder::new(budget);
        if seq.is_empty() || budget.max_depth == 0 || budget.max_nodes == 0 {
            return Ok(tb.build());
        }
        let mut logits = self.sync(seq, budget.max_depth as usize)?;
        let slot = self.slot.expect("slot").0;
        let mut parent = -1i32;
        for depth in 0..budget.max_depth {
            if logits.len() < self.n_vocab {
                return Err(format!("draft backend returned {} logits, expected {}", logits.len(), self.n_vocab));
            }
            let ((t1, p1), (t2, p2)) = top2(&logits[..self.n_vocab]);
            if p1 < self.opts.min_confidence {
                break;
            }
            let Some(idx) = tb.add(parent, t1, p1) else { break };
            if p2 >= self.opts.branch_min {
                tb.add(parent, t2, p2);
            }
            parent = idx as i32;
            if depth + 1 == budget.max_depth || tb.is_full() {
                break;
            }
            logits = self.feed(slot, &[t1])?;
        }
        Ok(tb.build())
    }

    fn observe(&mut self, _f: &DraftFeedback) -> Result<(), String> {
        Ok(())
    }

    fn vocabulary(&self) -> String {
        self.opts.model.display().to_string()
    }
}

coordgen_interface::export_drafter!("model", "a small draft model on a backend plugin", create);
