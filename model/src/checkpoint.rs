//! Checkpoints of a generation, so an interrupted job resumes to the same video.
//!
//! A checkpoint folder `DIR` holds, after a checkpoint of `S` completed steps:
//! * per rank `rank-R-step-S.ckpt`: the rank's clip latents after step S - 1 and its sampler
//!   state (the previous x0 prediction of the DPM samplers; DDIM has none), f32 ([`RankFile`]);
//! * `manifest.json`: the request digest ([`RequestDigest`]: model files, sizes, seed, sampler,
//!   prompts, world size, ...), S, and every rank file's name, size and SHA-256 ([`Manifest`]).
//!
//! Writing (after every `every` steps, and always after the last one, so a resume after the
//! last step only decodes): every rank writes its file to a temporary name in DIR and renames it
//! into place; a `gather_to_root` of the files' sizes and checksums tells rank 0 that every
//! rank's file is complete; rank 0 then writes the manifest (temporary + rename: the rename is
//! the commit) and only then removes the rank files of earlier steps. An interruption at any
//! point leaves the previous manifest and the files it names intact. DIR must be one folder
//! that every process of the job sees (a shared file system across nodes).
//!
//! Resuming: the manifest's digest must equal this run's field by field (a difference is an
//! error naming each field; `schedule` (and `sequential_cfg`, its name in checkpoints written
//! before the whole schedule was a field) is not compared: the schedule may change with the free
//! memory and the video does not); each rank's file must have the manifest's size and
//! checksum (an error names the file: never a silent restart from scratch). The loop continues at
//! step S from the saved latents and state; the SDE noise of step k is keyed by (seed, k + 1,
//! frame), so the remaining steps draw what an uninterrupted run draws. Frames are decoded only
//! after the last step, so no decoded frame is lost: the outputs are written anew from the
//! resumed latents.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vi_runtime::comm::Communicator;
use vi_runtime::{Device, Tensor};
use vi_weights::input_file::{read_bounded, Limit};

use crate::params::{ModelError, Result};
use crate::rank_loop::Resume;
use crate::request_digest::RequestDigest;
use crate::sampler::{SamplerKind, SamplerState};

/// The first bytes of a rank file.
pub const MAGIC: &[u8; 8] = b"VI-CKPT\n";
/// Version of the rank file and manifest formats.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name in DIR.
pub const MANIFEST: &str = "manifest.json";
/// Largest rank-file header (JSON) accepted, bytes.
const MAX_HEADER: u64 = 1 << 20;
/// Bytes of a rank file besides its header and payload: magic, version (u32), header length
/// (u64), SHA-256 trailer.
const FIXED_BYTES: u64 = 8 + 4 + 8 + 32;
/// A bound on a rank file's header (its JSON stays far below: a few hundred bytes).
pub const HEADER_BOUND: u64 = 4096;
/// Digest fields a resume does not compare (module doc).
const NOT_COMPARED: &[&str] = &["schedule", "sequential_cfg"];

fn msg(s: impl Into<String>) -> ModelError {
    ModelError::Msg(s.into())
}

/// The name of rank `rank`'s file after `completed` steps.
pub fn rank_file_name(rank: usize, completed: usize) -> String {
    format!("rank-{rank}-step-{completed}.ckpt")
}

/// `(rank, completed)` of a rank file name.
fn parse_rank_file_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("rank-")?.strip_suffix(".ckpt")?;
    let (r, s) = rest.split_once("-step-")?;
    Some((r.parse().ok()?, s.parse().ok()?))
}

/// Whether the sampler keeps a state between steps (the DPM samplers' previous x0).
pub fn has_state(kind: SamplerKind) -> bool {
    kind != SamplerKind::Ddim
}

/// Payload bytes of one rank's checkpoint: its latents [1, frames, h, w, c] and, for the DPM
/// samplers, the previous x0 prediction of the same shape, f32. A rank file is this plus a
/// header below [`HEADER_BOUND`] and 52 fixed bytes.
pub fn payload_bytes(
    frames: usize,
    latent: (usize, usize),
    channels: usize,
    kind: SamplerKind,
) -> u64 {
    let one = (frames * latent.0 * latent.1 * channels * 4) as u64;
    if has_state(kind) {
        2 * one
    } else {
        one
    }
}

