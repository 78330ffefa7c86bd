//! Reading tensors from checkpoint files: safetensors, and torch zip checkpoints
//! (`pytorch_model.bin`, `*.pt`) through the pickle subset in [`super::torch_pickle`].
//! Everything is converted to f32 on the host; every offset is bounds-checked and every
//! failure is an error naming the file (and tensor), never a panic.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::torch_pickle::{read_state_dict, TensorRef};

/// A tensor read from a checkpoint, converted to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// A checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CheckpointError {
    /// The file.
    pub path: PathBuf,
    /// What was wrong.
    pub message: String,
}

fn err<T>(path: &Path, message: impl Into<String>) -> Result<T, CheckpointError> {
    Err(CheckpointError {
        path: path.to_path_buf(),
        message: message.into(),
    })
}

/// Reads every tensor of a safetensors file or a torch zip checkpoint, by content (a zip
/// starts with `PK`), whatever the extension.
pub fn read_checkpoint(path: &Path) -> Result<HashMap<String, HostTensor>, CheckpointError> {
    let bytes = std::fs::read(path).or_else(|e| err(path, format!("cannot read: {e}")))?;
    read_checkpoint_bytes(path, &bytes)
}

/// [`read_checkpoint`] of a file already in memory (`path` names it in errors).
pub fn read_checkpoint_bytes(
    path: &Path,
    bytes: &[u8],
) -> Result<HashMap<String, HostTensor>, CheckpointError> {
    if bytes.starts_with(b"PK\x03\x04") {
        read_torch_zip(path, bytes)
    } else {
        read_safetensors(path, bytes)
    }
}

