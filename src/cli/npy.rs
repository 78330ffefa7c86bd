//! `m3 encode --npy-dir`: the three outputs as NumPy `.npy` arrays, appended batch by batch.
//! JSON text runs at ~21M floats/s on one core of the development VM (11 bytes per float,
//! measured with serde_json), while a GPU encodes ~570M colbert floats/s; raw little-endian
//! arrays cost 4 bytes per float and no formatting, and `np.load(..., mmap_mode="r")` reads
//! them in place.
//!
//! Layout of the directory: `dense.npy` f32 `[N, D]`; `colbert.npy` f32 `[T, D]` with
//! `colbert_offsets.npy` i64 `[N + 1]` (text i's vectors are rows `offsets[i]..offsets[i+1]`);
//! `lexical_ids.npy` u32 and `lexical_weights.npy` f32 `[nnz]` with `lexical_offsets.npy` i64
//! `[N + 1]`; `ids.jsonl`, each input line's "id" (or null). Every header is rewritten after
//! each chunk of input, so the files always describe the rows written so far.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use m3::model::embedder::Embedding;

/// Every file an npy output directory may hold (what `--npy-dir` may replace).
pub const NPY_FILES: [&str; 7] = [
    "dense.npy",
    "colbert.npy",
    "colbert_offsets.npy",
    "lexical_ids.npy",
    "lexical_weights.npy",
    "lexical_offsets.npy",
    "ids.jsonl",
];

/// Bytes reserved for an `.npy` header (magic, version, length, dict): room for any shape.
const HEADER: usize = 128;

/// One `.npy` file being appended to: a 1-D or 2-D array of one little-endian dtype.
struct NpyFile {
    path: PathBuf,
    out: BufWriter<File>,
    descr: &'static str,
    cols: Option<usize>,
    rows: usize,
}

impl NpyFile {
    fn create(path: PathBuf, descr: &'static str, cols: Option<usize>) -> anyhow::Result<Self> {
        let file =
            File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut f = NpyFile {
            path,
            out: BufWriter::new(file),
            descr,
            cols,
            rows: 0,
        };
        f.write_header()?;
        Ok(f)
    }

