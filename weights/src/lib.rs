//! vi-weights: safetensors files memory-mapped, validated, viewed without copies.
//!
//! A [`WeightStore`] is one or several `.safetensors` files seen as one name space. Every header is
//! validated before any tensor is looked at, so a hostile or broken file is rejected with an error
//! naming the file (and the tensor, where there is one) instead of panicking or reading out of
//! bounds:
//! - the file must hold the 8-byte header length, and the header must fit in the file and be at
//!   most [`MAX_HEADER_SIZE`] bytes;
//! - the header must be UTF-8 JSON, an object of tensor entries (plus an optional
//!   `__metadata__` object of strings);
//! - every dtype must be a known safetensors dtype, shapes and offsets non-negative integers,
//!   `end >= begin`, the byte length equal to `numel * dtype size` (overflow-checked), the range
//!   inside the data section;
//! - ranges must not overlap and must tile the data section exactly (the format's rule).
//!
//! The same file is then also checked by the `safetensors` crate's own parser (second opinion).
//! Data stays in the memory map: [`WeightStore::view`] gives the raw bytes, [`WeightStore::view_f32`]
//! a zero-copy `&[f32]` when the tensor is F32 and aligned (converted from F16/BF16/F64 otherwise).
//! [`write_safetensors`] writes a file atomically (temporary file, then rename).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

pub mod input_file;

/// Largest header accepted, in bytes (the `safetensors` crate's limit).
pub const MAX_HEADER_SIZE: usize = 100_000_000;

/// Element types of the safetensors format. `Other` stands for the exotic ones (fp8, fp4, fp6,
/// complex) that can be opened and viewed as bytes but not converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
    I8,
    I16,
    U16,
    U32,
    U64,
    Bool,
    Other,
}

impl WDType {
    fn from_st(d: Dtype) -> Self {
        match d {
            Dtype::F32 => WDType::F32,
            Dtype::F16 => WDType::F16,
            Dtype::BF16 => WDType::BF16,
            Dtype::F64 => WDType::F64,
            Dtype::I64 => WDType::I64,
            Dtype::I32 => WDType::I32,
            Dtype::U8 => WDType::U8,
            Dtype::I8 => WDType::I8,
            Dtype::I16 => WDType::I16,
            Dtype::U16 => WDType::U16,
            Dtype::U32 => WDType::U32,
            Dtype::U64 => WDType::U64,
            Dtype::BOOL => WDType::Bool,
            _ => WDType::Other,
        }
    }

    fn to_st(self) -> Option<Dtype> {
        Some(match self {
            WDType::F32 => Dtype::F32,
            WDType::F16 => Dtype::F16,
            WDType::BF16 => Dtype::BF16,
            WDType::F64 => Dtype::F64,
            WDType::I64 => Dtype::I64,
            WDType::I32 => Dtype::I32,
            WDType::U8 => Dtype::U8,
            WDType::I8 => Dtype::I8,
            WDType::I16 => Dtype::I16,
            WDType::U16 => Dtype::U16,
            WDType::U32 => Dtype::U32,
            WDType::U64 => Dtype::U64,
            WDType::Bool => Dtype::BOOL,
            WDType::Other => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WDType::F32 => "F32",
            WDType::F16 => "F16",
            WDType::BF16 => "BF16",
            WDType::F64 => "F64",
            WDType::I64 => "I64",
            WDType::I32 => "I32",
            WDType::U8 => "U8",
            WDType::I8 => "I8",
            WDType::I16 => "I16",
            WDType::U16 => "U16",
            WDType::U32 => "U32",
            WDType::U64 => "U64",
            WDType::Bool => "BOOL",
            WDType::Other => "other",
        }
    }

    /// Bytes per element (`None` for `Other`, whose size depends on the exact format).
    pub fn size_bytes(self) -> Option<usize> {
        Some(match self {
            WDType::F64 | WDType::I64 | WDType::U64 => 8,
            WDType::F32 | WDType::I32 | WDType::U32 => 4,
            WDType::F16 | WDType::BF16 | WDType::I16 | WDType::U16 => 2,
            WDType::U8 | WDType::I8 | WDType::Bool => 1,
            WDType::Other => return None,
        })
    }
}

/// A safetensors dtype string: our enum and its size in bits.
fn parse_dtype(s: &str) -> Option<(WDType, usize)> {
    let d = match s {
        "BOOL" => Dtype::BOOL,
        "F4" => Dtype::F4,
        "F6_E2M3" => Dtype::F6_E2M3,
        "F6_E3M2" => Dtype::F6_E3M2,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "F8_E5M2" => Dtype::F8_E5M2,
        "F8_E4M3" => Dtype::F8_E4M3,
        "F8_E8M0" => Dtype::F8_E8M0,
        "F8_E4M3FNUZ" => Dtype::F8_E4M3FNUZ,
        "F8_E5M2FNUZ" => Dtype::F8_E5M2FNUZ,
        "I16" => Dtype::I16,
        "U16" => Dtype::U16,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I32" => Dtype::I32,
        "U32" => Dtype::U32,
        "F32" => Dtype::F32,
        "C64" => Dtype::C64,
        "F64" => Dtype::F64,
        "I64" => Dtype::I64,
        "U64" => Dtype::U64,
        _ => return None,
    };
    Some((WDType::from_st(d), d.bitsize()))
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("tensor `{0}` not found in {1}")]
    Missing(String, String),
}

