//! kh x kw convolutions through cuDNN (implicit-GEMM tensor-core kernels, no im2col buffer), NHWC
//! activations and the [Cout, kh, kw, Cin] (KRSC, cuDNN's NHWC filter format) weight re-layout that
//! conv.rs caches. Descriptors and the chosen algorithm are cached per shape; the bias is added by
//! our in-place `bias_add` kernel (cudnnAddTensor's bf16 support is not guaranteed), an f32 bias
//! into bf16/f16 output by `bias_add_f32b` (the conv output is rounded once by cuDNN and once more
//! after the fp32 bias add). f32 runs with
//! CUDNN_FMA_MATH (no TF32), bf16/f16 with tensor-core math and fp32
//! accumulation (compute type CUDNN_DATA_FLOAT).
//!
//! Optional: conv.rs uses this path when [`conv_algo`] says so (default: cuDNN when libcudnn loads;
//! `VI_CONV=im2col` or [`set_conv_algo`] selects the im2col + cuBLASLt path) and falls back to
//! im2col, once with a warning, when cuDNN is missing or fails.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use cudarc::cudnn::sys;

use super::device::{cuda_err, CudaDevice};
use super::epilogue::bias_add_rows;
pub use crate::knobs::ConvAlgo;
use crate::{DType, Error, Result};

/// 0 = not decided (the `VI_CONV` knob), 1 = cuDNN, 2 = im2col.
static ALGO: AtomicU8 = AtomicU8::new(0);

/// Select the convolution implementation for the whole process (overrides `VI_CONV`).
pub fn set_conv_algo(a: ConvAlgo) {
    ALGO.store(
        match a {
            ConvAlgo::Cudnn => 1,
            ConvAlgo::Im2col => 2,
        },
        Ordering::Relaxed,
    );
}

/// The selected convolution implementation (`VI_CONV=im2col|cudnn`, default cuDNN).
pub fn conv_algo() -> ConvAlgo {
    match ALGO.load(Ordering::Relaxed) {
        1 => ConvAlgo::Cudnn,
        2 => ConvAlgo::Im2col,
        _ => {
            let a = crate::knobs::get().conv;
            set_conv_algo(a);
            a
        }
    }
}

fn check(what: &str, s: sys::cudnnStatus_t) -> Result<()> {
    if s == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("cuDNN {what}: {s:?}")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape {
    pub dtype: DType,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    filt: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    ws_bytes: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: descriptors created by `Dnn::plan`, destroyed once.
        unsafe {
            sys::cudnnDestroyTensorDescriptor(self.x);
            sys::cudnnDestroyTensorDescriptor(self.y);
            sys::cudnnDestroyFilterDescriptor(self.filt);
            sys::cudnnDestroyConvolutionDescriptor(self.conv);
        }
    }
}

/// Per-device cuDNN handle and plan cache.
pub(crate) struct Dnn {
    handle: sys::cudnnHandle_t,
    plans: Mutex<HashMap<ConvShape, Plan>>,
}

// SAFETY: the cuDNN handle and the plans' descriptors are raw pointers owned by this value; a cuDNN
// handle may be used from any thread with its context bound (done before every call), and every use
// (`conv`, which also builds plans) holds the `plans` mutex, so moving the value to another thread
// is sound.
unsafe impl Send for Dnn {}
// SAFETY: shared access never touches the handle or descriptors outside the `plans` mutex (see
// `conv`; `Drop` has exclusive access), so no two threads use them concurrently.
unsafe impl Sync for Dnn {}

fn data_type(d: DType) -> sys::cudnnDataType_t {
    match d {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
    }
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("cuDNN: dimension {v} exceeds i32")))
}

impl CudaDevice {
    /// The cuDNN state of this device (created on first use).
    pub(crate) fn dnn(&self) -> Result<&Dnn> {
        self.dnn
            .get_or_init(|| Dnn::new(self).map_err(|e| e.to_string()))?
            .as_ref()
            .map_err(|e| Error::Cuda(e.clone()))
    }
}

