//! Token-tree verification: checks a drafter's tree, lays it out as one forward batch (tree
//! positions and an ancestor mask behind the pending token), and walks the target's logits
//! to decide which nodes are accepted. Acceptance is lossless: greedy accepts exactly the
//! target's argmax path, and sampling uses recursive rejection over sibling candidates so
//! every emitted token is distributed exactly as the target's sampler would draw it.

use crate::plugins::Draft;
use crate::sampling::Sampler;

/// A checked draft tree: parents precede children, tokens are in the vocabulary, depth and
/// size are within budget, and siblings are distinct.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tree {
    pub tokens: Vec<u32>,
    /// `-1` = child of the pending token (the batch root).
    pub parents: Vec<i32>,
    /// Depth of each node (1 = directly after the pending token).
    pub depths: Vec<u32>,
    /// Each node's index in the drafter's original tree.
    pub origin: Vec<u32>,
}

impl Tree {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn max_depth(&self) -> u32 {
        self.depths.iter().copied().max().unwrap_or(0)
    }

    /// Merges `path` in as a branch from the root (sharing existing nodes), adding nodes
    /// while the tree has fewer than `max_nodes` and the depth is within `max_depth`. Added
    /// nodes have origin [`HOST_NODE`]. Returns how many nodes were added.
    pub fn add_branch(&mut self, path: &[u32], max_nodes: usize, max_depth: u32) -> usize {
        let mut parent = -1i32;
        let mut added = 0;
        for (k, &tok) in path.iter().enumerate() {
            let depth = k as u32 + 1;
            if depth > max_depth {
                break;
            }
            match (0..self.len()).find(|&i| self.parents[i] == parent && self.tokens[i] == tok) {
                Some(i) => parent = i as i32,
                None => {
                    if self.len() >= max_nodes {
                        break;
                    }
                    self.tokens.push(tok);
                    self.parents.push(parent);
                    self.depths.push(depth);
                    self.origin.push(HOST_NODE);
                    parent = self.len() as i32 - 1;
                    added += 1;
                }
            }
        }
        added
    }
}

/// Origin of nodes the host added (reused segments), which the drafter never proposed.
pub const HOST_NODE: u32 = u32::MAX;

/// Checks a draft and trims it to the budget. A malformed tree (a parent that does not
/// precede its child, mismatched lengths, a token outside the vocabulary) is an error; nodes
/// beyond `max_nodes` or `max_depth`, and repeated siblings with their subtrees, are dropped.
pub fn check(d: &Draft, n_vocab: usize, max_nodes: usize, max_depth: u32) -> Result<Tree, String> {
    if d.tokens.len() != d.parents.len() {
        return Err(format!("draft has {} tokens but {} parents", d.tokens.len(), d.parents.len()));
    }
    let mut t = Tree::default();
    // Map from the drafter's node index to ours (None = dropped).
    let mut map: Vec<Option<usize>> = Vec::with_capacity(d.tokens.len());
    for (i, (&tok, &p)) in d.tokens.iter().zip(&d.parents).enumerate() {
        if p < -1 || p >= i as i32 {
            return Err(format!("draft node {i} has parent {p}; parents must precede their children"));
        }
        if tok as usize >= n_vocab {
            return Err(format!("draft node {i} has token {tok}, outside the vocabulary of {n_vocab}"));
        }
        let parent = if p < 0 { Some(-1i32) } else { map[p as usize].map(|x| x as i32) };
        let keep = parent.and_then(|par| {
            let depth = if par < 0 { 1 } else { t.depths[par as usize] + 1 };
            let dup = t.tokens.iter().zip(&t.parents).any(|(&tt, &pp)| pp == par && tt == tok);
            (depth <= max_depth && t.len() < max_nodes && !dup).then_some((par, depth))
        });
        match keep {
            Some((par, depth)) => {
                map.push(Some(t.len()));
                t.tokens.push(tok);
                t.parents.push(par);
                t.depths.push(depth);
                t.origin.push(i as u32);
            }
            None => map.push(None),
        }
    }
    Ok(t)
}

/// The verification batch: row 0 is the pending token at `base`, row `i + 1` is node `i` at
/// `base + depth`; each row sees itself and its ancestors (and the whole cache).
pub fn batch(pending: u32, base: u32, t: &Tree) -> (Vec<u32>, Vec<u32>, Vec<u8>) {
    let w = t.len() + 1;
    let mut tokens = Vec::with_capacity(w);
    tokens.push(pending);
    tokens.extend_from_slice(&t.tokens);
    let mut positions = vec![base];
    positions.extend(t.depths.iter().map(|d| base + d));
    let mut mask = vec![0u8; w * w];
    mask[0] = 1;
    for i in 0..t.len() {
        let row = i + 1;
        mask[row * w + row] = 1;
        let mut a = t.parents[i];
        while a >= 0 {
            mask[row * w + a as usize + 1] = 1;
            a = t.parents[a as usize];
        }
        mask[row * w] = 1;
    }
    (tokens, positions, mask)
}