pub type Result<T> = std::result::Result<T, WeightsError>;

/// Name, dtype and shape of one tensor of a store.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: WDType,
    /// The dtype as written in the file (e.g. `F8_E4M3` where `dtype` is `Other`).
    pub dtype_name: String,
    pub shape: Vec<usize>,
    /// Byte range within the file's data section.
    pub data_offsets: (usize, usize),
    /// Index of the file in the store.
    pub file: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A zero-copy view of one tensor's bytes (little endian, row-major).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: WDType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Rust element types that a tensor can be viewed as without conversion.
pub trait Element: bytemuck::Pod {
    const DTYPE: WDType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: WDType = WDType::$d; })* };
}
element!(f32 => F32, f16 => F16, bf16 => BF16, f64 => F64, i64 => I64, i32 => I32, u8 => U8,
    i8 => I8, i16 => I16, u16 => U16, u32 => U32, u64 => U64);

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: HashMap<String, String>,
}

/// One or more safetensors files as one name space.
pub struct WeightStore {
    files: Vec<MappedFile>,
    index: BTreeMap<String, TensorInfo>,
}

/// One validated header entry: name, dtype, dtype as written, shape, data offsets.
type Entry = (String, WDType, String, Vec<usize>, (usize, usize));

/// A validated header: data section start, tensor entries, metadata.
struct Header {
    data_start: usize,
    tensors: Vec<Entry>,
    metadata: HashMap<String, String>,
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

/// Validate the header of `buf` (the whole file) without trusting any number in it.
fn parse_header(path: &Path, buf: &[u8]) -> Result<Header> {
    let ferr = |msg: String| WeightsError::File {
        path: path.to_path_buf(),
        msg,
    };
    let terr = |name: &str, msg: String| WeightsError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        msg,
    };
    let len = buf.len();
    if len == 0 {
        return Err(ferr("not a safetensors file: the file is empty".into()));
    }
    let Some(prefix) = buf.get(..8) else {
        return Err(ferr(format!(
            "not a safetensors file: {len} bytes, shorter than the 8-byte header length"
        )));
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n > MAX_HEADER_SIZE as u64 {
        return Err(ferr(format!(
            "header length {n} bytes exceeds the limit of {MAX_HEADER_SIZE} bytes (file is {len} bytes)"
        )));
    }
    let n = n as usize; // <= MAX_HEADER_SIZE, fits
    if n > len - 8 {
        return Err(ferr(format!(
            "header length {n} bytes runs past the end of the file ({len} bytes): truncated?"
        )));
    }
    let data_start = 8 + n;
    let data_len = len - data_start;
    let text = std::str::from_utf8(&buf[8..data_start])
        .map_err(|e| ferr(format!("header is not UTF-8: {e}")))?;
    let json: Value =
        serde_json::from_str(text).map_err(|e| ferr(format!("header is not valid JSON: {e}")))?;
    // A JSON object keeps the last of repeated keys: a repeated tensor name would silently hide
    // the first entry. Found on a second pass (the first proved the text valid JSON).
    if let Some(dup) = first_duplicate_key(text) {
        return Err(ferr(format!(
            "header is invalid: key `{dup}` appears more than once (a duplicate)"
        )));
    }
    let Value::Object(obj) = json else {
        return Err(ferr("header is not a JSON object".into()));
    };
    let mut metadata = HashMap::new();
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, entry) in &obj {
        if name == "__metadata__" {
            let Value::Object(m) = entry else {
                return Err(ferr("`__metadata__` is not an object".into()));
            };
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(ferr(format!(
                        "`__metadata__` value of `{k}` is not a string"
                    )));
                };
                metadata.insert(k.clone(), s.clone());
            }
            continue;
        }
        let Value::Object(e) = entry else {
            return Err(terr(name, "header entry is not an object".into()));
        };
        let dtype_s = e
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| terr(name, "missing or non-string `dtype`".into()))?;
        let (dtype, bits) =
            parse_dtype(dtype_s).ok_or_else(|| terr(name, format!("unknown dtype `{dtype_s}`")))?;
        let shape: Vec<usize> = e
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                terr(
                    name,
                    "`shape` is not an array of non-negative integers".into(),
                )
            })?;
        let offs = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| {
                terr(
                    name,
                    "`data_offsets` is not a pair of non-negative integers".into(),
                )
            })?;
        let (b, end) = (offs[0], offs[1]);
        if end < b {
            return Err(terr(
                name,
                format!("data_offsets [{b}, {end}]: end before begin"),
            ));
        }
        if end > data_len {
            return Err(terr(
                name,
                format!(
                    "data_offsets [{b}, {end}] out of range: the data section is {data_len} bytes \
                     (truncated file?)"
                ),
            ));
        }
        let nbits = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|ne| ne.checked_mul(bits))
            .ok_or_else(|| terr(name, format!("shape {shape:?} overflows")))?;
        if nbits % 8 != 0 {
            return Err(terr(
                name,
                format!("shape {shape:?} of {dtype_s} is not a whole number of bytes"),
            ));
        }
        if end - b != nbits / 8 {
            return Err(terr(
                name,
                format!(
                    "data is {} bytes but dtype {dtype_s} with shape {shape:?} needs {} bytes",
                    end - b,
                    nbits / 8
                ),
            ));
        }
        tensors.push((name.clone(), dtype, dtype_s.to_string(), shape, (b, end)));
    }
    // Ranges must tile [0, data_len) without overlap or gap.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].4);
    let mut pos = 0usize;
    let mut prev: Option<&str> = None;
    for &i in &order {
        let (name, _, _, _, (b, end)) = &tensors[i];
        if *b < pos {
            return Err(terr(
                name,
                format!(
                    "data_offsets [{b}, {end}] overlap tensor `{}` (which ends at {pos})",
                    prev.unwrap_or("?")
                ),
            ));
        }
        if *b > pos {
            return Err(terr(
                name,
                format!("data_offsets [{b}, {end}] leave a gap: previous data ends at {pos}"),
            ));
        }
        pos = *end;
        prev = Some(name);
    }
    if pos != data_len {
        return Err(ferr(format!(
            "data section is {data_len} bytes but the tensors cover {pos} bytes"
        )));
    }
    Ok(Header {
        data_start,
        tensors,
        metadata,
    })
}

