//! Attention launchers for `cuda/kernels/attention.cu` and `cuda/kernels/dual_scope.cu`
//! (see `docs/kernels.md`). Layout [B, S, heads, head_dim], read in place (row stride heads*head_dim).
//!
//! Kernel choice ([`attn_kernel`]: the `VI_ATTN_KERNEL` knob, read once, or [`set_attn_kernel`]):
//! * fast path: bf16/f16 storage, head_dim (= value dim) in {32, 64, 128}, 16-byte aligned buffers:
//!   `attn_flash_*` (tensor cores, online softmax; bias and causal supported), `attn_small_*` (the
//!   same engine, one warp per 16 queries, for Sk <= 64 and Sq <= 128), `attn_wide_*` (head dim 256
//!   or 512, e.g. the VAE mid-block: value dim in chunks of 128) and `dual_mma_*`;
//! * otherwise, or with `VI_ATTN_KERNEL=simple`: the straightforward fp32
//!   kernels `attn_generic_*` (any D and value dim) and `dual_generic_*` (D <= 128).
//!   `VI_ATTN_KERNEL=flash` uses the flash kernel also for short sequences, `VI_ATTN_KERNEL=flash4`
//!   the 4-warp flash variant (64 queries per block), for comparisons.

use std::sync::atomic::{AtomicU8, Ordering};

use cudarc::driver::{sys::CUfunction_attribute, LaunchConfig, PushKernelArg};

use super::device::{cuda_err, storage};
use super::launch::{dtype_suffix, i32_arg, launch, vec_width};
pub use crate::knobs::AttnKernel;
use crate::ops::{attention_shape, DualScopeParams};
use crate::{DType, Error, Result, Tensor};

/// 0 = not decided (the `VI_ATTN_KERNEL` knob), else 1 + the `AttnKernel` index.
static CHOICE: AtomicU8 = AtomicU8::new(0);

const KINDS: [AttnKernel; 4] = [
    AttnKernel::Auto,
    AttnKernel::Flash,
    AttnKernel::Flash4,
    AttnKernel::Simple,
];

/// Select the attention kernels for the whole process (overrides `VI_ATTN_KERNEL`; tests and
/// benchmarks compare the kernel families within one process).
pub fn set_attn_kernel(k: AttnKernel) {
    let i = KINDS
        .iter()
        .position(|&x| x == k)
        .expect("every kind listed");
    CHOICE.store(1 + i as u8, Ordering::Relaxed);
}

/// The selected attention kernels (`VI_ATTN_KERNEL`, read once, unless [`set_attn_kernel`] was
/// called).
pub fn attn_kernel() -> AttnKernel {
    match CHOICE.load(Ordering::Relaxed) {
        0 => crate::knobs::get().attn_kernel,
        i => KINDS[i as usize - 1],
    }
}

/// Shared memory a block may use without opting in.
const SMEM_DEFAULT: usize = 48 * 1024;

fn fast_dtype(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16)
}

