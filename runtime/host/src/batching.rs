//! One backend shared by several sessions (the server's slots), with the forwards they ask
//! for at about the same time merged into one `forward_slots` call.
//!
//! Each session keeps its own unchanged generation loop and sees an ordinary [`Backend`]
//! ([`SharedBackend`]). A forward joins a queue; whichever caller finds no forward running
//! becomes the *leader*: it waits briefly until every active session has its forward queued
//! (bounded by a fraction of the last forward's time, so a session busy elsewhere costs the
//! others little), runs them all as one call, and hands each caller its rows. On a
//! memory-bound CPU a forward of four slots' tokens costs little more than one, so the
//! sessions' decode steps share the weight reads. Rows are batch invariant, so merging
//! never changes a token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::plugins::{Backend, Capabilities, Forward, ModelInfo, PResult, PluginError};

/// Most tokens one merged forward carries (more queued tokens wait for the next one).
const MAX_MERGED_TOKENS: usize = 512;

struct Job {
    id: u64,
    slot: u32,
    tokens: Vec<u32>,
    positions: Vec<u32>,
    mask: Vec<u8>,
    rows: Vec<u32>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// Results by job id, with the tokens and the number of forwards merged in that call.
    done: HashMap<u64, (PResult<Vec<f32>>, u32, u32)>,
    leader: bool,
    next_id: u64,
    last_exec: Duration,
}

/// How the merging went (for the server's log and the benchmark).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct MergeStats {
    /// Backend forward calls made.
    pub calls: u64,
    /// Session forwards they carried (calls with more than one slot merged several).
    pub forwards: u64,
    pub tokens: u64,
}

struct Core {
    name: String,
    identity: String,
    backend: Mutex<Box<dyn Backend>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Sessions in the middle of a request: the leader waits for a forward from each.
    active: AtomicUsize,
    stats: Mutex<MergeStats>,
}

/// The handle the owner keeps: hands out [`SharedBackend`]s and marks requests active.
#[derive(Clone)]
pub struct Batcher(Arc<Core>);

/// While alive, the leader waits for this session's forwards before running a merged one.
pub struct ActiveGuard(Arc<Core>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        // A leader waiting for this session's forward stops waiting.
        self.0.wake.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Batcher {
    pub fn new(backend: Box<dyn Backend>) -> Self {
        Batcher(Arc::new(Core {
            name: backend.name().to_string(),
            identity: backend.identity(),
            backend: Mutex::new(backend),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            active: AtomicUsize::new(0),
            stats: Mutex::new(MergeStats::default()),
        }))
    }

    /// A backend view for one session.
    pub fn backend(&self) -> Box<dyn Backend> {
        Box::new(SharedBackend { core: self.0.clone(), last_merge: (0, 0) })
    }

    /// Marks one session's request as running until the guard drops.
    pub fn active(&self) -> ActiveGuard {
        self.0.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self.0.clone())
    }

    pub fn stats(&self) -> MergeStats {
        *lock(&self.0.stats)
    }
}

impl Core {
    fn forward(&self, f: &Forward<'_>) -> (PResult<Vec<f32>>, u32, u32) {
        let mut q = lock(&self.queue);
        let id = q.next_id;
        q.next_id += 1;
        q.jobs.push(Job { id, slot: f.slot, tokens: f.tokens.to_vec(), positions: f.positions.to_vec(), mask: f.mask.to_vec(), rows: f.logit_rows.to_vec() });
        self.wake.notify_all();
        loop {
            if let Some(r) = q.done.remove(&id) {
                return r;
            }
            if q.leader {
                q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            q.leader = true;
            // Wait (briefly) for the other active sessions' forwards.
            let window = (q.last_exec / 10).clamp(Duration::from_micros(200), Duration::from_millis(5));
            let deadline = Instant::now() + window;
            loop {
                let distinct = distinct_slots(&q.jobs);
                let now = Instant::now();
                if distinct >= self.active.load(Ordering::SeqCst) || now >= deadline {
                    break;
                }
                q = self.wake.wait_timeout(q, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            }
            let batch = take_batch(&mut q.jobs);
            drop(q);
            let t = Instant::now();
            // A panic here must not leave `leader` set (every session would wait forever):
            // the jobs of this batch get an error instead.
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&batch))).unwrap_or_else(|_| {
                batch.iter().map(|_| Err(PluginError::Call { plugin: self.name.clone(), message: "a merged forward panicked".into() })).collect()
            });
            let took = t.elapsed();
            q = lock(&self.queue);
            q.last_exec = took;
            let tokens: u32 = batch.iter().map(|j| j.tokens.len() as u32).sum();
            for (job, r) in batch.iter().zip(results) {
                q.done.insert(job.id, (r, tokens, batch.len() as u32));
            }
            q.leader = false;
            self.wake.notify_all();
        }
    }

    /// Runs the jobs as one call; when that fails (one bad batch fails the call, appending
    /// nothing), each job runs alone so only the bad one gets the error.
    fn run(&self, jobs: &[Job]) -> Vec<PResult<Vec<f32>>> {
        let fw: Vec<Forward<'_>> =
            jobs.iter().map(|j| Forward { slot: j.slot, tokens: &j.tokens, positions: &j.positions, mask: &j.mask, logit_rows: &j.rows }).collect();
        let mut b = lock(&self.backend);
        {
            let mut s = lock(&self.stats);
            s.calls += 1;
            s.forwards += jobs.len() as u64;
            s.tokens += jobs.iter().map(|j| j.tokens.len() as u64).sum::<u64>();
        }
        if fw.len() == 1 {
            return vec![b.forward(&fw[0])];
        }
        match b.forward_slots(&fw) {
            Ok(outs) => outs.into_iter().map(Ok).collect(),
            Err(_) => fw.iter().map(|f| b.forward(f)).collect(),
        }
    }
}