impl WeightStore {
    /// Open and validate one file.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightStore> {
        Self::open_many(&[path.as_ref().to_path_buf()])
    }

    /// Open every `*.safetensors` file of a directory (sorted by name) as one store.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<WeightStore> {
        let dir = dir.as_ref();
        let rd = std::fs::read_dir(dir).map_err(|e| WeightsError::File {
            path: dir.to_path_buf(),
            msg: format!("cannot list directory: {e}"),
        })?;
        let mut paths: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(WeightsError::File {
                path: dir.to_path_buf(),
                msg: "no .safetensors file in this directory".into(),
            });
        }
        Self::open_many(&paths)
    }

    /// Open several files; a tensor name present in two files is an error naming both.
    pub fn open_many(paths: &[PathBuf]) -> Result<WeightStore> {
        let mut files: Vec<MappedFile> = Vec::new();
        let mut index = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let ferr = |msg: String| WeightsError::File {
                path: path.clone(),
                msg,
            };
            // Only a regular file is opened (a FIFO would block, a device never end).
            let (file, flen) = input_file::open_regular(path, "safetensors file").map_err(|e| {
                WeightsError::File {
                    path: e.path,
                    msg: e.msg,
                }
            })?;
            // Files too short for the length prefix are not mapped (an empty map is not portable).
            if flen < 8 {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(&file, 8), &mut bytes)
                    .map_err(|e| ferr(format!("cannot read: {e}")))?;
                return Err(match parse_header(path, &bytes) {
                    Err(e) => e,
                    Ok(_) => ferr("file too short".into()),
                });
            }
            // SAFETY: the file is mapped read-only; we never create a mutable view. If another
            // process truncates it while mapped, reads may fault (documented memmap2 caveat);
            // the weights are treated as immutable inputs.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ferr(format!("cannot map: {e}")))?;
            let h = parse_header(path, &mmap)?;
            // Second opinion from the reference parser; should never disagree with ours.
            SafeTensors::read_metadata(&mmap)
                .map_err(|e| ferr(format!("not a valid safetensors file: {e}")))?;
            for (name, dtype, dtype_name, shape, data_offsets) in h.tensors {
                if let Some(old) = index.get(&name) {
                    let old: &TensorInfo = old;
                    return Err(WeightsError::Tensor {
                        path: path.clone(),
                        name,
                        msg: format!(
                            "defined in more than one file of the store (also in {})",
                            files[old.file].path.display()
                        ),
                    });
                }
                let ti = TensorInfo {
                    dtype,
                    dtype_name,
                    shape,
                    data_offsets,
                    file: fi,
                };
                index.insert(name, ti);
            }
            files.push(MappedFile {
                path: path.clone(),
                metadata: h.metadata,
                mmap,
                data_start: h.data_start,
            });
        }
        Ok(WeightStore { files, index })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name)
    }

    /// Number of files in the store.
    pub fn num_files(&self) -> usize {
        self.files.len()
    }

    /// `__metadata__` of file `i` (empty when absent). Panics if `file >= num_files()`.
    pub fn metadata(&self, file: usize) -> &HashMap<String, String> {
        &self.files[file].metadata
    }

    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// The file a tensor lives in.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index
            .get(name)
            .map(|i| self.files[i.file].path.as_path())
    }

    fn describe(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Zero-copy view of a tensor's bytes.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self
            .index
            .get(name)
            .ok_or_else(|| WeightsError::Missing(name.to_string(), self.describe()))?;
        let f = &self.files[info.file];
        let (a, b) = info.data_offsets;
        // Offsets were validated against the data length at open; `get` keeps this panic-free.
        let data = f
            .mmap
            .get(f.data_start + a..f.data_start + b)
            .ok_or_else(|| {
                self.tensor_err(name, format!("data_offsets [{a}, {b}] out of range"))
            })?;
        Ok(TensorView {
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }

    /// View with checks: the tensor must have exactly `dtype` and `shape`.
    pub fn get(&self, name: &str, dtype: WDType, shape: &[usize]) -> Result<TensorView<'_>> {
        let v = self.view(name)?;
        if v.dtype != dtype {
            return Err(self.tensor_err(
                name,
                format!("dtype {}, expected {}", self.dtype_name(name), dtype.name()),
            ));
        }
        self.check_shape(name, v.shape, Some(shape))?;
        Ok(v)
    }

    fn dtype_name(&self, name: &str) -> String {
        self.index
            .get(name)
            .map(|i| i.dtype_name.clone())
            .unwrap_or_default()
    }

    fn check_shape(&self, name: &str, got: &[usize], expect: Option<&[usize]>) -> Result<()> {
        match expect {
            Some(shape) if got != shape => {
                Err(self.tensor_err(name, format!("shape {got:?}, expected {shape:?}")))
            }
            _ => Ok(()),
        }
    }

    fn tensor_err(&self, name: &str, msg: String) -> WeightsError {
        let path = self
            .index
            .get(name)
            .map(|i| self.files[i.file].path.clone())
            .unwrap_or_default();
        WeightsError::Tensor {
            path,
            name: name.to_string(),
            msg,
        }
    }

    /// The tensor as a slice of `T`, which must be its exact dtype. Zero-copy when the data is
    /// aligned for `T` (always the case for files written with 8-byte aligned headers);
    /// copied otherwise.
    pub fn view_as<T: Element>(
        &self,
        name: &str,
        expect: Option<&[usize]>,
    ) -> Result<Cow<'_, [T]>> {
        let v = self.view(name)?;
        if v.dtype != T::DTYPE {
            return Err(self.tensor_err(
                name,
                format!(
                    "dtype {}, expected {}",
                    self.dtype_name(name),
                    T::DTYPE.name()
                ),
            ));
        }
        self.check_shape(name, v.shape, expect)?;
        Ok(cast_or_copy::<T>(v.data))
    }

    /// A float tensor as f32: borrowed from the map for aligned F32, converted from F16/BF16/F64
    /// otherwise. Checks the shape when `expect` is given.
    pub fn view_f32(&self, name: &str, expect: Option<&[usize]>) -> Result<Cow<'_, [f32]>> {
        let v = self.view(name)?;
        self.check_shape(name, v.shape, expect)?;
        float_values(v.dtype, v.data).ok_or_else(|| {
            self.tensor_err(
                name,
                format!("dtype {} is not a float type", self.dtype_name(name)),
            )
        })
    }

    /// Read a float tensor as f32 (f16/bf16/f64 converted), checking the shape when `expect` is given.
    pub fn read_f32(&self, name: &str, expect: Option<&[usize]>) -> Result<Vec<f32>> {
        Ok(self.view_f32(name, expect)?.into_owned())
    }

    /// Read an integer tensor (I64/I32/U32/I16/U16/I8/U8/BOOL) as i64. U64 values above
    /// `i64::MAX` are an error.
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let v = self.view(name)?;
        let d = v.data;
        Ok(match v.dtype {
            WDType::I64 => cast_or_copy::<i64>(d).into_owned(),
            WDType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            WDType::U32 => d
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            WDType::I16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            WDType::U16 => d
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            WDType::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
            WDType::U8 | WDType::Bool => d.iter().map(|&b| b as i64).collect(),
            WDType::U64 => d
                .chunks_exact(8)
                .map(|c| i64::try_from(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| self.tensor_err(name, "U64 value exceeds i64::MAX".into()))?,
            _ => {
                return Err(self.tensor_err(
                    name,
                    format!("dtype {} is not an integer type", self.dtype_name(name)),
                ))
            }
        })
    }
}