/// Result of walking one verified tree.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Accepted node indices, root to leaf.
    pub accepted: Vec<usize>,
    /// The target's own token after the accepted path.
    pub next: u32,
}

/// Walks the tree from the root row. `logits` holds `(t.len() + 1) x n_vocab` rows in batch
/// order; `history` is the sequence up to and including the pending token (the repetition
/// penalty looks at it, extended along the path).
///
/// At each row the target's token is drawn from its distribution with the draw the sampler
/// keys on that sequence position ([`Sampler::pick`]), and the child carrying that token,
/// if any, is accepted. Drafts are token trees without draft probabilities, so this is
/// speculative sampling with one-hot proposals: a child is accepted with exactly the
/// target's probability of its token, every output token follows the target's distribution,
/// and, because the draw depends only on the seed and the position, the text is the same as
/// plain sampling with the same seed whatever was drafted. Greedy decoding is the special
/// case of a one-token distribution.
pub fn accept(t: &Tree, logits: &[f32], n_vocab: usize, history: &[u32], sampler: &mut Sampler) -> Verdict {
    let mut hist = history.to_vec();
    let mut accepted = Vec::new();
    let mut row = 0usize; // batch row whose logits predict the next token
    loop {
        let l = &logits[row * n_vocab..(row + 1) * n_vocab];
        let tok = sampler.pick(&sampler.distribution(l, &hist), hist.len());
        let parent = row as i32 - 1;
        match (0..t.len()).find(|&i| t.parents[i] == parent && t.tokens[i] == tok) {
            Some(c) => {
                accepted.push(c);
                hist.push(tok);
                row = c + 1;
            }
            None => return Verdict { accepted, next: tok },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    fn draft(tokens: &[u32], parents: &[i32]) -> Draft {
        Draft { tokens: tokens.to_vec(), parents: parents.to_vec(), scores: vec![] }
    }

    #[test]
    fn check_trims_and_rejects() {
        let t = check(&draft(&[5, 6, 7, 5, 8], &[-1, 0, 1, -1, 0]), 10, 10, 2).unwrap();
        // node 2 is too deep, node 3 repeats sibling token 5.
        assert_eq!(t.tokens, vec![5, 6, 8]);
        assert_eq!(t.parents, vec![-1, 0, 0]);
        assert_eq!(t.depths, vec![1, 2, 2]);
        assert!(check(&draft(&[1, 2], &[-1, 1]), 10, 10, 5).is_err());
        assert!(check(&draft(&[1, 20], &[-1, 0]), 10, 10, 5).is_err());
        assert!(check(&draft(&[1], &[-1, 0]), 10, 10, 5).is_err());
        assert_eq!(check(&draft(&[1, 2, 3], &[-1, 0, 1]), 10, 2, 5).unwrap().tokens, vec![1, 2]);
    }

    #[test]
    fn batch_has_ancestor_mask() {
        let t = check(&draft(&[5, 6, 7], &[-1, 0, -1]), 10, 10, 4).unwrap();
        let (tok, pos, mask) = batch(9, 100, &t);
        assert_eq!(tok, vec![9, 5, 6, 7]);
        assert_eq!(pos, vec![100, 101, 102, 101]);
        let rows: Vec<&[u8]> = mask.chunks(4).collect();
        assert_eq!(rows[0], &[1, 0, 0, 0]);
        assert_eq!(rows[1], &[1, 1, 0, 0]);
        assert_eq!(rows[2], &[1, 1, 1, 0]);
        assert_eq!(rows[3], &[1, 0, 0, 1]);
    }

    fn one_hot(n: usize, hot: usize) -> Vec<f32> {
        (0..n).map(|i| if i == hot { 5.0 } else { 0.0 }).collect()
    }

    #[test]
    fn greedy_follows_argmax_path() {
        // Tree: root -> {1 -> 2, 3}; target argmax after root = 3, after 3 = 4.
        let t = check(&draft(&[1, 2, 3], &[-1, 0, -1]), 8, 10, 4).unwrap();
        let mut logits = one_hot(8, 3);
        logits.extend(one_hot(8, 2));
        logits.extend(one_hot(8, 0));
        logits.extend(one_hot(8, 4));
        let mut s = Sampler::new(SamplingParams::default());
        let v = accept(&t, &logits, 8, &[0], &mut s);
        assert_eq!(v, Verdict { accepted: vec![2], next: 4 });
    }
}
