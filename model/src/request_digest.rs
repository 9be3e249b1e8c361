//! What every rank of a multi-process job must agree on before a generation starts: a digest of
//! the request (model files, video size, sampling settings, prompts, Video-Infinity settings,
//! dtype, rank layout, build version) as an ordered list of named fields, compared field by field
//! across ranks through the rendezvous store ([`check_same_request`]). A difference is an error on
//! every rank that names the field and the ranks, so a generation with mismatched settings never
//! starts.
//!
//! Model files are summarised without reading their data: per `.safetensors` file its name, size
//! and a SHA-256 of its header (tensor names, dtypes, shapes, offsets), plus a SHA-256 of each
//! part's `config.json` and of the tokenizer files. Two checkpoints with identical headers and
//! sizes but different values are not told apart (reading every byte would cost minutes per
//! rank on a full model).

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vi_runtime::comm::Rendezvous;
use vi_runtime::DType;

use crate::models::{part_files_in, ModelPaths, PartKind};
use crate::params::{ModelError, Result};
use crate::pipeline::GenerateRequest;

/// Largest safetensors header hashed (bytes); a larger declared length is an error.
pub const MAX_HEADER_LEN: u64 = 100 << 20;

/// Hex characters of a SHA-256 kept in a field (64 bits: enough to tell the ranks' files apart).
const HASH_HEX: usize = 16;

fn msg(s: impl Into<String>) -> ModelError {
    ModelError::Msg(s.into())
}

/// Where the weights come from.
#[derive(Debug, Clone, Copy)]
pub enum ModelSource<'a> {
    /// Part folders on disk.
    Files(&'a ModelPaths),
    /// A model built into the binary (`tiny`, `random-full`): its name is its identity.
    Embedded(&'a str),
}

/// The request as an ordered list of `(field, value)`; values are short display strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestDigest {
    pub fields: Vec<(String, String)>,
}

fn short_hash(bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    let mut s = String::with_capacity(HASH_HEX);
    for b in &h[..HASH_HEX / 2] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// SHA-256 (shortened) of a whole small file.
fn hash_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).map_err(|e| msg(format!("{}: cannot read: {e}", p.display())))?;
    Ok(format!("{} sha256:{}", file_name(p), short_hash(&bytes)))
}

