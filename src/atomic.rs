//! Replacing user-visible directories so that a reader sees the old one or the new one,
//! never a mix: the new one is built in a temporary sibling, synced to disk, and swapped
//! into place in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames with
//! the old one kept aside until the new one is in place). A crash at any point leaves the
//! old directory usable; the temporary sibling it leaves behind is removed by the next
//! build of the same directory, which recognises it by name and dead process id.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Marker in the names of temporary siblings: `.<name>.m3-tmp-<pid>`.
const TMP_MARK: &str = ".m3-tmp-";
/// Marker of an old directory set aside during a swap without `RENAME_EXCHANGE`.
const OLD_MARK: &str = ".m3-old-";

/// A directory being built in a temporary sibling of `dst`, published by [`StagedDir::commit`]
/// and removed if dropped before that.
pub struct StagedDir {
    tmp: PathBuf,
    dst: PathBuf,
    committed: bool,
}

/// The file name of `p` as text, or an error naming the path.
fn name_of(p: &Path) -> anyhow::Result<String> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{}: not a directory name m3 can write", p.display()))
}

/// The directory holding `p` (`.` for a bare name).
fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether process `pid` is alive (always "yes" where that cannot be told, so nothing of a
/// running build is ever removed).
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Removes temporary and set-aside siblings of `dst` left by builds that died.
pub fn clean_leftovers(dst: &Path) -> anyhow::Result<()> {
    let name = name_of(dst)?;
    let parent = parent_of(dst);
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let Some(file) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Some(rest) = file.strip_prefix(&format!(".{name}")) else {
            continue;
        };
        let pid = rest
            .strip_prefix(TMP_MARK)
            .or_else(|| rest.strip_prefix(OLD_MARK))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !alive(pid) {
                std::fs::remove_dir_all(e.path())
                    .with_context(|| format!("{}: cannot remove leftover", e.path().display()))?;
            }
        }
    }
    Ok(())
}

/// Checks that `dst` may be replaced: absent, an empty directory, or a directory holding
/// only files named in `ours` (what m3 itself writes there). Anything else (a file, a
/// directory with other files) is refused, so a mistyped path never deletes user data.
pub fn ensure_replaceable(dst: &Path, ours: &[&str], what: &str) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(dst) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot inspect", dst.display())),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        bail!(
            "{}: exists and is not a directory; refusing to replace it with {what}",
            dst.display()
        );
    }
    let entries =
        std::fs::read_dir(dst).with_context(|| format!("{}: cannot list", dst.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("{}: cannot list", dst.display()))?;
        let file = e.file_name();
        if !ours.iter().any(|o| file == std::ffi::OsStr::new(o)) {
            bail!(
                "{}: holds {:?}, which is not part of {what}; refusing to replace the \
                 directory (choose a new or empty directory)",
                dst.display(),
                file
            );
        }
    }
    Ok(())
}

