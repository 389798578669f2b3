//! Prompt lookup: find the latest earlier occurrences of the sequence's last `n` tokens and
//! return what followed them.

/// Up to `branches` distinct continuations (most recent match first) of at most `depth`
/// tokens, for the longest `n` in `min_n..=max_n` that has a match, with that `n` (0 when
/// nothing matched).
pub fn continuations(seq: &[u32], min_n: usize, max_n: usize, depth: usize, branches: usize) -> (usize, Vec<Vec<u32>>) {
    let len = seq.len();
    let mut out: Vec<Vec<u32>> = Vec::new();
    if depth == 0 || branches == 0 {
        return (0, out);
    }
    for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
        let key = &seq[len - n..];
        // Occurrences must end before the last token so something follows them.
        let mut i = len - n;
        while i > 0 && out.len() < branches {
            i -= 1;
            if seq[i..i + n] == *key {
                let start = i + n;
                let end = (start + depth).min(len);
                let c = seq[start..end].to_vec();
                if !c.is_empty() && !out.iter().any(|o| o.starts_with(&c) || c.starts_with(o)) {
                    out.push(c);
                } else if let Some(o) = out.iter_mut().find(|o| c.starts_with(o) && c.len() > o.len()) {
                    *o = c;
                }
            }
        }
        if !out.is_empty() {
            return (n, out);
        }
    }
    (0, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_latest_longest_match() {
        //           0  1  2  3  4  5  6  7  8  9
        let seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3];
        let c = continuations(&seq, 1, 3, 4, 1);
        assert_eq!(c, (3, vec![vec![7, 8, 1, 2]]));
        let c = continuations(&seq, 1, 3, 2, 3);
        assert_eq!(c, (3, vec![vec![7, 8], vec![9, 1]]));
        assert!(continuations(&[5, 6, 7], 1, 3, 4, 2).1.is_empty());
        // Only the last token recurs: a 1-gram match.
        assert_eq!(continuations(&[4, 5, 6, 4], 1, 3, 2, 1), (1, vec![vec![5, 6]]));
    }

    #[test]
    fn continuation_may_run_to_the_end() {
        let seq = [4, 5, 4];
        assert_eq!(continuations(&seq, 1, 2, 5, 1), (1, vec![vec![5, 4]]));
    }
}
