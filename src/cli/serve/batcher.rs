//! Batching across requests: handlers tokenize their texts and queue a [`Work`] item; one
//! thread owns the model and, while the device works on a batch, requests pile up in the
//! queue; each round takes everything queued up to `--max-batch-tokens`, encodes it as one
//! packed call, and hands every request its own rows. A request whose client went away is
//! dropped before its round starts, and a panic in the model is answered as an error to
//! the requests of that round, never taking the server down.

use std::panic::AssertUnwindSafe;

use m3::backend::Backend;
use m3::model::embedder::{Embedder, Embedding, EncodeOptions};
use m3::text::Encoded;
use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;

/// Which outputs a request wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outputs {
    /// Dense vectors.
    pub dense: bool,
    /// Lexical weights.
    pub sparse: bool,
    /// Colbert vectors.
    pub colbert: bool,
}

/// One request's texts on their way to the model.
pub struct Work {
    /// Tokenized texts.
    pub texts: Vec<Encoded>,
    /// What to compute.
    pub outputs: Outputs,
    /// Where the answer goes (one embedding per text, in order).
    pub reply: oneshot::Sender<Result<Vec<Embedding>, String>>,
}

impl Work {
    fn tokens(&self) -> usize {
        self.texts.iter().map(|t| t.ids.len()).sum()
    }
}

/// Runs rounds until every sender is gone (the server stopped and in-flight work is done).
pub fn run<B: Backend>(
    be: &B,
    model: &Embedder<B>,
    mut queue: mpsc::UnboundedReceiver<Work>,
    max_batch_tokens: usize,
    metrics: &Metrics,
) {
    let mut carried: Option<Work> = None;
    loop {
        let first = match carried.take() {
            Some(w) => w,
            None => match queue.blocking_recv() {
                Some(w) => w,
                None => return,
            },
        };
        metrics.dequeued(1);
        let mut tokens = first.tokens();
        let mut round = vec![first];
        while tokens < max_batch_tokens {
            match queue.try_recv() {
                Ok(w) => {
                    metrics.dequeued(1);
                    if tokens + w.tokens() > max_batch_tokens {
                        carried = Some(w);
                        break;
                    }
                    tokens += w.tokens();
                    round.push(w);
                }
                Err(_) => break,
            }
        }
        // A client that disconnected frees its place before the round is encoded.
        round.retain(|w| !w.reply.is_closed());
        if round.is_empty() {
            continue;
        }
        // The texts move into one list (no copy); each request keeps its count.
        let counts: Vec<usize> = round.iter().map(|w| w.texts.len()).collect();
        let texts: Vec<Encoded> = round
            .iter_mut()
            .flat_map(|w| std::mem::take(&mut w.texts))
            .collect();
        let opts = EncodeOptions {
            batch_tokens: max_batch_tokens,
            dense: round.iter().any(|w| w.outputs.dense),
            sparse: round.iter().any(|w| w.outputs.sparse),
            colbert: round.iter().any(|w| w.outputs.colbert),
            ..EncodeOptions::default()
        };
        metrics.batch(texts.len(), texts.iter().map(|t| t.ids.len()).sum());
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            model.encode_tokenized(be, &texts, &opts, &mut |_| {})
        }));
        let result = match result {
            Ok(Ok(r)) => Ok(r.embeddings),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the model panicked on this batch".to_string()),
        };
        match result {
            Ok(all) => {
                let mut rows = all.into_iter();
                for (w, n) in round.into_iter().zip(counts) {
                    let mine = rows.by_ref().take(n).map(|e| keep(e, w.outputs)).collect();
                    let _ = w.reply.send(Ok(mine)); // a client may have gone meanwhile
                }
            }
            Err(e) => {
                for w in round {
                    let _ = w.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Only the outputs a request asked for (a round computes the union).
fn keep(e: Embedding, o: Outputs) -> Embedding {
    Embedding {
        dense: e.dense.filter(|_| o.dense),
        lexical: e.lexical.filter(|_| o.sparse),
        colbert: e.colbert.filter(|_| o.colbert),
    }
}
