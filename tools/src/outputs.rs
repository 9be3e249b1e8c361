//! Output paths: checked before any work, written under temporary names, renamed into place.
//!
//! - [`check_destination`]: a file destination is absent, a regular file, or a symbolic link to
//!   one (both replaced only with `--overwrite`); a directory, device, FIFO, socket or dangling
//!   link is refused, whatever the flags. Its folder must exist and be writable (probed).
//! - [`AtomicFile`]: a temporary file beside the destination, renamed onto it when complete.
//! - [`StagedDir`]: a temporary folder renamed into place (destination absent), or whose entries
//!   are moved into an existing destination folder when complete.
//!
//! Temporary paths are registered with [`crate::cleanup`] while they exist (removed on error,
//! drop and SIGINT/SIGTERM); their names `.<name>.<pid>.<n>.partial` let a later run remove those
//! of a process that is gone.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use vi_weights::input_file::kind_of;

use crate::cleanup::{self, Kind, Pending};

/// The folder a destination lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A path that does not exist (also when a folder on its way is a file: checked separately).
fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// The destination's file name, as the stem of its temporary names.
fn dest_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

/// Refuses a destination that exists and is not a regular file (or a link to one), and an
/// existing one without `overwrite`.
fn check_replaceable(path: &Path, overwrite: bool) -> Result<()> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if absent(&e) => return Ok(()),
        Err(e) => bail!("cannot check {}: {e}", path.display()),
    };
    let target = if m.file_type().is_symlink() {
        match fs::metadata(path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "{} is a dangling symbolic link (to {}, which does not exist): remove it or \
                 choose another name",
                path.display(),
                fs::read_link(path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into())
            ),
            Err(e) => bail!("cannot check {}: {e}", path.display()),
        }
    } else {
        None
    };
    let t = target.as_ref().unwrap_or(&m);
    if t.is_dir() {
        bail!(
            "{} is {}directory, expected a file name",
            path.display(),
            if target.is_some() {
                "a symbolic link to a "
            } else {
                "a "
            }
        );
    }
    if !t.is_file() {
        bail!(
            "{} is {}{}: --overwrite replaces only a regular file (or a symbolic link to one), \
             never a device, FIFO or socket",
            path.display(),
            if target.is_some() {
                "a symbolic link to "
            } else {
                ""
            },
            kind_of(t)
        );
    }
    ensure!(
        overwrite,
        "{} already exists (pass --overwrite to replace it)",
        path.display()
    );
    Ok(())
}

/// Checks a file destination before any work (see the module doc), removes stale temporary files
/// of earlier runs for it and probes that its folder is writable.
pub fn check_destination(path: &Path, overwrite: bool) -> Result<()> {
    check_replaceable(path, overwrite)?;
    let parent = parent_dir(path);
    if let Some(k) = vi_weights::input_file::wrong_kind(&parent, true) {
        bail!(
            "cannot write {}: {} is {k}, not a folder",
            path.display(),
            parent.display()
        );
    }
    ensure!(
        parent.is_dir(),
        "cannot write {}: folder {} does not exist",
        path.display(),
        parent.display()
    );
    let name = dest_name(path);
    cleanup::remove_stale_noisy(&parent, &name);
    // Probe: create and remove one temporary file.
    cleanup::create_temp(&parent, &name, Kind::File, create_new_file)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn create_new_file(p: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p)
}

/// A temporary file beside `dest`, renamed onto it by [`AtomicFile::commit`]; removed when
/// dropped uncommitted.
pub struct AtomicFile {
    dest: PathBuf,
    file: File,
    pending: Pending,
    overwrite: bool,
}

impl AtomicFile {
    /// Checks `dest` ([`check_destination`]) and creates its temporary file.
    pub fn create(dest: &Path, overwrite: bool) -> Result<AtomicFile> {
        check_destination(dest, overwrite)?;
        let (file, pending) = cleanup::create_temp(
            &parent_dir(dest),
            &dest_name(dest),
            Kind::File,
            create_new_file,
        )
        .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(AtomicFile {
            dest: dest.to_path_buf(),
            file,
            pending,
            overwrite,
        })
    }

    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    pub fn file_ref(&self) -> &File {
        &self.file
    }

    /// The temporary path (for messages).
    pub fn temp_path(&self) -> &Path {
        self.pending.path()
    }

    /// Flushes to disk and renames onto the destination (never onto anything but a regular file
    /// or a link to one; never onto an existing file without `overwrite`).
    pub fn commit(self) -> Result<()> {
        let dest = &self.dest;
        let cannot = || format!("cannot write {}", dest.display());
        // Keep the permissions of the file replaced; a new file has the process's defaults.
        if let Ok(m) = fs::metadata(dest) {
            if m.is_file() {
                self.file
                    .set_permissions(m.permissions())
                    .with_context(cannot)?;
            }
        }
        self.file.sync_all().with_context(cannot)?;
        // The destination may have changed kind since the first check.
        check_replaceable(dest, self.overwrite)?;
        let overwrite = self.overwrite;
        self.pending
            .commit(|tmp| {
                if overwrite {
                    fs::rename(tmp, dest)
                } else {
                    // Never clobber a destination created since the check: a hard link fails
                    // when it exists. Where the file system has no hard links, rename after one
                    // more check.
                    match fs::hard_link(tmp, dest) {
                        Ok(()) => fs::remove_file(tmp),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
                        Err(_) if fs::symlink_metadata(dest).is_err() => fs::rename(tmp, dest),
                        Err(e) => Err(e),
                    }
                }
            })
            .with_context(|| {
                format!(
                    "cannot rename the finished output onto {}",
                    self.dest.display()
                )
            })
    }
}