/// A bound on one rank file's size (payload + header bound + fixed bytes).
pub fn file_bound(
    frames: usize,
    latent: (usize, usize),
    channels: usize,
    kind: SamplerKind,
) -> u64 {
    payload_bytes(frames, latent, channels, kind) + HEADER_BOUND + FIXED_BYTES
}

/// One tensor of a rank file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct TensorEntry {
    name: String,
    shape: Vec<usize>,
    dtype: String,
}

/// A rank file's header (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RankHeader {
    rank: usize,
    world: usize,
    /// The rank's frames of the whole video, [start, end).
    clip: [usize; 2],
    completed: usize,
    steps: usize,
    sampler: String,
    /// In payload order: `latents`, then `prev_x0` when the sampler keeps it.
    tensors: Vec<TensorEntry>,
}

/// One rank's saved loop state.
#[derive(Debug, Clone, PartialEq)]
pub struct RankFile {
    pub rank: usize,
    pub world: usize,
    pub clip: Range<usize>,
    /// Steps done.
    pub completed: usize,
    /// Steps of the whole run.
    pub steps: usize,
    pub sampler: SamplerKind,
    /// [1, n, h, w, c].
    pub shape: Vec<usize>,
    pub latents: Vec<f32>,
    /// The DPM samplers' previous x0 prediction (same shape); None for DDIM (and before a step).
    pub prev_x0: Option<Vec<f32>>,
}

fn push_f32(out: &mut Vec<u8>, v: &[f32]) {
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

impl RankFile {
    /// The file's bytes: magic, version (u32 LE), header length (u64 LE), header JSON, the
    /// tensors' f32 LE values in header order, SHA-256 of everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut tensors = vec![TensorEntry {
            name: "latents".into(),
            shape: self.shape.clone(),
            dtype: "f32".into(),
        }];
        if self.prev_x0.is_some() {
            tensors.push(TensorEntry {
                name: "prev_x0".into(),
                shape: self.shape.clone(),
                dtype: "f32".into(),
            });
        }
        let header = RankHeader {
            rank: self.rank,
            world: self.world,
            clip: [self.clip.start, self.clip.end],
            completed: self.completed,
            steps: self.steps,
            sampler: format!("{:?}", self.sampler),
            tensors,
        };
        let header = serde_json::to_vec(&header).expect("a header serialises");
        let payload = self.latents.len() * 4 * (1 + self.prev_x0.is_some() as usize);
        let mut out = Vec::with_capacity(FIXED_BYTES as usize + header.len() + payload);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        push_f32(&mut out, &self.latents);
        if let Some(p) = &self.prev_x0 {
            push_f32(&mut out, p);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parses a rank file's bytes; errors name `path` and what is wrong.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<RankFile> {
        let err = |m: String| msg(format!("{}: {m}", path.display()));
        let n = bytes.len() as u64;
        if n < FIXED_BYTES || &bytes[..8] != MAGIC {
            return Err(err(format!(
                "not a checkpoint file (no `VI-CKPT` magic; {n} bytes)"
            )));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(err(
                "checksum mismatch: the file is corrupt or truncated (its SHA-256 trailer does \
                 not match its contents)"
                    .into(),
            ));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(err(format!(
                "checkpoint format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let hlen = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        if hlen > MAX_HEADER || 20 + hlen > body.len() as u64 {
            return Err(err(format!("header length {hlen} does not fit the file")));
        }
        let hend = 20 + hlen as usize;
        let h: RankHeader = serde_json::from_slice(&bytes[20..hend])
            .map_err(|e| err(format!("bad header: {e}")))?;
        let sampler: SamplerKind = match h.sampler.as_str() {
            "DpmSolverSde" => SamplerKind::DpmSolverSde,
            "DpmSolver2M" => SamplerKind::DpmSolver2M,
            "Ddim" => SamplerKind::Ddim,
            s => return Err(err(format!("unknown sampler `{s}` in the header"))),
        };
        let payload = &body[hend..];
        let mut at = 0usize;
        let mut latents = None;
        let mut prev_x0 = None;
        let shape = h
            .tensors
            .first()
            .map(|t| t.shape.clone())
            .ok_or_else(|| err("the header lists no tensor".into()))?;
        for t in &h.tensors {
            if t.dtype != "f32" || t.shape != shape {
                return Err(err(format!(
                    "tensor `{}` is {} {:?}, expected f32 {:?}",
                    t.name, t.dtype, t.shape, shape
                )));
            }
            let count = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|c| c.checked_mul(4).is_some_and(|b| at + b <= payload.len()))
                .ok_or_else(|| {
                    err(format!(
                        "tensor `{}` {:?} does not fit the file's {} payload bytes",
                        t.name,
                        t.shape,
                        payload.len()
                    ))
                })?;
            let v: Vec<f32> = payload[at..at + count * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            at += count * 4;
            match t.name.as_str() {
                "latents" if latents.is_none() => latents = Some(v),
                "prev_x0" if prev_x0.is_none() => prev_x0 = Some(v),
                other => return Err(err(format!("unexpected tensor `{other}`"))),
            }
        }
        if at != payload.len() {
            return Err(err(format!(
                "{} payload bytes past the listed tensors",
                payload.len() - at
            )));
        }
        let latents = latents.ok_or_else(|| err("no `latents` tensor".into()))?;
        if shape.len() != 5 || shape[0] != 1 || shape[1] != h.clip[1].saturating_sub(h.clip[0]) {
            return Err(err(format!(
                "latents {shape:?} do not fit the clip {}..{}",
                h.clip[0], h.clip[1]
            )));
        }
        if has_state(sampler) && h.completed > 0 && prev_x0.is_none() {
            return Err(err(format!(
                "the {sampler:?} sampler's state (`prev_x0`) is missing"
            )));
        }
        Ok(RankFile {
            rank: h.rank,
            world: h.world,
            clip: h.clip[0]..h.clip[1],
            completed: h.completed,
            steps: h.steps,
            sampler,
            shape,
            latents,
            prev_x0,
        })
    }

    /// The loop state on `device` ([`crate::rank_loop::RankInputs::resume`]).
    pub fn to_resume(&self, device: Device) -> Result<Resume> {
        let t = |v: &Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v.clone(), &self.shape)?.to_device(device)?)
        };
        Ok(Resume {
            completed: self.completed,
            latents: t(&self.latents)?,
            state: SamplerState::from_prev_x0(self.prev_x0.as_ref().map(t).transpose()?),
        })
    }
}