/// q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv] -> [B, Sq, H, Dv];
/// logits = q·k * scale (+ bias[Sq, Sk]) (causal: key j > query i masked).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    bias: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor> {
    const OP: &str = "attention";
    // Re-checked here (also done by `crate::ops`): the kernels index with these dims unchecked.
    let dims_ok = [q, k, v].iter().all(|t| t.rank() == 4)
        && k.dim(0) == q.dim(0)
        && v.dim(0) == q.dim(0)
        && k.dim(2) == q.dim(2)
        && v.dim(2) == q.dim(2)
        && k.dim(3) == q.dim(3)
        && v.dim(1) == k.dim(1)
        && match bias {
            Some(b) => b.shape() == [q.dim(1), k.dim(1)],
            None => true,
        }
        && (!causal || q.dim(1) == k.dim(1));
    let dtype_ok = [k, v]
        .iter()
        .chain(bias.iter())
        .all(|t| t.dtype() == q.dtype());
    if !dims_ok || !dtype_ok {
        let msg = format!(
            "q {:?} k {:?} v {:?} bias {:?} causal {causal} (dtypes {:?} {:?} {:?})",
            q.shape(),
            k.shape(),
            v.shape(),
            bias.map(|b| b.shape().to_vec()),
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
        return Err(if dims_ok {
            Error::dtype(OP, msg)
        } else {
            Error::shape(OP, msg)
        });
    }
    let (qs, ks, vs) = (storage(q, OP)?, storage(k, OP)?, storage(v, OP)?);
    let bsv = bias.map(|b| storage(b, OP)).transpose()?;
    let dev = qs.dev();
    let (b, sq, h, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (sk, dv) = (k.dim(1), v.dim(3));
    let dt = q.dtype();
    let out = dev.alloc(dt, b * sq * h * dv)?;
    let oshape = attention_shape(q, v);
    if out.is_empty() {
        return Ok(out.into_tensor(&oshape));
    }
    let (qp, kp, vp, op) = (qs.ptr(), ks.ptr(), vs.ptr(), out.ptr());
    let bp: u64 = bsv.map_or(0, |s| s.ptr()); // null pointer = no bias
    let causal_i = causal as i32;
    let (sq_i, sk_i, h_i) = (
        i32_arg(OP, "Sq", sq)?,
        i32_arg(OP, "Sk", sk)?,
        i32_arg(OP, "heads", h)?,
    );
    let aligned = [qp, kp, vp, op].iter().all(|p| p % 16 == 0);
    let choice = attn_kernel();
    // Wide heads (VAE mid-block: 1 head of 512): value dim in chunks of 128, scores on tensor cores.
    let wide = choice != AttnKernel::Simple
        && fast_dtype(dt)
        && d == dv
        && matches!(d, 256 | 512)
        && aligned
        && b <= 65535
        && h * (d / 128) <= 65535;
    let fast = choice != AttnKernel::Simple
        && fast_dtype(dt)
        && d == dv
        && matches!(d, 32 | 64 | 128)
        && aligned
        && b <= 65535
        && h <= 65535;
    // Short key sequences (temporal attention over frames: Sq = Sk = 16 with b = B*H*W rows): one
    // independent warp per (b, h, 16 queries) instead of 128-query blocks that would mostly idle.
    let small = fast && choice == AttnKernel::Auto && sk <= 64 && sq <= 128;
    if wide {
        const WARPS: usize = 2;
        let name = format!("attn_wide_{}_d{d}_w{WARPS}", dtype_suffix(dt));
        let f = dev.func("attention", &name)?;
        // Q tile and 32 full-width keys (pitch d + 8) + a 32 x 128 value chunk (pitch 136).
        let smem = ((16 * WARPS + 32) * (d + 8) + 32 * 136) * dt.size_in_bytes();
        if smem > SMEM_DEFAULT {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| cuda_err(&format!("{name}: shared memory opt-in {smem} B"), e))?;
        }
        let cfg = LaunchConfig {
            grid_dim: (
                sq.div_ceil(16 * WARPS) as u32,
                (h * (d / 128)) as u32,
                b as u32,
            ),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        // SAFETY: attn_wide_*(q, k, v, bias, out, Sq, Sk, H, scale_log2, causal): q/k/v/out are [B,
        // S, H, D] buffers of dt (D = Dv in {256, 512}, all 16-byte aligned, checked), bias null or
        // [Sq, Sk] of dt (ops-validated); grid (Sq/32, H*D/128, B) and the opted-in dynamic shared
        // memory are those the kernel's contract states.
        unsafe {
            launch(dev, &f, cfg, &name, |a| {
                a.arg(&qp)
                    .arg(&kp)
                    .arg(&vp)
                    .arg(&bp)
                    .arg(&op)
                    .arg(&sq_i)
                    .arg(&sk_i)
                    .arg(&h_i)
                    .arg(&scale_log2)
                    .arg(&causal_i);
            })
        }?;
    } else if small {
        let nk16 = sk.div_ceil(16) * 16;
        let per_warp = (16 + 2 * nk16) * (d + 8) * dt.size_in_bytes();
        let wpb = [4usize, 2, 1]
            .into_iter()
            .find(|&w| w * per_warp <= SMEM_DEFAULT)
            .unwrap_or(1);
        let tasks = b * h * sq.div_ceil(16);
        let blocks = tasks.div_ceil(wpb);
        if blocks > i32::MAX as usize {
            return Err(Error::shape(OP, format!("q {:?} too large", q.shape())));
        }
        let name = format!("attn_small_{}_d{d}", dtype_suffix(dt));
        let f = dev.func("attention", &name)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (32 * wpb as u32, 1, 1),
            shared_mem_bytes: (wpb * per_warp) as u32,
        };
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let b_i = i32_arg(OP, "B", b)?;
        // SAFETY: attn_small_*(q, k, v, bias, out, B, Sq, Sk, H, scale_log2, causal): buffers as
        // for the flash kernel (D in {32, 64, 128}, 16-byte aligned, checked); wpb warps per block
        // with wpb * per_warp bytes of shared memory (<= 48 KiB), one warp per (b, h, 16 queries),
        // blocks cover every task.
        unsafe {
            launch(dev, &f, cfg, &name, |a| {
                a.arg(&qp)
                    .arg(&kp)
                    .arg(&vp)
                    .arg(&bp)
                    .arg(&op)
                    .arg(&b_i)
                    .arg(&sq_i)
                    .arg(&sk_i)
                    .arg(&h_i)
                    .arg(&scale_log2)
                    .arg(&causal_i);
            })
        }?;
    } else if fast {
        let warps = if choice == AttnKernel::Flash4 || d == 128 {
            4
        } else {
            8
        };
        let bm = 16 * warps;
        let name = format!("attn_flash_{}_d{d}_w{warps}", dtype_suffix(dt));
        let f = dev.func("attention", &name)?;
        // Q tile + double-buffered 64-key K and V tiles, rows padded to d + 8 elements.
        let smem = (bm + 4 * 64) * (d + 8) * dt.size_in_bytes();
        if smem > SMEM_DEFAULT {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| cuda_err(&format!("{name}: shared memory opt-in {smem} B"), e))?;
        }
        let cfg = LaunchConfig {
            grid_dim: (sq.div_ceil(bm) as u32, h as u32, b as u32),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        // SAFETY: attn_flash_*_w<warps>(q, k, v, bias, out, Sq, Sk, H, scale_log2, causal):
        // q/k/v/out [B, S, H, D] of dt with D in {32, 64, 128}, 16-byte aligned (checked), bias
        // null or [Sq, Sk]; grid (Sq/(16*warps), H, B), block 32*warps threads and the (opted-in)
        // shared memory of the Q tile and double-buffered K/V tiles as the kernel expects.
        unsafe {
            launch(dev, &f, cfg, &name, |a| {
                a.arg(&qp)
                    .arg(&kp)
                    .arg(&vp)
                    .arg(&bp)
                    .arg(&op)
                    .arg(&sq_i)
                    .arg(&sk_i)
                    .arg(&h_i)
                    .arg(&scale_log2)
                    .arg(&causal_i);
            })
        }?;
    } else {
        // 16-byte loads of the key rows when the head dim and the buffer allow it.
        let kv = match vec_width(dt, d, &[kp]) {
            w if w * dt.size_in_bytes() == 16 => w,
            _ => 1,
        };
        let name = format!("attn_generic_{}_l4_k{kv}", dtype_suffix(dt));
        let f = dev.func("attention", &name)?;
        let warps = b * sq * h;
        let blocks = warps.div_ceil(4);
        if blocks > i32::MAX as usize || d * 16 > SMEM_DEFAULT {
            return Err(Error::shape(
                OP,
                format!("q {:?} too large for the generic kernel", q.shape()),
            ));
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (4 * d * 4) as u32,
        };
        let (b_i, d_i, dv_i) = (
            i32_arg(OP, "B", b)?,
            i32_arg(OP, "D", d)?,
            i32_arg(OP, "Dv", dv)?,
        );
        // SAFETY: attn_generic_*_k<kv>(q, k, v, bias, out, B, Sq, Sk, H, D, Dv, scale, causal): q/k
        // [B, S, H, D], v/out [B, S, H, Dv] of dt (ops-validated), bias null or [Sq, Sk]; key rows
        // aligned to kv elements (vec_width); 4 warps per block, 4*D floats of shared memory (D*16
        // <= 48 KiB checked).
        unsafe {
            launch(dev, &f, cfg, &name, |a| {
                a.arg(&qp)
                    .arg(&kp)
                    .arg(&vp)
                    .arg(&bp)
                    .arg(&op)
                    .arg(&b_i)
                    .arg(&sq_i)
                    .arg(&sk_i)
                    .arg(&h_i)
                    .arg(&d_i)
                    .arg(&dv_i)
                    .arg(&scale)
                    .arg(&causal_i);
            })
        }?;
    }
    Ok(out.into_tensor(&oshape))
}

