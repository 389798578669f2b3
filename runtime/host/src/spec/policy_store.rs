//! Keeps the drafting policy between runs of the command line: `coordgen generate` and
//! `coordgen chat` start from the per-confidence acceptance statistics the last run with the
//! same machine, backend, model, build and drafter ended with, as a session's next request
//! does (see [`Policy::carried`]). One small JSON file per key under the cache directory's
//! `policy/`; a missing, stale or malformed file means a cold start, never an error. The
//! workload bench does not use it: its modes carry their statistics in memory, from an
//! empty cache directory, so its figures do not depend on earlier runs.

use std::path::Path;

use anyhow::{Context, Result};

use super::policy::Policy;
use crate::calibrate::{key as machine_key, keyed_cache_file};
use crate::engine::Session;

fn key(s: &Session, drafter: &str) -> String {
    format!("{};drafter={drafter}", machine_key(s))
}

/// The stored policy for the session's drafter `drafter` (None when there is none, or it
/// is for another key or malformed; a malformed file is reported as a warning).
pub fn load(s: &Session, drafter: &str) -> Option<(String, Policy)> {
    let k = key(s, drafter);
    load_from(&keyed_cache_file("policy", &k), &k).map(|p| (drafter.to_string(), p))
}

/// Stores the session's carried policy (if any) for the next run.
pub fn save(s: &Session) -> Result<()> {
    let Some((drafter, p)) = &s.carried_policy else { return Ok(()) };
    let k = key(s, drafter);
    save_to(&keyed_cache_file("policy", &k), &k, p)
}

fn load_from(path: &Path, key: &str) -> Option<Policy> {
    let text = std::fs::read_to_string(path).ok()?;
    // Some(None): a well-formed file for another key (an FNV collision: not ours).
    let parsed = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| {
        if v.get("key")?.as_str()? != key {
            return Some(None);
        }
        let p: Policy = serde_json::from_value(v.get("policy")?.clone()).ok()?;
        p.is_valid().then_some(Some(p))
    });
    parsed.unwrap_or_else(|| {
        tracing::warn!(file = %path.display(), "ignoring a malformed stored drafting policy");
        None
    })
}

fn save_to(path: &Path, key: &str, p: &Policy) -> Result<()> {
    let dir = path.parent().context("policy file without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::json!({ "key": key, "policy": p }).to_string();
    // Written aside and renamed, so a concurrent run never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_policy_comes_back_only_for_its_key_and_only_well_formed() {
        let dir = std::env::temp_dir().join(format!("cg-policy-{}", std::process::id()));
        let path = dir.join("policy").join("p.json");
        let mut p = Policy::new(4);
        for _ in 0..10 {
            p.record(Some(0), 4, 0);
            p.record(Some(4), 4, 3);
        }
        save_to(&path, "k1", &p).unwrap();
        let back = load_from(&path, "k1").expect("stored policy");
        assert_eq!(back.max_depth(), 4);
        for (c, d) in [(Some(0), 1), (Some(4), 2), (None, 3)] {
            assert_eq!(back.acceptance(c, d), p.acceptance(c, d));
        }
        // Another key (a different model, build or drafter) starts cold.
        assert!(load_from(&path, "k2").is_none());
        // Missing, not JSON, wrong shape, or impossible counts: a cold start, no panic.
        assert!(load_from(&dir.join("absent.json"), "k1").is_none());
        for bad in [
            "{not json".to_string(),
            r#"{"key":"k1","policy":{"max_depth":4}}"#.to_string(),
            std::fs::read_to_string(&path).unwrap().replacen("\"succ\":[", "\"succ\":[99.0,", 1),
            std::fs::read_to_string(&path).unwrap().replacen("\"max_depth\":4", "\"max_depth\":3", 1),
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert!(load_from(&path, "k1").is_none(), "accepted {bad}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
