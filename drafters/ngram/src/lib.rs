//! The n-gram drafter plugin. Two sources, asked in order:
//! - prompt lookup: the last `n` tokens (n from `max_ngram` down to `min_ngram`) are searched
//!   in the prompt and the text generated so far; the continuations after the most recent
//!   matches of the longest matching `n` become the branches of a token tree;
//! - an online n-gram cache: counts of which token followed each pair of tokens in accepted
//!   output, kept across requests and saved to a file in the cache directory at the end of
//!   each request, used when lookup finds nothing.

pub mod lookup;

use std::path::PathBuf;

use coordgen_interface::{DraftBudget, DraftFeedback, DraftSource, DraftTree, TreeBuilder};
use serde::Deserialize;

use coordgen_drafter_store::ngram_cache::NgramCache;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    #[serde(default = "d_max_ngram")]
    max_ngram: usize,
    #[serde(default = "d_min_ngram")]
    min_ngram: usize,
    /// Distinct continuations merged into the tree.
    #[serde(default = "d_branches")]
    branches: usize,
    /// Use (and save) the online n-gram cache.
    #[serde(default = "d_true")]
    cache: bool,
    cache_dir: Option<PathBuf>,
    #[serde(default = "d_cache_file")]
    cache_file: String,
}

fn d_max_ngram() -> usize {
    4
}
fn d_min_ngram() -> usize {
    1
}
fn d_branches() -> usize {
    3
}
fn d_true() -> bool {
    true
}
fn d_cache_file() -> String {
    "ngram-cache.bin".into()
}

pub struct NgramDrafter {
    opts: Options,
    cache: Option<NgramCache>,
    cache_path: Option<PathBuf>,
    /// The last two tokens of the sequence (from the feedback), to learn trigrams.
    tail: Vec<u32>,
}

pub fn create(options: &str) -> Result<NgramDrafter, String> {
    let opts: Options = serde_json::from_str(if options.trim().is_empty() { "{}" } else { options })
        .map_err(|e| format!("n-gram drafter options: {e}"))?;
    if opts.min_ngram == 0 || opts.min_ngram > opts.max_ngram {
        return Err(format!("n-gram drafter options: need 1 <= min_ngram <= max_ngram (got {} and {})", opts.min_ngram, opts.max_ngram));
    }
    let (cache, cache_path) = if opts.cache {
        let path = opts.cache_dir.as_ref().map(|d| d.join(&opts.cache_file));
        let c = match &path {
            Some(p) if p.exists() => NgramCache::load(p)?,
            _ => NgramCache::default(),
        };
        (Some(c), path)
    } else {
        (None, None)
    };
    Ok(NgramDrafter { opts, cache, cache_path, tail: Vec::new() })
}

/// Confidence of a lookup draft: the longer the matched n-gram, the likelier the copy goes on
/// (a 1-gram match is often a coincidence). In (0, 1]; the host groups drafts by it.
fn match_confidence(n: usize, max_n: usize) -> f32 {
    n as f32 / max_n.max(1) as f32
}

/// Confidence of a draft from the n-gram cache (output learnt in earlier requests).
const CACHE_CONFIDENCE: f32 = 0.1;

impl DraftSource for NgramDrafter {
    fn begin(&mut self, prompt: &[u32]) -> Result<(), String> {
        self.tail = prompt[prompt.len().saturating_sub(2)..].to_vec();
        Ok(())
    }

    fn propose(&mut self, seq: &[u32], budget: DraftBudget) -> Result<DraftTree, String> {
        let mut tb = TreeBuilder::new(budget);
        let depth = budget.max_depth as usize;
        let (n, conts) = lookup::continuations(seq, self.opts.min_ngram, self.opts.max_ngram, depth, self.opts.branches);
        for (k, c) in conts.iter().enumerate() {
            tb.insert_path(c, match_confidence(n, self.opts.max_ngram) / (k + 1) as f32);
        }
        if tb.is_empty() {
            if let (Some(c), true) = (&self.cache, seq.len() >= 2) {
                let path = c.greedy_chain(seq[seq.len() - 2], seq[seq.len() - 1], depth);
                tb.insert_path(&path, CACHE_CONFIDENCE);
            }
        }
        Ok(tb.build())
    }

    fn observe(&mut self, f: &DraftFeedback) -> Result<(), String> {
        // Learn from accepted output only (the prompt is the user's text, not the model's).
        for &t in f.accepted.iter() {
            if let (Some(c), [a, b]) = (&mut self.cache, self.tail.as_slice()) {
                c.add(*a, *b, t);
            }
            self.tail.push(t);
            if self.tail.len() > 2 {
                self.tail.remove(0);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        if let (Some(c), Some(p)) = (&mut self.cache, &self.cache_path) {
            c.save(p)?;
        }
        Ok(())
    }
}

coordgen_interface::export_drafter!("ngram", "prompt lookup and an online n-gram cache", create);
