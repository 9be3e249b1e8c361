//! The GEMM engine on raw device addresses ([`Gemm`], [`gemm_rows`]): cuBLASLt, bf16/f16 inputs with fp32 accumulation (CUBLAS_COMPUTE_32F), or exact f32
//! (no TF32), with classic cuBLAS as the fallback. Descriptors, layouts and the heuristic's algorithm are built once per GEMM shape (plus
//! pointer alignments) and cached in [`Blas`]; only the pointers change between calls.
//!
//! Row-major bridge: cuBLASLt is column-major. A row-major C[M, N] = A[M, K] · B is the column-major
//! C^T[N, M] = B^T · A^T, and a row-major matrix with row stride `ld` is a column-major matrix of the
//! transposed shape with the same `ld`. So every call passes our B as cuBLASLt's "A", our A as its
//! "B", and swaps M and N. The Linear bias (one value per output column of the row-major C) is then a
//! per-row bias of the column-major D, which is exactly CUBLASLT_EPILOGUE_BIAS.
//!
//! Bias dtype: the GEMM dtype, or F32 under bf16/f16 operands (the precision policy keeps 1-D
//! parameters in fp32): CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = CUDA_R_32F, so the epilogue adds the
//! fp32 bias to the fp32 accumulator and D is rounded once. When cuBLASLt refuses a GEMM with an
//! f32 bias, the fallback keeps that contract at the cost of a pass: the GEMM without the bias into
//! an fp32 buffer (cuBLASLt, else classic cuBLAS), then `bias_round_f32b` (fp32 bias, one rounding);
//! an accumulating GEMM (beta = 1) adds the bias in place instead (`bias_add_f32b`, one more
//! rounding). stderr says so once per shape, and [`lt_refusals`] lists such shapes for tests.
//!
//! Used by the op modules `gemm.rs` (tensor-level matmul / linear) and `conv.rs`; imports only
//! `device` and `epilogue`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

use cudarc::cublas::result as cublas_classic;
use cudarc::cublas::sys as cublas_sys;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaSlice;

use super::device::{cuda_err, device, CudaDevice};
use super::epilogue::{bias_add_rows, bias_round};
use crate::{DType, Error, Result};

/// A row-major GEMM: C[b] (= beta * C[b]) + A[b] · op(B[b]) (+ bias), for b in 0..batch.
/// Pointers are raw device addresses; strides and leading dims are in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm {
    /// Dtype of A and B.
    pub dtype: DType,
    /// Dtype of C: `dtype`, or F32 to keep fp32 partial sums (e.g. accumulated temporal-conv taps)
    /// unrounded.
    pub c_dtype: DType,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A [M, K], row stride `lda` (>= K).
    pub a: u64,
    pub lda: usize,
    /// B [K, N] (row stride `ldb` >= N), or with `trans_b` B [N, K] (row stride `ldb` >= K).
    pub b: u64,
    pub ldb: usize,
    pub trans_b: bool,
    /// D [M, N], row stride `ldc` (>= N); always written.
    pub c: u64,
    /// The C read when `beta != 0`: `c` itself (accumulate in place) or another buffer of the same
    /// layout (e.g. the residual of `linear_add`, which must not be overwritten).
    pub c_src: u64,
    pub ldc: usize,
    /// Per-column bias [N] (address, dtype: `dtype` or F32; F32 when `c_dtype` is F32), added in
    /// the epilogue.
    pub bias: Option<(u64, DType)>,
    /// 0.0 (overwrite) or 1.0 (accumulate into C).
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    c_dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    trans_b: bool,
    /// The bias dtype (None: no bias).
    bias: Option<DType>,
    accumulate: bool,
    batch: usize,
    strides: (usize, usize, usize),
    /// Alignment in bytes (power of two, capped at 256) of A, B, C and bias.
    align: (u32, u32, u32, u32),
}

/// Cached cuBLASLt objects for one GEMM shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the raw cuBLASLt descriptors are only used under the `plans` mutex.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by us, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// Per-device cuBLASLt state: handle, workspace, plan cache.
pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_bytes: usize,
    plans: Mutex<HashMap<Key, Plan>>,
    /// Classic cuBLAS (cublasGemmStridedBatchedEx): the fallback for shapes cuBLASLt refuses
    /// (a plan or a matmul answering NOT_SUPPORTED). Created on first use.
    classic: Mutex<Option<Classic>>,
    /// Keys cuBLASLt refused once: they go straight to the fallback (no plan or heuristic per call).
    lt_refused: Mutex<std::collections::HashSet<Key>>,
}