/// A temporary folder for destination folder `dest`: beside it when `dest` does not exist (then
/// renamed onto it), inside it when it does (then its entries are moved in, replacing files of
/// the same name). Removed, with any folder created on the way, when dropped uncommitted.
pub struct StagedDir {
    dest: PathBuf,
    /// None once committed.
    stage: Option<Pending>,
    /// Missing ancestors of `dest` created for the stage, outermost first.
    created: Vec<Pending>,
    inside: bool,
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        // The stage first, then the folders created to hold it, innermost first.
        drop(self.stage.take());
        while let Some(p) = self.created.pop() {
            drop(p);
        }
    }
}

/// Refuses an existing `dest` that is not a folder; checks where a missing one would go.
pub fn check_dir_destination(dest: &Path) -> Result<()> {
    match fs::metadata(dest) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => bail!(
            "{} exists and is {}, expected a folder",
            dest.display(),
            kind_of(&m)
        ),
        Err(e) if absent(&e) => {
            if fs::symlink_metadata(dest).is_ok() {
                bail!(
                    "{} is a dangling symbolic link: remove it or choose another folder",
                    dest.display()
                );
            }
            // The nearest existing ancestor must be a folder.
            let mut a = parent_dir(dest);
            loop {
                match fs::metadata(&a) {
                    Ok(m) if m.is_dir() => return Ok(()),
                    Ok(m) => bail!(
                        "cannot create {}: {} is {}, not a folder",
                        dest.display(),
                        a.display(),
                        kind_of(&m)
                    ),
                    Err(_) => match a.parent() {
                        Some(p) if !p.as_os_str().is_empty() => a = p.to_path_buf(),
                        _ => return Ok(()),
                    },
                }
            }
        }
        Err(e) => bail!("cannot check {}: {e}", dest.display()),
    }
}

impl StagedDir {
    /// Creates the temporary folder now (and any missing folder above `dest`).
    pub fn create(dest: &Path) -> Result<StagedDir> {
        check_dir_destination(dest)?;
        let name = dest_name(dest);
        let inside = dest.is_dir();
        let mut created = Vec::new();
        let home = if inside {
            dest.to_path_buf()
        } else {
            let parent = parent_dir(dest);
            let mut missing = Vec::new();
            let mut a = parent.clone();
            while fs::symlink_metadata(&a).is_err() {
                missing.push(a.clone());
                match a.parent() {
                    Some(p) if !p.as_os_str().is_empty() => a = p.to_path_buf(),
                    _ => break,
                }
            }
            for d in missing.into_iter().rev() {
                let ((), p) = Pending::create(&d, Kind::EmptyDir, || fs::create_dir(&d))
                    .with_context(|| format!("cannot create folder {}", d.display()))?;
                created.push(p);
            }
            parent
        };
        cleanup::remove_stale_noisy(&home, &name);
        let ((), stage) = cleanup::create_temp(&home, &name, Kind::Tree, |p| fs::create_dir(p))
            .with_context(|| format!("cannot write into {}", home.display()))?;
        Ok(StagedDir {
            dest: dest.to_path_buf(),
            stage: Some(stage),
            created,
            inside,
        })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        self.stage.as_ref().expect("not committed").path()
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Puts the staged entries into place, then runs `tidy` on the destination (e.g. removing
    /// what the new entries replace); all as one step for the signal handler.
    pub fn commit(mut self, tidy: impl FnOnce(&Path) -> io::Result<()>) -> Result<()> {
        let dest = self.dest.clone();
        let inside = self.inside;
        let stage = self.stage.take().expect("committed once");
        stage
            .commit(|s| {
                if inside {
                    merge_into(s, &dest)?;
                    fs::remove_dir(s)?;
                } else {
                    fs::rename(s, &dest)?;
                }
                tidy(&dest)
            })
            .with_context(|| format!("cannot move the finished output into {}", dest.display()))?;
        for p in std::mem::take(&mut self.created) {
            p.keep();
        }
        Ok(())
    }
}

/// Moves every entry of `from` into `into` (folders merged, files replaced).
fn merge_into(from: &Path, into: &Path) -> io::Result<()> {
    for e in fs::read_dir(from)? {
        let e = e?;
        let src = e.path();
        let dst = into.join(e.file_name());
        if e.file_type()?.is_dir() {
            match fs::metadata(&dst) {
                Ok(m) if m.is_dir() => {
                    merge_into(&src, &dst)?;
                    fs::remove_dir(&src)?;
                }
                Ok(m) => {
                    return Err(io::Error::other(format!(
                        "{} is {}, expected a folder",
                        dst.display(),
                        kind_of(&m)
                    )))
                }
                Err(_) => fs::rename(&src, &dst)?,
            }
        } else {
            if let Ok(m) = fs::symlink_metadata(&dst) {
                if !m.is_file() && !m.file_type().is_symlink() {
                    return Err(io::Error::other(format!(
                        "{} is {}, not a file this run replaces",
                        dst.display(),
                        kind_of(&m)
                    )));
                }
            }
            fs::rename(&src, &dst)?;
        }
    }
    Ok(())
}
