//! Reading a PyTorch zip checkpoint (`torch.save`, format used since torch 1.6) without Python:
//! the archive is memory-mapped, `*/data.pkl` is interpreted by the safe [`pickle`] machine,
//! tensors are read straight from their stored (uncompressed) `*/data/<key>` records.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use vi_weights::WDType;

use super::pickle::{self, TensorRef, Value};

/// A tensor of the checkpoint's state dict.
#[derive(Debug, Clone)]
pub struct CkptTensor {
    pub name: String,
    pub tensor: TensorRef,
}

/// An opened checkpoint: the state dict's tensors in file order, data still in the map.
pub struct Checkpoint {
    path: PathBuf,
    mmap: Mmap,
    /// Record name (without the archive prefix) -> (byte offset of the data, byte length).
    records: HashMap<String, (usize, usize)>,
    pub tensors: Vec<CkptTensor>,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> String {
    format!("{}: {msg}", path.display())
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint, String> {
        // Only a regular file is opened (a FIFO would block, a device never end).
        let (file, _) =
            vi_weights::input_file::open_regular(path, "checkpoint").map_err(|e| e.to_string())?;
        let mut zip = zip::ZipArchive::new(&file)
            .map_err(|e| err(path, format!("not a PyTorch zip checkpoint: {e}")))?;
        // Locate `<prefix>/data.pkl`; every record of interest shares its prefix.
        let mut entries = Vec::with_capacity(zip.len());
        for i in 0..zip.len() {
            let f = zip
                .by_index_raw(i)
                .map_err(|e| err(path, format!("zip entry {i}: {e}")))?;
            entries.push((
                f.name().to_string(),
                f.compression(),
                f.data_start(),
                f.compressed_size(),
                f.size(),
            ));
        }
        let pkl_names: Vec<&String> = entries
            .iter()
            .map(|e| &e.0)
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let prefix = match pkl_names.as_slice() {
            [one] => one.trim_end_matches("data.pkl").to_string(),
            [] => {
                return Err(err(
                    path,
                    "no `<prefix>/data.pkl` record: not a torch.save zip",
                ))
            }
            _ => return Err(err(path, "several `*/data.pkl` records")),
        };
        // SAFETY: read-only map of a file we treat as immutable input; a concurrent truncation
        // by another process could fault (memmap2's documented caveat).
        let mmap =
            unsafe { Mmap::map(&file) }.map_err(|e| err(path, format!("cannot map: {e}")))?;
        let mut records = HashMap::new();
        for (name, method, start, csize, size) in entries {
            let Some(rel) = name.strip_prefix(&prefix) else {
                continue;
            };
            if method != zip::CompressionMethod::Stored || csize != size {
                return Err(err(
                    path,
                    format!("record `{name}` is compressed ({method:?}); torch.save stores records uncompressed"),
                ));
            }
            let (start, size) = (start as usize, size as usize);
            let in_file = match start.checked_add(size) {
                Some(end) => end <= mmap.len(),
                None => false,
            };
            if !in_file {
                return Err(err(
                    path,
                    format!("record `{name}` runs past the end of the file"),
                ));
            }
            records.insert(rel.to_string(), (start, size));
        }
        let mut ck = Checkpoint {
            path: path.to_path_buf(),
            mmap,
            records,
            tensors: Vec::new(),
        };
        if let Some(bo) = ck.record("byteorder") {
            if bo != b"little" {
                return Err(err(path, "big-endian checkpoints are not supported"));
            }
        }
        let pkl = ck
            .record("data.pkl")
            .ok_or_else(|| err(path, "data.pkl missing"))?;
        let top = pickle::load(pkl).map_err(|e| err(path, format!("{prefix}data.pkl: {e}")))?;
        ck.tensors = state_dict(&top).map_err(|e| err(path, e))?;
        Ok(ck)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&self, name: &str) -> Option<&[u8]> {
        let &(s, n) = self.records.get(name)?;
        self.mmap.get(s..s + n)
    }

    /// The tensor's bytes (little endian, row-major); borrowed from the map when contiguous.
    pub fn bytes(&self, t: &CkptTensor) -> Result<Cow<'_, [u8]>, String> {
        let r = &t.tensor;
        let e = r
            .storage
            .ty
            .dtype
            .size_bytes()
            .expect("storage dtypes have a size");
        let key = format!("data/{}", r.storage.key);
        let data = self.record(&key).ok_or_else(|| {
            err(
                &self.path,
                format!("tensor `{}`: storage record `{key}` missing", t.name),
            )
        })?;
        let terr = |msg: String| err(&self.path, format!("tensor `{}`: {msg}", t.name));
        if data.len() < r.storage.numel.saturating_mul(e) {
            return Err(terr(format!(
                "storage `{key}` is {} bytes, {} elements of {} declared",
                data.len(),
                r.storage.numel,
                r.storage.ty.name
            )));
        }
        let numel = r.numel();
        if numel == 0 {
            return Ok(Cow::Borrowed(&[]));
        }
        // Largest element index touched, checked against the storage.
        let mut last = r.offset;
        for (&d, &s) in r.shape.iter().zip(&r.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| terr("stride overflow".into()))?;
        }
        if last >= r.storage.numel {
            return Err(terr(format!(
                "offset {} / shape {:?} / stride {:?} reach element {last} of a {}-element storage",
                r.offset, r.shape, r.stride, r.storage.numel
            )));
        }
        if r.is_contiguous() {
            return Ok(Cow::Borrowed(&data[r.offset * e..(r.offset + numel) * e]));
        }
        // Strided: gather element by element in row-major order.
        let mut out = Vec::with_capacity(numel * e);
        let mut idx = vec![0usize; r.shape.len()];
        for _ in 0..numel {
            let off = r.offset + idx.iter().zip(&r.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&data[off * e..(off + 1) * e]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < r.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(Cow::Owned(out))
    }

    /// The tensor as f32 (F32/F16/BF16 sources).
    pub fn read_f32(&self, t: &CkptTensor) -> Result<Vec<f32>, String> {
        let b = self.bytes(t)?;
        Ok(match t.tensor.storage.ty.dtype {
            WDType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
            WDType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            WDType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => {
                return Err(err(
                    &self.path,
                    format!(
                        "tensor `{}`: {} is not a float storage",
                        t.name, t.tensor.storage.ty.name
                    ),
                ))
            }
        })
    }
}

/// The state dict inside the unpickled top-level object: `{"state_dict": {...}}` (Lightning), or
/// a DeepSpeed `{"module": {...}}` whose keys lose their first 16 characters
/// (`_forward_module.`), as VideoCrafter's `load_model_checkpoint` does.
fn state_dict(top: &Value) -> Result<Vec<CkptTensor>, String> {
    let entries = top
        .dict_entries()
        .ok_or_else(|| format!("top-level object is a {}, not a dict", top.describe()))?;
    let (sd, strip) = if let Some((_, v)) = entries.iter().find(|(k, _)| k == "state_dict") {
        (v, 0)
    } else if let Some((_, v)) = entries.iter().find(|(k, _)| k == "module") {
        (v, 16)
    } else {
        return Err("no `state_dict` (or DeepSpeed `module`) entry at the top level".into());
    };
    let items = sd.dict_entries().ok_or_else(|| {
        format!(
            "`state_dict` is a {}, not a dict with string keys",
            sd.describe()
        )
    })?;
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let name = k
            .get(strip..)
            .ok_or_else(|| format!("key `{k}` shorter than the DeepSpeed prefix"))?
            .to_string();
        match &v {
            Value::Tensor(tensor) => out.push(CkptTensor {
                name,
                tensor: tensor.clone(),
            }),
            other => {
                return Err(format!(
                    "state_dict entry `{k}` is a {}, not a tensor",
                    other.describe()
                ))
            }
        }
    }
    Ok(out)
}