/// The first key that repeats within one object of the JSON `text` (at any depth), if any;
/// None also where `text` is not valid JSON (the caller has parsed it already).
fn first_duplicate_key(text: &str) -> Option<String> {
    use std::cell::RefCell;

    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    /// Walks any JSON value; on a repeated key, stores it and fails.
    #[derive(Clone, Copy)]
    struct Walk<'a>(&'a RefCell<Option<String>>);
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = map.next_key::<String>()? {
                if !seen.insert(k.clone()) {
                    *self.0.borrow_mut() = Some(k);
                    return Err(de::Error::custom("duplicate key"));
                }
                map.next_value_seed(self)?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            while seq.next_element_seed(self)?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> std::result::Result<(), E> {
            Ok(())
        }
    }
    let found = RefCell::new(None);
    let mut d = serde_json::Deserializer::from_str(text);
    let _ = Walk(&found).deserialize(&mut d);
    found.into_inner()
}

/// Little-endian bytes of a float dtype (F32, F16, BF16, F64) as f32: borrowed for aligned F32,
/// converted otherwise; None for any other dtype.
pub fn float_values(dtype: WDType, data: &[u8]) -> Option<Cow<'_, [f32]>> {
    Some(match dtype {
        WDType::F32 => cast_or_copy::<f32>(data),
        WDType::F16 => Cow::Owned(
            data.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        WDType::BF16 => Cow::Owned(
            data.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        WDType::F64 => Cow::Owned(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
        ),
        _ => return None,
    })
}

/// Reinterpret little-endian bytes as `T` without copying when aligned (and on a little-endian
/// host); otherwise decode element by element. `bytes.len()` is a multiple of `size_of::<T>()`
/// for every validated tensor; a stray tail would be ignored, never read past.
fn cast_or_copy<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    let size = std::mem::size_of::<T>();
    if cfg!(target_endian = "little") {
        if let Ok(s) = bytemuck::try_cast_slice::<u8, T>(bytes) {
            return Cow::Borrowed(s);
        }
        return Cow::Owned(
            bytes
                .chunks_exact(size)
                .map(bytemuck::pod_read_unaligned::<T>)
                .collect(),
        );
    }
    // Big-endian host: reverse each element's bytes.
    Cow::Owned(
        bytes
            .chunks_exact(size)
            .map(|c| {
                let mut b = c.to_vec();
                b.reverse();
                bytemuck::pod_read_unaligned::<T>(&b)
            })
            .collect(),
    )
}

