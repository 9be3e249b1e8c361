use thiserror::Error;

/// Errors of the runtime. Messages name the op and the shapes involved.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
    /// Inputs (or an input and the requested output) whose dtypes the op does not combine.
    #[error("{op}: dtype mismatch: {msg}")]
    DTypeMismatch { op: &'static str, msg: String },
    #[error("{op}: unsupported dtype {dtype:?} on {device:?}")]
    DType {
        op: &'static str,
        dtype: crate::DType,
        device: crate::Device,
    },
    #[error("{op}: tensors on different devices ({a:?} vs {b:?})")]
    DeviceMismatch {
        op: &'static str,
        a: crate::Device,
        b: crate::Device,
    },
    #[error("{0}: a meta tensor (shape only) has no data")]
    Meta(&'static str),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("communicator: {0}")]
    Comm(String),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    pub fn dtype(op: &'static str, msg: impl Into<String>) -> Self {
        Error::DTypeMismatch {
            op,
            msg: msg.into(),
        }
    }
}
