//! The draft stage: a drafter running on its own thread, fed by crossbeam channels, so its
//! `begin` (indexing the prompt, or prefilling a draft model) overlaps the target's prefill.
//! Step feedback is queued and delivered just before the next proposal. A proposal can also
//! be asked for without waiting (overlapped drafting: the drafter works while the target
//! verifies) and collected later. Also [`Chain`], which combines
//! drafters: the first one with a draft wins, all of them see what was accepted.

use std::collections::VecDeque;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::plugins::{Draft, Drafter, Feedback, PResult, PluginError, Predictions};

enum Cmd {
    Begin(Vec<u32>),
    Propose { sequence: Vec<u32>, nodes: u32, depth: u32 },
    Observe(Feedback),
    Calibrate(Predictions),
}

enum Reply {
    Begun(PResult<()>),
    Draft(PResult<Draft>, f64),
    Observed(PResult<()>),
}

/// A drafter on its own thread for the length of one request.
pub struct DraftStage {
    name: String,
    tx: Option<Sender<Cmd>>,
    rx: Receiver<Reply>,
    /// Replies received while polling, not yet consumed by a wait.
    arrived: VecDeque<Reply>,
    handle: Option<JoinHandle<Box<dyn Drafter>>>,
    /// Feedback not yet delivered. It goes out right before the next proposal (or at the
    /// end), while the host waits anyway, so the drafter's thread never wakes in the middle
    /// of a target forward and takes a core from the backend's workers.
    queued: Vec<Feedback>,
    /// A proposal asked for with [`propose_ahead`](Self::propose_ahead) whose reply has not
    /// been taken.
    ahead: bool,
    /// Whether `begin` has answered (until then the wait allows [`BEGIN_LIMIT`]).
    begun: bool,
    /// How long a proposal may take before the drafter counts as hung.
    limit: Duration,
    /// The drafter missed its time limit: its thread is abandoned, never joined.
    hung: bool,
}

/// Time allowed for `begin` (a draft model's prefill of a long prompt takes a while).
const BEGIN_LIMIT: Duration = Duration::from_secs(600);

