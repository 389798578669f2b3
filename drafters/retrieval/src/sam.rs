//! An online suffix automaton over a token sequence, with occurrence counts kept exact while
//! it grows, so the drafter can find the longest suffix of the text that occurred before and
//! read every continuation of it with how often each followed.

#[derive(Clone, Debug)]
struct State {
    len: u32,
    link: i32,
    /// Outgoing transitions, sorted by token.
    next: Vec<(u32, u32)>,
    /// Number of end positions (occurrences) of this state's strings.
    count: u32,
    /// The latest and the one before the latest end position (NONE when absent).
    last_end: u32,
    prev_end: u32,
}

const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub struct Sam {
    st: Vec<State>,
    last: usize,
    text: Vec<u32>,
}

impl Default for Sam {
    fn default() -> Self {
        Sam { st: vec![State { len: 0, link: -1, next: Vec::new(), count: 0, last_end: NONE, prev_end: NONE }], last: 0, text: Vec::new() }
    }
}

impl Sam {
    pub fn text(&self) -> &[u32] {
        &self.text
    }

    pub fn get(&self, s: u32, c: u32) -> Option<u32> {
        let n = &self.st[s as usize].next;
        n.binary_search_by_key(&c, |x| x.0).ok().map(|i| n[i].1)
    }

    fn set(&mut self, s: usize, c: u32, to: u32) {
        let n = &mut self.st[s].next;
        match n.binary_search_by_key(&c, |x| x.0) {
            Ok(i) => n[i].1 = to,
            Err(i) => n.insert(i, (c, to)),
        }
    }

    pub fn push(&mut self, c: u32) {
        self.text.push(c);
        let cur = self.st.len();
        self.st.push(State { len: self.st[self.last].len + 1, link: -1, next: Vec::new(), count: 0, last_end: NONE, prev_end: NONE });
        let mut p = self.last as i32;
        while p >= 0 && self.get(p as u32, c).is_none() {
            self.set(p as usize, c, cur as u32);
            p = self.st[p as usize].link;
        }
        if p < 0 {
            self.st[cur].link = 0;
        } else {
            let q = self.get(p as u32, c).expect("transition") as usize;
            if self.st[p as usize].len + 1 == self.st[q].len {
                self.st[cur].link = q as i32;
            } else {
                let clone = self.st.len();
                let mut cl = self.st[q].clone();
                cl.len = self.st[p as usize].len + 1;
                self.st.push(cl);
                while p >= 0 && self.get(p as u32, c) == Some(q as u32) {
                    self.set(p as usize, c, clone as u32);
                    p = self.st[p as usize].link;
                }
                self.st[q].link = clone as i32;
                self.st[cur].link = clone as i32;
            }
        }
        self.last = cur;
        // The new end position belongs to every state on the suffix-link path.
        let end = self.text.len() as u32 - 1;
        let mut s = cur as i32;
        while s > 0 {
            let st = &mut self.st[s as usize];
            st.count += 1;
            st.prev_end = st.last_end;
            st.last_end = end;
            s = st.link;
        }
    }

    pub fn extend(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.push(t);
        }
    }

    /// The state of the longest suffix of the text that also occurs earlier, and its length
    /// (None when even the last token is new).
    pub fn longest_repeat(&self) -> Option<(u32, u32)> {
        let l = self.st[self.last].link;
        (l > 0).then(|| (l as u32, self.st[l as usize].len))
    }

    /// The latest end position of state `s`'s strings that has a token after it.
    pub fn latest_followed_end(&self, s: u32) -> Option<u32> {
        let st = &self.st[s as usize];
        let n = self.text.len() as u32;
        [st.last_end, st.prev_end].into_iter().find(|&e| e != NONE && e + 1 < n)
    }

    /// The state reached by appending `c` to a match of `len` tokens in state `s`, shortening
    /// the match from the left (suffix links) until `c` has followed it, and the new match's
    /// length; None when `c` never occurred.
    pub fn step(&self, mut s: u32, mut len: u32, c: u32) -> Option<(u32, u32)> {
        loop {
            if let Some(t) = self.get(s, c) {
                return Some((t, len + 1));
            }
            let l = self.st[s as usize].link;
            if l < 0 {
                return None;
            }
            s = l as u32;
            len = self.st[s as usize].len;
        }
    }

    /// Continuations of state `s`: (token, next state, occurrences).
    pub fn children(&self, s: u32) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        self.st[s as usize].next.iter().map(move |&(c, t)| (c, t, self.st[t as usize].count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Occurrences of `pat` in `text` ending before its last position (naive oracle).
    fn naive_next(text: &[u32], pat: &[u32]) -> Vec<(u32, u32)> {
        let mut m = std::collections::BTreeMap::new();
        for i in 0..text.len().saturating_sub(pat.len()) {
            if text[i..i + pat.len()] == *pat {
                *m.entry(text[i + pat.len()]).or_insert(0u32) += 1;
            }
        }
        m.into_iter().collect()
    }

    #[test]
    fn matches_a_naive_search() {
        let mut x = 12345u64;
        let text: Vec<u32> = (0..600)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 5) as u32
            })
            .collect();
        let mut sam = Sam::default();
        for (i, &t) in text.iter().enumerate() {
            sam.push(t);
            let seen = &text[..=i];
            let (s, len) = match sam.longest_repeat() {
                Some(v) => v,
                None => continue,
            };
            let pat = &seen[seen.len() - len as usize..];
            // No longer suffix occurs earlier.
            if (len as usize) < seen.len() {
                let longer = &seen[seen.len() - len as usize - 1..];
                assert!(naive_next(seen, longer).is_empty(), "at {i}");
            }
            let got: Vec<(u32, u32)> = sam.children(s).map(|(c, _, n)| (c, n)).collect();
            assert_eq!(got, naive_next(seen, pat), "at {i}");
            // The latest earlier occurrence of the matched suffix, as the naive search sees it.
            let latest = (0..seen.len() - pat.len()).rev().find(|&j| seen[j..j + pat.len()] == *pat).map(|j| (j + pat.len() - 1) as u32);
            assert_eq!(sam.latest_followed_end(s), latest, "at {i}");
        }
    }
}
