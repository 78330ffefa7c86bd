//! Peak heap memory, counted by a global allocator: the lexical loss is O(tokens), never
//! batch × length × vocabulary; sub-batching bounds activation memory by the sub-batch,
//! not the batch; and a hostile file of N bytes makes the readers allocate a small multiple
//! of N plus the tensors it legitimately declares.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use m3::autograd::Tape;
use m3::backend::cpu::Cpu;
use m3::backend::Backend;
use m3::batch::pack_in_order;
use m3::rng::Rng;
use m3::text::Encoded;
use m3::train::arena::{GradArena, ParamLayout};
use m3::train::forward::{step_grads, RankLoss, StepBatch, StepDropout};
use m3::train::loss::LossConfig;
use m3::train::model::TrainModel;
use m3::{DType, HostData};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::SeqCst);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Serialises the measurements: the counter is global, tests run on threads.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Peak bytes allocated by `f` above what was live when it started (callers hold
/// [`LOCK`]).
fn peak_of<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = f();
    (PEAK.load(Ordering::SeqCst).saturating_sub(base), r)
}

fn random_seqs(rng: &mut Rng, n: usize, len: usize, vocab: u32) -> Vec<Encoded> {
    (0..n)
        .map(|_| {
            let mut ids = vec![0u32];
            ids.extend((0..len - 2).map(|_| 4 + rng.below(vocab - 4)));
            ids.push(2);
            Encoded {
                ids,
                cls_positions: vec![0],
                truncated: false,
            }
        })
        .collect()
}

fn lexical_peak(queries: usize, passages: usize, len: usize, vocab: u32) -> usize {
    let mut rng = Rng::new(1);
    let q = pack_in_order(&random_seqs(&mut rng, queries, len, vocab), 2);
    let p = pack_in_order(&random_seqs(&mut rng, passages, len, vocab), 2);
    let wq = rng.vec(q.tokens(), 0.0, 1.0);
    let wp = rng.vec(p.tokens(), 0.0, 1.0);
    let (peak, ()) = peak_of(|| {
        let mut t = Tape::new(&Cpu);
        let a = t.param_owned(Cpu.upload(HostData::F32(&wq), &[wq.len()]).unwrap());
        let b = t.param_owned(Cpu.upload(HostData::F32(&wp), &[wp.len()]).unwrap());
        let s = t
            .lexical_scores(
                a,
                &q.ids,
                &q.cu_seqlens,
                b,
                &p.ids,
                &p.cu_seqlens,
                &[0, 1, 2, 3],
            )
            .unwrap();
        let total = t.sum_all(s).unwrap();
        let g = t.backward(total).unwrap();
        assert!(g.get(a).is_some() && g.get(b).is_some());
    });
    peak
}

fn step_peak(
    model: &mut TrainModel<Cpu>,
    queries: usize,
    group: usize,
    sub: Option<usize>,
) -> usize {
    let layout = ParamLayout::of(model);
    let mut rng = Rng::new(2);
    let vocab = model.config.vocab_size as u32;
    let batch = StepBatch {
        q: pack_in_order(&random_seqs(&mut rng, queries, 48, vocab), 2),
        p: pack_in_order(&random_seqs(&mut rng, queries * group, 96, vocab), 2),
    };
    let cfg = LossConfig::new(group, vec![0, 1, 2, 3]);
    let drop = StepDropout { p: 0.1, seed: 5 };
    // The gradient arena is part of the step (it holds what per-tensor gradients held).
    let (peak, r) = peak_of(|| {
        let mut g = GradArena::zeros(&Cpu, &layout)?;
        step_grads(
            &Cpu,
            model,
            &layout,
            &batch,
            &cfg,
            drop,
            sub,
            &RankLoss::solo(),
            &mut g,
        )
    });
    assert!(r.unwrap().loss.is_finite());
    peak
}

