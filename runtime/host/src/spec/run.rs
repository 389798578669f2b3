//! Generation on a session: prefill, then verification steps ([`super::decoder`]). Each
//! step asks the draft stage for a token tree (sized by the policy and the scheduler),
//! verifies the pending token plus the whole tree in one forward, keeps the accepted path in
//! the KV cache (rejected entries are dropped), and streams the accepted tokens. With no
//! drafter, or when drafts do not pay, a step is a plain one-token decode, so plain
//! generation is the same loop with empty trees.

use std::time::Instant;

use anyhow::Result;

use super::decoder::Decoder;
use crate::engine::{GenerateParams, Generation, Timings};
use crate::plugins::Drafter;
use crate::scheduler::{Fixed, Scheduler};
use crate::session::{Session, DEFAULT_PREFILL_CHUNK};

impl Session {
    /// Generates after `prompt` (with the session's drafter, if any), calling `on_text` with
    /// each new piece of text as soon as its tokens are accepted.
    pub fn generate(&mut self, prompt: &[u32], p: &GenerateParams, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        let drafter = self.take_drafter();
        let sched = self.replace_scheduler(None).unwrap_or_else(|| Box::new(Fixed::new(4, DEFAULT_PREFILL_CHUNK as u32)));
        let (back, sched, r) = self.run(prompt, p, drafter, sched, on_text);
        if r.is_err() {
            // A failed forward may have left the slot holding more (or other) than the
            // host's record of it; start the next request from an empty cache.
            if let Err(e) = self.reset() {
                tracing::warn!(error = %e, "could not clear the KV slot after a failed request");
            }
        }
        self.put_drafter(back);
        self.replace_scheduler(Some(sched));
        r
    }

    fn run(
        &mut self,
        prompt: &[u32],
        p: &GenerateParams,
        drafter: Option<Box<dyn Drafter>>,
        mut sched: Box<dyn Scheduler>,
        on_text: &mut dyn FnMut(&str),
    ) -> (Option<Box<dyn Drafter>>, Box<dyn Scheduler>, Result<Generation>) {
        let _span = tracing::info_span!("generate", prompt_tokens = prompt.len()).entered();
        let t0 = Instant::now();
        let max_fwd = match self.backend().capabilities().max_width {
            0 => 512,
            w => w.min(512),
        };
        match sched.prefill_chunk(prompt.len() as u32, max_fwd) {
            Ok(c) => self.set_prefill_chunk(c as usize),
            Err(e) => tracing::warn!(error = %e, "scheduler could not size the prefill chunk"),
        }
        let mut dec = Decoder::new(self, prompt, p, drafter, sched);
        let (logits, computed) = match dec.prefill(prompt) {
            Ok(x) => x,
            Err(e) => return dec.abandon(e),
        };
        if let Some(hook) = &p.on_prefilled {
            (hook.0)();
        }
        let timings = Timings { prompt_tokens: prompt.len(), prefill_tokens: computed, prefill_ms: t0.elapsed().as_secs_f64() * 1e3, ..Default::default() };
        let t1 = Instant::now();
        let r = dec.decode(&logits, on_text);
        dec.finish(r, timings, t1, on_text)
    }
}
