//! An example drafter plugin written outside CoordGen's own drafters: it learns, from the
//! prompt and the accepted output, which token most often follows each token, and drafts
//! the chain of most frequent successors. It uses only the `coordgen-interface` crate.

use std::collections::HashMap;

use coordgen_interface::{linear_draft, DraftBudget, DraftFeedback, DraftSource, DraftTree};

/// Successor counts: token -> (next token -> count).
#[derive(Default)]
pub struct Bigram {
    next: HashMap<u32, HashMap<u32, u32>>,
    /// Sequence length already counted.
    seen: usize,
    min_count: u32,
}

impl Bigram {
    fn learn(&mut self, seq: &[u32]) {
        for w in seq[self.seen.saturating_sub(1)..].windows(2) {
            *self.next.entry(w[0]).or_default().entry(w[1]).or_default() += 1;
        }
        self.seen = seq.len();
    }

    fn best(&self, t: u32) -> Option<u32> {
        let m = self.next.get(&t)?;
        let (&tok, &n) = m.iter().max_by_key(|(&tok, &n)| (n, std::cmp::Reverse(tok)))?;
        (n >= self.min_count).then_some(tok)
    }
}

/// Called with the plugin's options from plugins.toml as JSON, e.g. `{"min_count": 2}`.
fn create(options: &str) -> Result<Bigram, String> {
    let min_count = options
        .split("\"min_count\"")
        .nth(1)
        .and_then(|rest| rest.trim_start_matches([':', ' ']).split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(2);
    Ok(Bigram { min_count, ..Default::default() })
}

impl DraftSource for Bigram {
    fn begin(&mut self, prompt: &[u32]) -> Result<(), String> {
        self.seen = 0;
        self.learn(prompt);
        Ok(())
    }

    fn propose(&mut self, seq: &[u32], budget: DraftBudget) -> Result<DraftTree, String> {
        self.learn(seq);
        let mut out = Vec::new();
        let mut t = *seq.last().ok_or("empty sequence")?;
        while out.len() < budget.max_depth.min(budget.max_nodes) as usize {
            match self.best(t) {
                Some(n) => {
                    out.push(n);
                    t = n;
                }
                None => break,
            }
        }
        Ok(linear_draft(&out))
    }

    fn observe(&mut self, _feedback: &DraftFeedback) -> Result<(), String> {
        Ok(())
    }
}

coordgen_interface::export_drafter!("bigram", "example: most frequent successor chain", create);
