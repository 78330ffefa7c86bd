//! Writing f32 state dicts as `torch.save` does (zip archive, pickle protocol 2, one
//! storage per tensor), so trained heads keep the published names `colbert_linear.pt` and
//! `sparse_linear.pt` that FlagEmbedding's `BGEM3FlagModel` loads with `torch.load`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use zip::write::SimpleFileOptions;

/// Pickle opcodes used here (protocol 2).
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

fn global(p: &mut Vec<u8>, module: &str, name: &str) {
    p.push(op::GLOBAL);
    p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
}

fn string(p: &mut Vec<u8>, s: &str) {
    p.push(op::BINUNICODE);
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

fn int(p: &mut Vec<u8>, v: usize) {
    p.push(op::BININT);
    p.extend_from_slice(&(v as i32).to_le_bytes());
}

fn int_tuple(p: &mut Vec<u8>, v: &[usize]) {
    p.push(op::MARK);
    for &x in v {
        int(p, x);
    }
    p.push(op::TUPLE);
}

/// The pickle of an `OrderedDict` of tensors, storage `k` holding tensor `k`.
fn state_dict_pickle(tensors: &[(String, Vec<usize>, &[f32])]) -> Vec<u8> {
    let mut p = vec![op::PROTO, 2];
    global(&mut p, "collections", "OrderedDict");
    p.extend([op::EMPTY_TUPLE, op::REDUCE, op::MARK]);
    for (k, (name, shape, data)) in tensors.iter().enumerate() {
        string(&mut p, name);
        // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.push(op::MARK);
        p.push(op::MARK);
        string(&mut p, "storage");
        global(&mut p, "torch", "FloatStorage");
        string(&mut p, &k.to_string());
        string(&mut p, "cpu");
        int(&mut p, data.len());
        p.extend([op::TUPLE, op::BINPERSID]);
        int(&mut p, 0);
        int_tuple(&mut p, shape);
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        int_tuple(&mut p, &stride);
        p.push(op::NEWFALSE);
        global(&mut p, "collections", "OrderedDict");
        p.extend([op::EMPTY_TUPLE, op::REDUCE, op::TUPLE, op::REDUCE]);
    }
    p.extend([op::SETITEMS, op::STOP]);
    p
}

/// Writes `(name, shape, values)` as a torch zip checkpoint at `path` (through a temporary
/// name and a rename). Entries are stored uncompressed and 64-byte aligned as torch does.
pub fn write_torch_state_dict(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> anyhow::Result<()> {
    let archive = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && s.is_ascii())
        .unwrap_or("archive");
    let tmp = path.with_extension("pt.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut put = |name: String, bytes: &[u8]| -> anyhow::Result<()> {
        zip.start_file(format!("{archive}/{name}"), opts)?;
        zip.write_all(bytes)?;
        Ok(())
    };
    put("data.pkl".into(), &state_dict_pickle(tensors))?;
    put("byteorder".into(), b"little")?;
    for (k, (_, _, data)) in tensors.iter().enumerate() {
        put(format!("data/{k}"), bytemuck::cast_slice(data))?;
    }
    put("version".into(), b"3\n")?;
    zip.finish()?.flush()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::read_checkpoint;

    #[test]
    fn a_written_state_dict_reads_back() {
        let dir = std::env::temp_dir().join(format!("m3-torch-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("colbert_linear.pt");
        let w: Vec<f32> = (0..300 * 2).map(|i| i as f32 * 0.5 - 7.0).collect();
        let b = vec![0.25f32, -1.5];
        write_torch_state_dict(
            &path,
            &[
                ("weight".into(), vec![2, 300], &w),
                ("bias".into(), vec![2], &b),
            ],
        )
        .unwrap();
        let got = read_checkpoint(&path).unwrap();
        assert_eq!(got["weight"].shape, vec![2, 300]);
        assert_eq!(got["weight"].data, w);
        assert_eq!(got["bias"].shape, vec![2]);
        assert_eq!(got["bias"].data, b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
