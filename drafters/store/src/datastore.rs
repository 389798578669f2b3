//! The datastore: token ids of the user's local files with a suffix array, written by
//! `coordgen index` and memory-mapped by the drafter. Layout (little-endian): magic `CGDS`,
//! version, token count, a length-prefixed tokenizer model path, the tokens, the suffix
//! array, and an FNV-1a checksum of everything before it. A damaged file is an error.

use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"CGDS";
const VERSION: u32 = 1;
/// Separates files; never matches a real token.
pub const SEPARATOR: u32 = u32::MAX;
/// Suffixes are ordered on their first `SORT_DEPTH` tokens; matches and drafts stay within it.
pub const SORT_DEPTH: usize = 64;

/// The checksum a datastore ends with (FNV-1a over everything before it).
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn suffix<'a>(tokens: &'a [u32], i: usize) -> &'a [u32] {
    &tokens[i..(i + SORT_DEPTH).min(tokens.len())]
}

/// Builds and writes a datastore from documents already tokenized with `model`'s tokenizer.
pub fn write(path: &Path, model: &Path, docs: &[Vec<u32>]) -> Result<usize, String> {
    let mut tokens = Vec::new();
    for d in docs {
        if d.iter().any(|&t| t == SEPARATOR) {
            return Err("token id u32::MAX is reserved".into());
        }
        tokens.extend_from_slice(d);
        tokens.push(SEPARATOR);
    }
    if tokens.len() > u32::MAX as usize / 2 {
        return Err(format!("{} tokens is more than a datastore holds", tokens.len()));
    }
    let mut sa: Vec<u32> = (0..tokens.len() as u32).filter(|&i| tokens[i as usize] != SEPARATOR).collect();
    sa.sort_unstable_by(|&a, &b| suffix(&tokens, a as usize).cmp(suffix(&tokens, b as usize)));
    let model = model.to_string_lossy();
    let mut buf = Vec::with_capacity(32 + model.len() + 4 * (tokens.len() + sa.len()));
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(sa.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(model.len() as u32).to_le_bytes());
    buf.extend_from_slice(model.as_bytes());
    for &t in tokens.iter().chain(&sa) {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    let sum = fnv(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    crate::atomic::write_atomic(path, &buf).map_err(|e| format!("cannot write datastore {}: {e}", path.display()))?;
    Ok(sa.len())
}

#[derive(Debug)]
pub struct Datastore {
    pub tokens: Vec<u32>,
    pub sa: Vec<u32>,
    /// The model whose tokenizer produced the ids.
    pub model: PathBuf,
}

/// A set of datastore suffixes sharing their first `len` tokens: `sa[lo..hi]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub lo: u32,
    pub hi: u32,
    pub len: u32,
}

impl Datastore {
    pub fn load(path: &Path) -> Result<Datastore, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read datastore {}: {e}", path.display()))?;
        Self::parse(&bytes, path)
    }

    /// Parses a datastore's bytes; `path` names it in messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Datastore, String> {
        let bad = |why: String| format!("datastore {} is corrupt or not a datastore ({why}); rebuild it with `coordgen index`", path.display());
        if bytes.len() < 36 || &bytes[..4] != MAGIC {
            return Err(bad("no CGDS header".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        if u32_at(4) != VERSION {
            return Err(bad(format!("version {}", u32_at(4))));
        }
        let (n, m) = (u64_at(8) as usize, u64_at(16) as usize);
        let plen = u32_at(24) as usize;
        let body = 28usize.checked_add(plen).and_then(|x| x.checked_add(n.checked_add(m)?.checked_mul(4)?));
        if body.and_then(|b| b.checked_add(8)) != Some(bytes.len()) || m > n {
            return Err(bad(format!("{} bytes do not fit {n} tokens", bytes.len())));
        }
        let body = body.unwrap();
        if fnv(&bytes[..body]) != u64_at(body) {
            return Err(bad("checksum mismatch".into()));
        }
        let model = PathBuf::from(String::from_utf8_lossy(&bytes[28..28 + plen]).into_owned());
        let at = 28 + plen;
        let tokens: Vec<u32> = (0..n).map(|i| u32_at(at + 4 * i)).collect();
        let sa: Vec<u32> = (0..m).map(|i| u32_at(at + 4 * (n + i))).collect();
        if sa.iter().any(|&i| i as usize >= n) {
            return Err(bad("suffix index out of range".into()));
        }
        Ok(Datastore { tokens, sa, model })
    }

    fn at(&self, k: u32, off: u32) -> u32 {
        self.tokens.get((self.sa[k as usize] + off) as usize).copied().unwrap_or(SEPARATOR)
    }

    /// The range of suffixes starting with `pat` (None if absent or too long).
    pub fn find(&self, pat: &[u32]) -> Option<Range> {
        if pat.is_empty() || pat.len() > SORT_DEPTH {
            return None;
        }
        let cmp = |k: usize| {
            let s = self.sa[k] as usize;
            let end = (s + pat.len()).min(self.tokens.len());
            self.tokens[s..end].cmp(pat)
        };
        let lo = partition(self.sa.len(), |k| cmp(k).is_lt());
        let hi = partition(self.sa.len(), |k| cmp(k).is_le());
        (hi > lo).then_some(Range { lo: lo as u32, hi: hi as u32, len: pat.len() as u32 })
    }

    /// The longest suffix of `seq` (at most `max_len` tokens) found in the datastore.
    pub fn longest_suffix(&self, seq: &[u32], min_len: usize, max_len: usize) -> Option<Range> {
        let max_len = max_len.min(seq.len()).min(SORT_DEPTH - 1);
        // Matches nest (a longer match implies the shorter ones), so binary search the length.
        let (mut good, mut lo, mut hi) = (None, min_len.max(1), max_len);
        while lo <= hi {
            let mid = (lo + hi) / 2;
            match self.find(&seq[seq.len() - mid..]) {
                Some(r) => {
                    good = Some(r);
                    lo = mid + 1;
                }
                None => hi = mid - 1,
            }
        }
        good
    }

    /// The continuations of a range: (token, sub-range), with the sub-range's size as count.
    pub fn children(&self, r: Range) -> Vec<(u32, Range)> {
        let mut out = Vec::new();
        if r.len as usize >= SORT_DEPTH {
            return out;
        }
        let mut k = r.lo;
        while k < r.hi {
            let t = self.at(k, r.len);
            let end = r.lo + partition((r.hi - r.lo) as usize, |j| self.at(r.lo + j as u32, r.len) <= t) as u32;
            if t != SEPARATOR {
                out.push((t, Range { lo: k, hi: end, len: r.len + 1 }));
            }
            k = end.max(k + 1);
        }
        out
    }
}

/// First index in `0..n` where `pred` is false (pred must be true then false).
fn partition(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_suffixes_and_continuations_and_rejects_damage() {
        let dir = std::env::temp_dir().join(format!("cg-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ds.bin");
        let docs = vec![vec![1, 2, 3, 4, 1, 2, 5], vec![7, 1, 2, 3, 9]];
        write(&p, Path::new("/m.gguf"), &docs).unwrap();
        let ds = Datastore::load(&p).unwrap();
        assert_eq!(ds.model, PathBuf::from("/m.gguf"));
        let r = ds.longest_suffix(&[8, 8, 1, 2], 1, 8).unwrap();
        assert_eq!((r.len, r.hi - r.lo), (2, 3));
        let kids: Vec<(u32, u32)> = ds.children(r).into_iter().map(|(t, r)| (t, r.hi - r.lo)).collect();
        assert_eq!(kids, vec![(3, 2), (5, 1)]);
        let r3 = ds.find(&[1, 2, 3]).unwrap();
        let kids: Vec<u32> = ds.children(r3).into_iter().map(|(t, _)| t).collect();
        assert_eq!(kids, vec![4, 9]);
        assert!(ds.longest_suffix(&[42], 1, 8).is_none());
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(Datastore::load(&p).unwrap_err().contains("checksum"));
        std::fs::write(&p, &bytes[..20]).unwrap();
        assert!(Datastore::load(&p).unwrap_err().contains("corrupt"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
