//! Draft reuse: after a verification rejects a draft, the rest of the rejected branch is not
//! necessarily wrong. The same forward computed the target's prediction at every node of it,
//! so the longest run of the tail whose tokens each equal the target's prediction at their
//! parent (plus the target's prediction after the run) is kept and offered again in the next
//! steps, until it is consumed, contradicted, or would go past the depth bound.

use super::tree::{Tree, Verdict};
use crate::sampling::argmax;

#[derive(Clone, Debug, Default)]
pub struct Reuse {
    seg: Vec<u32>,
    /// Tokens reused (offered and accepted) in this request.
    pub accepted: u64,
}

impl Reuse {
    /// The segment to offer after the pending token (empty = nothing).
    pub fn offer(&self) -> &[u32] {
        &self.seg
    }

    pub fn clear(&mut self) {
        self.seg.clear();
    }

    /// Updates after a step whose verified tree was `t` (with `logits` for the pending token
    /// and every node), whose verdict was `v`, and which appended `emitted` (the accepted
    /// drafts then the target's token) to the sequence.
    pub fn after_step(&mut self, t: &Tree, logits: &[f32], n_vocab: usize, v: &Verdict, emitted: &[u32], max_len: usize) {
        // The old segment survives only as far as the sequence followed it.
        if !self.seg.is_empty() {
            let m = self.seg.iter().zip(emitted).take_while(|(a, b)| a == b).count();
            self.accepted += m.min(emitted.len().saturating_sub(1)) as u64;
            if m == emitted.len() && m < self.seg.len() {
                self.seg.drain(..m);
            } else {
                self.seg.clear();
            }
        }
        if let Some(fresh) = rejected_tail(t, logits, n_vocab, v, max_len) {
            if fresh.len() > self.seg.len() {
                self.seg = fresh;
            }
        }
    }
}

/// The deepest node under `parent` (-1 = the root) and the path down to it.
fn deepest_branch(t: &Tree, parent: i32) -> Vec<usize> {
    let kids: Vec<usize> = (0..t.len()).filter(|&i| t.parents[i] == parent).collect();
    let mut best: Vec<usize> = Vec::new();
    for k in kids {
        let mut path = vec![k];
        path.extend(deepest_branch(t, k as i32));
        if path.len() > best.len() {
            best = path;
        }
    }
    best
}

/// The reusable segment of this step's rejected branch, if any: the main rejected branch
/// below the last accepted node, without its rejected first node; of its tail, the longest
/// run of nodes each equal to the target's argmax at its parent, followed by the target's
/// argmax after the run.
fn rejected_tail(t: &Tree, logits: &[f32], n_vocab: usize, v: &Verdict, max_len: usize) -> Option<Vec<u32>> {
    if t.is_empty() {
        return None;
    }
    let at = v.accepted.last().map(|&i| i as i32).unwrap_or(-1);
    let branch = deepest_branch(t, at);
    // branch[0] is the rejected node (the target chose `v.next` instead).
    if branch.len() < 2 || t.tokens[branch[0]] == v.next {
        return None;
    }
    let pred = |node: usize| argmax(&logits[(node + 1) * n_vocab..(node + 2) * n_vocab]);
    let mut best: (usize, usize) = (0, 0); // (start, len) in branch
    let mut i = 1;
    while i < branch.len() {
        let mut j = i;
        while j < branch.len() && pred(branch[j - 1]) == t.tokens[branch[j]] {
            j += 1;
        }
        if j - i > best.1 {
            best = (i, j - i);
        }
        i = j.max(i + 1);
    }
    if best.1 == 0 {
        return None;
    }
    let mut seg: Vec<u32> = branch[best.0..best.0 + best.1].iter().map(|&n| t.tokens[n]).collect();
    seg.push(pred(branch[best.0 + best.1 - 1]));
    seg.truncate(max_len);
    (seg.len() >= 2).then_some(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn onehot(nv: usize, rows: &[u32]) -> Vec<f32> {
        let mut l = vec![0f32; nv * rows.len()];
        for (r, &t) in rows.iter().enumerate() {
            l[r * nv + t as usize] = 1.0;
        }
        l
    }

    #[test]
    fn keeps_the_agreeing_tail_of_a_rejected_draft_until_it_is_used_or_contradicted() {
        let nv = 20;
        // Draft 1 2 3 4 5 (linear). The target accepts 1, wants 9 instead of 2, and its
        // predictions at nodes 2, 3, 4 are 3, 4, 7: the tail 3 4 agrees, then predicts 7.
        let t = Tree { tokens: vec![1, 2, 3, 4, 5], parents: vec![-1, 0, 1, 2, 3], depths: vec![1, 2, 3, 4, 5], origin: vec![0, 1, 2, 3, 4] };
        let logits = onehot(nv, &[1, 9, 3, 4, 7, 0]);
        let v = Verdict { accepted: vec![0], next: 9 };
        let mut r = Reuse::default();
        r.after_step(&t, &logits, nv, &v, &[1, 9], 8);
        assert_eq!(r.offer(), &[3, 4, 7]);
        // Next step emits 3 then the target's own 4: the rest (7) stays on offer.
        r.after_step(&Tree::default(), &[], nv, &Verdict { accepted: vec![0], next: 4 }, &[3, 4], 8);
        assert_eq!(r.offer(), &[7]);
        assert_eq!(r.accepted, 1);
        // A step that goes elsewhere drops it.
        r.after_step(&Tree::default(), &[], nv, &Verdict { accepted: vec![], next: 8 }, &[8], 8);
        assert!(r.offer().is_empty());
        // A fully accepted draft leaves nothing to reuse.
        let logits = onehot(nv, &[1, 2, 3, 4, 5, 6]);
        r.after_step(&t, &logits, nv, &Verdict { accepted: vec![0, 1, 2, 3, 4], next: 6 }, &[1, 2, 3, 4, 5, 6], 8);
        assert!(r.offer().is_empty());
    }
}
