//! JSONL input and output for the CLI: line-numbered records, errors that name the file and
//! line, and an output sink (file or stdout) that is flushed before an error is reported,
//! so every line before a bad one is complete.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// A source of JSONL lines: a file, or stdin for `-`.
pub struct Lines {
    name: String,
    reader: Box<dyn BufRead>,
    line: usize,
}

impl Lines {
    /// Opens `path` (`-` = stdin).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (name, reader): (String, Box<dyn BufRead>) = if path == Path::new("-") {
            ("<stdin>".into(), Box::new(BufReader::new(std::io::stdin())))
        } else {
            let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            (path.display().to_string(), Box::new(BufReader::new(f)))
        };
        Ok(Lines {
            name,
            reader,
            line: 0,
        })
    }

    /// The next non-blank line parsed as JSON, with its 1-based line number; `None` at the
    /// end. Invalid UTF-8 or JSON is an error naming the file and line.
    pub fn next_value(&mut self) -> anyhow::Result<Option<(usize, Value)>> {
        loop {
            let mut buf = Vec::new();
            let limit = m3::text::MAX_LINE_BYTES as u64 + 1;
            let n = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("{}: read error after line {}", self.name, self.line))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            if buf.len() as u64 == limit && buf.last() != Some(&b'\n') {
                bail!(
                    "{}:{}: line longer than {} MiB, the limit for one record",
                    self.name,
                    self.line,
                    m3::text::MAX_LINE_BYTES >> 20
                );
            }
            let text = std::str::from_utf8(&buf)
                .map_err(|e| anyhow!("{}:{}: invalid UTF-8 ({e})", self.name, self.line))?;
            if text.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(text)
                .map_err(|e| anyhow!("{}:{}: malformed JSON: {e}", self.name, self.line))?;
            return Ok(Some((self.line, v)));
        }
    }

    /// Where the lines come from, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A text to embed: a JSON string, or an object with `"text"` and optional `"id"`.
#[derive(Debug, Clone)]
pub struct TextRecord {
    /// The caller's id, echoed in the output.
    pub id: Option<Value>,
    /// The text.
    pub text: String,
}

/// Reads a text record from one line's JSON.
pub fn text_record(src: &str, line: usize, v: Value) -> anyhow::Result<TextRecord> {
    match v {
        Value::String(text) => Ok(TextRecord { id: None, text }),
        Value::Object(mut o) => {
            let text = match o.remove("text") {
                Some(Value::String(t)) => t,
                Some(other) => bail!("{src}:{line}: \"text\" must be a string, got {other}"),
                None => bail!("{src}:{line}: object has no \"text\""),
            };
            Ok(TextRecord {
                id: o.remove("id"),
                text,
            })
        }
        other => {
            bail!("{src}:{line}: expected a JSON string or an object with \"text\", got {other}")
        }
    }
}

/// Reads records in chunks of `chunk`: returns the good records before the first bad line
/// and that line's error, so the caller can finish the good ones before failing.
pub fn read_chunk<T>(
    lines: &mut Lines,
    chunk: usize,
    parse: &dyn Fn(&str, usize, Value) -> anyhow::Result<T>,
) -> (Vec<T>, Option<anyhow::Error>) {
    let mut out = Vec::new();
    while out.len() < chunk {
        match lines.next_value() {
            Ok(None) => break,
            Ok(Some((line, v))) => match parse(lines.name(), line, v) {
                Ok(t) => out.push(t),
                Err(e) => return (out, Some(e)),
            },
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// Output lines: a file or stdout (`-`).
pub struct Sink {
    out: Box<dyn Write>,
    name: PathBuf,
}

impl Sink {
    /// Creates `path` (`-` = stdout).
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let out: Box<dyn Write> = if path == Path::new("-") {
            Box::new(BufWriter::new(std::io::stdout().lock()))
        } else {
            let f =
                File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
            Box::new(BufWriter::new(f))
        };
        Ok(Sink {
            out,
            name: path.to_path_buf(),
        })
    }

    /// Writes one value as a JSON line.
    pub fn write(&mut self, v: &impl serde::Serialize) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out
            .write_all(b"\n")
            .with_context(|| format!("{}: write failed", self.name.display()))
    }

    /// Flushes buffered lines.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out
            .flush()
            .with_context(|| format!("{}: write failed", self.name.display()))
    }
}