impl StagedDir {
    /// Starts building `dst`: removes leftovers of dead builds and creates an empty
    /// temporary sibling (creating `dst`'s parent if needed).
    pub fn new(dst: &Path) -> anyhow::Result<Self> {
        let name = name_of(dst)?;
        let parent = parent_of(dst);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
        clean_leftovers(dst)?;
        let tmp = parent.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("{}: cannot remove", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(StagedDir {
            tmp,
            dst: dst.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write the new directory's files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The directory this build will replace.
    pub fn destination(&self) -> &Path {
        &self.dst
    }

    /// Syncs every file and the directory to disk, then swaps it into place; the old
    /// directory, if any, is removed after the swap.
    pub fn commit(mut self) -> anyhow::Result<()> {
        sync_dir_files(&self.tmp)?;
        let parent = parent_of(&self.dst);
        if std::fs::symlink_metadata(&self.dst).is_err() {
            std::fs::rename(&self.tmp, &self.dst)
                .with_context(|| format!("{}: cannot rename into place", self.dst.display()))?;
        } else if exchange(&self.tmp, &self.dst)? {
            // `tmp` now holds the old directory.
            std::fs::remove_dir_all(&self.tmp).with_context(|| {
                format!("{}: cannot remove the replaced copy", self.tmp.display())
            })?;
        } else {
            let old = parent.join(format!(
                ".{}{OLD_MARK}{}",
                name_of(&self.dst)?,
                std::process::id()
            ));
            std::fs::rename(&self.dst, &old)
                .with_context(|| format!("{}: cannot move aside", self.dst.display()))?;
            std::fs::rename(&self.tmp, &self.dst)
                .with_context(|| format!("{}: cannot rename into place", self.dst.display()))?;
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("{}: cannot remove the replaced copy", old.display()))?;
        }
        self.committed = true;
        sync_path(&parent)
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a build abandoned on an error leaves nothing behind.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Atomically exchanges two paths; `false` where the platform or file system cannot.
fn exchange(a: &Path, b: &Path) -> anyhow::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: both arguments are valid NUL-terminated paths that live across the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) => Ok(false),
            _ => Err(e).with_context(|| format!("{}: cannot swap into place", b.display())),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// fsync of one file or directory.
pub fn sync_path(p: &Path) -> anyhow::Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot sync to disk", p.display()))
}

/// The temporary sibling [`write_file`] writes `path` through (what a crash can leave).
pub fn write_file_temp(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".m3-tmp");
    PathBuf::from(tmp)
}

/// Writes `bytes` to `path` whole or not at all: a temporary sibling, fsync, rename, fsync
/// of the directory (a crash leaves the old file or the new one, never half of one).
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = write_file_temp(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    sync_path(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => sync_path(dir),
        None => Ok(()),
    }
}

/// fsync of every file in `dir`, then of `dir` itself.
pub fn sync_dir_files(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let e = e.with_context(|| format!("{}: cannot list", dir.display()))?;
        sync_path(&e.path())?;
    }
    sync_path(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("m3-atomic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_commit_replaces_the_whole_directory_and_an_abandoned_build_leaves_it() {
        let root = tmp("swap");
        let dst = root.join("idx");
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(dst.join("a"), "old a").unwrap();
        std::fs::write(dst.join("b"), "old b").unwrap();
        {
            let s = StagedDir::new(&dst).unwrap();
            std::fs::write(s.path().join("a"), "new a").unwrap();
            // Dropped without commit: the old directory is untouched, the temp one gone.
        }
        assert_eq!(std::fs::read_to_string(dst.join("a")).unwrap(), "old a");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
        let s = StagedDir::new(&dst).unwrap();
        std::fs::write(s.path().join("a"), "new a").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read_to_string(dst.join("a")).unwrap(), "new a");
        assert!(!dst.join("b").exists(), "a file of the old build survived");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn leftovers_of_dead_builds_are_removed_and_foreign_directories_refused() {
        let root = tmp("left");
        let dst = root.join("out");
        // A pid that cannot be alive (beyond Linux's pid_max).
        let dead = root.join(format!(".out{TMP_MARK}4294967294"));
        std::fs::create_dir(&dead).unwrap();
        let unrelated = root.join(".outsider.m3-tmp-4294967294");
        std::fs::create_dir(&unrelated).unwrap();
        StagedDir::new(&dst).unwrap();
        assert!(!dead.exists());
        assert!(
            unrelated.exists(),
            "another directory's leftover was removed"
        );
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(dst.join("thesis.tex"), "years of work").unwrap();
        let e = ensure_replaceable(&dst, &["meta.json"], "an index").unwrap_err();
        assert!(format!("{e:#}").contains("thesis.tex"), "{e:#}");
        let file = root.join("plain");
        std::fs::write(&file, "x").unwrap();
        assert!(ensure_replaceable(&file, &[], "an index").is_err());
        assert!(ensure_replaceable(&root.join("absent"), &[], "an index").is_ok());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