/// Writes f32 tensors `(name, shape, values)` as a safetensors file, through a temporary
/// name and a rename so a reader never sees half a file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> anyhow::Result<()> {
    use anyhow::Context;
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            if shape.iter().product::<usize>() != data.len() {
                anyhow::bail!("tensor {name}: shape {shape:?} but {} values", data.len());
            }
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytemuck::cast_slice(data),
                )?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::tensor::serialize_to_file(views, None, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

fn read_safetensors(
    path: &Path,
    bytes: &[u8],
) -> Result<HashMap<String, HostTensor>, CheckpointError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .or_else(|e| err(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data = match view.dtype() {
            safetensors::Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            // Integer buffers (BERT's position_ids) are not weights.
            safetensors::Dtype::I64 | safetensors::Dtype::I32 | safetensors::Dtype::BOOL => {
                continue
            }
            other => {
                return err(
                    path,
                    format!("tensor {name}: dtype {other:?} is not supported (f32, f16, bf16)"),
                );
            }
        };
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Decodes one little-endian element into f32.
type Decode = fn(&[u8]) -> f32;

/// Bytes per element and a decoder for a torch storage type.
fn decoder(dtype: &str) -> Option<(usize, Decode)> {
    match dtype {
        "Float" => Some((4, |c| f32::from_le_bytes(c.try_into().unwrap()))),
        "Half" => Some((2, |c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        "BFloat16" => Some((2, |c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        _ => None,
    }
}

fn read_torch_zip(
    path: &Path,
    bytes: &[u8],
) -> Result<HashMap<String, HostTensor>, CheckpointError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .or_else(|e| err(path, format!("not a valid zip archive: {e}")))?;
    // Entries live under one top-level folder named after the checkpoint: find its data.pkl.
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or_else(|| CheckpointError {
            path: path.to_path_buf(),
            message: "zip has no data.pkl: not a torch checkpoint".into(),
        })?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap().to_string();
    let mut entry = |name: &str| -> Result<Vec<u8>, CheckpointError> {
        let mut f = zip
            .by_name(name)
            .or_else(|e| err(path, format!("missing archive entry {name}: {e}")))?;
        // The declared size is the file's word: never reserve more than the file holds.
        let mut buf = Vec::with_capacity((f.size() as usize).min(bytes.len()));
        f.read_to_end(&mut buf)
            .or_else(|e| err(path, format!("cannot read archive entry {name}: {e}")))?;
        Ok(buf)
    };
    if let Ok(order) = entry(&format!("{prefix}byteorder")) {
        if order != b"little" {
            return err(path, "big-endian checkpoints are not supported");
        }
    }
    let pickle = entry(&pkl)?;
    let state = read_state_dict(&pickle).or_else(|e| err(path, format!("{pkl}: {e}")))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = HashMap::new();
    // Views materialise at most twice the archive's bytes as f32 (tied weights share a
    // storage, so a little more than once is legitimate), never what a view merely claims.
    let mut budget = bytes.len().saturating_mul(2) / 4 + (1 << 16);
    for (name, t) in state {
        if matches!(t.storage.dtype.as_str(), "Long" | "Int" | "Bool") {
            continue; // integer buffers are not weights
        }
        let key = &t.storage.key;
        if !storages.contains_key(key) {
            let data = entry(&format!("{prefix}data/{key}"))?;
            storages.insert(key.clone(), data);
        }
        let tensor = gather(&t, &storages[key], &mut budget)
            .or_else(|m| err(path, format!("tensor {name}: {m}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Materialises a strided view of a storage, checking every index against the storage and
/// the element count against `budget` (elements left to materialise) before allocating.
fn gather(t: &TensorRef, raw: &[u8], budget: &mut usize) -> Result<HostTensor, String> {
    let (width, decode) = decoder(&t.storage.dtype).ok_or_else(|| {
        format!(
            "storage type {} is not supported (Float, Half, BFloat16)",
            t.storage.dtype
        )
    })?;
    if t.size.len() != t.stride.len() {
        return Err(format!(
            "size {:?} and stride {:?} differ in rank",
            t.size, t.stride
        ));
    }
    let elems = raw.len() / width;
    let numel: usize = t
        .size
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .ok_or("size overflows")?;
    if numel > 0 {
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&s, &st)| {
                (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
            })
            .ok_or("strides overflow")?;
        if last >= elems || last >= t.storage.numel.max(elems) {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a {elems}-element storage",
                t.offset, t.size, t.stride
            ));
        }
    }
    if numel > elems {
        return Err(format!(
            "view of {numel} elements (size {:?}, stride {:?}) over a storage of {elems}: \
             broadcast (stride-0) views are not weights",
            t.size, t.stride
        ));
    }
    *budget = budget.checked_sub(numel).ok_or_else(|| {
        format!("views of the archive materialise more elements than it holds ({numel} more)")
    })?;
    let mut data = Vec::with_capacity(numel);
    let mut idx = vec![0usize; t.size.len()];
    for _ in 0..numel {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        data.push(decode(&raw[at * width..(at + 1) * width]));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(HostTensor {
        shape: t.size.clone(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::super::torch_pickle::StorageRef;
    use super::*;

    fn view(offset: usize, size: Vec<usize>, stride: Vec<usize>) -> TensorRef {
        TensorRef {
            storage: StorageRef {
                key: "0".into(),
                dtype: "Float".into(),
                numel: 6,
            },
            offset,
            size,
            stride,
        }
    }

    #[test]
    fn strided_views_gather_and_out_of_range_views_are_errors() {
        let raw: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        // A transposed 2x3 view of a 3x2 storage.
        let b = &mut 1000;
        let t = gather(&view(0, vec![2, 3], vec![1, 2]), &raw, b).unwrap();
        assert_eq!(t.data, vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
        assert!(gather(&view(1, vec![2, 3], vec![3, 1]), &raw, b).is_err());
        assert!(gather(&view(0, vec![7], vec![1]), &raw, b).is_err());
        assert!(gather(&view(usize::MAX, vec![2], vec![1]), &raw, b).is_err());
        assert!(gather(&view(0, vec![2, usize::MAX], vec![1, usize::MAX]), &raw, b).is_err());
        // Stride 0 with a huge size: refused before anything is allocated.
        let e = gather(&view(0, vec![1 << 40], vec![0]), &raw, b).unwrap_err();
        assert!(e.contains("stride-0"), "{e}");
        // The budget: views may not materialise more than it allows in all.
        let b = &mut 8;
        assert!(gather(&view(0, vec![6], vec![1]), &raw, b).is_ok());
        assert!(gather(&view(0, vec![6], vec![1]), &raw, b).is_err());
    }

    #[test]
    fn garbage_files_are_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("m3-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in [
            ("a.safetensors", &b"\x10\x00\x00\x00\x00\x00\x00\x00{}"[..]),
            ("b.bin", &b"PK\x03\x04garbage"[..]),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = read_checkpoint(&p).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