impl Dnn {
    fn new(dev: &CudaDevice) -> Result<Dnn> {
        // SAFETY: only tries to dlopen libcudnn.
        let present =
            std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(Error::Cuda(
                "libcudnn not found (set LD_LIBRARY_PATH to site-packages/nvidia/cudnn/lib)".into(),
            ));
        }
        dev.ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: creating a handle and binding it to our stream; a missing symbol panics inside
        // cudarc, caught here.
        let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            let s = sys::cudnnCreate(&mut handle);
            if s != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                return s;
            }
            sys::cudnnSetStream(handle, dev.stream().cu_stream() as sys::cudaStream_t)
        }))
        .map_err(|_| {
            Error::Cuda("cuDNN initialisation panicked (incompatible libcudnn?)".into())
        })?;
        check("create handle", status)?;
        Ok(Dnn {
            handle,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, s: &ConvShape) -> Result<Plan> {
        let dt = data_type(s.dtype);
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let ho = (s.h + 2 * s.pad - s.kh) / s.stride + 1;
        let wo = (s.w + 2 * s.pad - s.kw) / s.stride + 1;
        // SAFETY: plain descriptor creation / setup; every handle is owned by the returned Plan
        // (destroyed by its Drop, also on the error paths below once it exists).
        unsafe {
            let mut p = Plan {
                x: std::ptr::null_mut(),
                y: std::ptr::null_mut(),
                filt: std::ptr::null_mut(),
                conv: std::ptr::null_mut(),
                algo:
                    sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                ws_bytes: 0,
            };
            check("create", sys::cudnnCreateTensorDescriptor(&mut p.x))?;
            check("create", sys::cudnnCreateTensorDescriptor(&mut p.y))?;
            check("create", sys::cudnnCreateFilterDescriptor(&mut p.filt))?;
            check("create", sys::cudnnCreateConvolutionDescriptor(&mut p.conv))?;
            check(
                "x descriptor",
                sys::cudnnSetTensor4dDescriptor(
                    p.x,
                    nhwc,
                    dt,
                    int(s.n)?,
                    int(s.cin)?,
                    int(s.h)?,
                    int(s.w)?,
                ),
            )?;
            check(
                "y descriptor",
                sys::cudnnSetTensor4dDescriptor(
                    p.y,
                    nhwc,
                    dt,
                    int(s.n)?,
                    int(s.cout)?,
                    int(ho)?,
                    int(wo)?,
                ),
            )?;
            check(
                "filter descriptor",
                sys::cudnnSetFilter4dDescriptor(
                    p.filt,
                    dt,
                    nhwc,
                    int(s.cout)?,
                    int(s.cin)?,
                    int(s.kh)?,
                    int(s.kw)?,
                ),
            )?;
            check(
                "conv descriptor",
                sys::cudnnSetConvolution2dDescriptor(
                    p.conv,
                    int(s.pad)?,
                    int(s.pad)?,
                    int(s.stride)?,
                    int(s.stride)?,
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
            )?;
            let math = if s.dtype == DType::F32 {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            };
            check("math type", sys::cudnnSetConvolutionMathType(p.conv, math))?;
            const N: usize = 8;
            let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = std::mem::zeroed();
            let mut count = 0;
            check(
                "algorithm heuristic",
                sys::cudnnGetConvolutionForwardAlgorithm_v7(
                    self.handle,
                    p.x,
                    p.filt,
                    p.conv,
                    p.y,
                    N as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                ),
            )?;
            let ok = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
            // For f32 the algorithm must use FMA math: CUDNN_DEFAULT_MATH permits TF32 on Ampere+.
            let best = perf[..count.max(0) as usize].iter().find(|r| {
                r.status == ok
                    && (s.dtype != DType::F32 || r.mathType == sys::cudnnMathType_t::CUDNN_FMA_MATH)
            });
            let best = best.ok_or_else(|| Error::Cuda(format!("cuDNN: no algorithm for {s:?}")))?;
            p.algo = best.algo;
            check(
                "set math type",
                sys::cudnnSetConvolutionMathType(p.conv, best.mathType),
            )?;
            check(
                "workspace size",
                sys::cudnnGetConvolutionForwardWorkspaceSize(
                    self.handle,
                    p.x,
                    p.filt,
                    p.conv,
                    p.y,
                    p.algo,
                    &mut p.ws_bytes,
                ),
            )?;
            Ok(p)
        }
    }

    /// y[N, Ho, Wo, Cout] = conv(x[N, H, W, Cin], w[Cout, kh, kw, Cin]) (+ bias[Cout], of the
    /// activation dtype or F32).
    pub(crate) fn conv(
        &self,
        dev: &std::sync::Arc<CudaDevice>,
        s: &ConvShape,
        x: u64,
        w: u64,
        bias: Option<(u64, DType)>,
        y: u64,
    ) -> Result<()> {
        let mut plans = self.plans.lock().unwrap();
        let plan = match plans.entry(*s) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(s)?),
        };
        let ws = if plan.ws_bytes > 0 {
            Some(dev.alloc(DType::F32, plan.ws_bytes.div_ceil(4))?)
        } else {
            None
        };
        let ws_ptr = ws.as_ref().map_or(0, |b| b.ptr());
        dev.ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let (one, zero) = (1f32, 0f32);
        // SAFETY: descriptors match the buffers (shapes checked by ops::conv2d and conv.rs); the
        // workspace lives until after the call is queued and is freed stream-ordered.
        unsafe {
            check(
                "convolution forward",
                sys::cudnnConvolutionForward(
                    self.handle,
                    &one as *const f32 as *const c_void,
                    plan.x,
                    x as *const c_void,
                    plan.filt,
                    w as *const c_void,
                    plan.conv,
                    plan.algo,
                    ws_ptr as *mut c_void,
                    plan.ws_bytes,
                    &zero as *const f32 as *const c_void,
                    plan.y,
                    y as *mut c_void,
                ),
            )?;
        }
        drop(ws);
        if let Some((b, bdt)) = bias {
            let ho = (s.h + 2 * s.pad - s.kh) / s.stride + 1;
            let wo = (s.w + 2 * s.pad - s.kw) / s.stride + 1;
            bias_add_rows(dev, s.dtype, y, b, bdt, s.n * ho * wo, s.cout)?;
        }
        Ok(())
    }
}

impl Drop for Dnn {
    fn drop(&mut self) {
        self.plans.lock().unwrap().clear();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            sys::cudnnDestroy(self.handle);
        }
    }
}