/// One rank's file as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    pub rank: usize,
    pub name: String,
    pub bytes: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
}

/// `DIR/manifest.json`: which checkpoint is complete, and of what request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    /// Steps done (the rank files hold the latents after step `completed - 1`).
    pub completed: usize,
    pub steps: usize,
    pub world: usize,
    pub digest: RequestDigest,
    /// One per rank, in rank order.
    pub files: Vec<ManifestFile>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Largest manifest read (the real ones are a few KiB).
const MANIFEST_LIMIT: Limit = Limit {
    what: "checkpoint manifest",
    max_bytes: 16 << 20,
};

impl Manifest {
    /// Reads `dir/manifest.json` (None when absent); errors name the file.
    pub fn read(dir: &Path) -> Result<Option<Manifest>> {
        let p = dir.join(MANIFEST);
        if std::fs::symlink_metadata(&p).is_err() {
            return Ok(None);
        }
        let bytes = read_bounded(&p, MANIFEST_LIMIT).map_err(|e| msg(e.to_string()))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            msg(format!(
                "{}: not a checkpoint manifest (corrupt or truncated): {e}",
                p.display()
            ))
        })?;
        if m.format != FORMAT_VERSION {
            return Err(msg(format!(
                "{}: checkpoint format version {}, this build reads version {FORMAT_VERSION}",
                p.display(),
                m.format
            )));
        }
        if m.files.len() != m.world
            || m.files.iter().enumerate().any(|(r, f)| f.rank != r)
            || m.completed > m.steps
        {
            return Err(msg(format!(
                "{}: inconsistent manifest ({} files for {} ranks, {} of {} steps)",
                p.display(),
                m.files.len(),
                m.world,
                m.completed,
                m.steps
            )));
        }
        Ok(Some(m))
    }

    /// Refuses a resume whose request differs from the checkpoint's: the error names every
    /// differing field with both values (module doc: the schedule is not compared).
    pub fn check(&self, dir: &Path, digest: &RequestDigest) -> Result<()> {
        let mut names: Vec<&str> = self.digest.fields.iter().map(|(n, _)| n.as_str()).collect();
        for (n, _) in &digest.fields {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        let show = |v: Option<&str>| v.unwrap_or("no such field").to_string();
        let diffs: Vec<String> = names
            .into_iter()
            .filter(|n| !NOT_COMPARED.contains(n))
            .filter(|n| self.digest.get(n) != digest.get(n))
            .map(|n| {
                format!(
                    "field `{n}`: the checkpoint has {}, this run has {}",
                    show(self.digest.get(n)),
                    show(digest.get(n))
                )
            })
            .collect();
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(msg(format!(
                "--resume {}: the checkpoint is of another request (refused; nothing was \
                 loaded or written): {}",
                dir.display(),
                diffs.join("; ")
            )))
        }
    }

    /// Reads and checks rank `rank`'s file against the manifest: size, checksum, then its header
    /// (rank, world, clip, steps, sampler). Every error names the file.
    pub fn load_rank(&self, dir: &Path, rank: usize, clip: &Range<usize>) -> Result<RankFile> {
        let entry = self.files.get(rank).ok_or_else(|| {
            msg(format!(
                "{}: no file for rank {rank}",
                dir.join(MANIFEST).display()
            ))
        })?;
        let p = dir.join(&entry.name);
        let err = |m: String| msg(format!("{}: {m}", p.display()));
        let limit = Limit {
            what: "checkpoint file",
            max_bytes: entry.bytes,
        };
        let bytes = read_bounded(&p, limit).map_err(|e| msg(e.to_string()))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(err(format!(
                "truncated: {} bytes, the manifest records {}",
                bytes.len(),
                entry.bytes
            )));
        }
        let sum = hex(&Sha256::digest(&bytes));
        if sum != entry.sha256 {
            return Err(err(format!(
                "checksum mismatch: the file is corrupt (SHA-256 {sum}, the manifest records {})",
                entry.sha256
            )));
        }
        let f = RankFile::decode(&p, &bytes)?;
        if f.rank != rank
            || f.world != self.world
            || &f.clip != clip
            || f.completed != self.completed
            || f.steps != self.steps
        {
            return Err(err(format!(
                "holds rank {} of {}, frames {:?}, {} of {} steps; the manifest and this run \
                 expect rank {rank} of {}, frames {clip:?}, {} of {} steps",
                f.rank,
                f.world,
                f.clip,
                f.completed,
                f.steps,
                self.world,
                self.completed,
                self.steps
            )));
        }
        Ok(f)
    }
}

