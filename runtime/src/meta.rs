//! Shape-only execution and tensor-byte accounting: the memory planner's dry run.
//!
//! * [`measure`] runs a closure with a fresh [`Accountant`] installed on the calling thread: every
//!   tensor created on that thread while it runs (any device: CPU, CUDA or meta) is charged its
//!   `elem_count * dtype size` bytes until its storage is dropped (wherever it is dropped), and the
//!   high-water mark of those live bytes is returned. Tensors that existed before the call (the
//!   model's weights) are not counted. Outside `measure` nothing is counted (one thread-local read
//!   per tensor creation).
//! * [`MetaBackend`]: the [`Backend`] of `Device::Meta`: every op returns a fresh meta tensor of the
//!   output shape and dtype the CPU/CUDA backends produce, with no data. Since the models never
//!   branch on the device, a forward pass on meta tensors allocates exactly the tensors of the real
//!   pass, in the same order, and `measure` gives its activation high-water mark without computing
//!   anything.
//! * [`Tensor::meta`] stays an uncharged placeholder (parameter tables, dry-run weights);
//!   [`tracked`] (= `Tensor::from_storage(Storage::Meta, ..)`) is a charged meta tensor.
//!
//! What the count covers: tensors only. Backend scratch that is not a tensor (CPU GEMM packing,
//! cuBLASLt/cuDNN workspaces, the CUDA pool's rounding) is not counted; the planner adds a margin
//! for it. CUDA temporaries that scale with the activations are modelled here: the f32
//! accumulator of a bf16/f16 temporal convolution with more than one tap (`cuda/conv.rs`) is
//! counted in the peak; the fp32 buffer of the GEMM f32-bias fallback, which exists only when
//! cuBLASLt refuses an epilogue, is reported apart ([`Measured::fallback`]).

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::ops::{
    attention_shape, concat_shape, geglu_shape, index_select_shape, permute_shape,
    upsample_nearest2x_shape, Backend, BinaryOp, Conv2dGeom, DualScopeParams, GroupNormParams,
    TemporalConvGeom, UnaryOp,
};
use crate::{DType, Result, Storage, Tensor};

/// Live and peak tensor bytes of one measurement.
#[derive(Debug, Default)]
pub struct Accountant {
    live: AtomicUsize,
    peak: AtomicUsize,
    /// Largest conditional backend temporary noted by the meta backend ([`Measured::fallback`]).
    fallback: AtomicUsize,
}

