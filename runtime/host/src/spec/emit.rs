//! Turns accepted tokens into streamed text: end-of-sequence and stop strings end the
//! output, text that could still grow into a stop string (or is an incomplete UTF-8
//! character) is held back until it cannot.

use std::sync::Arc;

use anyhow::Result;

use crate::tokenizer::Tok;

pub struct Emitter {
    tok: Arc<Tok>,
    stop: Vec<String>,
    stop_at_eos: bool,
    max_tokens: usize,
    max_stop: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    emitted: usize,
    pub finish: Option<&'static str>,
}

impl Emitter {
    pub fn new(tok: Arc<Tok>, stop: &[String], stop_at_eos: bool, max_tokens: usize) -> Self {
        let max_stop = stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let finish = (max_tokens == 0).then_some("length");
        Emitter { tok, stop: stop.to_vec(), stop_at_eos, max_tokens, max_stop, tokens: Vec::new(), text: String::new(), emitted: 0, finish }
    }

    /// Adds one token; returns false (and sets `finish`) when the output is complete.
    pub fn push(&mut self, t: u32, on_text: &mut dyn FnMut(&str)) -> Result<bool> {
        if self.finish.is_some() {
            return Ok(false);
        }
        if self.stop_at_eos && self.tok.is_eos(t) {
            self.finish = Some("stop");
            return Ok(false);
        }
        self.tokens.push(t);
        self.text = self.tok.decode(&self.tokens)?;
        if let Some(pos) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(pos);
            self.flush(on_text);
            self.finish = Some("stop");
            return Ok(false);
        }
        let mut safe = self.text.len().saturating_sub(self.max_stop.saturating_sub(1));
        while safe > self.emitted && !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if !self.text.ends_with('\u{FFFD}') && safe > self.emitted {
            on_text(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        if self.tokens.len() >= self.max_tokens {
            self.finish = Some("length");
            return Ok(false);
        }
        Ok(true)
    }

    /// Streams whatever is still held back.
    pub fn flush(&mut self, on_text: &mut dyn FnMut(&str)) {
        if self.text.len() > self.emitted {
            on_text(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
    }
}