/// One tensor to write: its bytes are little-endian, row-major.
struct WriteView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl safetensors::View for WriteView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Write `tensors` (name, dtype, shape, little-endian bytes) as a safetensors file at `path`,
/// atomically: the file is written next to `path` under a temporary name, synced, then renamed.
/// Checks that each byte length equals `numel * dtype size` and that names are unique.
pub fn write_safetensors<B: AsRef<[u8]>>(
    path: impl AsRef<Path>,
    tensors: &[(String, WDType, Vec<usize>, B)],
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let ferr = |msg: String| WeightsError::File {
        path: path.to_path_buf(),
        msg,
    };
    let mut views = Vec::with_capacity(tensors.len());
    let mut seen = std::collections::HashSet::new();
    for (name, dtype, shape, bytes) in tensors {
        let terr = |msg: String| WeightsError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            msg,
        };
        if !seen.insert(name.as_str()) {
            return Err(terr("name given twice".into()));
        }
        if name == "__metadata__" {
            return Err(terr("reserved name".into()));
        }
        let st = dtype
            .to_st()
            .ok_or_else(|| terr("cannot write dtype `other`".into()))?;
        let need = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size_bytes().expect("known dtype")))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        let data = bytes.as_ref();
        if data.len() != need {
            return Err(terr(format!(
                "{} bytes given but dtype {} with shape {shape:?} needs {need}",
                data.len(),
                dtype.name()
            )));
        }
        views.push((
            name.as_str(),
            WriteView {
                dtype: st,
                shape,
                data,
            },
        ));
    }
    let fname = path
        .file_name()
        .ok_or_else(|| ferr("not a file path".into()))?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{fname}.tmp-{}", std::process::id()));
    let res = (|| -> std::result::Result<(), String> {
        safetensors::serialize_to_file(views, metadata.cloned(), &tmp)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot rename {} into place: {e}", tmp.display()))
    })();
    if let Err(msg) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(ferr(msg));
    }
    Ok(())
}