/// q [b, n, H, D]; k_local/v_local [b, n + 2p, H, D]; k_glob/v_glob [b, G, H, D] -> [b, n, H, D].
pub(crate) fn dual_scope_attention(
    q: &Tensor,
    k_local: &Tensor,
    v_local: &Tensor,
    k_glob: &Tensor,
    v_glob: &Tensor,
    p: &DualScopeParams,
) -> Result<Tensor> {
    const OP: &str = "dual_scope_attention";
    // Re-checked here (also done by `crate::ops`): the kernels index with these dims unchecked.
    let ok = q.rank() == 4 && k_glob.rank() == 4 && {
        let loc = [q.dim(0), q.dim(1) + 2 * p.pad, q.dim(2), q.dim(3)];
        let glob = [q.dim(0), k_glob.dim(1), q.dim(2), q.dim(3)];
        k_local.shape() == loc
            && v_local.shape() == loc
            && k_glob.shape() == glob
            && v_glob.shape() == glob
            && [k_local, v_local, k_glob, v_glob]
                .iter()
                .all(|t| t.dtype() == q.dtype())
    };
    if !ok {
        return Err(Error::shape(
            OP,
            format!(
                "q {:?} k_local {:?} v_local {:?} k_glob {:?} v_glob {:?} pad {}",
                q.shape(),
                k_local.shape(),
                v_local.shape(),
                k_glob.shape(),
                v_glob.shape(),
                p.pad
            ),
        ));
    }
    let qs = storage(q, OP)?;
    let (kls, vls) = (storage(k_local, OP)?, storage(v_local, OP)?);
    let (kgs, vgs) = (storage(k_glob, OP)?, storage(v_glob, OP)?);
    let dev = qs.dev();
    let (nb, n, h, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let g = k_glob.dim(1);
    let dt = q.dtype();
    let out = dev.alloc(dt, q.elem_count())?;
    if out.is_empty() {
        return Ok(out.into_tensor(q.shape()));
    }
    // Number of visible keys per query row: 2p + 1 local + G global.
    let nvis = 2 * p.pad + 1 + g;
    let scale = if p.token_num_scale {
        p.scale * ((nvis as f32).ln() / 16f32.ln())
    } else {
        p.scale
    };
    // A zero-size k_glob may have no device allocation: pass the (valid) q pointer instead; G = 0
    // means it is never read.
    let (qp, klp, vlp, op) = (qs.ptr(), kls.ptr(), vls.ptr(), out.ptr());
    let (kgp, vgp) = if g == 0 {
        (qp, qp)
    } else {
        (kgs.ptr(), vgs.ptr())
    };
    let (nb_i, n_i, h_i, pad_i, g_i) = (
        i32_arg(OP, "b", nb)?,
        i32_arg(OP, "n", n)?,
        i32_arg(OP, "heads", h)?,
        i32_arg(OP, "pad", p.pad)?,
        i32_arg(OP, "G", g)?,
    );
    let aligned = [qp, klp, vlp, kgp, vgp, op].iter().all(|x| x % 16 == 0);
    // Keys staged per warp (padded to 16): a 16-query tile sees min(16, n) + 2p local rows + G.
    let nkp = (n.min(16) + 2 * p.pad + g).div_ceil(16) * 16;
    let per_warp = (16 + 2 * nkp) * (d + 8) * dt.size_in_bytes();
    let fast = attn_kernel() != AttnKernel::Simple
        && fast_dtype(dt)
        && matches!(d, 32 | 64 | 128)
        && aligned
        && per_warp <= SMEM_DEFAULT;
    if fast {
        let wpb = [4usize, 2, 1]
            .into_iter()
            .find(|&w| w * per_warp <= SMEM_DEFAULT)
            .unwrap_or(1);
        let tasks = nb * h * n.div_ceil(16);
        let blocks = tasks.div_ceil(wpb);
        if blocks > i32::MAX as usize {
            return Err(Error::shape(OP, format!("q {:?} too large", q.shape())));
        }
        let name = format!("dual_mma_{}_d{d}", dtype_suffix(dt));
        let f = dev.func("dual_scope", &name)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (32 * wpb as u32, 1, 1),
            shared_mem_bytes: (wpb * per_warp) as u32,
        };
        let l2e = std::f32::consts::LOG2_E;
        let (scale_l2, lb_l2, gb_l2) = (scale * l2e, p.local_bias * l2e, p.global_bias * l2e);
        let nkp_i = nkp as i32;
        // SAFETY: dual_mma_*(q, k_local, v_local, k_glob, v_glob, out, b, n, H, pad, G, nkp, ...):
        // q/out [b, n, H, D], locals [b, n + 2p, H, D], globals [b, G, H, D] of dt (ops-validated;
        // a G = 0 global is never read), all 16-byte aligned (checked), D in {32, 64, 128}; wpb
        // warps of per_warp bytes of shared memory each (<= 48 KiB).
        unsafe {
            launch(dev, &f, cfg, &name, |a| {
                a.arg(&qp)
                    .arg(&klp)
                    .arg(&vlp)
                    .arg(&kgp)
                    .arg(&vgp)
                    .arg(&op)
                    .arg(&nb_i)
                    .arg(&n_i)
                    .arg(&h_i)
                    .arg(&pad_i)
                    .arg(&g_i)
                    .arg(&nkp_i)
                    .arg(&scale_l2)
                    .arg(&lb_l2)
                    .arg(&gb_l2);
            })
        }?;
    } else {
        if d > 128 {
            return Err(Error::shape(
                OP,
                format!("head dim {d} > 128 is not supported by the CUDA kernels"),
            ));
        }
        let name = format!("dual_generic_{}_l4", dtype_suffix(dt));
        let f = dev.func("dual_scope", &name)?;
        let blocks = (nb * n * h).div_ceil(4);
        if blocks > i32::MAX as usize {
            return Err(Error::shape(OP, format!("q {:?} too large", q.shape())));
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (4 * d * 4) as u32,
        };
        let d_i = d as i32;
        let (lb, gb) = (p.local_bias, p.global_bias);
        // SAFETY: dual_generic_*(q, k_local, v_local, k_glob, v_glob, out, b, n, H, D, pad, G,
        // ...): buffers as for dual_mma (ops-validated shapes, a G = 0 global never read), D <= 128
        // (checked); 4 warps per block, 4*D floats of shared memory.
        unsafe {
            launch(dev, &f, cfg, &name, |a| {
                a.arg(&qp)
                    .arg(&klp)
                    .arg(&vlp)
                    .arg(&kgp)
                    .arg(&vgp)
                    .arg(&op)
                    .arg(&nb_i)
                    .arg(&n_i)
                    .arg(&h_i)
                    .arg(&d_i)
                    .arg(&pad_i)
                    .arg(&g_i)
                    .arg(&scale)
                    .arg(&lb)
                    .arg(&gb);
            })
        }?;
    }
    Ok(out.into_tensor(q.shape()))
}
