//! The server's slots: one [`Session`] (a KV slot on the shared backend, its drafter and
//! scheduler) per concurrent request, a bounded queue for requests that find every slot
//! busy, and the choice of slot: the idle one whose cache shares the longest prefix with the
//! request's prompt, so a chat's next turn or the same document asked about again lands
//! where its tokens are cached.
//!
//! Prefix sharing across slots: a busy slot publishes its prompt once it is prefilled, and a
//! request whose prompt shares a longer prefix with a published one than with its own slot's
//! cache copies those KV entries (`copy_prefix`) instead of computing them, so clients
//! asking about the same document at about the same time prefill it once. A busy slot never
//! shrinks below its prompt until it is handed back, and [`Pool::put`] withdraws the prompt
//! under the lock a copy holds, so a copy always reads entries that hold what was published.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::Session;

/// Fewest tokens worth copying from another slot (below this, computing them is as cheap).
const MIN_SHARED: usize = 16;

pub struct Pool {
    idle: Mutex<Vec<(u64, Session)>>,
    /// Busy slots' prompts, whose KV entries the slots hold (see the module header).
    published: Mutex<Vec<(u32, Arc<[u32]>)>>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// Requests that may wait for a slot; beyond them a request is refused.
    queue: usize,
    total: usize,
    uses: AtomicUsize,
}

/// A request's hold on a slot: the session, handed back to the pool by [`Pool::put`].
pub struct Lease {
    pub session: Session,
    _permit: OwnedSemaphorePermit,
}

/// Every slot is busy and the queue is full.
#[derive(Debug)]
pub struct Busy;

struct Waiting<'a>(&'a AtomicUsize);
impl Drop for Waiting<'_> {
    // Runs also when a queued client disconnects and its request future is dropped.
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    pub fn new(sessions: Vec<Session>, queue: usize) -> Self {
        let total = sessions.len();
        Pool {
            idle: Mutex::new(sessions.into_iter().map(|s| (0, s)).collect()),
            published: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(total)),
            waiting: AtomicUsize::new(0),
            queue,
            total,
            uses: AtomicUsize::new(1),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
    pub fn idle(&self) -> usize {
        self.permits.available_permits()
    }
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Waits for a slot (in arrival order) and takes the idle one best for `prompt`; refuses
    /// at once when every slot is busy and `queue` requests are already waiting.
    pub async fn take(&self, prompt: &[u32]) -> Result<Lease, Busy> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Err(Busy);
                }
                let _w = Waiting(&self.waiting);
                self.permits.clone().acquire_owned().await.map_err(|_| Busy)?
            }
        };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Longest shared prefix first; among equals the least recently used, so the caches
        // of recent conversations survive longest.
        let best = (0..idle.len())
            .max_by_key(|&i| {
                let (used, s) = &idle[i];
                let common = s.common_prefix(prompt);
                (common, std::cmp::Reverse(*used))
            })
            .expect("a permit implies an idle slot");
        let (_, session) = idle.swap_remove(best);
        Ok(Lease { session, _permit: permit })
    }

    /// Offers `prompt` (whose KV entries `slot`, a busy slot, now holds) to other requests.
    pub fn publish(&self, slot: u32, prompt: &[u32]) {
        let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|(s, _)| *s != slot);
        p.push((slot, prompt.into()));
    }

    /// Before `session` prefills `prompt`: if a busy slot's published prompt shares at least
    /// [`MIN_SHARED`] more leading tokens with it than the session's cache does, copies
    /// those entries into the session's slot. Returns the tokens copied (0: none). A failed
    /// copy leaves the session with an empty cache (the prefill then computes everything).
    pub fn adopt_shared_prefix(&self, session: &mut Session, prompt: &[u32]) -> usize {
        let own = session.common_prefix(prompt);
        // Held through the copy: the source cannot be handed back (and reused) meanwhile.
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let best = published
            .iter()
            .filter(|(s, _)| *s != session.slot())
            .map(|(s, p)| (*s, p, p.iter().zip(prompt).take_while(|(a, b)| a == b).count()))
            .max_by_key(|x| x.2);
        // Leave the prompt's last token to the prefill (it needs that token's logits).
        let Some((src, tokens, n)) = best.map(|(s, p, n)| (s, p, n.min(prompt.len().saturating_sub(1)))) else { return 0 };
        if n < own + MIN_SHARED {
            return 0;
        }
        match session.copy_prefix_from(src, &tokens[..n]) {
            Ok(()) => {
                tracing::debug!(from = src, to = session.slot(), tokens = n, "copied a shared prompt prefix");
                n
            }
            Err(e) => {
                tracing::warn!(from = src, to = session.slot(), error = %e, "could not copy a shared prompt prefix; prefilling it");
                0
            }
        }
    }

    /// Gives the slot back (its cache kept for the next request).
    pub fn put(&self, lease: Lease) {
        // Withdrawn first: once idle, the slot may be taken and its cache cut.
        self.published.lock().unwrap_or_else(|e| e.into_inner()).retain(|(s, _)| *s != lease.session.slot());
        let used = self.uses.fetch_add(1, Ordering::SeqCst) as u64;
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push((used, lease.session));
        // The permit drops after the session is back, so a woken request finds it.
        drop(lease._permit);
    }
}