/// `name size bytes header sha256:…` of one safetensors file; reads only its header.
pub fn safetensors_summary(p: &Path) -> Result<String> {
    let err = |m: String| msg(format!("{}: {m}", p.display()));
    let mut f = std::fs::File::open(p).map_err(|e| err(format!("cannot open: {e}")))?;
    let size = f
        .metadata()
        .map_err(|e| err(format!("cannot stat: {e}")))?
        .len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| err(format!("not a safetensors file (no header length): {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_LEN || n > size - 8 {
        return Err(err(format!(
            "safetensors header length {n} is not below the limit of {MAX_HEADER_LEN} bytes and \
             the file's {size} bytes: not a safetensors file, or a truncated one"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| err(format!("cannot read its header: {e}")))?;
    Ok(format!(
        "{} {size} bytes header sha256:{}",
        file_name(p),
        short_hash(&header)
    ))
}

/// The value of a weight part's field: its config and each weights file, in file-name order.
fn part_summary(dir: &Path, kind: PartKind) -> Result<String> {
    let files = part_files_in(dir, kind)?;
    let mut items = vec![hash_file(&files.config)?];
    for w in &files.weights {
        items.push(safetensors_summary(w)?);
    }
    Ok(items.join("; "))
}

fn tokenizer_summary(dir: &Path) -> Result<String> {
    let items = ["vocab.json", "merges.txt"]
        .iter()
        .map(|n| hash_file(&dir.join(n)))
        .collect::<Result<Vec<_>>>()?;
    Ok(items.join("; "))
}

impl RequestDigest {
    /// The digest of `req` run with the weights of `model` in `dtype`. Reads the model files'
    /// headers (errors name the file).
    pub fn new(req: &GenerateRequest, model: ModelSource<'_>, dtype: DType) -> Result<Self> {
        let mut d = RequestDigest { fields: Vec::new() };
        match model {
            ModelSource::Files(p) => {
                d.push("model.unet", part_summary(&p.unet, PartKind::Unet)?);
                d.push(
                    "model.text_encoder",
                    part_summary(&p.text_encoder, PartKind::TextEncoder)?,
                );
                d.push("model.vae", part_summary(&p.vae, PartKind::Vae)?);
                d.push("model.tokenizer", tokenizer_summary(&p.tokenizer)?);
            }
            ModelSource::Embedded(name) => d.push("model", format!("embedded {name}")),
        }
        d.push("frames", req.frames.to_string());
        d.push("height", req.height.to_string());
        d.push("width", req.width.to_string());
        d.push("steps", req.steps.to_string());
        d.push("seed", req.seed.to_string());
        d.push("sampler", format!("{:?}", req.sampler));
        // Debug of a float is its shortest exact representation: equal strings, equal bits.
        d.push("guidance", format!("{:?}", req.guidance));
        d.push("fps_cond", format!("{:?}", req.fps_cond));
        d.push("prompts", format!("{:?}", req.prompts));
        d.push("negative_prompt", format!("{:?}", req.negative_prompt));
        d.push("vi", format!("{:?}", req.vi));
        d.push("decode", req.decode.to_string());
        // The job's schedule, agreed before the digest (multiprocess: the merge of every
        // process's choice). Sequential CFG rows double the passes, so the exchange sequence;
        // frame chunks and turns change no exchange, but a process whose ranks ignored the
        // agreed bound could outgrow its plan: every rank runs the same schedule.
        d.push("schedule", req.schedule.spec());
        d.push("dtype", format!("{dtype:?}"));
        d.push("world", format!("{} ranks", req.world));
        d.push("version", format!("vi-model {}", env!("CARGO_PKG_VERSION")));
        Ok(d)
    }

    /// Appends a field (callers may add what else their ranks must agree on).
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.fields.push((name.to_string(), value.into()));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a list of string pairs serialises")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        serde_json::from_slice(b).map_err(|e| msg(format!("not a request digest: {e}")))
    }
}

/// The store key of rank `r`'s digest.
pub fn digest_key(rank: usize) -> String {
    format!("digest/{rank}")
}

/// Each rank publishes `digest` as `digest/{rank}` and reads every other rank's (each wait
/// bounded by `timeout`). Any difference is an error, the same on every rank, that names each
/// differing field and the ranks whose value differs from rank 0's:
/// "request differs between ranks: field `frames`: rank 0 has 64, rank 2 has 80".
pub fn check_same_request(
    store: &dyn Rendezvous,
    rank: usize,
    world: usize,
    digest: &RequestDigest,
    timeout: Duration,
) -> Result<()> {
    if rank >= world {
        return Err(msg(format!(
            "rank {rank} is not below the world size {world}"
        )));
    }
    store.set(&digest_key(rank), &digest.to_bytes())?;
    let mut all = Vec::with_capacity(world);
    for r in 0..world {
        if r == rank {
            all.push(digest.clone());
            continue;
        }
        let bytes = store.get(&digest_key(r), timeout).map_err(|e| {
            msg(format!(
                "rank {r} did not publish its request within {timeout:?}: {e}"
            ))
        })?;
        all.push(RequestDigest::from_bytes(&bytes).map_err(|e| msg(format!("rank {r}: {e}")))?);
    }
    match compare(&all) {
        None => Ok(()),
        Some(diff) => Err(msg(format!("request differs between ranks: {diff}"))),
    }
}

/// Every field where some rank differs from rank 0 (fields in rank 0's order, then fields only
/// other ranks have), or None when all agree. Depends only on `all`: every rank builds the same
/// message.
fn compare(all: &[RequestDigest]) -> Option<String> {
    let reference = &all[0];
    let mut names: Vec<&str> = reference.fields.iter().map(|(n, _)| n.as_str()).collect();
    for d in &all[1..] {
        for (n, _) in &d.fields {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
    }
    let show = |v: Option<&str>| match v {
        Some(v) => v.to_string(),
        None => "no such field".to_string(),
    };
    let mut diffs = Vec::new();
    for name in names {
        let base = reference.get(name);
        let others: Vec<String> = all
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, d)| d.get(name) != base)
            .map(|(r, d)| format!("rank {r} has {}", show(d.get(name))))
            .collect();
        if !others.is_empty() {
            diffs.push(format!(
                "field `{name}`: rank 0 has {}, {}",
                show(base),
                others.join(", ")
            ));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip_parallel::ViConfig;
    use crate::sampler::SamplerKind;
    use vi_runtime::comm::MemoryStore;

    fn request() -> GenerateRequest {
        GenerateRequest {
            prompts: vec![(0, "a cat".into()), (32, "a dog".into())],
            negative_prompt: String::new(),
            frames: 64,
            height: 64,
            width: 64,
            steps: 10,
            sampler: SamplerKind::DpmSolverSde,
            guidance: 7.5,
            fps_cond: 8.0,
            seed: 42,
            vi: ViConfig::default(),
            world: 4,
            rank_timeout: Duration::from_secs(30),
            comm: Default::default(),
            vae_chunk: 4,
            decode: true,
            schedule: crate::schedule::Schedule::UNCONSTRAINED,
            offload_dir: None,
        }
    }

    /// Runs `check_same_request` on one thread per rank over one store; results in rank order.
    fn run(digests: Vec<RequestDigest>) -> Vec<Result<()>> {
        let store = MemoryStore::new();
        let world = digests.len();
        std::thread::scope(|s| {
            let hs: Vec<_> = digests
                .iter()
                .enumerate()
                .map(|(r, d)| {
                    let store = &store;
                    s.spawn(move || check_same_request(store, r, world, d, Duration::from_secs(5)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn digest(req: &GenerateRequest) -> RequestDigest {
        RequestDigest::new(req, ModelSource::Embedded("tiny"), DType::F32).unwrap()
    }

    #[test]
    fn same_requests_pass() {
        let d = digest(&request());
        assert!(run(vec![d.clone(); 4]).iter().all(|r| r.is_ok()));
        assert_eq!(RequestDigest::from_bytes(&d.to_bytes()).unwrap(), d);
    }

    /// Every rank fails with the same message naming the field and the ranks.
    fn all_fail_naming(digests: Vec<RequestDigest>, want: &str) {
        let res = run(digests);
        let msgs: Vec<String> = res
            .into_iter()
            .map(|r| r.unwrap_err().to_string())
            .collect();
        for m in &msgs {
            assert!(m.contains(want), "{m:?} lacks {want:?}");
            assert_eq!(m, &msgs[0], "every rank reports the same difference");
        }
    }

    #[test]
    fn a_different_frames_or_seed_is_named() {
        let base = request();
        let mut other = base.clone();
        other.frames = 80;
        let d = digest(&base);
        all_fail_naming(
            vec![d.clone(), d.clone(), digest(&other), d.clone()],
            "request differs between ranks: field `frames`: rank 0 has 64, rank 2 has 80",
        );
        // Rank 0 itself may be the odd one out.
        all_fail_naming(
            vec![digest(&other), d.clone(), d.clone()],
            "field `frames`: rank 0 has 80, rank 1 has 64, rank 2 has 64",
        );
        let mut seed = base.clone();
        seed.seed = 43;
        let msgs = run(vec![d.clone(), digest(&seed)]);
        let m = msgs[1].as_ref().unwrap_err().to_string();
        assert!(
            m.contains("field `seed`: rank 0 has 42, rank 1 has 43"),
            "{m}"
        );
        assert!(
            !m.contains("`frames`"),
            "only differing fields are named: {m}"
        );
    }

    #[test]
    fn fields_are_compared_one_by_one() {
        let base = request();
        let mut other = base.clone();
        other.guidance = 7.0;
        other.vi.top_k = 8;
        let m = run(vec![digest(&base), digest(&other)])[0]
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("field `guidance`: rank 0 has 7.5, rank 1 has 7.0"),
            "{m}"
        );
        assert!(m.contains("field `vi`"), "{m}");
        assert!(!m.contains("`seed`") && !m.contains("`prompts`"), "{m}");
        // Other dtype or model.
        let f16 = RequestDigest::new(&base, ModelSource::Embedded("tiny"), DType::F16).unwrap();
        let m = run(vec![digest(&base), f16])[0]
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("field `dtype`: rank 0 has F32, rank 1 has F16"),
            "{m}"
        );
        // A field only one rank has (another build) is named too.
        let mut extra = digest(&base);
        extra.push("new", "x");
        let m = run(vec![digest(&base), extra])[0]
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("field `new`: rank 0 has no such field, rank 1 has x"),
            "{m}"
        );
    }

    #[test]
    fn a_rank_that_never_publishes_times_out_naming_it() {
        let store = MemoryStore::new();
        let d = digest(&request());
        let e = check_same_request(&store, 0, 2, &d, Duration::from_millis(30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1") && e.contains("digest/1"), "{e}");
    }

    /// A model folder with `unet/` holding `config.json` and one safetensors file of `body`
    /// header bytes, plus the other parts.
    fn model_dir(dir: &Path, unet_header: &str) -> ModelPaths {
        for part in ["unet", "text_encoder", "vae", "tokenizer"] {
            std::fs::create_dir_all(dir.join(part)).unwrap();
        }
        for part in ["unet", "text_encoder", "vae"] {
            std::fs::write(dir.join(part).join("config.json"), "{}").unwrap();
            let header = if part == "unet" { unet_header } else { "{}" };
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&[0u8; 16]);
            std::fs::write(dir.join(part).join("model.safetensors"), bytes).unwrap();
        }
        std::fs::write(dir.join("tokenizer/vocab.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer/merges.txt"), "").unwrap();
        ModelPaths::in_dir(dir).unwrap()
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vi-digest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_different_weights_file_is_named() {
        let (a, b) = (tmp("a"), tmp("b"));
        // Headers of equal length (equal file sizes): only the header hash tells them apart.
        let pa = model_dir(
            &a,
            r#"{"w":{"dtype":"F32","shape":[4,1],"data_offsets":[0,16]}}"#,
        );
        let pb = model_dir(
            &b,
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
        );
        let req = request();
        let da = RequestDigest::new(&req, ModelSource::Files(&pa), DType::F32).unwrap();
        let db = RequestDigest::new(&req, ModelSource::Files(&pb), DType::F32).unwrap();
        // The same files in another folder (another node's path) agree.
        let pa2 = model_dir(
            &tmp("a2"),
            r#"{"w":{"dtype":"F32","shape":[4,1],"data_offsets":[0,16]}}"#,
        );
        let da2 = RequestDigest::new(&req, ModelSource::Files(&pa2), DType::F32).unwrap();
        assert!(run(vec![da.clone(), da2]).iter().all(|r| r.is_ok()));
        let m = run(vec![da.clone(), db])[1]
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(m.contains("field `model.unet`"), "{m}");
        assert!(m.contains("model.safetensors"), "{m}");
        assert!(!m.contains("`model.vae`"), "{m}");
        // An absurd header length is refused, naming the file.
        let bad = pa.vae.join("model.safetensors");
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&bad, bytes).unwrap();
        let e = RequestDigest::new(&req, ModelSource::Files(&pa), DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("header length"),
            "{e}"
        );
        for d in [a, b, tmp("a2")] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
