//! The online n-gram cache: for each pair of tokens, how often each next token followed it in
//! accepted output. Saved as a small binary file (magic, version, entry count, entries) so it
//! persists across runs; a damaged file is reported, never half-loaded.

use std::collections::HashMap;
use std::path::Path;

const MAGIC: &[u8; 4] = b"CGNG";
const VERSION: u32 = 1;
/// Keys kept at most; the rarest are dropped beyond this.
const MAX_KEYS: usize = 1 << 20;

#[derive(Default, Debug)]
pub struct NgramCache {
    map: HashMap<u64, Vec<(u32, u32)>>,
}

fn key(a: u32, b: u32) -> u64 {
    (a as u64) << 32 | b as u64
}

impl NgramCache {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn add(&mut self, a: u32, b: u32, next: u32) {
        let e = self.map.entry(key(a, b)).or_default();
        match e.iter_mut().find(|x| x.0 == next) {
            Some(x) => x.1 = x.1.saturating_add(1),
            None => e.push((next, 1)),
        }
    }

    /// The most frequent next token after (a, b), if it was seen at least twice.
    pub fn best(&self, a: u32, b: u32) -> Option<u32> {
        let e = self.map.get(&key(a, b))?;
        let best = e.iter().max_by_key(|x| (x.1, std::cmp::Reverse(x.0)))?;
        (best.1 >= 2).then_some(best.0)
    }

    /// Follows the most frequent continuation for up to `depth` tokens.
    pub fn greedy_chain(&self, mut a: u32, mut b: u32, depth: usize) -> Vec<u32> {
        let mut out = Vec::new();
        while out.len() < depth {
            match self.best(a, b) {
                Some(n) => {
                    out.push(n);
                    a = b;
                    b = n;
                }
                None => break,
            }
        }
        out
    }

    pub fn load(path: &Path) -> Result<NgramCache, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read n-gram cache {}: {e}", path.display()))?;
        Self::parse(&bytes, path)
    }

    /// Parses an n-gram cache's bytes; `path` names it in messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<NgramCache, String> {
        let bad = |why: &str| format!("n-gram cache {} is corrupt ({why}); delete it to start a new cache", path.display());
        if bytes.len() < 16 || &bytes[..4] != MAGIC {
            return Err(bad("not an n-gram cache file"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        if u32_at(4) != VERSION {
            return Err(bad(&format!("version {} instead of {VERSION}", u32_at(4))));
        }
        let n = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
        if n.checked_mul(16).and_then(|x| x.checked_add(16)) != Some(bytes.len()) {
            return Err(bad(&format!("{} bytes for {n} entries", bytes.len())));
        }
        let mut c = NgramCache::default();
        for i in 0..n {
            let o = 16 + i * 16;
            let (a, b, next, count) = (u32_at(o), u32_at(o + 4), u32_at(o + 8), u32_at(o + 12));
            if count == 0 {
                return Err(bad("an entry with a zero count"));
            }
            c.map.entry(key(a, b)).or_default().push((next, count));
        }
        Ok(c)
    }

    /// Writes the cache atomically (a temporary file renamed over the old one).
    pub fn save(&mut self, path: &Path) -> Result<(), String> {
        if self.map.len() > MAX_KEYS {
            let mut totals: Vec<(u64, u32)> = self.map.iter().map(|(k, v)| (*k, v.iter().map(|x| x.1).sum())).collect();
            totals.sort_by_key(|x| std::cmp::Reverse(x.1));
            for (k, _) in &totals[MAX_KEYS..] {
                self.map.remove(k);
            }
        }
        let n: usize = self.map.values().map(|v| v.len()).sum();
        let mut buf = Vec::with_capacity(16 + n * 16);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&(n as u64).to_le_bytes());
        for (k, v) in &self.map {
            for &(next, count) in v {
                for x in [(k >> 32) as u32, *k as u32, next, count] {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        crate::atomic::write_atomic(path, &buf).map_err(|e| format!("cannot write n-gram cache {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let dir = std::env::temp_dir().join(format!("cg-ngram-{}", std::process::id()));
        let p = dir.join("c.bin");
        let mut c = NgramCache::default();
        for _ in 0..3 {
            c.add(1, 2, 3);
            c.add(2, 3, 4);
        }
        c.add(1, 2, 9);
        c.save(&p).unwrap();
        let d = NgramCache::load(&p).unwrap();
        assert_eq!(d.greedy_chain(1, 2, 5), vec![3, 4]);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&p, &bytes).unwrap();
        let e = NgramCache::load(&p).unwrap_err();
        assert!(e.contains("corrupt"), "{e}");
        std::fs::write(&p, b"hello world, not a cache").unwrap();
        assert!(NgramCache::load(&p).unwrap_err().contains("not an n-gram cache"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