fn distinct_slots(jobs: &[Job]) -> usize {
    let mut s: Vec<u32> = jobs.iter().map(|j| j.slot).collect();
    s.sort_unstable();
    s.dedup();
    s.len()
}

/// The oldest jobs, one per slot, up to [`MAX_MERGED_TOKENS`] (always at least one).
fn take_batch(jobs: &mut Vec<Job>) -> Vec<Job> {
    let mut taken = Vec::new();
    let mut rest = Vec::new();
    let mut tokens = 0;
    for j in jobs.drain(..) {
        let fits = taken.is_empty() || tokens + j.tokens.len() <= MAX_MERGED_TOKENS;
        if fits && !taken.iter().any(|t: &Job| t.slot == j.slot) {
            tokens += j.tokens.len();
            taken.push(j);
        } else {
            rest.push(j);
        }
    }
    *jobs = rest;
    taken
}

/// A session's view of the shared backend: forwards merge, everything else goes straight
/// to the backend under its lock.
pub struct SharedBackend {
    core: Arc<Core>,
    /// Other sessions' tokens and forwards in this session's last forward.
    last_merge: (u32, u32),
}

impl SharedBackend {
    fn with<T>(&self, f: impl FnOnce(&mut Box<dyn Backend>) -> T) -> T {
        f(&mut lock(&self.core.backend))
    }
}

impl Backend for SharedBackend {
    fn name(&self) -> &str {
        &self.core.name
    }
    fn identity(&self) -> String {
        self.core.identity.clone()
    }
    fn capabilities(&self) -> Capabilities {
        self.with(|b| b.capabilities())
    }
    fn set_threads(&mut self, n: u32) -> PResult<()> {
        // The threads belong to every session at once; a single one cannot take them.
        let _ = n;
        Err(PluginError::Call { plugin: self.core.name.clone(), message: "a shared backend's threads are fixed".into() })
    }
    fn load_model(&mut self, path: &Path) -> PResult<ModelInfo> {
        self.with(|b| b.load_model(path))
    }
    fn create_slot(&mut self, model: u64, n_ctx: u32) -> PResult<u32> {
        self.with(|b| b.create_slot(model, n_ctx))
    }
    fn free_slot(&mut self, slot: u32) -> PResult<()> {
        self.with(|b| b.free_slot(slot))
    }
    fn slot_len(&self, slot: u32) -> PResult<u32> {
        self.with(|b| b.slot_len(slot))
    }
    fn truncate(&mut self, slot: u32, len: u32) -> PResult<()> {
        self.with(|b| b.truncate(slot, len))
    }
    fn copy_prefix(&mut self, src: u32, dst: u32, len: u32) -> PResult<()> {
        self.with(|b| b.copy_prefix(src, dst, len))
    }
    fn keep_entries(&mut self, slot: u32, start: u32, keep: &[u32]) -> PResult<()> {
        self.with(|b| b.keep_entries(slot, start, keep))
    }
    fn forward(&mut self, f: &Forward<'_>) -> PResult<Vec<f32>> {
        let (r, tokens, forwards) = self.core.forward(f);
        self.last_merge = (tokens.saturating_sub(f.tokens.len() as u32), forwards.saturating_sub(1));
        r
    }
    fn merged_with(&self) -> Option<(u32, u32)> {
        Some(self.last_merge)
    }
    fn stats_json(&self) -> String {
        self.with(|b| b.stats_json())
    }
}
