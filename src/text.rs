//! Tokenization: the model directory's `tokenizer.json` through the `tokenizers` crate,
//! special tokens read from the directory (never hard-coded), truncation to a maximum
//! length, and MCLS insertion (SPEC §3).

use std::path::Path;

use anyhow::{anyhow, Context};

/// Content tokens per CLS in MCLS mode (SPEC §3).
pub const MCLS_CHUNK: usize = 256;

/// Characters of a text kept per token of the length limit before tokenizing: tokenizing
/// costs hundreds of bytes per character, so a text is first cut to this many characters
/// per token of `max_length` (a token averages 2 to 6 characters in BGE-M3's vocabulary),
/// then exactly to `max_length` tokens. Only a text averaging more than this per token (long
/// runs of one character that its normalizer collapses) can lose tokens to the first cut.
pub const CHARS_PER_TOKEN: usize = 64;

/// The longest input line (one JSONL record) m3 reads: 64 MiB.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// `text` cut to at most `chars` characters, and whether it was cut.
pub fn cut_chars(text: &str, chars: usize) -> (&str, bool) {
    match text.char_indices().nth(chars) {
        Some((at, _)) => (&text[..at], true),
        None => (text, false),
    }
}

/// A tokenized text ready for packing.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids with special tokens.
    pub ids: Vec<u32>,
    /// Positions (within `ids`) of CLS tokens: `[0]`, or every inserted CLS with MCLS.
    pub cls_positions: Vec<usize>,
    /// Whether content was cut to fit the maximum length.
    pub truncated: bool,
}

/// Special token ids of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    /// Sequence start (`<s>`, `[CLS]`).
    pub cls: u32,
    /// Sequence end (`</s>`, `[SEP]`).
    pub eos: u32,
    /// Padding.
    pub pad: Option<u32>,
    /// Unknown.
    pub unk: Option<u32>,
}

impl Specials {
    /// Ids whose lexical weights are dropped (SPEC §3): CLS, EOS, PAD, UNK.
    pub fn unused(&self) -> impl Fn(u32) -> bool + '_ {
        move |id| id == self.cls || id == self.eos || Some(id) == self.pad || Some(id) == self.unk
    }
}

/// One content token of a text with its byte span in the text (for a `/tokenize` route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Token id.
    pub id: u32,
    /// The token's vocabulary string.
    pub text: String,
    /// Byte offset where it starts in the text.
    pub start: usize,
    /// Byte offset where it ends.
    pub stop: usize,
}

/// The model's tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: std::path::PathBuf,
    /// The special token ids.
    pub specials: Specials,
}

