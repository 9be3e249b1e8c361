//! Where a model gets its parameters: a [`ParamSource`] looked up by exact checkpoint key names.
//!
//! Models are built from a config and a [`Params`] (a source + a key prefix). The same construction
//! code, run on a [`MetaRecorder`], yields the parameter table (names and shapes, no allocation) that
//! tests compare with the manifests; run on a [`StoreSource`], it loads real weights.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;

use vi_runtime::{DType, Device, Tensor};
use vi_weights::{WDType, WeightStore};

/// Error of model construction and running.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Runtime(#[from] vi_runtime::Error),
    #[error(transparent)]
    Weights(#[from] vi_weights::WeightsError),
    #[error("parameter `{key}`: {msg}")]
    Param { key: String, msg: String },
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A source of named parameters.
pub trait ParamSource: Sync {
    /// The parameter `key` with exactly `shape`, on the source's device and dtype.
    /// Errors name the key (missing, wrong shape, not finite).
    fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, key: &str) -> bool;
}

/// A prefix into a [`ParamSource`]: `p.pp("down_blocks").pp(0).get("conv.weight", ..)` looks up
/// `down_blocks.0.conv.weight`.
#[derive(Clone, Copy)]
pub struct Params<'a> {
    src: &'a dyn ParamSource,
    prefix: &'a str,
}

/// An owned prefix (Params borrows its prefix; `pp` returns this, which derefs by `.p()`).
pub struct PrefixedParams<'a> {
    src: &'a dyn ParamSource,
    prefix: String,
}

impl<'a> Params<'a> {
    pub fn new(src: &'a dyn ParamSource) -> Self {
        Params { src, prefix: "" }
    }
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }
    pub fn pp(&self, name: impl std::fmt::Display) -> PrefixedParams<'a> {
        PrefixedParams {
            src: self.src,
            prefix: self.key(&name.to_string()),
        }
    }
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.get(&self.key(name), shape)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&self.key(name))
    }
}

impl<'a> PrefixedParams<'a> {
    pub fn p(&self) -> Params<'_> {
        Params {
            src: self.src,
            prefix: &self.prefix,
        }
    }
    pub fn pp(&self, name: impl std::fmt::Display) -> PrefixedParams<'a> {
        PrefixedParams {
            src: self.src,
            prefix: format!("{}.{}", self.prefix, name),
        }
    }
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.p().get(name, shape)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.p().contains(name)
    }
}

/// Records every requested (key, shape) and returns meta tensors: the parameter table of a model
/// built from its config alone.
#[derive(Default)]
pub struct MetaRecorder {
    table: Mutex<BTreeMap<String, Vec<usize>>>,
    /// Keys `contains` answers true for (optional parameters such as conv_shortcut are decided by
    /// the config, so by default `contains` is false).
    pub present: Option<std::collections::HashSet<String>>,
}

impl MetaRecorder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn table(&self) -> BTreeMap<String, Vec<usize>> {
        self.table.lock().unwrap().clone()
    }
}

impl ParamSource for MetaRecorder {
    fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let mut t = self.table.lock().unwrap();
        if let Some(prev) = t.insert(key.to_string(), shape.to_vec()) {
            if prev != shape {
                return Err(ModelError::Param {
                    key: key.into(),
                    msg: format!("requested twice with shapes {prev:?} and {shape:?}"),
                });
            }
        }
        Ok(Tensor::meta(shape, DType::F32))
    }
    fn contains(&self, key: &str) -> bool {
        self.present.as_ref().is_some_and(|p| p.contains(key))
    }
}

/// The one verdict on a weight tensor, the same for loading (`generate`), `inspect` and
/// `convert`: a float dtype (F32, F16, BF16, F64), exactly the `expected` shape, every value finite
/// once converted to f32 (an F64 beyond f32's range is not). Returns the values as f32 (borrowed
/// for aligned F32). The error is the problem alone; callers name the tensor and its file.
pub fn check_weight<'a>(
    dtype: WDType,
    dtype_name: &str,
    shape: &[usize],
    expected: &[usize],
    data: &'a [u8],
) -> std::result::Result<Cow<'a, [f32]>, String> {
    if shape != expected {
        return Err(format!("shape {shape:?}, expected {expected:?}"));
    }
    let values = vi_weights::float_values(dtype, data).ok_or_else(|| {
        format!("dtype {dtype_name} is not a float type (F32, F16, BF16 or F64 expected)")
    })?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("non-finite value {} at element {i}", values[i]));
    }
    Ok(values)
}

