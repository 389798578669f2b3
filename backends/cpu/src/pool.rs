//! A persistent worker pool: `n - 1` threads plus the caller run one closure per parallel
//! region, each with its thread index. Workers spin briefly for the next region (decode
//! issues hundreds of small regions per token) and then park on a condition variable.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Incremented for every region; workers run each generation once.
    generation: AtomicUsize,
    /// Workers still running the current region.
    pending: AtomicUsize,
    job: Mutex<Option<SendJob>>,
    wake: Condvar,
    lock: Mutex<()>,
    stop: AtomicBool,
    panicked: AtomicBool,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointer is only dereferenced while `run` keeps the closure alive, and the
// closure is `Sync`.
unsafe impl Send for SendJob {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n: usize,
}

const SPIN_ITERS: usize = 20_000;

impl ThreadPool {
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: Mutex::new(None),
            wake: Condvar::new(),
            lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let workers = (1..n)
            .map(|idx| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("coordgen-cpu-{idx}"))
                    .spawn(move || worker(s, idx))
                    .expect("spawn worker thread")
            })
            .collect();
        ThreadPool { shared, workers, n }
    }

    pub fn threads(&self) -> usize {
        self.n
    }

    /// Runs `f(i)` for every thread index `i` in `0..threads()` and waits for all.
    /// A panic in a worker is re-raised here after every worker finished.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n == 1 {
            f(0);
            return;
        }
        // SAFETY: we erase the lifetime; `run` does not return before every worker has
        // finished with the closure (pending reaches 0), so the pointer never dangles.
        let job: Job = unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f as *const _) };
        *self.shared.job.lock().unwrap() = Some(SendJob(job));
        self.shared.pending.store(self.n - 1, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap();
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            self.shared.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        let mut spins = 0usize;
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("a CPU backend worker thread panicked");
        }
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0usize;
    loop {
        // Spin first: the next region usually follows within microseconds.
        let mut spins = 0;
        while s.generation.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Relaxed) && spins < SPIN_ITERS {
            std::hint::spin_loop();
            spins += 1;
        }
        if s.generation.load(Ordering::Acquire) == seen {
            let mut g = s.lock.lock().unwrap();
            while s.generation.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Relaxed) {
                g = s.wake.wait(g).unwrap();
            }
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = s.generation.load(Ordering::Acquire);
        let job = s.job.lock().unwrap().expect("job set before generation bump");
        // SAFETY: see `run`.
        let f = unsafe { &*job.0 };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(idx))).is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap();
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Splits `0..n` into `parts` nearly equal contiguous ranges and returns range `i`.
pub fn split_range(n: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    let base = n / parts;
    let rem = n % parts;
    let start = i * base + i.min(rem);
    let len = base + usize::from(i < rem);
    start..start + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_region() {
        let pool = ThreadPool::new(3);
        for _ in 0..200 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
    }

    #[test]
    fn split_covers_range() {
        for n in [0, 1, 7, 100] {
            for parts in 1..5 {
                let total: usize = (0..parts).map(|i| split_range(n, parts, i).len()).sum();
                assert_eq!(total, n);
            }
        }
    }
}
