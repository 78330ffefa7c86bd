//! Checkpoints: `checkpoint-N` directories (the published model layout plus
//! `optimizer.safetensors` and `trainer_state.json`), written whole or not at all
//! ([`crate::atomic`]), found newest first, checked against the run's settings
//! (the fingerprint), loaded for `--resume`, and thinned by `--save-total-limit`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::model::{Master, TrainModel, SIDE_FILES};
use super::optim::Moments;
use super::options::TrainOptions;
use crate::atomic::{sync_dir_files, sync_path, StagedDir};
use crate::backend::Backend;
use crate::model::checkpoint::{read_checkpoint, write_safetensors};
use crate::model::params::Held;
use crate::model::torch_save::write_torch_state_dict;
use crate::tensor::DType;

/// Where training stands; saved with every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Next batch within the epoch's plan.
    pub index: usize,
}

/// A checkpoint exists but was written by a run with other settings.
#[derive(Debug)]
pub struct SettingsDiffer(pub String);

impl std::fmt::Display for SettingsDiffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsDiffer {}

/// The options that must match for a resumed run to continue the same one (the
/// sub-batch size may change: the gradient is the same).
pub fn fingerprint(o: &TrainOptions, world: usize) -> serde_json::Value {
    let data: Vec<PathBuf> = o
        .data
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let v = json!({
        "data": data, "batch_size": o.batch_size, "group": o.group, "seed": o.seed,
        "shuffle": o.shuffle, "query_max_len": o.query_max_len,
        "passage_max_len": o.passage_max_len, "temperature": o.temperature, "adamw": o.adamw,
        "linear_schedule": o.linear_schedule, "warmup_ratio": o.warmup_ratio,
        "warmup_steps": o.warmup_steps, "max_steps": o.max_steps, "epochs": o.epochs,
        "dropout": o.dropout, "max_grad_norm": o.max_grad_norm, "dense_only": o.dense_only,
        "self_distill_start_step": o.self_distill_start_step,
        "no_self_distill": o.no_self_distill, "kd_loss": o.kd_loss,
        "knowledge_distillation": o.knowledge_distillation,
    });
    // Keys a one-rank run without them never had, so its older checkpoints still resume.
    let mut v = v;
    if world > 1 {
        v["world_size"] = json!(world);
    }
    if o.negatives_cross_device {
        v["negatives_cross_device"] = json!(true);
    }
    // Each value as its JSON text: f32s read back from JSON as f64 need not print the
    // same, strings compare exactly.
    let map = v.as_object().expect("an object");
    serde_json::Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.to_string())))
            .collect(),
    )
}

/// The keys whose values differ between two fingerprints, as `key: was → now`.
pub fn differences(was: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let text =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or("(none)").to_string();
    let empty = serde_json::Map::new();
    let now = now.as_object().unwrap_or(&empty);
    let mut d: Vec<String> = now
        .iter()
        .filter(|(k, v)| was.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {} → {}", text(was.get(k)), text(Some(v))))
        .collect();
    // Keys present only when set (the world size of a several-rank run).
    if let Some(was) = was.as_object() {
        d.extend(
            was.iter()
                .filter(|(k, _)| !now.contains_key(*k))
                .map(|(k, v)| format!("{k}: {} → (none)", text(Some(v)))),
        );
    }
    d
}

/// Every `checkpoint-N` directory under `dir` holding a trainer state, newest first.
pub fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (n, e.path()))
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v.into_iter().map(|(_, p)| p).collect()
}

/// The config and tokenizer files ([`SIDE_FILES`]) of `source` (the model directory or the
/// checkpoint resumed from), each taken from `model` where `source` lacks it (checkpoints
/// of older m3 versions could lose them); `config.json` and `tokenizer.json` must exist.
pub fn read_side_files(
    source: &Path,
    model: &Path,
) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in SIDE_FILES {
        let found = [source.join(f), model.join(f)]
            .into_iter()
            .find(|p| p.is_file());
        match found {
            Some(p) => {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
                out.push((f, bytes));
            }
            None if f == "config.json" || f == "tokenizer.json" => bail!(
                "{}: missing (and not in {} either)",
                source.join(f).display(),
                model.display()
            ),
            None => {}
        }
    }
    Ok(out)
}