/// [`check_weight`] on the tensor `name` of `store`; the error names the tensor and its file.
pub fn store_weight<'s>(
    store: &'s WeightStore,
    name: &str,
    expected: &[usize],
) -> Result<Cow<'s, [f32]>> {
    let info = store.info(name).ok_or_else(|| ModelError::Param {
        key: name.to_string(),
        msg: "missing".into(),
    })?;
    let view = store.view(name)?;
    check_weight(
        info.dtype,
        &info.dtype_name,
        view.shape,
        expected,
        view.data,
    )
    .map_err(|msg| ModelError::Param {
        key: name.to_string(),
        msg: match store.file_of(name) {
            Some(f) => format!("{msg} (in {})", f.display()),
            None => msg,
        },
    })
}

/// Parameters from a [`WeightStore`], converted to `dtype` and placed on `device`.
/// The storage dtype of a parameter of `shape` in a model run with `dtype` activations: matrices and
/// conv kernels take `dtype` (they are GEMM operands); 1-D parameters (biases, norm gamma/beta) stay
/// F32 whatever `dtype` is. They cost nothing (a few hundred KB in the full UNet) and rounding one
/// shifts every element of its channel alike: on the tiny golden UNet, bf16 1-D parameters alone
/// move the output by rel L2 7.7e-3, as much as every bf16 matrix together.
pub fn param_dtype(shape: &[usize], dtype: DType) -> DType {
    if shape.len() < 2 {
        DType::F32
    } else {
        dtype
    }
}

/// `prefix` is prepended to every key (e.g. `weight/` in golden files); `alt_prefix` is tried
/// second (e.g. `text_model.` for text encoders written by transformers < 5).
/// Records which keys were used, so callers can report unused tensors.
pub struct StoreSource<'s> {
    pub store: &'s WeightStore,
    pub prefix: String,
    pub alt_prefix: Option<String>,
    pub device: Device,
    pub dtype: DType,
    used: Mutex<std::collections::BTreeSet<String>>,
}

impl<'s> StoreSource<'s> {
    pub fn new(store: &'s WeightStore, prefix: &str, device: Device, dtype: DType) -> Self {
        StoreSource {
            store,
            prefix: prefix.to_string(),
            alt_prefix: None,
            device,
            dtype,
            used: Mutex::new(Default::default()),
        }
    }
    pub fn with_alt_prefix(mut self, alt: &str) -> Self {
        self.alt_prefix = Some(alt.to_string());
        self
    }
    fn resolve(&self, key: &str) -> Option<String> {
        let k = format!("{}{}", self.prefix, key);
        if self.store.contains(&k) {
            return Some(k);
        }
        let alt = format!("{}{}", self.alt_prefix.as_deref()?, key);
        self.store.contains(&alt).then_some(alt)
    }
    /// Store keys (full names) that were used so far.
    pub fn used(&self) -> std::collections::BTreeSet<String> {
        self.used.lock().unwrap().clone()
    }
}

impl ParamSource for StoreSource<'_> {
    fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.resolve(key).ok_or_else(|| ModelError::Param {
            key: key.to_string(),
            msg: format!(
                "missing from {}",
                self.store
                    .paths()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        // Borrowed from the map for f32 files; converted on the host for f16/bf16 ones.
        let data = store_weight(self.store, &full, shape)?;
        self.used.lock().unwrap().insert(full);
        Ok(Tensor::from_slice_on(
            &data,
            shape,
            self.device,
            param_dtype(shape, self.dtype),
        )?)
    }
    fn contains(&self, key: &str) -> bool {
        self.resolve(key).is_some()
    }
}
