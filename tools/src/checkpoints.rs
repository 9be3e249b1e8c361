//! `generate --checkpoint-dir DIR` / `--resume DIR`: the checkpoint folder prepared before any
//! weight is loaded (format and protocol: `vi_model::checkpoint`).
//!
//! * A fresh run creates DIR and refuses one that already holds a manifest (never overwritten:
//!   it is continued with `--resume`).
//! * A resume reads the manifest, refuses another request (naming each differing field) and
//!   loads this process's rank files (a corrupt or truncated one is refused, naming it).
//! * The checkpoint's size is stated and checked against DIR's free space (statvfs): the
//!   previous checkpoint is kept until the next one is complete, so twice a checkpoint must fit.
//! * Files are written through [`crate::outputs::AtomicFile`]: temporaries registered with
//!   [`crate::cleanup`] (removed on SIGINT/SIGTERM), synced, renamed into place; temporaries left
//!   by a killed process are removed by the next run.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vi_model::checkpoint::{self, Checkpointing, Manifest, MANIFEST};
use vi_model::memory_plan::fmt_bytes;
use vi_model::request_digest::RequestDigest;
use vi_model::sampler::SamplerKind;

use crate::cleanup;
use crate::outputs::AtomicFile;

/// Testing: `VI_TEST_PAUSE_AFTER_STEP=K` makes rank 0 sleep [`TEST_PAUSE`] once the checkpoint
/// after 0-based step K is in place, so a test can stop the process (SIGTERM, kill -9) exactly
/// there.
pub const PAUSE_ENV: &str = "VI_TEST_PAUSE_AFTER_STEP";
const TEST_PAUSE: Duration = Duration::from_secs(120);

/// What `generate` asked for.
pub struct CheckpointArgs<'a> {
    pub checkpoint_dir: Option<&'a Path>,
    pub every: usize,
    pub resume: Option<&'a Path>,
    pub assume_free_disk: Option<u64>,
}

/// The checkpoint folder of a run, ready: settings and, on a resume, this process's rank files.
pub struct Prepared {
    pub dir: PathBuf,
    pub every: usize,
    pub digest: RequestDigest,
    pub resume: BTreeMap<usize, checkpoint::RankFile>,
    /// Steps done by the checkpoint resumed (0: a fresh run).
    pub completed: usize,
    pub pause_after: Option<usize>,
}

/// The shape of the run, for the size of its checkpoint.
pub struct Layout<'a> {
    /// Every rank's frames (the whole world).
    pub clips: &'a [Range<usize>],
    /// The ranks of this process.
    pub local: Range<usize>,
    /// Latent (h, w) and channels.
    pub latent: (usize, usize),
    pub channels: usize,
    pub sampler: SamplerKind,
    pub steps: usize,
}

/// Free bytes for an unprivileged user in the file system holding `dir`.
#[cfg(unix)]
pub(crate) fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{}: a path with a NUL byte", dir.display()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path; statvfs writes one `struct statvfs` into `st`, which
    // is read only when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        bail!(
            "{}: cannot read the free space: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are 32 bits on some targets.
    #[allow(clippy::unnecessary_cast)]
    let (avail, frsize) = (st.f_bavail as u64, st.f_frsize as u64);
    Ok(avail.saturating_mul(frsize))
}

#[cfg(not(unix))]
pub(crate) fn free_bytes(_dir: &Path) -> Result<u64> {
    Ok(u64::MAX)
}

/// Removes temporaries (`.NAME.PID.N.partial`) left in `dir` by processes that are gone.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter_map(|n| {
            let n = n.strip_prefix('.')?.strip_suffix(".partial")?;
            // NAME.PID.N: NAME is what precedes the last two dot-separated parts.
            let mut parts = n.rsplitn(3, '.');
            let (_, _, name) = (parts.next()?, parts.next()?, parts.next()?);
            Some(name.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    for n in names {
        cleanup::remove_stale_noisy(dir, &n);
    }
}

/// A checkpoint's size: the bytes DIR needs (the new checkpoint beside the previous one: every
/// rank's file lands in DIR, and the previous checkpoint stays until the new manifest is in
/// place) and a description of one checkpoint.
pub fn size(layout: &Layout) -> (u64, String) {
    let file = |c: &Range<usize>| {
        checkpoint::file_bound(c.len(), layout.latent, layout.channels, layout.sampler)
    };
    let per_checkpoint: u64 = layout.clips.iter().map(file).sum();
    let largest = layout.clips.iter().map(file).max().unwrap_or(0);
    let what = format!(
        "at most {} per checkpoint ({} rank file{}, the largest {}: latents{} f32)",
        fmt_bytes(per_checkpoint),
        layout.clips.len(),
        if layout.clips.len() == 1 { "" } else { "s" },
        fmt_bytes(largest),
        if checkpoint::has_state(layout.sampler) {
            " + the sampler's previous x0,"
        } else {
            ","
        },
    );
    (2 * per_checkpoint, what)
}