#[test]
fn peak_memory_follows_tokens_and_sub_batches() {
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Lexical scores at BGE-M3's vocabulary: FlagEmbedding's dense B × L × vocab tensor
    // would be 16 × 128 × 250002 × 4 bytes = 2 GB for the passages alone.
    let vocab = 250_002;
    let small = lexical_peak(4, 16, 128, vocab);
    let large = lexical_peak(8, 32, 128, vocab);
    let tokens = 20 * 128;
    eprintln!("lexical loss peak: {small} bytes for {tokens} tokens, {large} for twice as many");
    assert!(
        small < 128 * tokens,
        "lexical peak {small} bytes is not O(tokens) ({tokens} tokens)"
    );
    assert!(
        small < vocab as usize * 4,
        "a vocabulary-sized buffer was allocated"
    );
    // Twice the tokens: the score matrix grows 4×, the rest 2×; far from vocab-sized.
    assert!(large < 4 * small, "{large} vs {small}");

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3");
    let mut model = TrainModel::load(&Cpu, &dir, DType::F32, 0).unwrap();
    let whole4 = step_peak(&mut model, 4, 4, None);
    let whole2 = step_peak(&mut model, 2, 4, None);
    let sub4 = step_peak(&mut model, 4, 4, Some(2));
    let sub2 = step_peak(&mut model, 2, 4, Some(2));
    eprintln!("step peak bytes: whole batch of 4: {whole4}, of 2: {whole2}; sub-batches of 2 sequences: batch 4 {sub4}, batch 2 {sub2}");
    // Without sub-batches the peak grows with the batch...
    assert!(whole4 as f64 > 1.7 * whole2 as f64, "{whole4} vs {whole2}");
    // ...with them it stays near one sub-batch's, whatever the batch.
    assert!((sub4 as f64) < 1.3 * sub2 as f64, "{sub4} vs {sub2}");
    assert!((sub4 as f64) < 0.25 * whole4 as f64, "{sub4} vs {whole4}");
}

/// Peak bytes of reading the checkpoint `bytes` as a file (it must fail or succeed; a
/// panic or abort fails the test).
fn read_peak(dir: &std::path::Path, name: &str, bytes: &[u8]) -> usize {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let (peak, _) = peak_of(|| m3::model::checkpoint::read_checkpoint(&p).map(|t| t.len()));
    peak
}

#[test]
fn hostile_checkpoints_and_texts_allocate_in_proportion_to_their_size() {
    use common::pickles::{memo_doubling, nested_lists, state_dict, torch_zip};
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("m3-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let storage: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    // The reader reads the whole file (N bytes), and the pickle machine may build 64 bytes
    // of values per pickle byte plus 1 MiB: the bound is that and a little slack.
    let bound = |n: usize| 2 * n + 64 * n + (3 << 20);
    for (what, file) in [
        (
            "memo doubling (billion laughs)",
            torch_zip(&memo_doubling(60), &storage),
        ),
        (
            "nested 1M deep",
            torch_zip(&nested_lists(1_000_000), &storage),
        ),
        (
            "stride-0 view of 2^40 elements",
            torch_zip(&state_dict(4, 0, &[1 << 40], &[0]), &storage),
        ),
        (
            "view claiming 2^20 x 2^20",
            torch_zip(&state_dict(4, 0, &[1 << 20, 1 << 20], &[0, 0]), &storage),
        ),
    ] {
        let peak = read_peak(&dir, "hostile.pt", &file);
        eprintln!("{what}: {} byte file, peak {peak} bytes", file.len());
        assert!(
            peak <= bound(file.len()),
            "{what}: {peak} bytes for a {}-byte file",
            file.len()
        );
    }
    // A real head file: its tensors' f32 values, the file, and small change.
    let head = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3/colbert_linear.pt"),
    )
    .unwrap();
    let peak = read_peak(&dir, "colbert_linear.pt", &head);
    assert!(peak <= bound(head.len()), "fixture head: {peak} bytes");
    // A 4 MB one-line text cut to 16 tokens: tokenizing it whole costs hundreds of bytes
    // per character; cut first, it costs what 16 tokens' worth of characters does.
    let tok = m3::text::TextTokenizer::from_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3"),
    )
    .unwrap();
    let text: String = std::iter::repeat_n("alpha beta gamma ", 250_000).collect();
    let (peak, e) = peak_of(|| tok.encode(&text, 16, false).unwrap());
    eprintln!("4 MB text at 16 tokens: peak {peak} bytes");
    assert_eq!(e.ids.len(), 16);
    assert!(
        peak < 2 << 20,
        "{peak} bytes to tokenize 16 tokens of a 4 MB text"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
