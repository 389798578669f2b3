//! The server's slots: one [`Session`] (a KV slot on the shared backend, its drafter and
//! scheduler) per concurrent request, a bounded queue for requests that find every slot
//! busy, and the choice of slot: the idle one whose cache shares the longest prefix with the
//! request's prompt, so a chat's next turn or the same document asked about again lands
//! where its tokens are cached.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::Session;

pub struct Pool {
    idle: Mutex<Vec<(u64, Session)>>,
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

    /// Gives the slot back (its cache kept for the next request).
    pub fn put(&self, lease: Lease) {
        let used = self.uses.fetch_add(1, Ordering::SeqCst) as u64;
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push((used, lease.session));
        // The permit drops after the session is back, so a woken request finds it.
        drop(lease._permit);
    }
}
