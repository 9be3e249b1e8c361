//! Temporary outputs that must not outlive the run: every temporary file or folder this process
//! creates is registered here while it exists. Its owner removes it on error and when dropped; the
//! SIGINT/SIGTERM handler ([`install_signal_handler`], installed by the binary only) removes
//! whatever is still registered, prints one line and exits with 128 + the signal number.
//!
//! Temporary names are `.<destination name>.<pid>.<n>.partial`, beside the destination (or inside
//! an existing destination folder): a later run writing the same destination removes those whose
//! process is gone ([`remove_stale`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// How a registered path is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A temporary file.
    File,
    /// A temporary folder of ours: removed with everything in it.
    Tree,
    /// A folder created on the way to a destination: removed only while empty.
    EmptyDir,
}

struct Entry {
    id: u64,
    path: PathBuf,
    kind: Kind,
}

#[derive(Default)]
struct Registry {
    next: u64,
    entries: Vec<Entry>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    entries: Vec::new(),
});

/// The registry, also after a panic elsewhere (the list stays valid: every change is one push or
/// one remove).
fn lock() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove(path: &Path, kind: Kind) -> io::Result<()> {
    match kind {
        Kind::File => std::fs::remove_file(path),
        Kind::Tree => {
            // Moved aside first: a writer still creating entries by their path (a frame being
            // written while a signal arrives) then fails instead of racing `remove_dir_all`
            // (which fails with "directory not empty" when an entry appears behind it).
            let mut aside = path.as_os_str().to_owned();
            aside.push(".removing");
            let aside = PathBuf::from(aside);
            match std::fs::rename(path, &aside) {
                Ok(()) => std::fs::remove_dir_all(&aside),
                Err(_) => std::fs::remove_dir_all(path),
            }
        }
        Kind::EmptyDir => std::fs::remove_dir(path),
    }
}

/// A registered temporary path; removed when dropped unless [`Pending::commit`]ted.
#[derive(Debug)]
pub struct Pending {
    id: u64,
    path: PathBuf,
    kind: Kind,
    done: bool,
}

impl Pending {
    /// Runs `create` (which makes `path`) and registers `path`, as one step for the signal
    /// handler: it sees either nothing or the registered path.
    pub fn create<T>(
        path: &Path,
        kind: Kind,
        create: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<(T, Pending)> {
        let mut r = lock();
        let made = create()?;
        let id = r.next;
        r.next += 1;
        r.entries.push(Entry {
            id,
            path: path.to_path_buf(),
            kind,
        });
        Ok((
            made,
            Pending {
                id,
                path: path.to_path_buf(),
                kind,
                done: false,
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `finish` (e.g. the rename into place) and, when it succeeds, forgets the path, as one
    /// step for the signal handler. On error the path stays registered (removed on drop).
    pub fn commit<T>(mut self, finish: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
        let mut r = lock();
        let out = finish(&self.path)?;
        r.entries.retain(|e| e.id != self.id);
        self.done = true;
        Ok(out)
    }
}

impl Pending {
    /// Forgets the path without removing it (it is now part of the output).
    pub fn keep(mut self) {
        lock().entries.retain(|e| e.id != self.id);
        self.done = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut r = lock();
        let _ = remove(&self.path, self.kind);
        r.entries.retain(|e| e.id != self.id);
    }
}

/// `.<name>.<pid>.` : the start of this process's temporary names for destination `name`.
pub fn temp_prefix(name: &str) -> String {
    format!(".{name}.{}.", std::process::id())
}

/// A fresh temporary path for destination name `name` in `dir`, made by `create` (which must
/// fail with `AlreadyExists` when the path is taken), registered as `kind`.
pub fn create_temp<T>(
    dir: &Path,
    name: &str,
    kind: Kind,
    mut create: impl FnMut(&Path) -> io::Result<T>,
) -> io::Result<(T, Pending)> {
    let prefix = temp_prefix(name);
    for n in 0u32.. {
        let path = dir.join(format!("{prefix}{n}.partial"));
        match Pending::create(&path, kind, || create(&path)) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            other => return other,
        }
    }
    unreachable!("u32 temporary names exhausted")
}

/// Whether process `pid` still runs (or might: a process of another user counts as running).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: kill with signal 0 sends nothing; it only checks that `pid` exists and may be
        // signalled. No memory is passed.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes, from `dir`, the temporary files and folders of destination `name` left by processes
/// that no longer run (`.<name>.<pid>.<n>.partial`); returns what it removed. Entries of other
/// users, of running processes and anything not matching the pattern exactly are left alone.
pub fn remove_stale(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return removed;
    };
    let start = format!(".{name}.");
    for e in rd.filter_map(|e| e.ok()) {
        let file_name = e.file_name();
        let Some(n) = file_name.to_str() else {
            continue;
        };
        let Some(rest) = n
            .strip_prefix(&start)
            .and_then(|r| r.strip_suffix(".partial"))
        else {
            continue;
        };
        let Some((pid, counter)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(pid), true) = (
            pid.parse::<u32>(),
            !counter.is_empty() && counter.bytes().all(|b| b.is_ascii_digit()),
        ) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = e.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: getuid has no preconditions and cannot fail.
            if m.uid() != unsafe { libc::getuid() } {
                continue;
            }
        }
        let kind = if m.is_dir() {
            Kind::Tree
        } else if m.is_file() {
            Kind::File
        } else {
            continue;
        };
        if remove(&path, kind).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// [`remove_stale`] with one stderr line per removed path.
pub fn remove_stale_noisy(dir: &Path, name: &str) {
    for p in remove_stale(dir, name) {
        eprintln!(
            "    note: removed {}, left by an earlier run that no longer runs",
            p.display()
        );
    }
}

/// On SIGINT or SIGTERM: removes every registered path, prints
/// `interrupted by SIGINT: removed PATH[, PATH...]` and exits with 128 + the signal number (130,
/// 143). Runs on a thread of its own (not in the signal handler), so the removal is ordinary code.
pub fn install_signal_handler() -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                // Held until exit: no temporary path is created or committed after this.
                let r = lock();
                let mut removed = Vec::new();
                for e in r.entries.iter().rev() {
                    if remove(&e.path, e.kind).is_ok() && e.kind != Kind::EmptyDir {
                        removed.push(e.path.display().to_string());
                    }
                }
                let what = if removed.is_empty() {
                    "nothing had been written".to_string()
                } else {
                    format!("removed {}", removed.join(", "))
                };
                // Start a fresh line where a progress bar may be drawn.
                let nl = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    "\n"
                } else {
                    ""
                };
                eprintln!("{nl}interrupted by {name}: {what}");
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}