/// An empty directory at `dir` (an old one, say from a crash mid-write, is removed).
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("{}: cannot remove", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))
}

/// AdamW moments saved by [`save`], checked against the masters.
fn read_moments(path: &Path, masters: &[Master]) -> anyhow::Result<Vec<Moments>> {
    let mut all = read_checkpoint(path)?;
    masters
        .iter()
        .map(|m| {
            let mut get = |k: &str| -> anyhow::Result<Vec<f32>> {
                let key = format!("{k}.{}", m.name);
                let t = all
                    .remove(&key)
                    .with_context(|| format!("{}: tensor {key} is missing", path.display()))?;
                if t.shape != m.shape {
                    bail!(
                        "{}: tensor {key} has shape {:?}, expected {:?}",
                        path.display(),
                        t.shape,
                        m.shape
                    );
                }
                Ok(t.data)
            };
            Ok(Moments {
                m: get("exp_avg")?,
                v: get("exp_avg_sq")?,
            })
        })
        .collect()
}

/// Writes a model directory in the published layout: model.safetensors (PyTorch's names
/// and `[out, in]` linear weights, untrained tensors such as the pooler carried through),
/// `colbert_linear.pt` and `sparse_linear.pt`, and the config and tokenizer files.
pub fn write_model<B: Backend>(
    dir: &Path,
    model: &TrainModel<B>,
    masters: &[Master],
    side_files: &[(&'static str, Vec<u8>)],
) -> anyhow::Result<()> {
    let h = model.config.hidden_size;
    let mut encoder: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut heads: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for m in masters {
        let (shape, data) = m.torch_layout();
        if m.held == Held::FirstRow {
            let mut all = data;
            all.extend_from_slice(&model.token_type_rest);
            let rows = all.len() / h;
            encoder.push((m.name.clone(), vec![rows, h], all));
        } else if m.name.contains("_linear.") {
            heads.push((m.name.clone(), shape, data));
        } else {
            encoder.push((m.name.clone(), shape, data));
        }
    }
    for (name, t) in &model.untouched {
        encoder.push((name.clone(), t.shape.clone(), t.data.clone()));
    }
    let view = |v: &[(String, Vec<usize>, Vec<f32>)],
                strip: &str|
     -> Vec<(String, Vec<usize>, Vec<f32>)> {
        v.iter()
            .filter(|(n, _, _)| n.starts_with(strip))
            .map(|(n, s, d)| (n[strip.len()..].to_string(), s.clone(), d.clone()))
            .collect()
    };
    let write = |path: PathBuf, v: &[(String, Vec<usize>, Vec<f32>)]| {
        let t: Vec<(String, Vec<usize>, &[f32])> = v
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
            .collect();
        write_safetensors(&path, &t)
    };
    write(dir.join("model.safetensors"), &encoder)?;
    // Heads as the published `.pt` files FlagEmbedding's `torch.load` reads.
    for stem in ["colbert_linear", "sparse_linear"] {
        let v = view(&heads, &format!("{stem}."));
        let t: Vec<(String, Vec<usize>, &[f32])> = v
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
            .collect();
        write_torch_state_dict(&dir.join(format!("{stem}.pt")), &t)?;
    }
    for (name, bytes) in side_files {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

/// Writes checkpoint `checkpoint-<state.step>` into `out`: the model (`masters`), the AdamW
/// `moments` and the trainer state with the run's fingerprint; then, with a retention
/// `limit`, removes all but the newest `limit` checkpoints. Built beside its final name
/// and swapped in whole: a crash leaves the whole checkpoint or none, and leftovers of a
/// crashed save are removed by the next one.
#[allow(clippy::too_many_arguments)]
pub fn save<B: Backend>(
    out: &Path,
    model: &TrainModel<B>,
    masters: &[Master],
    moments: &[[Vec<f32>; 2]],
    state: TrainState,
    opts: &TrainOptions,
    world: usize,
    total_steps: u64,
    side_files: &[(&'static str, Vec<u8>)],
) -> anyhow::Result<PathBuf> {
    let dst = out.join(format!("checkpoint-{}", state.step));
    let stage = StagedDir::new(&dst)?;
    let tmp = stage.path().to_path_buf();
    write_model(&tmp, model, masters, side_files)?;
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (m, [em, ev]) in masters.iter().zip(moments) {
        tensors.push((format!("exp_avg.{}", m.name), m.shape.clone(), em));
        tensors.push((format!("exp_avg_sq.{}", m.name), m.shape.clone(), ev));
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &tensors)?;
    let saved = json!({
        "state": state, "fingerprint": fingerprint(opts, world),
        "total_steps": total_steps, "options": opts,
    });
    let state_path = tmp.join("trainer_state.json");
    std::fs::write(&state_path, serde_json::to_vec_pretty(&saved)?)
        .with_context(|| format!("{}: cannot write", state_path.display()))?;
    stage.commit()?;
    if let Some(limit) = opts.save_total_limit {
        for old in checkpoints(out).into_iter().skip(limit.max(1)) {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("{}: cannot remove", old.display()))?;
        }
    }
    Ok(dst)
}

/// Writes the trained model into `out` itself, each file renamed into place once written
/// (`out` also holds the checkpoints, so it cannot be swapped whole).
pub fn save_final<B: Backend>(
    out: &Path,
    model: &TrainModel<B>,
    masters: &[Master],
    side_files: &[(&'static str, Vec<u8>)],
) -> anyhow::Result<()> {
    let tmp = out.join(".final.tmp");
    fresh_dir(&tmp)?;
    write_model(&tmp, model, masters, side_files)?;
    sync_dir_files(&tmp)?;
    let list = |e| anyhow::anyhow!("{}: cannot list: {e}", tmp.display());
    for e in std::fs::read_dir(&tmp).map_err(list)? {
        let e = e.map_err(list)?;
        let dst = out.join(e.file_name());
        std::fs::rename(e.path(), &dst)
            .with_context(|| format!("{}: cannot rename into place", dst.display()))?;
    }
    std::fs::remove_dir(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    sync_path(out)
}

/// A checkpoint read back for `--resume`: the model (f32), its AdamW moments and state.
pub struct Loaded<B: Backend> {
    /// The model, f32.
    pub model: TrainModel<B>,
    /// AdamW moments in the model's order.
    pub moments: Vec<Moments>,
    /// Where training stood.
    pub state: TrainState,
}

/// Reads a checkpoint written by [`save`], after checking it came from a run whose
/// fingerprint is `now` ([`SettingsDiffer`] names what differs).
pub fn load<B: Backend>(
    be: &B,
    dir: &Path,
    now: &serde_json::Value,
    seed: u64,
) -> anyhow::Result<Loaded<B>> {
    let path = dir.join("trainer_state.json");
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let diff = differences(&saved["fingerprint"], now);
    if !diff.is_empty() {
        return Err(SettingsDiffer(format!(
            "--resume: {} was written by a run with other settings: {}",
            dir.display(),
            diff.join(", ")
        ))
        .into());
    }
    let state: TrainState = serde_json::from_value(saved["state"].clone())
        .with_context(|| format!("{}: no valid \"state\"", path.display()))?;
    let mut model = TrainModel::load(be, dir, DType::F32, seed)?;
    let masters = model.masters(be)?;
    let moments = read_moments(&dir.join("optimizer.safetensors"), &masters)?;
    Ok(Loaded {
        model,
        moments,
        state,
    })
}