/// Time allowed for one proposal: `COORDGEN_DRAFT_TIMEOUT_MS`, 10 s by default. A drafter
/// slower than this costs more than it could save, and one that never answers would hang the
/// request; past it the request goes on with plain decoding.
pub fn proposal_limit() -> Duration {
    let ms = std::env::var("COORDGEN_DRAFT_TIMEOUT_MS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(10_000);
    Duration::from_millis(ms.max(1))
}

fn gone(name: &str) -> PluginError {
    PluginError::Call { plugin: name.to_string(), message: "the draft stage stopped unexpectedly".into() }
}

impl DraftStage {
    /// Starts the stage and sends `begin(prompt)` at once (its result is awaited by the
    /// first [`propose`](Self::propose)); each proposal may take up to `limit`.
    pub fn start(mut drafter: Box<dyn Drafter>, prompt: &[u32], limit: Duration) -> DraftStage {
        let name = drafter.name().to_string();
        let (tx, crx) = unbounded::<Cmd>();
        let (rtx, rx) = unbounded::<Reply>();
        let handle = std::thread::Builder::new()
            .name(format!("draft-{name}"))
            .spawn(move || {
                for cmd in crx {
                    let reply = match cmd {
                        Cmd::Begin(p) => {
                            let _s = tracing::info_span!("draft_begin", prompt_tokens = p.len()).entered();
                            Reply::Begun(drafter.begin(&p))
                        }
                        Cmd::Propose { sequence, nodes, depth } => {
                            let _s = tracing::debug_span!("draft", nodes, depth).entered();
                            let t = Instant::now();
                            let d = drafter.propose(&sequence, nodes, depth);
                            Reply::Draft(d, t.elapsed().as_secs_f64() * 1e3)
                        }
                        Cmd::Observe(f) => Reply::Observed(drafter.observe(&f)),
                        Cmd::Calibrate(c) => {
                            let _s = tracing::info_span!("draft_calibrate", positions = c.len()).entered();
                            Reply::Observed(drafter.calibrate(&c))
                        }
                    };
                    if rtx.send(reply).is_err() {
                        break;
                    }
                }
                drafter
            })
            .expect("spawning the draft thread");
        let _ = tx.send(Cmd::Begin(prompt.to_vec()));
        DraftStage {
            name,
            tx: Some(tx),
            rx,
            arrived: VecDeque::new(),
            handle: Some(handle),
            queued: Vec::new(),
            ahead: false,
            begun: false,
            limit,
            hung: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for replies until `want` matches; an error reply (or a lost stage) is returned.
    /// A drafter that does not answer within its limit is marked hung and an error returned.
    fn wait<T>(&mut self, want: impl Fn(Reply) -> Option<PResult<T>>) -> PResult<T> {
        loop {
            let r = match self.arrived.pop_front() {
                Some(r) => r,
                None => {
                    let limit = if self.begun { self.limit } else { BEGIN_LIMIT };
                    match self.rx.recv_timeout(limit) {
                        Ok(r) => r,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            self.hung = true;
                            return Err(PluginError::Call {
                                plugin: self.name.clone(),
                                message: format!("no answer within {} ms; the drafter is abandoned", limit.as_millis()),
                            });
                        }
                        Err(_) => return Err(gone(&self.name)),
                    }
                }
            };
            if matches!(r, Reply::Begun(_)) {
                self.begun = true;
            }
            match r {
                Reply::Begun(Err(e)) | Reply::Observed(Err(e)) => return Err(e),
                Reply::Begun(Ok(())) => {}
                other => {
                    if let Some(v) = want(other) {
                        return v;
                    }
                }
            }
        }
    }

    /// Asks for a draft continuing `sequence`; returns it with the drafter's time in ms. A
    /// proposal still running ahead is waited for and dropped first.
    pub fn propose(&mut self, sequence: &[u32], nodes: u32, depth: u32) -> PResult<(Draft, f64)> {
        self.propose_ahead(sequence, nodes, depth)?;
        self.take_ahead()
    }

    /// Asks for a draft continuing `sequence` without waiting for it: the drafter works on
    /// it while the caller verifies. [`take_ahead`](Self::take_ahead) collects it; any other
    /// proposal drops it.
    pub fn propose_ahead(&mut self, sequence: &[u32], nodes: u32, depth: u32) -> PResult<()> {
        if self.ahead {
            self.take_ahead()?;
        }
        self.flush()?;
        let tx = self.tx.as_ref().ok_or_else(|| gone(&self.name))?;
        tx.send(Cmd::Propose { sequence: sequence.to_vec(), nodes, depth }).map_err(|_| gone(&self.name))?;
        self.ahead = true;
        Ok(())
    }

    /// Whether the drafter is still working on a proposal asked for ahead (its reply has not
    /// arrived yet). Does not wait.
    pub fn drafting_ahead(&mut self) -> bool {
        if !self.ahead {
            return false;
        }
        self.arrived.extend(self.rx.try_iter());
        !self.arrived.iter().any(|r| matches!(r, Reply::Draft(..)))
    }

    /// Waits for the proposal asked for by [`propose_ahead`](Self::propose_ahead); returns
    /// it with the drafter's time in ms (an error if none is outstanding).
    pub fn take_ahead(&mut self) -> PResult<(Draft, f64)> {
        if !std::mem::take(&mut self.ahead) {
            return Err(PluginError::Call { plugin: self.name.clone(), message: "no proposal is outstanding".into() });
        }
        self.wait(|r| match r {
            Reply::Draft(d, ms) => Some(d.map(|d| (d, ms))),
            _ => None,
        })
    }

    /// Hands the drafter the target's predictions over the prompt (before the first
    /// proposal; an error surfaces at the next proposal).
    pub fn calibrate(&mut self, c: Predictions) -> PResult<()> {
        let tx = self.tx.as_ref().ok_or_else(|| gone(&self.name))?;
        tx.send(Cmd::Calibrate(c)).map_err(|_| gone(&self.name))
    }

    /// Reports a step's outcome (delivered before the next proposal; errors surface then).
    pub fn observe(&mut self, f: Feedback) {
        self.queued.push(f);
    }

    fn flush(&mut self) -> PResult<()> {
        let tx = self.tx.as_ref().ok_or_else(|| gone(&self.name))?;
        for f in self.queued.drain(..) {
            tx.send(Cmd::Observe(f)).map_err(|_| gone(&self.name))?;
        }
        Ok(())
    }

    /// Stops the thread and hands the drafter back (None if its thread died), with the
    /// result of `finish()` on it.
    /// A hung drafter is left on its thread (which ends when the call does, if ever).
    pub fn stop(mut self) -> (Option<Box<dyn Drafter>>, PResult<()>) {
        if self.hung {
            drop(self.tx.take());
            drop(self.handle.take());
            return (None, Err(PluginError::Call { plugin: self.name.clone(), message: "abandoned after missing its time limit".into() }));
        }
        let flushed = self.flush();
        drop(self.tx.take());
        let mut first_err = flushed;
        let arrived: Vec<Reply> = self.arrived.drain(..).collect();
        for r in arrived.into_iter().chain(self.rx.iter()) {
            if let Reply::Begun(Err(e)) | Reply::Observed(Err(e)) = r {
                if first_err.is_ok() {
                    first_err = Err(e);
                }
            }
        }
        let d = self.handle.take().and_then(|h| h.join().ok());
        match d {
            Some(mut d) => {
                let fin = d.finish();
                (Some(d), first_err.and(fin))
            }
            None => (None, Err(gone(&self.name))),
        }
    }
}

/// Several drafters asked in order; the first non-empty draft is used.
pub struct Chain {
    name: String,
    parts: Vec<Box<dyn Drafter>>,
    last: Option<usize>,
}

impl Chain {
    pub fn new(parts: Vec<Box<dyn Drafter>>) -> Chain {
        let name = parts.iter().map(|p| p.name()).collect::<Vec<_>>().join(",");
        Chain { name, parts, last: None }
    }
}

impl Drafter for Chain {
    fn name(&self) -> &str {
        &self.name
    }
    fn begin(&mut self, prompt: &[u32]) -> PResult<()> {
        self.parts.iter_mut().try_for_each(|p| p.begin(prompt))
    }
    fn propose(&mut self, sequence: &[u32], max_nodes: u32, max_depth: u32) -> PResult<Draft> {
        self.last = None;
        for (i, p) in self.parts.iter_mut().enumerate() {
            let d = p.propose(sequence, max_nodes, max_depth)?;
            if !d.tokens.is_empty() {
                self.last = Some(i);
                return Ok(d);
            }
        }
        Ok(Draft::default())
    }
    fn observe(&mut self, f: &Feedback) -> PResult<()> {
        for (i, p) in self.parts.iter_mut().enumerate() {
            if Some(i) == self.last {
                p.observe(f)?;
            } else {
                p.observe(&Feedback { accepted: f.accepted.clone(), ..Default::default() })?;
            }
        }
        Ok(())
    }
    fn vocabulary(&self) -> Option<std::path::PathBuf> {
        self.parts.iter().find_map(|p| p.vocabulary())
    }
    fn calibration_top_k(&self) -> u32 {
        self.parts.iter().map(|p| p.calibration_top_k()).max().unwrap_or(0)
    }
    fn calibrate(&mut self, c: &Predictions) -> PResult<()> {
        self.parts.iter_mut().filter(|p| p.calibration_top_k() > 0).try_for_each(|p| p.calibrate(c))
    }
    fn own_threads(&self) -> u32 {
        self.parts.iter().map(|p| p.own_threads()).sum()
    }
    fn finish(&mut self) -> PResult<()> {
        let mut r = Ok(());
        for p in &mut self.parts {
            let x = p.finish();
            if r.is_ok() {
                r = x;
            }
        }
        r
    }
}