/// Reads `key` from special_tokens_map.json / tokenizer_config.json: a string or an object
/// with `"content"`.
fn special_name(dir: &Path, keys: &[&str]) -> Option<String> {
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        for key in keys {
            match v.get(key) {
                Some(serde_json::Value::String(s)) => return Some(s.clone()),
                Some(obj) => {
                    if let Some(s) = obj.get("content").and_then(|c| c.as_str()) {
                        return Some(s.to_string());
                    }
                }
                None => {}
            }
        }
    }
    None
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a model directory and finds its special tokens from
    /// `special_tokens_map.json` / `tokenizer_config.json`, else from the usual names.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        // Truncation and padding are ours (token budgets, MCLS); some published
        // tokenizer.json files carry their own settings, which would cut texts silently.
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        inner.with_padding(None);
        let id = |keys: &[&str], fallbacks: &[&str]| -> Option<u32> {
            special_name(dir, keys)
                .into_iter()
                .chain(fallbacks.iter().map(|s| s.to_string()))
                .find_map(|name| inner.token_to_id(&name))
        };
        let cls = id(&["cls_token", "bos_token"], &["<s>", "[CLS]"])
            .ok_or_else(|| anyhow!("{}: no CLS token found", path.display()))?;
        let eos = id(&["sep_token", "eos_token"], &["</s>", "[SEP]"])
            .ok_or_else(|| anyhow!("{}: no SEP/EOS token found", path.display()))?;
        let specials = Specials {
            cls,
            eos,
            pad: id(&["pad_token"], &["<pad>", "[PAD]"]),
            unk: id(&["unk_token"], &["<unk>", "[UNK]"]),
        };
        Ok(TextTokenizer {
            inner,
            path,
            specials,
        })
    }

    /// Refuses a tokenizer whose ids reach past the model's word-embedding table
    /// (`vocab_size` rows, from `config`), naming both files.
    pub fn check_vocab(&self, vocab_size: usize, config: &Path) -> anyhow::Result<()> {
        let top = self.inner.get_vocab(true).into_values().max().unwrap_or(0);
        if top as usize >= vocab_size {
            anyhow::bail!(
                "{} has token ids up to {top}, but {} says vocab_size {vocab_size}: the \
                 tokenizer and the model do not belong together",
                self.path.display(),
                config.display()
            );
        }
        Ok(())
    }

    /// Content token ids of `text`, without special tokens.
    pub fn content_ids(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))
            .context("tokenizing")?;
        Ok(enc.get_ids().to_vec())
    }

    /// The content tokens of `text` with their spans (cut like [`TextTokenizer::encode`]
    /// to [`CHARS_PER_TOKEN`] characters per token of `max_length`).
    pub fn pieces(&self, text: &str, max_length: usize) -> anyhow::Result<Vec<Piece>> {
        let (text, _) = cut_chars(text, max_length.saturating_mul(CHARS_PER_TOKEN));
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .zip(enc.get_offsets())
            .map(|((&id, t), &(start, stop))| Piece {
                id,
                text: t.clone(),
                start,
                stop,
            })
            .collect())
    }

    /// The vocabulary string of token `id`.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids decoded to text (the tokenizer's decoder: `▁Paris` reads `Paris`).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("{}: cannot decode: {e}", self.path.display()))
    }

    /// `CLS content EOS`, content truncated to fit `max_length` tokens in all (at least 2).
    /// With `mcls`, a CLS goes before every [`MCLS_CHUNK`] content tokens and the inserted
    /// CLS tokens count toward `max_length`.
    /// The text is cut to [`CHARS_PER_TOKEN`] characters per token first, so memory follows
    /// `max_length`, not the text's length.
    pub fn encode(&self, text: &str, max_length: usize, mcls: bool) -> anyhow::Result<Encoded> {
        let (text, cut) = cut_chars(text, max_length.saturating_mul(CHARS_PER_TOKEN));
        let content = self.content_ids(text)?;
        let mut e = self.assemble(&content, max_length, mcls);
        e.truncated |= cut;
        Ok(e)
    }

    /// Builds the sequence from content ids (see [`TextTokenizer::encode`]).
    pub fn assemble(&self, content: &[u32], max_length: usize, mcls: bool) -> Encoded {
        let max_length = max_length.max(2);
        // Content tokens that fit: n + (number of CLS) + 1 <= max_length.
        let fits = |n: usize| {
            let cls = if mcls {
                n.div_ceil(MCLS_CHUNK).max(1)
            } else {
                1
            };
            n + cls < max_length
        };
        let mut n = content.len();
        if !fits(n) {
            n = max_length - 2;
            while n > 0 && !fits(n) {
                n -= 1;
            }
        }
        let truncated = n < content.len();
        let mut ids = Vec::with_capacity(n + n / MCLS_CHUNK + 2);
        let mut cls_positions = Vec::new();
        for (i, &t) in content[..n].iter().enumerate() {
            if i == 0 || (mcls && i % MCLS_CHUNK == 0) {
                cls_positions.push(ids.len());
                ids.push(self.specials.cls);
            }
            ids.push(t);
        }
        if n == 0 {
            cls_positions.push(0);
            ids.push(self.specials.cls);
        }
        ids.push(self.specials.eos);
        Encoded {
            ids,
            cls_positions,
            truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> TextTokenizer {
        TextTokenizer::from_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3"),
        )
        .unwrap()
    }

    #[test]
    fn specials_come_from_the_directory() {
        let t = tok();
        assert_eq!(
            t.specials,
            Specials {
                cls: 0,
                eos: 2,
                pad: Some(1),
                unk: Some(3)
            }
        );
    }

    #[test]
    fn truncation_keeps_the_first_tokens_and_the_eos() {
        let t = tok();
        let content: Vec<u32> = (10..30).collect();
        let e = t.assemble(&content, 8, false);
        assert_eq!(e.ids, vec![0, 10, 11, 12, 13, 14, 15, 2]);
        assert!(e.truncated);
        let e = t.assemble(&[], 8, false);
        assert_eq!(
            (e.ids, e.cls_positions, e.truncated),
            (vec![0, 2], vec![0], false)
        );
    }

    #[test]
    fn long_texts_are_cut_before_tokenizing_with_the_same_tokens() {
        let t = tok();
        let words = ["alpha ", "beta ", "gamma ", "delta "];
        let text: String = (0..20_000).map(|i| words[i % 4]).collect();
        let cut = t.encode(&text, 16, false).unwrap();
        let full = t.assemble(&t.content_ids(&text).unwrap(), 16, false);
        assert_eq!(cut, full);
        assert_eq!(cut_chars("añb", 2), ("añ", true));
        assert_eq!(cut_chars("añb", 3), ("añb", false));
        // A text within the character budget is not marked truncated by the cut.
        assert!(!t.encode("alpha beta", 16, false).unwrap().truncated);
    }

    #[test]
    fn mcls_inserts_a_cls_before_every_256_tokens() {
        let t = tok();
        let content: Vec<u32> = (0..600).map(|i| 10 + i % 50).collect();
        let e = t.assemble(&content, 8192, true);
        assert_eq!(e.cls_positions, vec![0, 257, 514]);
        assert_eq!(e.ids.len(), 600 + 3 + 1);
        for &p in &e.cls_positions {
            assert_eq!(e.ids[p], 0);
        }
        assert_eq!(e.ids[258], content[256]);
        // The inserted CLS tokens count toward max_length: 300 tokens leave room for 296
        // content tokens (2 CLS + EOS + 296 + ... = 300 with the second CLS at 257).
        let e = t.assemble(&content, 300, true);
        assert_eq!(e.ids.len(), 300);
        assert_eq!(e.cls_positions, vec![0, 257]);
        assert!(e.truncated);
    }
}
