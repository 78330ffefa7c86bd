//! Mutation fuzzing of the readers of untrusted files, in the normal suite: valid files
//! (a torch zip and its pickle, a safetensors header, an index) with random bytes flipped,
//! set, inserted, deleted or cut off must give `Ok` or an error, never a panic or an abort.
//! `PROPTEST_CASES=N` runs more cases (the session notes record long runs).

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, search_index, tmp};
use proptest::prelude::*;

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Values that sit at format boundaries: 0, small counts, sign bits, all ones.
    let special = prop_oneof![
        Just(0u8),
        Just(1),
        Just(0x7f),
        Just(0x80),
        Just(0xff),
        any::<u8>()
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, 1 << b)),
        (any::<usize>(), special).prop_map(|(p, v)| Edit::Set(p, v)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, v)| Edit::Insert(p, v)),
        (any::<usize>(), 1usize..32).prop_map(|(p, n)| Edit::Delete(p, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

/// Applies `edits` to `bytes`, positions taken modulo `region` (the part worth hitting:
/// a header, a pickle) or the whole length.
fn mutate(bytes: &[u8], edits: &[Edit], region: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for e in edits {
        let span = region.min(b.len()).max(1);
        match e {
            Edit::Flip(p, m) if !b.is_empty() => b[p % span] ^= m,
            Edit::Set(p, v) if !b.is_empty() => b[p % span] = *v,
            Edit::Insert(p, v) => {
                let at = p % (region.min(b.len()) + 1);
                b.splice(at..at, v.iter().copied());
            }
            Edit::Delete(p, n) if !b.is_empty() => {
                let at = p % span;
                b.drain(at..(at + n).min(b.len()));
            }
            Edit::Truncate(p) => b.truncate(p % (b.len() + 1)),
            _ => {}
        }
    }
    b
}

/// The pickle inside a torch zip (stored, so its bytes are in the file as is).
fn pickle_of(zip_bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).unwrap();
    let name = (0..z.len())
        .map(|i| z.name_for_index(i).unwrap().to_string())
        .find(|n| n.ends_with("data.pkl"))
        .unwrap();
    let mut out = Vec::new();
    z.by_name(&name).unwrap().read_to_end(&mut out).unwrap();
    out
}

/// `cases` per property, or `PROPTEST_CASES` when set (long runs by hand).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn the_pickle_reader_never_panics(edits in prop::collection::vec(edit(), 1..8)) {
        let head = std::fs::read(fixture("tiny-m3/colbert_linear.pt")).unwrap();
        let p = pickle_of(&head);
        let m = mutate(&p, &edits, p.len());
        let _ = m3::model::torch_pickle::read_state_dict(&m);
    }

    #[test]
    fn the_torch_zip_reader_never_panics(edits in prop::collection::vec(edit(), 1..8)) {
        let head = std::fs::read(fixture("tiny-m3/sparse_linear.pt")).unwrap();
        let m = mutate(&head, &edits, head.len());
        let d = tmp("fuzz-zip");
        let p = d.join("sparse_linear.pt");
        std::fs::write(&p, m).unwrap();
        let _ = m3::model::checkpoint::read_checkpoint(&p);
    }

    #[test]
    fn the_safetensors_reader_never_panics(edits in prop::collection::vec(edit(), 1..8)) {
        let st = std::fs::read(fixture("tiny-m3/model.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        let m = mutate(&st, &edits, header);
        let d = tmp("fuzz-st");
        let p = d.join("model.safetensors");
        std::fs::write(&p, m).unwrap();
        let _ = m3::model::checkpoint::read_checkpoint(&p);
    }
}

/// An index of a three-line corpus, built once for the whole run (its directory lives as
/// long as the process: a static is never dropped).
fn index_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<(common::TmpDir, PathBuf)> = std::sync::OnceLock::new();
    &DIR.get_or_init(|| {
        let d = tmp("fuzz-index");
        let corpus = d.join("corpus.jsonl");
        std::fs::write(
            &corpus,
            "\"alpha beta\"\n{\"id\": 7, \"text\": \"gamma\"}\n\"\"\n",
        )
        .unwrap();
        let idx = d.join("idx");
        let out = search_index(&fixture("tiny-m3"), &corpus, &idx, "m3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (d, idx)
    })
    .1
}

proptest! {
    #![proptest_config(config(300))]

    /// Every file of an index mutated; for meta.json also with its self-checksum made
    /// valid again, so the structural checks behind the checksum are fuzzed too.
    #[test]
    fn the_index_reader_never_panics(
        file in 0usize..4,
        reseal in any::<bool>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let src = index_dir();
        let d = tmp(&format!("fuzz-idx-{file}"));
        for f in m3::index::FILES {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
        let name = m3::index::FILES[file];
        let bytes = std::fs::read(d.join(name)).unwrap();
        let mut m = mutate(&bytes, &edits, bytes.len());
        if name == "meta.json" && reseal {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&m) {
                if v.is_object() {
                    v["checksum"] = serde_json::Value::from(m3::index::meta_checksum(&v));
                    m = serde_json::to_vec(&v).unwrap();
                }
            }
        }
        std::fs::write(d.join(name), m).unwrap();
        if let Ok(idx) = m3::index::Index::load(&d) {
            // Whatever loads must answer a query without panicking.
            let q = m3::model::embedder::Embedding {
                dense: Some(vec![0.1; idx.model().dense_dim]),
                lexical: Some(vec![(5, 1.0)]),
                colbert: Some(vec![vec![0.1; idx.model().colbert_dim]]),
            };
            let _ = idx.search(&q, 3, m3::score::Weights::default());
        }
    }
}
