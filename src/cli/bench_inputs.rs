//! Random token ids for the benchmarks (the same ids go to the PyTorch peers through
//! `--save-inputs`): sequences of uniform or mixed lengths, and training batches.

use anyhow::Context;
use m3::model::config::Config;
use m3::rng::Rng;
use m3::text::Encoded;

/// Random sequences (CLS + ids + EOS) totalling at least `tokens`.
pub fn inputs(
    spec: &str,
    tokens: usize,
    vocab: usize,
    max_tokens: usize,
    seed: u64,
) -> anyhow::Result<Vec<Encoded>> {
    let mut rng = Rng::new(seed);
    let (lo, hi) = match spec.split_once(':') {
        Some(("uniform", n)) => {
            let n: usize = n.parse()?;
            (n, n)
        }
        Some(("mixed", r)) => {
            let (a, b) = r.split_once('-').context("mixed:MIN-MAX")?;
            (a.parse()?, b.parse()?)
        }
        _ => anyhow::bail!("--lengths must be uniform:N or mixed:MIN-MAX, got {spec:?}"),
    };
    if lo < 2 || hi < lo || hi > max_tokens {
        anyhow::bail!("lengths {lo}..{hi} must lie within 2..{max_tokens}");
    }
    let mut out = Vec::new();
    let mut total = 0;
    while total < tokens {
        let len = lo + rng.below((hi - lo + 1) as u32) as usize;
        let mut ids = vec![0u32];
        ids.extend((0..len - 2).map(|_| 3 + rng.below(vocab as u32 - 4)));
        ids.push(2);
        total += len;
        out.push(Encoded {
            ids,
            cls_positions: vec![0],
            truncated: false,
        });
    }
    Ok(out)
}

/// Random query and passage token ids for a training batch: `b` queries of `q_len` tokens
/// and `b * g` passages of `p_len` (each query's group contiguous).
pub fn train_inputs(
    c: &Config,
    b: usize,
    g: usize,
    q_len: usize,
    p_len: usize,
    seed: u64,
) -> anyhow::Result<(Vec<Encoded>, Vec<Encoded>)> {
    let seqs = |n: usize, len: usize, seed: u64| {
        inputs(
            &format!("uniform:{len}"),
            n * len,
            c.vocab_size,
            c.max_tokens(),
            seed,
        )
    };
    Ok((seqs(b, q_len, seed)?, seqs(b * g, p_len, seed + 1)?))
}
