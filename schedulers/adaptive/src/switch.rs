//! Progressive graph switching for backends with static-shape graphs per layer block (the
//! NPU case): near the end of the prefill, blocks move from their prefill graph to their
//! verify graph, last block first, so that loading one block's graph overlaps the other
//! blocks' compute instead of all loads waiting for the prefill to end. A block that has
//! switched runs its remaining prefill chunks with the (slower) verify graph, so switching
//! pays only while the hidden load time exceeds that penalty; a greedy pass over the blocks
//! from the last, each trying earlier switch chunks while the simulated time to the first
//! verification drops, decides.

use coordgen_interface::{SwitchPlan, SwitchProblem};

/// Time (µs) until every block holds its verify graph and the prefill has finished, for
/// switch chunks `at` (block `b` runs chunks `at[b]..` with the verify graph).
pub fn simulate(p: &SwitchProblem, at: &[u32]) -> u64 {
    let nb = p.prefill_us.len();
    let mut t = 0u64; // compute clock
    let mut loader = 0u64; // when the loader is free
    let mut loaded = vec![u64::MAX; nb];
    // A block's load can start once its last prefill-graph chunk is done; blocks that never
    // use the prefill graph again (at == 0) start loading at once, in block order from the last.
    let mut queue_load = |b: usize, ready: u64, loaded: &mut Vec<u64>| {
        let start = loader.max(ready);
        loader = start + p.load_us;
        loaded[b] = loader;
    };
    for b in (0..nb).rev() {
        if at[b] == 0 {
            queue_load(b, 0, &mut loaded);
        }
    }
    for c in 0..p.chunks {
        for b in 0..nb {
            if c >= at[b] {
                t = t.max(loaded[b]) + p.verify_us[b];
            } else {
                t += p.prefill_us[b];
                if c + 1 == at[b] {
                    queue_load(b, t, &mut loaded);
                }
            }
        }
    }
    t.max(loaded.iter().copied().filter(|&x| x != u64::MAX).max().unwrap_or(0))
}

/// The greedy plan: start from switching every block after the prefill; then, from the last
/// block to the first, move a block's switch earlier one chunk at a time while that lowers
/// the simulated ready time; stop at the first block that gains nothing.
pub fn plan(p: &SwitchProblem) -> SwitchPlan {
    let nb = p.prefill_us.len().min(p.verify_us.len());
    let p = SwitchProblem { chunks: p.chunks, prefill_us: p.prefill_us[..nb].into(), verify_us: p.verify_us[..nb].into(), load_us: p.load_us };
    let mut at = vec![p.chunks; nb];
    let naive = simulate(&p, &at);
    let mut best = naive;
    for b in (0..nb).rev() {
        let mut moved = false;
        while at[b] > 0 {
            at[b] -= 1;
            let t = simulate(&p, &at);
            if t < best {
                best = t;
                moved = true;
            } else {
                at[b] += 1;
                break;
            }
        }
        if !moved {
            break;
        }
    }
    SwitchPlan { switch_at: at.into_iter().collect(), ready_us: best, naive_ready_us: naive }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(nb: usize, chunks: u32, pre: u64, ver: u64, load: u64) -> SwitchProblem {
        SwitchProblem { chunks, prefill_us: vec![pre; nb].into(), verify_us: vec![ver; nb].into(), load_us: load }
    }

    /// Exhaustive search over switch chunks in `lo..=chunks` for every block (small cases).
    fn brute(p: &SwitchProblem, lo: u32) -> u64 {
        let nb = p.prefill_us.len();
        let mut at = vec![lo; nb];
        let mut best = u64::MAX;
        loop {
            best = best.min(simulate(p, &at));
            let mut i = 0;
            loop {
                if i == nb {
                    return best;
                }
                if at[i] < p.chunks {
                    at[i] += 1;
                    break;
                }
                at[i] = lo;
                i += 1;
            }
        }
    }

    #[test]
    fn free_switches_change_nothing() {
        // A dynamic backend (the CPU): loading costs nothing, switching early only slows.
        let p = problem(6, 4, 100, 150, 0);
        let plan = plan(&p);
        assert!(plan.switch_at.iter().all(|&a| a == 4));
        assert_eq!(plan.ready_us, 4 * 6 * 100);
    }

    #[test]
    fn naive_switching_exposes_the_loads_of_the_last_blocks() {
        // After the prefill, block 0's load overlaps blocks 1..5's last chunk; the others queue.
        let p = problem(6, 4, 100, 150, 300);
        assert_eq!(simulate(&p, &[4; 6]), 3 * 600 + 100 + 6 * 300);
    }

    #[test]
    fn expensive_loads_switch_the_last_blocks_early_and_match_the_exhaustive_optimum() {
        for (nb, chunks, pre, ver, load) in [(4usize, 3u32, 100u64, 130u64, 400u64), (5, 4, 100, 110, 250), (4, 3, 100, 400, 120), (3, 5, 80, 90, 500)] {
            let p = problem(nb, chunks, pre, ver, load);
            let plan = plan(&p);
            assert!(plan.ready_us <= plan.naive_ready_us);
            assert_eq!(plan.ready_us, simulate(&p, &plan.switch_at));
            let opt = brute(&p, chunks.saturating_sub(2));
            // Greedy is near the optimum over the last two chunks (within one load).
            assert!(plan.ready_us <= opt + load, "{nb} {chunks} {pre} {ver} {load}: greedy {} vs optimum {opt}", plan.ready_us);
            if ver < pre + load / 2 {
                assert!(plan.ready_us < plan.naive_ready_us, "cheap verify graphs and slow loads must gain");
                assert!(plan.switch_at[nb - 1] < chunks, "the last block switches first");
            }
        }
    }
}