/// Writes `bytes` to `path` so that `path` is either absent/old or complete: a temporary file
/// beside it (`.NAME.PID.N.partial`), synced, renamed into place. The default of
/// [`Checkpointing::write`]; the command line registers its temporaries for its signal handler.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.0.partial", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// How a generation checkpoints (and whether it resumes).
pub struct Checkpointing<'a> {
    pub dir: PathBuf,
    /// A checkpoint after every `every` steps (at least 1) and after the last step.
    pub every: usize,
    /// This run's request digest (the manifest's).
    pub digest: RequestDigest,
    /// Resuming: this process's ranks' files, loaded and checked ([`Manifest::load_rank`]).
    pub resume: BTreeMap<usize, RankFile>,
    /// Writes a file atomically ([`write_atomic`] or the caller's).
    pub write: &'a (dyn Fn(&Path, &[u8]) -> std::io::Result<()> + Sync),
    /// Testing: rank 0 sleeps this long after the checkpoint of this 0-based step is complete
    /// (a test stops the process there).
    pub pause_after: Option<(usize, Duration)>,
}

/// What rank 0 reports of a completed checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    /// Steps done.
    pub completed: usize,
    /// Bytes of every rank's file together.
    pub bytes: u64,
    /// Rank 0's time from the step's end to the manifest in place (its own file, waiting for
    /// the other ranks' files, the manifest, removing the older files).
    pub elapsed: Duration,
}

