//! vi-weights: safetensors files memory-mapped, validated, viewed without copies.
//!
//! A [`WeightStore`] is one or several `.safetensors` files seen as one name space. Headers are
//! parsed and validated by the `safetensors` crate (header length, JSON, dtypes, offsets in range,
//! contiguous and non-overlapping, data length); the data stays in the memory map and is read through
//! zero-copy [`TensorView`]s. Every error names the file and, where there is one, the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

/// Element types we read. Anything else in a file is reported with its name when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
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
            _ => WDType::Other,
        }
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
            WDType::Other => "other",
        }
    }
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
    pub shape: Vec<usize>,
    /// Byte range within the file's data section.
    pub data_offsets: (usize, usize),
    /// Index of the file in the store.
    pub file: usize,
}

/// A zero-copy view of one tensor's bytes (little endian, row-major).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: WDType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

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

impl WeightStore {
    /// Open and validate one file.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightStore> {
        Self::open_many(&[path.as_ref().to_path_buf()])
    }

    /// Open several files; a tensor name present in two files is an error.
    pub fn open_many(paths: &[PathBuf]) -> Result<WeightStore> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let ferr = |msg: String| WeightsError::File {
                path: path.clone(),
                msg,
            };
            let file = File::open(path).map_err(|e| ferr(format!("cannot open: {e}")))?;
            // SAFETY: the file is mapped read-only; we never create a mutable view. If another
            // process truncates it while mapped, reads may fault (documented memmap2 caveat);
            // the weights are treated as immutable inputs.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ferr(format!("cannot map: {e}")))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| ferr(format!("not a valid safetensors file: {e}")))?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                let ti = TensorInfo {
                    dtype: WDType::from_st(info.dtype),
                    shape: info.shape.clone(),
                    data_offsets: info.data_offsets,
                    file: fi,
                };
                if index.insert(name.clone(), ti).is_some() {
                    return Err(WeightsError::Tensor {
                        path: path.clone(),
                        name,
                        msg: "defined in more than one file of the store".into(),
                    });
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                metadata: meta.metadata().clone().unwrap_or_default(),
                mmap,
                data_start,
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

    /// `__metadata__` of file `i` (empty when absent).
    pub fn metadata(&self, file: usize) -> &HashMap<String, String> {
        &self.files[file].metadata
    }

    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    fn describe(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Zero-copy view of a tensor.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self
            .index
            .get(name)
            .ok_or_else(|| WeightsError::Missing(name.to_string(), self.describe()))?;
        let f = &self.files[info.file];
        let (a, b) = info.data_offsets;
        // Offsets were validated against the data length by `read_metadata`.
        let data = &f.mmap[f.data_start + a..f.data_start + b];
        Ok(TensorView {
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
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

    /// Read a float tensor as f32 (f16/bf16/f64 converted), checking the shape when `expect` is given.
    pub fn read_f32(&self, name: &str, expect: Option<&[usize]>) -> Result<Vec<f32>> {
        let v = self.view(name)?;
        if let Some(shape) = expect {
            if v.shape != shape {
                return Err(
                    self.tensor_err(name, format!("shape {:?}, expected {:?}", v.shape, shape))
                );
            }
        }
        let out: Vec<f32> = match v.dtype {
            WDType::F32 => v
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WDType::F16 => v
                .data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            WDType::BF16 => v
                .data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            WDType::F64 => v
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            d => {
                return Err(self.tensor_err(name, format!("dtype {} is not a float type", d.name())))
            }
        };
        Ok(out)
    }

    /// Read an integer tensor (I64/I32) as i64.
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let v = self.view(name)?;
        match v.dtype {
            WDType::I64 => Ok(v
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()),
            WDType::I32 => Ok(v
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect()),
            d => Err(self.tensor_err(name, format!("dtype {} is not an integer type", d.name()))),
        }
    }
}
