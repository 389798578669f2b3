//! A drafter for tests: drafts by copying the token that followed the last occurrence of the
//! current token, and after `fail_after` proposals fails in the way `mode` names: `panic`,
//! `error`, `garbage` (a malformed tree), `oov` (a token outside any vocabulary) or `hang`
//! (a proposal that does not return for `hang_ms`, 60 s by default). The host must finish
//! the request with plain decoding and the same tokens.

use coordgen_interface::{linear_draft, DraftBudget, DraftFeedback, DraftSource, DraftTree};

pub struct Flaky {
    fail_after: u64,
    mode: String,
    calls: u64,
    hang_ms: u64,
}

fn create(options: &str) -> Result<Flaky, String> {
    let v: serde_json::Value = serde_json::from_str(options).map_err(|e| e.to_string())?;
    Ok(Flaky {
        fail_after: v["fail_after"].as_u64().unwrap_or(3),
        mode: v["mode"].as_str().unwrap_or("panic").to_string(),
        calls: 0,
        hang_ms: v["hang_ms"].as_u64().unwrap_or(60_000),
    })
}

impl DraftSource for Flaky {
    fn begin(&mut self, _prompt: &[u32]) -> Result<(), String> {
        self.calls = 0;
        Ok(())
    }
    fn propose(&mut self, seq: &[u32], budget: DraftBudget) -> Result<DraftTree, String> {
        self.calls += 1;
        if self.calls > self.fail_after {
            match self.mode.as_str() {
                "panic" => panic!("flaky drafter gave up"),
                "error" => return Err("flaky drafter error".into()),
                "oov" => return Ok(linear_draft(&[1, u32::MAX - 7])),
                "hang" => {
                    std::thread::sleep(std::time::Duration::from_millis(self.hang_ms));
                    return Ok(linear_draft(&[]));
                }
                _ => {
                    return Ok(DraftTree { tokens: vec![1, 2].into(), parents: vec![-1, 5].into(), scores: Default::default() });
                }
            }
        }
        let last = *seq.last().unwrap_or(&0);
        let mut out = Vec::new();
        if let Some(i) = seq[..seq.len().saturating_sub(1)].iter().rposition(|&t| t == last) {
            out.extend(seq[i + 1..].iter().take(budget.max_depth as usize));
        }
        Ok(linear_draft(&out))
    }
    fn observe(&mut self, _f: &DraftFeedback) -> Result<(), String> {
        Ok(())
    }
}

coordgen_interface::export_drafter!("flaky", "test drafter that fails mid-request", create);