    /// Writes the header for the rows so far at the start of the file and returns to its end.
    fn write_header(&mut self) -> anyhow::Result<()> {
        let shape = match self.cols {
            Some(c) => format!("({}, {c})", self.rows),
            None => format!("({},)", self.rows),
        };
        let dict = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.descr
        );
        // magic (6) + version (2) + header length (2) + dict padded with spaces + '\n'.
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(b"\x93NUMPY\x01\x00");
        header.extend_from_slice(&((HEADER - 10) as u16).to_le_bytes());
        header.extend_from_slice(dict.as_bytes());
        header.resize(HEADER - 1, b' ');
        header.push(b'\n');
        let io = |e| anyhow::anyhow!("{}: cannot write: {e}", self.path.display());
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&header).map_err(io)?;
        self.out.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(())
    }

    /// Appends `n` rows given as raw little-endian bytes.
    fn append(&mut self, bytes: &[u8], n: usize) -> anyhow::Result<()> {
        self.out
            .write_all(bytes)
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.rows += n;
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.write_header()?;
        self.out
            .flush()
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// Raw little-endian bytes of a slice of plain numbers.
fn le_bytes<T: bytemuck::Pod>(v: &[T]) -> &[u8] {
    // Every target m3 builds for is little-endian, as .npy's '<' descr says.
    bytemuck::cast_slice(v)
}

/// An array pair "values + offsets": text i owns values `offsets[i]..offsets[i + 1]`.
struct Ragged {
    values: NpyFile,
    offsets: NpyFile,
    end: i64,
}

impl Ragged {
    fn create(values: NpyFile, offsets_path: PathBuf) -> anyhow::Result<Self> {
        let mut offsets = NpyFile::create(offsets_path, "<i8", None)?;
        offsets.append(le_bytes(&[0i64]), 1)?;
        Ok(Ragged {
            values,
            offsets,
            end: 0,
        })
    }

    fn close_text(&mut self, rows: usize) -> anyhow::Result<()> {
        self.end += rows as i64;
        self.offsets.append(le_bytes(&[self.end]), 1)
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.values.flush()?;
        self.offsets.flush()
    }
}

/// The `.npy` outputs of one `m3 encode` run.
pub struct NpySink {
    dense_dim: usize,
    colbert_dim: usize,
    dense: Option<NpyFile>,
    colbert: Option<Ragged>,
    lexical: Option<(Ragged, NpyFile)>,
    ids: BufWriter<File>,
    ids_path: PathBuf,
}

impl NpySink {
    /// Creates `dir` (if needed) and the files for the requested outputs: dense vectors of
    /// `dense_dim`, colbert vectors of `colbert_dim` when given, lexical weights if `sparse`.
    pub fn create(
        dir: &Path,
        dense_dim: Option<usize>,
        sparse: bool,
        colbert_dim: Option<usize>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let file = |name: &str| dir.join(name);
        let dense = dense_dim
            .map(|d| NpyFile::create(file("dense.npy"), "<f4", Some(d)))
            .transpose()?;
        let colbert = colbert_dim
            .map(|d| -> anyhow::Result<Ragged> {
                let values = NpyFile::create(file("colbert.npy"), "<f4", Some(d))?;
                Ragged::create(values, file("colbert_offsets.npy"))
            })
            .transpose()?;
        let lexical = sparse
            .then(|| -> anyhow::Result<(Ragged, NpyFile)> {
                let ids = NpyFile::create(file("lexical_ids.npy"), "<u4", None)?;
                let weights = NpyFile::create(file("lexical_weights.npy"), "<f4", None)?;
                Ok((Ragged::create(ids, file("lexical_offsets.npy"))?, weights))
            })
            .transpose()?;
        let ids_path = file("ids.jsonl");
        let ids = File::create(&ids_path)
            .with_context(|| format!("{}: cannot create", ids_path.display()))?;
        Ok(NpySink {
            dense_dim: dense_dim.unwrap_or(0),
            colbert_dim: colbert_dim.unwrap_or(0),
            dense,
            colbert,
            lexical,
            ids: BufWriter::new(ids),
            ids_path,
        })
    }

    /// Appends one text's outputs (its input "id", or null, to `ids.jsonl`).
    pub fn write(&mut self, id: Option<&serde_json::Value>, e: &Embedding) -> anyhow::Result<()> {
        let (dim, cdim) = (self.dense_dim, self.colbert_dim);
        let missing = |what: &str| anyhow::anyhow!("internal: no {what} output for a text");
        if let Some(f) = &mut self.dense {
            let v = e.dense.as_deref().ok_or_else(|| missing("dense"))?;
            anyhow::ensure!(
                v.len() == dim,
                "dense vector of {} values, expected {dim}",
                v.len()
            );
            f.append(le_bytes(v), 1)?;
        }
        if let Some(r) = &mut self.colbert {
            let rows = e.colbert.as_deref().ok_or_else(|| missing("colbert"))?;
            for row in rows {
                anyhow::ensure!(
                    row.len() == cdim,
                    "colbert row of {} values, expected {cdim}",
                    row.len()
                );
                r.values.append(le_bytes(row), 1)?;
            }
            r.close_text(rows.len())?;
        }
        if let Some((r, weights)) = &mut self.lexical {
            let lex = e.lexical.as_deref().ok_or_else(|| missing("lexical"))?;
            let ids: Vec<u32> = lex.iter().map(|p| p.0).collect();
            let ws: Vec<f32> = lex.iter().map(|p| p.1).collect();
            r.values.append(le_bytes(&ids), ids.len())?;
            weights.append(le_bytes(&ws), ws.len())?;
            r.close_text(lex.len())?;
        }
        serde_json::to_writer(&mut self.ids, &id.unwrap_or(&serde_json::Value::Null))?;
        self.ids
            .write_all(b"\n")
            .with_context(|| format!("{}: cannot write", self.ids_path.display()))
    }

    /// Rewrites every header for the rows so far and flushes all files.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(f) = &mut self.dense {
            f.flush()?;
        }
        if let Some(r) = &mut self.colbert {
            r.flush()?;
        }
        if let Some((r, w)) = &mut self.lexical {
            r.flush()?;
            w.flush()?;
        }
        self.ids
            .flush()
            .with_context(|| format!("{}: cannot write", self.ids_path.display()))
    }
}