impl Accountant {
    /// Bytes of the tensors charged here that are still alive.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
    /// Highest value `live` reached.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
    fn add(&self, bytes: usize) {
        let now = self.live.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Accountant>>> = const { RefCell::new(None) };
}

/// The charge of one tensor storage: subtracted from its accountant when the storage is dropped.
pub(crate) struct Charge {
    acct: Arc<Accountant>,
    bytes: usize,
}

impl Charge {
    /// A charge of `bytes` on the calling thread's accountant, if one is installed.
    pub(crate) fn new(bytes: usize) -> Option<Charge> {
        CURRENT.with(|c| {
            c.borrow().as_ref().map(|a| {
                a.add(bytes);
                Charge {
                    acct: a.clone(),
                    bytes,
                }
            })
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.acct.live.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Restores the previous accountant of the thread (also on unwind).
struct Installed(Option<Arc<Accountant>>);

impl Drop for Installed {
    fn drop(&mut self) {
        let prev = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Runs `f` with a fresh accountant on this thread; returns f's result and the peak bytes of the
/// tensors created on this thread during `f` that were alive at the same time. A nested `measure`
/// charges its own tensors to its own accountant only.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let (r, m) = measure_full(f);
    (r, m.peak)
}

/// What [`measure_full`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measured {
    /// High-water mark of live tensor bytes.
    pub peak: usize,
    /// Bytes still alive when the closure returned (tensors it returned or stored elsewhere: e.g.
    /// the latents a denoising phase hands to the decoder).
    pub live_end: usize,
    /// Largest temporary a real backend allocates only on a fallback path, not counted in
    /// `peak` (meta runs only): the fp32 buffer of the CUDA GEMM's f32-bias fallback (when
    /// cuBLASLt refuses a bf16/f16 GEMM with an f32 bias epilogue, `cuda/gemm.rs`): one op's
    /// output in f32, freed when the op ends.
    pub fallback: usize,
}

/// [`measure`] with the bytes alive at the end and the largest fallback temporary.
pub fn measure_full<R>(f: impl FnOnce() -> R) -> (R, Measured) {
    let acct = Arc::new(Accountant::default());
    let prev = CURRENT.with(|c| c.borrow_mut().replace(acct.clone()));
    let guard = Installed(prev);
    let r = f();
    drop(guard);
    let m = Measured {
        peak: acct.peak(),
        live_end: acct.live(),
        fallback: acct.fallback.load(Ordering::SeqCst),
    };
    (r, m)
}

/// Notes a conditional backend temporary of `bytes` (see [`Measured::fallback`]).
fn note_fallback(bytes: usize) {
    CURRENT.with(|c| {
        if let Some(a) = c.borrow().as_ref() {
            a.fallback.fetch_max(bytes, Ordering::SeqCst);
        }
    });
}

/// A GEMM writing `out_elems` elements of `x`'s dtype with `bias`: on CUDA, a bf16/f16 output with
/// an f32 bias may take the fp32-buffer fallback.
fn gemm_bias_fallback(x: &Tensor, bias: Option<&Tensor>, out_elems: usize) {
    if let Some(b) = bias {
        if x.dtype() != DType::F32 && b.dtype() != x.dtype() {
            note_fallback(out_elems * DType::F32.size_in_bytes());
        }
    }
}

/// Live bytes of the current measurement (0 outside [`measure`]).
pub fn live_bytes() -> usize {
    CURRENT.with(|c| c.borrow().as_ref().map_or(0, |a| a.live()))
}

/// A charged meta tensor (counted by [`measure`], unlike [`Tensor::meta`]).
pub fn tracked(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_storage(Storage::Meta, shape.to_vec(), dtype, crate::Device::Meta)
}

/// Reads the inputs of a meta op as a real backend does: an offloaded input is restored (and
/// charged to the calling thread) exactly where the real op would restore it
/// ([`crate::offload`]).
pub(crate) fn touch(ts: &[&Tensor]) -> Result<()> {
    for t in ts {
        t.storage()?;
    }
    Ok(())
}

fn touch_opt(t: Option<&Tensor>) -> Result<()> {
    if let Some(t) = t {
        t.storage()?;
    }
    Ok(())
}

/// The backend of `Device::Meta` (see the module doc). Inputs are validated by `ops`; every
/// method states the output shape/dtype rule of the real backends.
pub(crate) struct MetaBackend;

impl Backend for MetaBackend {
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        touch(&[a, b])?;
        // a [batch, M, K] x b [batch_b, K, N] (or [batch_b, N, K] transposed) -> [batch, M, N].
        let n = if trans_b { b.dim(1) } else { b.dim(2) };
        Ok(tracked(&[a.dim(0), a.dim(1), n], a.dtype()))
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        touch(&[x, w])?;
        touch_opt(bias)?;
        gemm_bias_fallback(x, bias, x.dim(0) * w.dim(0));
        Ok(tracked(&[x.dim(0), w.dim(0)], x.dtype()))
    }
    fn linear_to(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: Option<&Tensor>,
        out: DType,
    ) -> Result<Tensor> {
        touch(&[x, w])?;
        touch_opt(_bias)?;
        // Written straight as `out` from the accumulator (CUDA, CPU rounded path); reached only
        // with out != x's dtype (ops::linear_to delegates the same-dtype case to linear).
        Ok(tracked(&[x.dim(0), w.dim(0)], out))
    }
    // linear_add: the trait's default (linear, then binary into the residual's dtype): the
    // unfused composition's intermediate product is counted, an upper bound of the fused backends.
    fn conv2d(
        &self,
        x: &Tensor,
        _w: &Tensor,
        bias: Option<&Tensor>,
        g: &Conv2dGeom,
    ) -> Result<Tensor> {
        touch(&[x, _w])?;
        touch_opt(bias)?;
        let shape = g.out_shape();
        // 1x1 and im2col convolutions are GEMMs with the bias in the epilogue.
        gemm_bias_fallback(x, bias, shape.iter().product());
        Ok(tracked(&shape, x.dtype()))
    }
    fn temporal_conv(
        &self,
        x: &Tensor,
        _w: &Tensor,
        bias: Option<&Tensor>,
        g: &TemporalConvGeom,
    ) -> Result<Tensor> {
        touch(&[x, _w])?;
        touch_opt(bias)?;
        let shape = g.out_shape();
        let out = tracked(&shape, x.dtype());
        // The CUDA backend accumulates the taps of a bf16/f16 temporal conv (k > 1) in an f32
        // buffer of the output's size, alive next to the output until the op returns.
        if x.dtype() != DType::F32 && g.k > 1 {
            drop(tracked(&shape, DType::F32));
        } else {
            gemm_bias_fallback(x, bias, shape.iter().product());
        }
        Ok(out)
    }
    fn group_norm_stats(&self, x: &Tensor, groups: usize) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(&[x.dim(0), groups, 3], DType::F32))
    }
    fn group_norm_apply(&self, x: &Tensor, _stats: &Tensor, p: &GroupNormParams) -> Result<Tensor> {
        touch(&[x, _stats, p.gamma, p.beta])?;
        Ok(tracked(x.shape(), p.out))
    }
    fn group_norm(&self, x: &Tensor, _groups: usize, p: &GroupNormParams) -> Result<Tensor> {
        touch(&[x, p.gamma, p.beta])?;
        Ok(tracked(x.shape(), p.out))
    }
    fn layer_norm(
        &self,
        x: &Tensor,
        _gamma: &Tensor,
        _beta: &Tensor,
        _eps: f32,
        out: DType,
    ) -> Result<Tensor> {
        touch(&[x, _gamma, _beta])?;
        Ok(tracked(x.shape(), out))
    }
    fn softmax_last(&self, x: &Tensor) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(x.shape(), x.dtype()))
    }
    fn attention(
        &self,
        q: &Tensor,
        _k: &Tensor,
        v: &Tensor,
        _scale: f32,
        _bias: Option<&Tensor>,
        _causal: bool,
    ) -> Result<Tensor> {
        touch(&[q, _k, v])?;
        touch_opt(_bias)?;
        Ok(tracked(&attention_shape(q, v), q.dtype()))
    }
    fn dual_scope_attention(
        &self,
        q: &Tensor,
        _k_local: &Tensor,
        _v_local: &Tensor,
        _k_glob: &Tensor,
        _v_glob: &Tensor,
        _p: &DualScopeParams,
    ) -> Result<Tensor> {
        touch(&[q, _k_local, _v_local, _k_glob, _v_glob])?;
        Ok(tracked(q.shape(), q.dtype()))
    }
    fn unary(&self, x: &Tensor, _op: UnaryOp) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(x.shape(), x.dtype()))
    }
    fn geglu(&self, x: &Tensor) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(&geglu_shape(x), x.dtype()))
    }
    fn binary(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _op: BinaryOp,
        out_shape: &[usize],
        out: DType,
    ) -> Result<Tensor> {
        touch(&[_a, _b])?;
        Ok(tracked(out_shape, out))
    }
    fn affine(&self, x: &Tensor, _mul: f32, _add: f32) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(x.shape(), x.dtype()))
    }
    fn clamp(&self, x: &Tensor, _lo: f32, _hi: f32) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(x.shape(), x.dtype()))
    }
    fn concat(&self, xs: &[&Tensor], axis: usize) -> Result<Tensor> {
        touch(xs)?;
        Ok(tracked(&concat_shape(xs, axis), xs[0].dtype()))
    }
    fn index_select(&self, x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(
            &index_select_shape(x, axis, indices.len()),
            x.dtype(),
        ))
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(&permute_shape(x, perm), x.dtype()))
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        touch(&[x])?;
        Ok(tracked(&upsample_nearest2x_shape(x), x.dtype()))
    }
    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        touch(&[table])?;
        Ok(tracked(&[ids.len(), table.dim(1)], table.dtype()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    #[test]
    fn measure_counts_live_tensor_bytes() {
        let ((), peak) = measure(|| {
            let a = tracked(&[10, 4], DType::F32); // 160
            let b = ops::silu(&a).unwrap(); // +160
            assert_eq!(live_bytes(), 320);
            drop(a);
            let c = b.to_dtype(DType::BF16).unwrap(); // +80
            assert_eq!(c.device(), crate::Device::Meta);
            assert_eq!(live_bytes(), 240);
            let r = c.reshape(&[40]).unwrap(); // shares storage: +0
            assert_eq!(live_bytes(), 240);
            drop((b, c, r));
            assert_eq!(live_bytes(), 0);
            // Uncharged placeholders (parameter tables) and nothing outside measure.
            let _w = Tensor::meta(&[1000], DType::F32);
            assert_eq!(live_bytes(), 0);
        });
        assert_eq!(peak, 320);
        assert_eq!(live_bytes(), 0);
        // Real CPU tensors are charged the same way.
        let (_, peak) = measure(|| Tensor::zeros(&[3, 5], crate::Device::Cpu, DType::F32));
        assert_eq!(peak, 60);
    }

    #[test]
    fn meta_ops_have_the_real_output_shapes() {
        let x = tracked(&[2, 8, 6, 4], DType::BF16);
        let w = Tensor::meta(&[16, 4, 3, 3], DType::BF16);
        let y = ops::conv2d(&x, &w, None, 2, 1).unwrap();
        assert_eq!(y.shape(), [2, 4, 3, 16]);
        assert_eq!(y.dtype(), DType::BF16);
        let s = ops::group_norm_stats(&x.reshape(&[2, 48, 4]).unwrap(), 2).unwrap();
        assert_eq!((s.shape(), s.dtype()), (&[2usize, 2, 3][..], DType::F32));
        let r = tracked(&[6, 16], DType::F32);
        let lw = Tensor::meta(&[16, 4], DType::BF16);
        let la = ops::linear_add(&tracked(&[6, 4], DType::BF16), &lw, None, &r).unwrap();
        assert_eq!((la.shape(), la.dtype()), (&[6usize, 16][..], DType::F32));
        let q = tracked(&[3, 5, 2, 8], DType::F32);
        let v = tracked(&[3, 7, 2, 4], DType::F32);
        let k = tracked(&[3, 7, 2, 8], DType::F32);
        let a = ops::attention(&q, &k, &v, 1.0, None, false).unwrap();
        assert_eq!(a.shape(), [3, 5, 2, 4]);
        let p = ops::permute(&q, &[0, 2, 1, 3]).unwrap();
        assert_eq!(p.shape(), [3, 2, 5, 8]);
        let c = ops::concat(&[&q, &q], 1).unwrap();
        assert_eq!(c.shape(), [3, 10, 2, 8]);
        assert!(c.to_vec_f32().is_err(), "a meta tensor has no data");
    }

    #[test]
    fn bf16_gemm_with_f32_bias_notes_the_fallback_buffer() {
        let x = tracked(&[6, 4], DType::BF16);
        let w = Tensor::meta(&[10, 4], DType::BF16);
        let b32 = Tensor::meta(&[10], DType::F32);
        let (_, m) = measure_full(|| ops::linear(&x, &w, Some(&b32)).unwrap());
        assert_eq!(m.peak, 6 * 10 * 2);
        assert_eq!(m.fallback, 6 * 10 * 4);
        let b16 = Tensor::meta(&[10], DType::BF16);
        let (_, m) = measure_full(|| ops::linear(&x, &w, Some(&b16)).unwrap());
        assert_eq!(m.fallback, 0);
    }

    #[test]
    fn bf16_temporal_conv_counts_the_f32_accumulator() {
        let x = tracked(&[1, 4, 2, 8], DType::BF16); // 128 bytes
        let w = Tensor::meta(&[8, 8, 3], DType::BF16);
        let (_, peak) = measure(|| ops::temporal_conv(&x, &w, None).unwrap());
        // output bf16 (128) + f32 accumulator (256) at once.
        assert_eq!(peak, 128 + 256);
    }
}