impl Checkpointing<'_> {
    /// Whether a checkpoint follows 0-based step `step` of `steps`.
    pub fn due(&self, step: usize, steps: usize) -> bool {
        (step + 1).is_multiple_of(self.every.max(1)) || step + 1 == steps
    }

    /// The checkpoint after 0-based step `step` (a collective when [`Checkpointing::due`]: every
    /// rank calls it after the same steps). Rank 0 returns what was saved.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &self,
        comm: &dyn Communicator,
        clip: &Range<usize>,
        step: usize,
        steps: usize,
        sampler: SamplerKind,
        latents: &Tensor,
        state: &SamplerState,
    ) -> Result<Option<Saved>> {
        let t0 = Instant::now();
        let (rank, world) = (comm.rank(), comm.world_size());
        let completed = step + 1;
        let file = RankFile {
            rank,
            world,
            clip: clip.clone(),
            completed,
            steps,
            sampler,
            shape: latents.shape().to_vec(),
            latents: latents.to_vec_f32()?,
            prev_x0: state.prev_x0().map(|t| t.to_vec_f32()).transpose()?,
        };
        let bytes = file.encode();
        drop(file);
        let name = rank_file_name(rank, completed);
        let path = self.dir.join(&name);
        (self.write)(&path, &bytes).map_err(|e| {
            msg(format!(
                "{}: cannot write the checkpoint: {e}",
                path.display()
            ))
        })?;
        // Size (8 bytes LE) and SHA-256 (32 bytes), one byte per f32 (exact).
        let mut id = (bytes.len() as u64).to_le_bytes().to_vec();
        id.extend_from_slice(&Sha256::digest(&bytes));
        drop(bytes);
        let id = Tensor::from_vec(id.iter().map(|&b| b as f32).collect(), &[40])?;
        let Some(all) = comm.gather_to_root(&id)? else {
            return Ok(None);
        };
        let mut files = Vec::with_capacity(world);
        for (r, t) in all.iter().enumerate() {
            let v: Vec<u8> = t.to_vec_f32()?.iter().map(|&x| x as u8).collect();
            if v.len() != 40 {
                return Err(msg(format!(
                    "checkpoint: rank {r} sent {} bytes of file identity, expected 40",
                    v.len()
                )));
            }
            files.push(ManifestFile {
                rank: r,
                name: rank_file_name(r, completed),
                bytes: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
                sha256: hex(&v[8..]),
            });
        }
        let total = files.iter().map(|f| f.bytes).sum();
        let manifest = Manifest {
            format: FORMAT_VERSION,
            completed,
            steps,
            world,
            digest: self.digest.clone(),
            files,
        };
        let mpath = self.dir.join(MANIFEST);
        let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        (self.write)(&mpath, &text).map_err(|e| {
            msg(format!(
                "{}: cannot write the manifest: {e}",
                mpath.display()
            ))
        })?;
        // The new checkpoint is complete: the older rank files go (files of later steps, left by
        // an earlier attempt, are rewritten when reached).
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let n = e.file_name();
                if let Some((_, s)) = n.to_str().and_then(parse_rank_file_name) {
                    if s < completed {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let saved = Saved {
            completed,
            bytes: total,
            elapsed: t0.elapsed(),
        };
        if let Some((k, d)) = self.pause_after {
            if k == step {
                eprintln!("checkpoint: test pause after step {step} ({d:?})");
                std::thread::sleep(d);
            }
        }
        Ok(Some(saved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(prev: bool) -> RankFile {
        RankFile {
            rank: 1,
            world: 2,
            clip: 3..5,
            completed: 2,
            steps: 3,
            sampler: if prev {
                SamplerKind::DpmSolverSde
            } else {
                SamplerKind::Ddim
            },
            shape: vec![1, 2, 1, 1, 2],
            latents: vec![1.0, -2.5, f32::MIN_POSITIVE, 3.0],
            prev_x0: prev.then(|| vec![0.5, 0.25, -0.0, 7.0]),
        }
    }

    /// The schedule is not compared on a resume (also under its old field name), the rest is.
    #[test]
    fn a_resume_may_run_another_schedule_but_not_another_request() {
        let digest = |schedule: (&str, &str), seed: &str| RequestDigest {
            fields: vec![
                ("seed".to_string(), seed.to_string()),
                (schedule.0.to_string(), schedule.1.to_string()),
            ],
        };
        let m = Manifest {
            format: FORMAT_VERSION,
            completed: 1,
            steps: 2,
            world: 0,
            digest: digest(("schedule", "chunk=2,sequential-cfg,turns"), "1"),
            files: Vec::new(),
        };
        let dir = Path::new("ckpt");
        m.check(dir, &digest(("schedule", "unconstrained"), "1"))
            .unwrap();
        // A checkpoint written when the digest named only the CFG rows.
        let old = Manifest {
            digest: digest(("sequential_cfg", "true"), "1"),
            ..m.clone()
        };
        old.check(dir, &digest(("schedule", "unconstrained"), "1"))
            .unwrap();
        let e = m
            .check(dir, &digest(("schedule", "unconstrained"), "2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("field `seed`") && !e.contains("schedule"), "{e}");
    }

    #[test]
    fn rank_file_round_trips_bit_for_bit() {
        let p = Path::new("x.ckpt");
        for prev in [true, false] {
            let f = file(prev);
            let b = f.encode();
            assert_eq!(RankFile::decode(p, &b).unwrap(), f);
        }
    }

    #[test]
    fn a_flipped_or_missing_byte_is_refused_naming_the_file() {
        let p = Path::new("/d/rank-1-step-2.ckpt");
        let b = file(true).encode();
        for i in [0, 9, 15, 30, b.len() - 40, b.len() - 1] {
            let mut c = b.clone();
            c[i] ^= 0x10;
            let e = RankFile::decode(p, &c).unwrap_err().to_string();
            assert!(e.contains("/d/rank-1-step-2.ckpt"), "byte {i}: {e}");
        }
        let e = RankFile::decode(p, &b[..b.len() - 5])
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    /// Timing, not a check (BENCHMARKS.md): one full-size rank file (288 frames of a 40x64x4
    /// latent, with the DPM state: the largest rank of 2,300 frames over 8 ranks) encoded with its
    /// SHA-256, written (synced, renamed) into `VI_CKPT_BENCH_DIR` (default: the temp folder), read
    /// back and verified. `cargo test -p vi-model --release --lib checkpoint -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn time_a_full_size_rank_file() {
        let dir = std::env::var_os("VI_CKPT_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let shape = vec![1, 288, 40, 64, 4];
        let n: usize = shape.iter().product();
        let f = RankFile {
            rank: 0,
            world: 8,
            clip: 0..288,
            completed: 1,
            steps: 30,
            sampler: SamplerKind::DpmSolverSde,
            shape,
            latents: (0..n).map(|i| (i as f32).sin()).collect(),
            prev_x0: Some((0..n).map(|i| (i as f32).cos()).collect()),
        };
        let path = dir.join(format!("vi-ckpt-bench-{}.ckpt", std::process::id()));
        for round in 0..3 {
            let t = Instant::now();
            let bytes = f.encode();
            let t_enc = t.elapsed();
            write_atomic(&path, &bytes).unwrap();
            let t_write = t.elapsed() - t_enc;
            let back = std::fs::read(&path).unwrap();
            let g = RankFile::decode(&path, &back).unwrap();
            let t_read = t.elapsed() - t_enc - t_write;
            assert!(g == f);
            eprintln!(
                "round {round}: {} bytes: encode + SHA-256 {:.3} s, write + fsync + rename {:.3} \
                 s, read + verify {:.3} s",
                bytes.len(),
                t_enc.as_secs_f64(),
                t_write.as_secs_f64(),
                t_read.as_secs_f64()
            );
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn names_parse_and_due_steps() {
        assert_eq!(parse_rank_file_name(&rank_file_name(3, 17)), Some((3, 17)));
        assert_eq!(parse_rank_file_name("rank-3-step-17.ckpt.tmp"), None);
        let c = Checkpointing {
            dir: PathBuf::new(),
            every: 2,
            digest: RequestDigest { fields: vec![] },
            resume: BTreeMap::new(),
            write: &write_atomic,
            pause_after: None,
        };
        let due: Vec<usize> = (0..5).filter(|&k| c.due(k, 5)).collect();
        assert_eq!(due, vec![1, 3, 4], "every 2nd step and the last");
    }
}