/// Classic cuBLAS handle and a buffer of ones per dtype (the bias is added as a rank-1 GEMM
/// C += bias · 1^T when the fallback is taken).
struct Classic {
    handle: cublas_sys::cublasHandle_t,
    /// dtype -> (device buffer of `len` ones encoded in that dtype, len).
    ones: HashMap<DType, (CudaSlice<u8>, usize)>,
    /// Keys already reported as falling back (one line each on stderr).
    reported: std::collections::HashSet<Key>,
}

// SAFETY: the cuBLASLt handle (raw pointer owned by this value) may be used from any thread with
// the device context bound (done before every call); it is used only while holding the `plans`
// mutex (`run_lt`, and `plan`, called from it), the classic handle only under the `classic` mutex.
unsafe impl Send for Blas {}
// SAFETY: as for `Send`: every shared use of either handle holds its mutex, so never concurrently.
unsafe impl Sync for Blas {}

/// GEMM shapes (the `Key` debug line) whose f32-bias epilogue cuBLASLt refused in this process.
static REFUSED_F32_BIAS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The GEMM shapes (debug lines) for which cuBLASLt refused a bias of another dtype than the
/// operands (an f32 bias with bf16/f16 operands) in this process; those ran the slower fallback
/// (GEMM + in-place bias add). For tests and diagnostics.
pub fn lt_refusals() -> Vec<String> {
    REFUSED_F32_BIAS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn blas_err(what: &str, e: impl std::fmt::Debug) -> Error {
    cuda_err(&format!("cuBLASLt {what}"), e)
}

impl CudaDevice {
    /// The cuBLASLt state of this device (created on first use).
    pub(crate) fn blas(&self) -> Result<&Blas> {
        self.blas
            .get_or_init(|| Blas::new(self).map_err(|e| e.to_string()))?
            .as_ref()
            .map_err(|e| Error::Cuda(e.clone()))
    }
}

impl Blas {
    fn new(dev: &CudaDevice) -> Result<Blas> {
        // SAFETY: only tries to dlopen libcublasLt.
        let present =
            std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(Error::Cuda(
                "libcublasLt not found: set LD_LIBRARY_PATH to the CUDA libraries (e.g. \
                 site-packages/nvidia/cu13/lib or /usr/local/cuda/lib64)"
                    .into(),
            ));
        }
        dev.ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let handle = std::panic::catch_unwind(lt::create_handle)
            .map_err(|_| Error::Cuda("cublasLtCreate panicked (incompatible libcublasLt?)".into()))?
            .map_err(|e| blas_err("create handle", e))?;
        // NVIDIA's recommendation: 32 MiB on Hopper, 4 MiB before.
        let workspace_bytes = if dev.compute_capability().0 >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        // SAFETY: scratch memory for cuBLASLt; never read by us.
        let workspace = unsafe { dev.stream().alloc::<u8>(workspace_bytes) }
            .map_err(|e| cuda_err("cuBLASLt workspace", e))?;
        Ok(Blas {
            handle,
            workspace,
            workspace_bytes,
            plans: Mutex::new(HashMap::new()),
            classic: Mutex::new(None),
            lt_refused: Mutex::new(Default::default()),
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.lock().unwrap().clear();
        if let Some(c) = self.classic.lock().unwrap().take() {
            // SAFETY: created in `run_classic`, destroyed once.
            unsafe {
                let _ = cublas_classic::destroy_handle(c.handle);
            }
        }
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn align_of(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
    }
}

fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    // SAFETY: `v` is a plain value of the type the attribute expects, copied by cuBLASLt.
    unsafe {
        lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, size_of::<T>())
    }
    .map_err(|e| blas_err(&format!("set {attr:?}"), e))
}

fn set_layout<T>(
    l: sys::cublasLtMatrixLayout_t,
    attr: sys::cublasLtMatrixLayoutAttribute_t,
    v: &T,
) -> Result<()> {
    // SAFETY: `v` is a plain value of the type the attribute expects, copied by cuBLASLt.
    unsafe {
        lt::set_matrix_layout_attribute(l, attr, v as *const T as *const c_void, size_of::<T>())
    }
    .map_err(|e| blas_err(&format!("set {attr:?}"), e))
}

fn set_pref<T>(
    p: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> Result<()> {
    // SAFETY: `v` is a plain value of the type the attribute expects, copied by cuBLASLt.
    unsafe {
        lt::set_matmul_pref_attribute(p, attr, v as *const T as *const c_void, size_of::<T>())
    }
    .map_err(|e| blas_err(&format!("set {attr:?}"), e))
}

impl Blas {
    fn plan(&self, key: &Key) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        use sys::cublasLtMatrixLayoutAttribute_t as L;
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)
            .map_err(|e| blas_err("create matmul desc", e))?;
        let dt = data_type(key.dtype);
        // Column-major view (see the module doc): cuBLASLt A = our B, cuBLASLt B = our A.
        // cuBLASLt A: op(A) is [n, k]; stored col-major as [n, k] (no transpose: our B [K, N] row-major)
        // or [k, n] with op = T (our B [N, K] row-major).
        let (a_rows, a_cols) = if key.trans_b {
            (key.k, key.n)
        } else {
            (key.n, key.k)
        };
        let la = lt::create_matrix_layout(dt, a_rows as u64, a_cols as u64, key.ldb as i64)
            .map_err(|e| blas_err("layout A", e))?;
        let lb = lt::create_matrix_layout(dt, key.k as u64, key.m as u64, key.lda as i64)
            .map_err(|e| blas_err("layout B", e))?;
        let lc = lt::create_matrix_layout(
            data_type(key.c_dtype),
            key.n as u64,
            key.m as u64,
            key.ldc as i64,
        )
        .map_err(|e| blas_err("layout C", e))?;
        // Owns the descriptors from here on: destroyed by its Drop on every error path below, and
        // returned (never copied out of, which would destroy them) on success.
        let mut plan = Plan {
            desc,
            layouts: [la, lb, lc],
            // SAFETY: plain C struct, filled by the heuristic below before use.
            algo: unsafe { std::mem::zeroed() },
        };
        let transa: i32 = key.trans_b as i32;
        let transb: i32 = 0;
        set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &transa)?;
        set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &transb)?;
        let epilogue = if key.bias.is_some() {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
        if let Some(bias_dt) = key.bias {
            let bias_type = data_type(bias_dt);
            set_desc(
                desc,
                D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &(bias_type as u32),
            )?;
            // Dummy pointer so the heuristic sees a bias; the real one is set per call.
            let p: u64 = 256;
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p)?;
        }
        if key.batch > 1 {
            let count = key.batch as i32;
            let (sa, sb, sc) = key.strides;
            for (l, stride) in [(la, sb), (lb, sa), (lc, sc)] {
                set_layout(l, L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count)?;
                set_layout(
                    l,
                    L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &(stride as i64),
                )?;
            }
        }
        let pref = lt::create_matmul_pref().map_err(|e| blas_err("create preference", e))?;
        struct PrefGuard(sys::cublasLtMatmulPreference_t);
        impl Drop for PrefGuard {
            fn drop(&mut self) {
                // SAFETY: created above, destroyed once.
                unsafe {
                    let _ = lt::destroy_matmul_pref(self.0);
                }
            }
        }
        let _pref_guard = PrefGuard(pref);
        set_pref(
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &self.workspace_bytes,
        )?;
        let (al_a, al_b, al_c, al_bias) = key.align;
        // cuBLASLt's "A" is our B and vice versa.
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b)?;
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a)?;
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c)?;
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c)?;
        let _ = al_bias;
        if key.c_dtype != DType::F32 {
            // The contract is fp32 accumulation and ONE rounding per output. Split-K algorithms
            // that reduce their partial sums in the output type (INPLACE, OUTPUT_TYPE) would round
            // every partial sum to bf16/f16 (and add the bias/C to a rounded value); allow only
            // unsplit algorithms (scheme NONE always passes the mask) and split-K reduced in the
            // fp32 compute type (in the workspace).
            let mask =
                sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask)?;
        }
        // SAFETY: all descriptors are valid and alive.
        let heur =
            unsafe { lt::get_matmul_algo_heuristic(self.handle, desc, la, lb, lc, lc, pref) }
                .map_err(|e| blas_err(&format!("no algorithm for {key:?}"), e))?;
        plan.algo = heur.algo;
        Ok(plan)
    }

    /// Queue the GEMM on the device stream.
    pub(crate) fn run(&self, dev: &CudaDevice, g: &Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if let Some((_, bdt)) = g.bias {
            // Bias of the operand dtype into C of the operand dtype, or an f32 bias (into any C).
            let ok = bdt == DType::F32 || (bdt == g.dtype && g.c_dtype == g.dtype);
            if !ok {
                return Err(Error::Cuda(format!(
                    "GEMM bias {bdt:?} with {:?} operands and {:?} C (must be F32, or the operand \
                     dtype with C of the operand dtype)",
                    g.dtype, g.c_dtype
                )));
            }
        }
        let key = Key {
            dtype: g.dtype,
            c_dtype: g.c_dtype,
            m: g.m,
            n: g.n,
            k: g.k,
            lda: g.lda,
            ldb: g.ldb,
            ldc: g.ldc,
            trans_b: g.trans_b,
            bias: g.bias.map(|b| b.1),
            accumulate: g.beta != 0.0,
            batch: g.batch,
            strides: if g.batch > 1 {
                (g.stride_a, g.stride_b, g.stride_c)
            } else {
                (0, 0, 0)
            },
            align: (
                align_of(g.a),
                align_of(g.b),
                align_of(g.c).min(align_of(g.c_src)),
                g.bias.map(|b| align_of(b.0)).unwrap_or(256),
            ),
        };
        if self.lt_refused.lock().unwrap().contains(&key) {
            let why = Error::Cuda("refused earlier by cuBLASLt".into());
            return self.fallback(dev, g, &key, &why);
        }
        match self.run_lt(dev, g, &key) {
            Ok(()) => Ok(()),
            Err(lt_err) => {
                self.lt_refused.lock().unwrap().insert(key);
                self.fallback(dev, g, &key, &lt_err)
            }
        }
    }

    /// What runs when cuBLASLt refused `key`: classic cuBLAS, except that a bias of another dtype
    /// than the operands (f32 bias, bf16/f16 operands) cannot be the classic path's rank-1 GEMM:
    /// then the GEMM runs without it (cuBLASLt or classic, via `run`) into an fp32 buffer and the
    /// bias is added while rounding once (`bias_round_f32b`); with beta != 0 (accumulating into C)
    /// the GEMM runs in place and the bias is added in place.
    fn fallback(&self, dev: &CudaDevice, g: &Gemm, key: &Key, why: &Error) -> Result<()> {
        let Some((bias, bdt)) = g.bias.filter(|b| b.1 != g.dtype) else {
            return self.run_classic(dev, g, key, why);
        };
        {
            let mut reported = REFUSED_F32_BIAS.lock().unwrap_or_else(|p| p.into_inner());
            let line = format!("{key:?}");
            if !reported.contains(&line) {
                eprintln!(
                    "vi-runtime: cuBLASLt refused the {bdt:?}-bias epilogue for {line} ({why}); \
                     GEMM without bias + bias_add kernel"
                );
                reported.push(line);
            }
        }
        if g.ldc != g.n || g.batch != 1 {
            return Err(Error::Cuda(format!(
                "GEMM {key:?}: the {bdt:?}-bias fallback needs a single dense C (ldc == n)"
            )));
        }
        if g.beta == 0.0 && g.c_dtype != DType::F32 {
            // The op's contract: fp32 product + fp32 bias, one rounding to C's dtype.
            let acc = device(dev.ordinal())?.alloc(DType::F32, g.m * g.n)?;
            let acc_gemm = Gemm {
                bias: None,
                c_dtype: DType::F32,
                c: acc.ptr(),
                c_src: acc.ptr(),
                ..*g
            };
            self.run(dev, &acc_gemm)?;
            bias_round(dev, g.c_dtype, acc.ptr(), Some((bias, bdt)), g.c, g.m, g.n)?;
            drop(acc); // stream-ordered free after the kernel
            return Ok(());
        }
        self.run(dev, &Gemm { bias: None, ..*g })?;
        bias_add_rows(dev, g.c_dtype, g.c, bias, bdt, g.m, g.n)
    }

    /// The cuBLASLt path (cached plan per key).
    fn run_lt(&self, dev: &CudaDevice, g: &Gemm, key: &Key) -> Result<()> {
        let key = *key;
        let mut plans = self.plans.lock().unwrap();
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(&key)?),
        };
        if let Some((bias, _)) = g.bias {
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias,
            )?;
        }
        dev.ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let alpha: f32 = 1.0;
        let beta: f32 = g.beta;
        let ws = {
            use cudarc::driver::DevicePtr;
            self.workspace.device_ptr(dev.stream()).0
        };
        let [la, lb, lc] = plan.layouts;
        // SAFETY: pointers are live device buffers of the sizes described by the layouts (checked by
        // the callers), the plan's descriptors are alive, and the call is queued on the device stream.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                g.b as *const c_void,
                la,
                g.a as *const c_void,
                lb,
                g.c_src as *const c_void,
                lc,
                g.c as *mut c_void,
                lc,
                &plan.algo,
                ws as *mut c_void,
                self.workspace_bytes,
                dev.stream().cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_err(&format!("matmul {key:?}"), e))
    }

    /// Fallback: cublasGemmStridedBatchedEx with the same column-major bridge (fp32 compute), and
    /// the bias as a second, rank-1 GEMM C += bias[N] x ones[M].
    fn run_classic(&self, dev: &CudaDevice, g: &Gemm, key: &Key, why: &Error) -> Result<()> {
        use cublas_sys::cublasOperation_t as Op;
        let cerr = |what: &str, e: cublas_classic::CublasError| {
            cuda_err(&format!("cuBLAS {what} (after cuBLASLt failed: {why})"), e)
        };
        dev.ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let mut guard = self.classic.lock().unwrap();
        if guard.is_none() {
            let handle = std::panic::catch_unwind(cublas_classic::create_handle)
                .map_err(|_| Error::Cuda("libcublas not found: set LD_LIBRARY_PATH".into()))?
                .map_err(|e| cerr("create handle", e))?;
            // Split-K reductions in fp32, never in a bf16/f16 output type (cuBLAS' default math
            // mode allows that): one rounding per output, as on the cuBLASLt path. No TF32 either
            // way: every call passes CUBLAS_COMPUTE_32F.
            // SAFETY: `handle` was just created and is not shared yet.
            let mode = unsafe {
                cublas_sys::cublasSetMathMode(
                    handle,
                    cublas_sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
                )
            };
            if let Err(e) = mode.result() {
                // SAFETY: created above and stored nowhere: destroyed once.
                unsafe {
                    let _ = cublas_classic::destroy_handle(handle);
                }
                return Err(cerr("set math mode", e));
            }
            *guard = Some(Classic {
                handle,
                ones: HashMap::new(),
                reported: Default::default(),
            });
        }
        let c = guard.as_mut().expect("set above");
        if c.reported.insert(*key) {
            eprintln!(
                "vi-runtime: cuBLASLt refused {key:?} ({why}); using cublasGemmStridedBatchedEx"
            );
        }
        // SAFETY: the handle is alive; the stream belongs to this device's context.
        unsafe { cublas_classic::set_stream(c.handle, dev.stream().cu_stream() as _) }
            .map_err(|e| cerr("set stream", e))?;
        if g.beta != 0.0 && g.c_src != g.c {
            // cublasGemmEx accumulates in place: start D as a copy of C.
            if g.batch != 1 {
                return Err(Error::Cuda(format!(
                    "GEMM {key:?}: a separate C source needs batch 1 on the classic path"
                )));
            }
            let bytes = ((g.m - 1) * g.ldc + g.n) * g.c_dtype.size_in_bytes();
            // SAFETY: both buffers hold the [m, n] (row stride ldc) C layout of `c_dtype`; they are
            // distinct allocations (c is a fresh output); queued on the device stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    g.c,
                    g.c_src,
                    bytes,
                    dev.stream().cu_stream(),
                )
            }
            .map_err(|e| cuda_err("copying the GEMM's C source", e))?;
        }
        let classic_type = |d: DType| match d {
            DType::F32 => cublas_sys::cudaDataType_t::CUDA_R_32F,
            DType::BF16 => cublas_sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => cublas_sys::cudaDataType_t::CUDA_R_16F,
        };
        let dt = classic_type(g.dtype);
        let cdt = classic_type(g.c_dtype);
        let compute = cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let alpha: f32 = 1.0;
        let beta: f32 = g.beta;
        let (sa, sb, sc) = if g.batch > 1 {
            (g.stride_a, g.stride_b, g.stride_c)
        } else {
            (0, 0, 0)
        };
        let opa = if g.trans_b {
            Op::CUBLAS_OP_T
        } else {
            Op::CUBLAS_OP_N
        };
        // SAFETY: pointers are live device buffers of the sizes the callers checked; column-major
        // view: C^T[N, M] = op(B^T)[N, K] · A^T[K, M] (see the module doc).
        unsafe {
            cublas_classic::gemm_strided_batched_ex(
                c.handle,
                opa,
                Op::CUBLAS_OP_N,
                g.n as i32,
                g.m as i32,
                g.k as i32,
                &alpha as *const f32 as *const c_void,
                g.b as *const c_void,
                dt,
                g.ldb as i32,
                sb as i64,
                g.a as *const c_void,
                dt,
                g.lda as i32,
                sa as i64,
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                cdt,
                g.ldc as i32,
                sc as i64,
                g.batch as i32,
                compute,
                algo,
            )
        }
        .map_err(|e| cerr("gemm", e))?;
        let Some((bias, bias_dt)) = g.bias else {
            return Ok(());
        };
        if bias_dt != g.dtype {
            return Err(Error::Cuda(format!(
                "classic cuBLAS fallback: {bias_dt:?} bias with {:?} operands (handled by `fallback`)",
                g.dtype
            )));
        }
        let need = g.m;
        let have = c.ones.get(&g.dtype).map(|o| o.1).unwrap_or(0);
        if have < need {
            let len = need.next_power_of_two();
            let bytes: Vec<u8> = match g.dtype {
                DType::F32 => (0..len).flat_map(|_| 1f32.to_le_bytes()).collect(),
                DType::BF16 => (0..len)
                    .flat_map(|_| half::bf16::ONE.to_le_bytes())
                    .collect(),
                DType::F16 => (0..len)
                    .flat_map(|_| half::f16::ONE.to_le_bytes())
                    .collect(),
            };
            let buf = dev
                .stream()
                .clone_htod(&bytes)
                .map_err(|e| cuda_err("ones buffer", e))?;
            c.ones.insert(g.dtype, (buf, len));
        }
        let ones_ptr = {
            use cudarc::driver::DevicePtr;
            c.ones[&g.dtype].0.device_ptr(dev.stream()).0
        };
        let one: f32 = 1.0;
        // SAFETY: bias [N] and ones [>= M] are live device buffers; C as above.
        unsafe {
            cublas_classic::gemm_strided_batched_ex(
                c.handle,
                Op::CUBLAS_OP_N,
                Op::CUBLAS_OP_N,
                g.n as i32,
                g.m as i32,
                1,
                &alpha as *const f32 as *const c_void,
                bias as *const c_void,
                dt,
                g.n as i32,
                0,
                ones_ptr as *const c_void,
                dt,
                1,
                0,
                &one as *const f32 as *const c_void,
                g.c as *mut c_void,
                cdt,
                g.ldc as i32,
                sc as i64,
                g.batch as i32,
                compute,
                algo,
            )
        }
        .map_err(|e| cerr("bias gemm", e))
    }
}

/// C[rows, N] (row stride ldc) (+)= A[rows, K] (row stride lda) · W[N, K]^T (+ bias): the building
/// block of linear, 1x1 / im2col convolutions and the temporal convolution taps.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    dev: &CudaDevice,
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    w: u64,
    c: u64,
    ldc: usize,
    bias: Option<(u64, DType)>,
    beta: f32,
) -> Result<()> {
    gemm_rows_to(dev, dtype, dtype, rows, n, k, a, lda, w, c, ldc, bias, beta)
}

/// [`gemm_rows`] with C of dtype `c_dtype` (`dtype`, or F32 to keep unrounded fp32 partial sums).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows_to(
    dev: &CudaDevice,
    dtype: DType,
    c_dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    w: u64,
    c: u64,
    ldc: usize,
    bias: Option<(u64, DType)>,
    beta: f32,
) -> Result<()> {
    dev.blas()?.run(
        dev,
        &Gemm {
            dtype,
            c_dtype,
            m: rows,
            n,
            k,
            a,
            lda,
            b: w,
            ldb: k,
            trans_b: true,
            c,
            c_src: c,
            ldc,
            bias,
            beta,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        },
    )
}
