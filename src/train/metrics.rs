//! The `--metrics` file: one JSON object per optimiser step, flushed as written, rewound
//! to the resumed step on `--resume`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Appends one JSON object per line to a metrics file.
pub struct MetricsWriter {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens a metrics file: truncated for a fresh run; when resuming after step `n`, with
    /// the lines of steps up to `n` kept (later ones, from the run that crashed, dropped).
    /// The kept lines replace the file through a temporary file and a rename, so a crash
    /// while rewinding loses none of them.
    pub fn open(path: &Path, resumed_at: Option<u64>) -> anyhow::Result<Self> {
        let io = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", path.display());
        let mut keep = String::new();
        if let (Some(n), Ok(old)) = (resumed_at, std::fs::read_to_string(path)) {
            for line in old.lines() {
                let step = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64());
                if step.is_some_and(|s| s <= n) {
                    keep.push_str(line);
                    keep.push('\n');
                }
            }
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".m3-tmp");
        let tmp = PathBuf::from(tmp_name);
        std::fs::write(&tmp, keep.as_bytes())
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(io)?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(MetricsWriter {
            out: std::io::BufWriter::new(f),
            path: path.to_path_buf(),
        })
    }

    /// Writes one line and flushes it, so a crash keeps every finished step.
    pub fn write(&mut self, v: &serde_json::Value) -> anyhow::Result<()> {
        let io = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", self.path.display());
        writeln!(self.out, "{v}").map_err(io)?;
        self.out.flush().map_err(io)?;
        Ok(())
    }
}
