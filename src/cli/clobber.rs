//! Refusing writes that would destroy an input: an output file that is the same file as an
//! input (also through a symlink, a hard link or `./`), or an output directory that holds
//! an input. Checked before anything is opened for writing, so a refused run changes
//! nothing on disk.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// An input or output path with the flag that named it, for messages.
pub struct Named<'a> {
    flag: &'a str,
    path: PathBuf,
}

/// `path` as named by `flag`.
pub fn named<'a>(flag: &'a str, path: &Path) -> Named<'a> {
    Named {
        flag,
        path: path.to_path_buf(),
    }
}

/// Every file directly inside the directory `dir`, named by `flag` (a model directory's
/// weights, tokenizer and heads; an index's files).
pub fn files_in<'a>(flag: &'a str, dir: &Path) -> Vec<Named<'a>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| named(flag, &e.path()))
        .collect()
}

#[cfg(unix)]
fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

fn is_stdio(p: &Path) -> bool {
    p == Path::new("-")
}

/// Refuses if an output file is the same file as an input.
pub fn refuse_same_file(outputs: &[Named], inputs: &[Named]) -> anyhow::Result<()> {
    for o in outputs.iter().filter(|o| !is_stdio(&o.path)) {
        let Some(oid) = file_id(&o.path) else {
            continue; // does not exist yet: it cannot be an input
        };
        for i in inputs.iter().filter(|i| !is_stdio(&i.path)) {
            if file_id(&i.path).as_ref() == Some(&oid) {
                bail!(
                    "{} {} is the same file as {} {}: refusing to overwrite an input \
                     (nothing was written)",
                    o.flag,
                    o.path.display(),
                    i.flag,
                    i.path.display()
                );
            }
        }
    }
    Ok(())
}

/// Refuses if an output directory (which m3 replaces whole) is an input or holds one.
pub fn refuse_dir_holding_input(out: &Named, inputs: &[Named]) -> anyhow::Result<()> {
    let Ok(dir) = std::fs::canonicalize(&out.path) else {
        return Ok(()); // does not exist yet
    };
    for i in inputs.iter().filter(|i| !is_stdio(&i.path)) {
        let Ok(p) = std::fs::canonicalize(&i.path) else {
            continue;
        };
        if p.starts_with(&dir) {
            bail!(
                "{} {} holds {} {}: refusing to replace a directory with an input in it \
                 (nothing was written)",
                out.flag,
                out.path.display(),
                i.flag,
                i.path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_is_found_through_dots_symlinks_and_hard_links() {
        let d = std::env::temp_dir().join(format!("m3-clobber-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let input = d.join("in.jsonl");
        std::fs::write(&input, "\"x\"\n").unwrap();
        std::os::unix::fs::symlink(&input, d.join("link")).unwrap();
        std::fs::hard_link(&input, d.join("hard")).unwrap();
        let inputs = [named("--input", &input)];
        for out in [
            d.join("sub/../in.jsonl"),
            d.join("link"),
            d.join("hard"),
            input.clone(),
        ] {
            let e = refuse_same_file(&[named("--output", &out)], &inputs).unwrap_err();
            assert!(e.to_string().contains("--input"), "{e}");
        }
        refuse_same_file(&[named("--output", &d.join("new"))], &inputs).unwrap();
        refuse_same_file(&[named("--output", Path::new("-"))], &inputs).unwrap();
        let e = refuse_dir_holding_input(&named("--index", &d), &inputs).unwrap_err();
        assert!(e.to_string().contains("in.jsonl"), "{e}");
        refuse_dir_holding_input(&named("--index", &d.join("sub")), &inputs).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
