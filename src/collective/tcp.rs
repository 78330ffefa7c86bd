//! Ranks as processes, joined over TCP the way torchrun's rendezvous does: rank 0 listens at
//! `MASTER_ADDR:MASTER_PORT`, every other rank connects to it. Rank 0 is the hub of every
//! collective: it receives each rank's contribution in rank order, combines them (the sum
//! for an all-reduce, so every rank gets the bits a [`super::ThreadGroup`] gives; the list
//! for an all-gather) and sends the result back. A star moves `world × size` through rank
//! 0, fine for CPU ranks and small groups; GPUs want NCCL's rings instead.
//!
//! Frames are `[kind u8][length u64 LE][payload]`: data, or an abort carrying the failed
//! rank and its message. Every read waits at most the timeout; a closed connection means
//! that rank (or rank 0) stopped, and the error names it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{f32_bytes, sum_in_rank_order, Collective};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const DATA: u8 = 0;
const ABORT: u8 = 1;
/// The first bytes each connecting rank sends (then its rank and the world size).
const HELLO: &[u8; 8] = b"m3-rank1";

/// One rank of a group of processes.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: a link per other rank (index `r - 1`); others: the link to rank 0.
    links: Mutex<Vec<TcpStream>>,
}

fn err(msg: String) -> Error {
    Error::Collective(msg)
}

