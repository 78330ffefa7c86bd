//! Ranks as threads of one process, exchanging through shared memory.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Collective;
use crate::backend::Backend;
use crate::error::{Error, Result};

/// The exchange state shared by a [`ThreadGroup`]'s ranks.
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<Round>,
    changed: Condvar,
}

struct Round {
    /// Rounds completed so far.
    done: u64,
    /// This round's contributions.
    slots: Vec<Option<Vec<u8>>>,
    /// The last completed round's contributions (read by ranks still waking up: the next
    /// round cannot complete before every rank has taken them).
    last: Arc<Vec<Vec<u8>>>,
    /// The first failure: the rank and why.
    failed: Option<(usize, String)>,
}

/// One rank of a group whose ranks are threads of this process.
#[derive(Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// `world` ranks (give one to each thread); a collective waits at most `timeout`.
    pub fn new(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(Round {
                done: 0,
                slots: vec![None; world],
                last: Arc::new(Vec::new()),
                failed: None,
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// This rank's index.
    pub fn index(&self) -> usize {
        self.rank
    }

    /// Marks this rank failed: every other rank's current or next collective fails
    /// naming it.
    pub fn fail(&self, why: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.failed.is_none() {
            st.failed = Some((self.rank, why.to_string()));
        }
        self.shared.changed.notify_all();
    }

    fn exchange(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let sh = &*self.shared;
        let failed =
            |f: &(usize, String)| Error::Collective(format!("rank {} stopped: {}", f.0, f.1));
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &st.failed {
            return Err(failed(f));
        }
        let round = st.done;
        st.slots[self.rank] = Some(mine.to_vec());
        if st.slots.iter().all(Option::is_some) {
            let all: Vec<Vec<u8>> = st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            st.last = Arc::new(all);
            st.done += 1;
            sh.changed.notify_all();
            return Ok(st.last.to_vec());
        }
        let deadline = Instant::now() + sh.timeout;
        loop {
            if st.done > round {
                return Ok(st.last.to_vec());
            }
            if let Some(f) = &st.failed {
                return Err(failed(f));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> =
                    (0..sh.world).filter(|&r| st.slots[r].is_none()).collect();
                let why = format!(
                    "rank {} waited {:.0?} for rank(s) {missing:?}, which did not reach the \
                     same collective (stopped, hung or much slower)",
                    self.rank, sh.timeout
                );
                st.failed = Some((self.rank, why.clone()));
                sh.changed.notify_all();
                return Err(Error::Collective(why));
            }
            st = sh
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl<B: Backend> Collective<B> for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.exchange(mine)
    }
    fn abort(&self, why: &str) {
        self.fail(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::tensor::HostData;

    fn run<T: Send>(world: usize, timeout_ms: u64, f: impl Fn(ThreadGroup) -> T + Sync) -> Vec<T> {
        let ranks = ThreadGroup::new(world, Duration::from_millis(timeout_ms));
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks.into_iter().map(|g| s.spawn(|| f(g))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_and_gathers_agree_on_every_rank() {
        let out = run(3, 10_000, |g| {
            let r = Collective::<Cpu>::rank(&g) as f32;
            let mut x = Cpu.upload(HostData::F32(&[r, 10.0 * r]), &[2]).unwrap();
            for _ in 0..5 {
                g.all_reduce_sum(&Cpu, &mut x).unwrap();
            }
            let rows: Vec<f32> = (0..(r as usize + 1) * 2)
                .map(|i| r * 100.0 + i as f32)
                .collect();
            let t = Cpu
                .upload(HostData::F32(&rows), &[r as usize + 1, 2])
                .unwrap();
            let (all, counts) = g.all_gather_rows(&Cpu, &t).unwrap();
            (
                Cpu.to_vec_f32(&x).unwrap(),
                Cpu.to_vec_f32(&all).unwrap(),
                counts,
            )
        });
        // Five rounds of summing 0 + 1 + 2: 3, 9, 27, 81, 243 times the per-rank unit.
        for (x, all, counts) in &out {
            assert_eq!(x, &vec![243.0, 2430.0]);
            assert_eq!(counts, &vec![1, 2, 3]);
            assert_eq!(&all[..4], &[0.0, 1.0, 100.0, 101.0]);
            assert_eq!(all.len(), 12);
            assert_eq!(all[11], 205.0);
        }
    }

    #[test]
    fn a_failed_rank_stops_the_others_naming_it() {
        let out = run(3, 60_000, |g| {
            if Collective::<Cpu>::rank(&g) == 2 {
                Collective::<Cpu>::abort(&g, "out of memory");
                return Ok(());
            }
            Collective::<Cpu>::barrier(&g)
        });
        for e in &out[..2] {
            let e = e.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 2") && e.contains("out of memory"), "{e}");
        }
    }

    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let t0 = Instant::now();
        let out = run(2, 200, |g| {
            if Collective::<Cpu>::rank(&g) == 1 {
                return Ok(());
            }
            Collective::<Cpu>::barrier(&g)
        });
        let e = out[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("rank(s) [1]"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
}
