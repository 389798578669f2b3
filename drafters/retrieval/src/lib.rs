//! The context-retrieval drafter plugin. It keeps a suffix automaton over the prompt and the
//! text generated so far (grown as the sequence grows) and, optionally, a datastore of the
//! user's files (`coordgen index DIR -o FILE`). Each proposal finds the longest suffix of
//! the sequence seen before in either source and grows a token tree best-first: a node's
//! children are the tokens that followed the matched text, weighted by how often each did
//! (sources weighted by match length), and the tree keeps the most probable paths.

pub mod sam;

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::path::PathBuf;

use coordgen_interface::{DraftBudget, DraftFeedback, DraftSource, DraftTree, TreeBuilder};
use serde::Deserialize;

use coordgen_drafter_store::datastore::{Datastore, Range};
use sam::Sam;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// A datastore written by `coordgen index`.
    datastore: Option<PathBuf>,
    /// Shortest suffix match that may draft.
    #[serde(default = "d_min_match")]
    min_match: usize,
    /// Longest suffix looked up in the datastore.
    #[serde(default = "d_max_match")]
    max_match: usize,
    #[allow(dead_code)]
    cache_dir: Option<PathBuf>,
}

fn d_min_match() -> usize {
    1
}
fn d_max_match() -> usize {
    32
}

pub struct RetrievalDrafter {
    opts: Options,
    sam: Sam,
    store: Option<Datastore>,
}

pub fn create(options: &str) -> Result<RetrievalDrafter, String> {
    let opts: Options = serde_json::from_str(if options.trim().is_empty() { "{}" } else { options })
        .map_err(|e| format!("retrieval drafter options: {e}"))?;
    let store = opts.datastore.as_deref().map(Datastore::load).transpose()?;
    Ok(RetrievalDrafter { opts, sam: Sam::default(), store })
}

/// Where a tree node stands in each source.
#[derive(Clone, Copy, Debug)]
enum Handle {
    Local { state: u32, weight: f32 },
    Store { range: Range, weight: f32 },
}

struct Candidate {
    score: f32,
    parent: i32,
    token: u32,
    handles: Vec<Handle>,
}

impl PartialEq for Candidate {
    fn eq(&self, o: &Self) -> bool {
        self.score == o.score
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Candidate {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score)
    }
}

impl RetrievalDrafter {
    /// Brings the automaton up to `seq` (rebuilding it if `seq` is not a continuation).
    fn sync(&mut self, seq: &[u32]) {
        let have = self.sam.text().len();
        if seq.len() < have || seq[..have] != *self.sam.text() {
            self.sam = Sam::default();
            self.sam.extend(seq);
        } else {
            self.sam.extend(&seq[have..]);
        }
    }

    /// Children of a node: (token, probability, handles), merged across sources.
    fn children(&self, handles: &[Handle]) -> Vec<(u32, f32, Vec<Handle>)> {
        let mut out: Vec<(u32, f32, Vec<Handle>)> = Vec::new();
        let total_w: f32 = handles.iter().map(|h| match h {
            Handle::Local { weight, .. } | Handle::Store { weight, .. } => *weight,
        }).sum();
        let mut add = |tok: u32, p: f32, h: Handle| match out.iter_mut().find(|x| x.0 == tok) {
            Some(x) => {
                x.1 += p;
                x.2.push(h);
            }
            None => out.push((tok, p, vec![h])),
        };
        for &h in handles {
            match h {
                Handle::Local { state, weight } => {
                    let kids: Vec<(u32, u32, u32)> = self.sam.children(state).collect();
                    let n: u32 = kids.iter().map(|k| k.2).sum();
                    for (tok, next, c) in kids {
                        add(tok, weight / total_w * c as f32 / n as f32, Handle::Local { state: next, weight });
                    }
                }
                Handle::Store { range, weight } => {
                    if let Some(ds) = &self.store {
                        let n = (range.hi - range.lo) as f32;
                        for (tok, r) in ds.children(range) {
                            add(tok, weight / total_w * (r.hi - r.lo) as f32 / n, Handle::Store { range: r, weight });
                        }
                    }
                }
            }
        }
        out
    }
}

impl DraftSource for RetrievalDrafter {
    fn begin(&mut self, prompt: &[u32]) -> Result<(), String> {
        self.sam = Sam::default();
        self.sam.extend(prompt);
        Ok(())
    }

    fn propose(&mut self, seq: &[u32], budget: DraftBudget) -> Result<DraftTree, String> {
        self.sync(seq);
        let mut roots = Vec::new();
        if let Some((state, len)) = self.sam.longest_repeat() {
            if len as usize >= self.opts.min_match {
                roots.push(Handle::Local { state, weight: len as f32 });
            }
        }
        if let Some(ds) = &self.store {
            if let Some(r) = ds.longest_suffix(seq, self.opts.min_match, self.opts.max_match) {
                roots.push(Handle::Store { range: r, weight: r.len as f32 });
            }
        }
        let mut tb = TreeBuilder::new(budget);
        if roots.is_empty() {
            return Ok(tb.build());
        }
        // Best-first: the tree holds the most probable paths the budget allows.
        let mut heap = BinaryHeap::new();
        for (tok, p, h) in self.children(&roots) {
            heap.push(Candidate { score: p, parent: -1, token: tok, handles: h });
        }
        while let Some(c) = heap.pop() {
            if tb.is_full() {
                break;
            }
            let Some(idx) = tb.add(c.parent, c.token, c.score) else { continue };
            for (tok, p, h) in self.children(&c.handles) {
                heap.push(Candidate { score: c.score * p, parent: idx as i32, token: tok, handles: h });
            }
        }
        Ok(tb.build())
    }

    fn observe(&mut self, _f: &DraftFeedback) -> Result<(), String> {
        Ok(())
    }

    fn vocabulary(&self) -> String {
        self.store.as_ref().map(|s| s.model.display().to_string()).unwrap_or_default()
    }
}

coordgen_interface::export_drafter!("retrieval", "suffix-automaton retrieval over the context and a local datastore", create);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_the_most_frequent_continuation_first() {
        let mut d = create("{}").unwrap();
        // After "1 2", 3 followed twice and 4 once.
        d.begin(&[1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2]).unwrap();
        let t = d.propose(&[1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2], DraftBudget { max_nodes: 3, max_depth: 4 }).unwrap();
        assert_eq!(t.tokens[0], 3);
        assert_eq!(t.parents[0], -1);
        assert_eq!(t.tokens.len(), 3);
        // Nothing repeats: no draft.
        let t = d.propose(&[5, 6], DraftBudget { max_nodes: 3, max_depth: 4 }).unwrap();
        assert!(t.tokens.is_empty());
    }
}