fn write_frame(s: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn abort_payload(rank: usize, why: &str) -> Vec<u8> {
    let mut p = (rank as u64).to_le_bytes().to_vec();
    p.extend_from_slice(why.as_bytes());
    p
}

fn abort_error(p: &[u8]) -> Error {
    let rank = p
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(u64::MAX);
    err(format!(
        "rank {rank} stopped: {}",
        String::from_utf8_lossy(p.get(8..).unwrap_or_default())
    ))
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A list of byte strings as one payload: count, then each length and its bytes.
fn pack(all: &[Vec<u8>]) -> Vec<u8> {
    let mut p = (all.len() as u64).to_le_bytes().to_vec();
    for b in all {
        p.extend_from_slice(&(b.len() as u64).to_le_bytes());
        p.extend_from_slice(b);
    }
    p
}

fn unpack(p: &[u8]) -> Result<Vec<Vec<u8>>> {
    let bad = || err("all-gather: a malformed answer from rank 0".into());
    let word = |at: usize| -> Result<usize> {
        Ok(u64::from_le_bytes(p.get(at..at + 8).ok_or_else(bad)?.try_into().unwrap()) as usize)
    };
    let n = word(0)?;
    let mut at = 8;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let len = word(at)?;
        at += 8;
        out.push(p.get(at..at + len).ok_or_else(bad)?.to_vec());
        at += len;
    }
    Ok(out)
}

impl TcpGroup {
    /// Joins rank `rank` of `world` at `addr` (`host:port`, rank 0 listens there). Rank 0
    /// waits up to `timeout` for every other rank to connect; the others retry connecting
    /// until then. Every later collective waits at most `timeout` too.
    pub fn join(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(err(format!("rank {rank} is not in a world of {world}")));
        }
        let deadline = Instant::now() + timeout;
        let mut links = Vec::new();
        if rank == 0 {
            let listener = TcpListener::bind(addr)
                .map_err(|e| err(format!("rank 0 cannot listen at {addr}: {e}")))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| err(format!("{addr}: {e}")))?;
            let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)
                            .and_then(|_| s.set_read_timeout(Some(timeout)))
                            .map_err(|e| err(format!("{addr}: {e}")))?;
                        let mut hello = [0u8; 24];
                        if s.read_exact(&mut hello).is_err() || &hello[..8] != HELLO {
                            continue;
                        }
                        let r = u64::from_le_bytes(hello[8..16].try_into().unwrap()) as usize;
                        let w = u64::from_le_bytes(hello[16..].try_into().unwrap()) as usize;
                        if w != world || r == 0 || r >= world {
                            return Err(err(format!(
                                "a rank {r} of a world of {w} joined rank 0 of a world of {world} \
                                 (WORLD_SIZE differs between the launches)"
                            )));
                        }
                        if peers[r - 1].is_some() {
                            return Err(err(format!("two processes joined as rank {r}")));
                        }
                        peers[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing: Vec<usize> =
                                (1..world).filter(|&r| peers[r - 1].is_none()).collect();
                            return Err(err(format!(
                                "rank 0 waited {timeout:.0?} at {addr} for rank(s) {missing:?} \
                                 to join"
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(err(format!("{addr}: {e}"))),
                }
            }
            links.extend(peers.into_iter().flatten());
        } else {
            let target = addr
                .to_socket_addrs()
                .map_err(|e| err(format!("MASTER_ADDR:MASTER_PORT {addr}: {e}")))?
                .next()
                .ok_or_else(|| err(format!("{addr} resolves to no address")))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(err(format!(
                            "rank {rank} could not reach rank 0 at {addr} within {timeout:.0?}: {e}"
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            s.set_read_timeout(Some(timeout))
                .and_then(|_| s.set_nodelay(true))
                .map_err(|e| err(format!("{addr}: {e}")))?;
            let mut hello = HELLO.to_vec();
            hello.extend_from_slice(&(rank as u64).to_le_bytes());
            hello.extend_from_slice(&(world as u64).to_le_bytes());
            s.write_all(&hello)
                .map_err(|e| err(format!("rank {rank} → rank 0 at {addr}: {e}")))?;
            links.push(s);
        }
        Ok(TcpGroup {
            rank,
            world,
            timeout,
            links: Mutex::new(links),
        })
    }

    /// This rank's index.
    pub fn index(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.world
    }

    /// Tells the others this rank failed (best effort: a link may be gone already).
    pub fn fail(&self, why: &str) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let p = abort_payload(self.rank, why);
        for s in links.iter_mut() {
            let _ = write_frame(s, ABORT, &p);
        }
    }

    /// One collective: every rank's `mine` reaches rank 0, which sends back
    /// `combine(all, in rank order)`.
    fn round(
        &self,
        mine: &[u8],
        combine: &dyn Fn(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank != 0 {
            let s = &mut links[0];
            write_frame(s, DATA, mine).map_err(|e| {
                err(format!(
                    "rank 0 stopped (rank {} cannot send: {e})",
                    self.rank
                ))
            })?;
            return match read_frame(s) {
                Ok((DATA, p)) => Ok(p),
                Ok((_, p)) => Err(abort_error(&p)),
                Err(e) if timed_out(&e) => Err(err(format!(
                    "rank {} waited {:.0?} for the other ranks (through rank 0)",
                    self.rank, self.timeout
                ))),
                Err(e) => Err(err(format!("rank 0 stopped (connection: {e})"))),
            };
        }
        let mut all = vec![mine.to_vec()];
        // The error here, and what the other ranks are told: the rank at fault and why.
        let mut failure: Option<(Error, usize, String)> = None;
        for (k, s) in links.iter_mut().enumerate() {
            let r = k + 1;
            match read_frame(s) {
                Ok((DATA, p)) => all.push(p),
                Ok((_, p)) => {
                    let e = abort_error(&p);
                    let culprit = p
                        .get(..8)
                        .map_or(r, |b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
                    let why = String::from_utf8_lossy(p.get(8..).unwrap_or_default()).into();
                    failure = Some((e, culprit, why));
                    break;
                }
                Err(e) if timed_out(&e) => {
                    let why = format!(
                        "did not reach the same collective within {:.0?} (stopped, hung or much \
                         slower; seen from rank 0)",
                        self.timeout
                    );
                    let e = err(format!(
                        "rank 0 waited {:.0?} for rank(s) [{r}], which did not reach the same \
                         collective (stopped, hung or much slower)",
                        self.timeout
                    ));
                    failure = Some((e, r, why));
                    break;
                }
                Err(e) => {
                    let why = format!("its connection to rank 0 closed ({e})");
                    failure = Some((err(format!("rank {r} stopped: {why}")), r, why));
                    break;
                }
            }
        }
        let result = match failure {
            Some(f) => Err(f),
            None => combine(all).map_err(|e| (e, 0, String::new())),
        };
        match result {
            Ok(out) => {
                for (k, s) in links.iter_mut().enumerate() {
                    write_frame(s, DATA, &out)
                        .map_err(|e| err(format!("rank {} stopped (connection: {e})", k + 1)))?;
                }
                Ok(out)
            }
            Err((e, culprit, why)) => {
                let why = if why.is_empty() { format!("{e}") } else { why };
                let p = abort_payload(culprit, &why);
                for s in links.iter_mut() {
                    let _ = write_frame(s, ABORT, &p);
                }
                Err(e)
            }
        }
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        unpack(&self.round(mine, &|all| Ok(pack(&all)))?)
    }
}

impl<B: Backend> Collective<B> for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.all_gather(mine)
    }
    /// Rank 0 adds the contributions in rank order and sends back only the sum.
    fn all_reduce_sum(&self, be: &B, x: &mut Tensor<B>) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let sum = self.round(&f32_bytes(&be.to_vec_f32(x)?), &|all| {
            Ok(f32_bytes(&sum_in_rank_order(&all)?))
        })?;
        be.write_f32(x, &super::bytes_f32(&sum))
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

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[test]
    fn ranks_over_loopback_sum_and_gather_like_threads() {
        let addr = free_addr();
        let out: Vec<(Vec<f32>, Vec<Vec<u8>>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let g = TcpGroup::join(&addr, r, 3, Duration::from_secs(20)).unwrap();
                        let mut x = Cpu.upload(HostData::F32(&[r as f32, 0.1]), &[2]).unwrap();
                        Collective::<Cpu>::all_reduce_sum(&g, &Cpu, &mut x).unwrap();
                        let all = g.all_gather(&vec![r as u8; r]).unwrap();
                        (Cpu.to_vec_f32(&x).unwrap(), all)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (x, all) in &out {
            assert_eq!(x, &vec![3.0, 0.1f32 + 0.1 + 0.1]);
            assert_eq!(all, &vec![vec![], vec![1], vec![2, 2]]);
        }
    }

    #[test]
    fn a_failed_or_missing_rank_is_named() {
        let addr = free_addr();
        let out: Vec<Result<()>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let g = TcpGroup::join(&addr, r, 3, Duration::from_secs(20)).unwrap();
                        if r == 2 {
                            g.fail("disk full");
                            return Ok(());
                        }
                        g.all_gather(b"x").map(|_| ())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in &out[..2] {
            let e = e.as_ref().unwrap_err().to_string();
            assert!(
                e.contains("rank 2 stopped") && e.contains("disk full"),
                "{e}"
            );
        }
        let t0 = Instant::now();
        let e = TcpGroup::join(&free_addr(), 0, 2, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank(s) [1]"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
