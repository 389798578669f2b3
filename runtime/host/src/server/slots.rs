//! The server's slots: one [`Session`] (a KV slot on the shared backend, its drafter and
//! scheduler) per concurrent request, a bounded queue for requests that find every slot
//! busy, and the choice of slot: the idle one whose cache shares the longest prefix with the
//! request's prompt, so a chat's next turn or the same document asked about again lands
//! where its tokens are cached.
//!
//! Prefix sharing across slots: a busy slot announces its prompt before its prefill and
//! publishes it once prefilled. A request whose prompt shares a longer prefix with an
//! announced one than with its own slot's cache waits for that prefill and copies those KV
//! entries (`copy_prefix`) instead of computing them, so clients asking about the same
//! document at the same time prefill it once. A busy slot never shrinks below its prompt
//! until it is handed back, and [`Pool::put`] withdraws the prompt under the lock a copy
//! holds, so a copy always reads entries that hold what was published. A request announces
//! only after its own wait, so waits never form a cycle.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::Session;

/// Fewest tokens worth copying from another slot (below this, computing them is as cheap).
const MIN_SHARED: usize = 16;

/// Longest a request waits for another slot's prefill of the prefix it shares.
const SHARE_WAIT: Duration = Duration::from_secs(60);

/// A busy slot's prompt; `ready` once the slot's cache holds its entries.
struct Published {
    slot: u32,
    prompt: Box<[u32]>,
    ready: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks: a panic elsewhere leaves nothing half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Pool {
    idle: Mutex<Vec<(u64, Session)>>,
    /// Busy slots' prompts, whose KV entries the slots hold (see the module header).
    published: Mutex<Vec<Published>>,
    /// Signalled when a published prompt becomes ready or is withdrawn.
    changed: Condvar,
    /// Prefix sharing on (off: announce and adopt do nothing).
    share: bool,
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
    pub fn new(sessions: Vec<Session>, queue: usize, share: bool) -> Self {
        let total = sessions.len();
        Pool {
            idle: Mutex::new(sessions.into_iter().map(|s| (0, s)).collect()),
            published: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            share,
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

    /// Announces that `slot` (busy) is about to prefill `prompt`: requests sharing its
    /// prefix wait for it (see [`Pool::adopt_shared_prefix`]) instead of computing the same
    /// entries beside it.
    pub fn announce(&self, slot: u32, prompt: &[u32]) {
        if !self.share {
            return;
        }
        let mut p = lock(&self.published);
        p.retain(|e| e.slot != slot);
        p.push(Published { slot, prompt: prompt.into(), ready: false });
    }

    /// `slot`'s cache now holds the prompt it announced: others may copy from it.
    pub fn publish(&self, slot: u32) {
        for e in lock(&self.published).iter_mut().filter(|e| e.slot == slot) {
            e.ready = true;
        }
        self.changed.notify_all();
    }

    /// Before `session` prefills `prompt`: if a busy slot's prompt shares at least
    /// [`MIN_SHARED`] more leading tokens with it than the session's cache does, copies
    /// those entries into the session's slot, first waiting for that slot's prefill if it
    /// is still running (at most [`SHARE_WAIT`], and not after `cancel` is set). Returns
    /// the tokens copied (0: none). A failed copy leaves the session with an empty cache
    /// (the prefill then computes everything).
    pub fn adopt_shared_prefix(&self, session: &mut Session, prompt: &[u32], cancel: Option<&AtomicBool>) -> usize {
        if !self.share {
            return 0;
        }
        let own = session.common_prefix(prompt);
        let deadline = Instant::now() + SHARE_WAIT;
        // Held through the copy: the source cannot be handed back (and reused) meanwhile.
        let mut published = lock(&self.published);
        loop {
            let best = published
                .iter()
                .filter(|e| e.slot != session.slot())
                .map(|e| (e, e.prompt.iter().zip(prompt).take_while(|(a, b)| a == b).count()))
                .max_by_key(|x| x.1);
            // Leave the prompt's last token to the prefill (it needs that token's logits).
            let Some((e, n)) = best.map(|(e, n)| (e, n.min(prompt.len().saturating_sub(1)))) else { return 0 };
            if n < own + MIN_SHARED {
                return 0;
            }
            if !e.ready {
                let now = Instant::now();
                if now >= deadline || cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                    return 0;
                }
                // Woken by publish and put; the short step notices a cancelled request.
                let step = (deadline - now).min(Duration::from_millis(100));
                published = self.changed.wait_timeout(published, step).unwrap_or_else(|e| e.into_inner()).0;
                continue;
            }
            let src = e.slot;
            return match session.copy_prefix_from(src, &e.prompt[..n]) {
                Ok(()) => {
                    tracing::debug!(from = src, to = session.slot(), tokens = n, "copied a shared prompt prefix");
                    n
                }
                Err(err) => {
                    tracing::warn!(from = src, to = session.slot(), error = %err, "could not copy a shared prompt prefix; prefilling it");
                    0
                }
            };
        }
    }

    /// Gives the slot back (its cache kept for the next request).
    pub fn put(&self, lease: Lease) {
        // Withdrawn first: once idle, the slot may be taken and its cache cut.
        lock(&self.published).retain(|e| e.slot != lease.session.slot());
        // Requests waiting for this slot's prefill stop waiting.
        self.changed.notify_all();
        let used = self.uses.fetch_add(1, Ordering::SeqCst) as u64;
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push((used, lease.session));
        // The permit drops after the session is back, so a woken request finds it.
        drop(lease._permit);
    }
}