/// `--plan-only` with checkpoints: states their size (no folder is created or checked).
pub fn state_size(layout: &Layout) {
    let (need, what) = size(layout);
    eprintln!(
        "{:>8}: {what}; needs {} with the previous one (free space not checked: --plan-only)",
        "ckpt",
        fmt_bytes(need)
    );
}

/// Prepares the checkpoint folder (see the module doc); None without `--checkpoint-dir` and
/// `--resume`. `digest`: this run's request digest; `writes`: this process holds rank 0 (it
/// tidies DIR and states the size).
pub fn prepare(
    a: &CheckpointArgs,
    digest: RequestDigest,
    layout: &Layout,
    writes: bool,
) -> Result<Option<Prepared>> {
    let dir = match (a.checkpoint_dir, a.resume) {
        (None, None) => return Ok(None),
        (Some(c), Some(r)) if c != r => bail!(
            "--checkpoint-dir {} and --resume {}: a resumed run keeps checkpointing into the \
             folder it resumes from; give one of them",
            c.display(),
            r.display()
        ),
        (c, r) => r.or(c).expect("one is given").to_path_buf(),
    };
    let mut resume = BTreeMap::new();
    let mut completed = 0;
    if a.resume.is_some() {
        ensure!(
            dir.is_dir(),
            "--resume {}: no such folder: nothing to resume",
            dir.display()
        );
        let Some(m) = Manifest::read(&dir)? else {
            bail!(
                "--resume {}: no checkpoint there ({} does not exist): nothing to resume (a run \
                 stopped before its first checkpoint starts again without --resume)",
                dir.display(),
                dir.join(MANIFEST).display()
            );
        };
        m.check(&dir, &digest)?;
        for r in layout.local.clone() {
            resume.insert(r, m.load_rank(&dir, r, &layout.clips[r])?);
        }
        completed = m.completed;
    } else {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("--checkpoint-dir {}: cannot create it", dir.display()))?;
        if let Some(m) = Manifest::read(&dir)? {
            bail!(
                "--checkpoint-dir {} already holds a checkpoint ({} of {} steps): continue it \
                 with --resume {}, or remove it",
                dir.display(),
                m.completed,
                m.steps,
                dir.display()
            );
        }
    }
    let (need, what) = size(layout);
    let free = match a.assume_free_disk {
        Some(b) => b,
        None => free_bytes(&dir)?,
    };
    ensure!(
        free >= need,
        "--checkpoint-dir {}: a checkpoint takes {what}, and the previous one is kept until the \
         next is complete: it needs {} free, the file system has {} (checked before loading any \
         weights; nothing was written)",
        dir.display(),
        fmt_bytes(need),
        fmt_bytes(free)
    );
    if writes {
        remove_stale_temporaries(&dir);
        eprintln!(
            "{:>8}: {} after every {} step{} and the last: {what}; needs {} with the \
             previous one, {} free",
            "ckpt",
            dir.display(),
            a.every,
            if a.every == 1 { "" } else { "s" },
            fmt_bytes(need),
            fmt_bytes(free)
        );
        if a.resume.is_some() {
            eprintln!(
                "  resume: {completed} of {} steps done; {}; the outputs are written anew from \
                 the saved latents",
                layout.steps,
                if completed == layout.steps {
                    "decoding only".to_string()
                } else {
                    format!("denoising continues at step {}", completed + 1)
                }
            );
        }
    }
    let pause_after = match std::env::var(PAUSE_ENV) {
        Ok(v) => Some(
            v.parse()
                .with_context(|| format!("{PAUSE_ENV}={v}: not a step number"))?,
        ),
        Err(_) => None,
    };
    Ok(Some(Prepared {
        dir,
        every: a.every,
        digest,
        resume,
        completed,
        pause_after,
    }))
}

/// Writes a checkpoint file: a registered temporary beside `path`, synced, renamed onto it.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let io = |e: anyhow::Error| std::io::Error::other(format!("{e:#}"));
    let mut f = AtomicFile::create(path, true).map_err(io)?;
    f.file().write_all(bytes)?;
    f.commit().map_err(io)
}

impl Prepared {
    /// The library's settings (writing through [`write_file`]).
    pub fn checkpointing(&self) -> Checkpointing<'static> {
        Checkpointing {
            dir: self.dir.clone(),
            every: self.every,
            digest: self.digest.clone(),
            resume: self.resume.clone(),
            write: &write_file,
            pause_after: self.pause_after.map(|k| (k, TEST_PAUSE)),
        }
    }
}
