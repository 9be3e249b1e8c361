//! GroupNorm / LayerNorm / softmax launchers for `cuda/kernels/norm.cu` (see `docs/kernels.md`).
//!
//! Inputs are validated by `crate::ops` (shapes, one CUDA device, dtypes) and are contiguous.
//! Mixed dtypes are fused (no conversion passes): x may be the f32 residual stream normalised
//! straight into a bf16/f16 output (`out`), and gamma/beta are read as fp32 by every kernel (f32
//! parameters directly; bf16/f16 ones are widened once here, C elements).
//! All statistics are fp32 whatever the storage dtype (f32, bf16, f16):
//! * `group_norm_stats` returns an **f32** tensor [N, G, 3] = (count, mean, M2) (counts reach 1.6M,
//!   not representable in bf16).
//! * `group_norm_apply` accepts stats [N, G, 2] in f32 or in x's dtype.
//! * `group_norm` = partial moments (pass 1, many blocks per (n)) + per-group Chan merge + apply.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{storage, CudaStorage, Keep};
use super::epilogue::convert;
use super::launch::{dtype_suffix, i32_arg, launch, vec_width, vec_width_mixed};
use crate::ops::GroupNormParams;
use crate::{DType, Error, Result, Tensor};

const MODULE: &str = "norm";

/// The (input, output) dtype pairs the norm kernels are instantiated for: same dtype, or an f32 x
/// written as bf16/f16.
fn fused_pair(x: DType, out: DType) -> bool {
    x == out || x == DType::F32
}

/// gamma/beta as fp32 on the device: (address, the widened copy to keep alive until the launch is
/// queued). f32 tensors are used as they are; bf16/f16 ones are widened (C elements, exact).
fn f32_param(t: &Tensor, op: &'static str) -> Result<(u64, Keep)> {
    let s = storage(t, op)?;
    if s.dtype() == DType::F32 {
        return Ok((s.ptr(), Keep::Held(s)));
    }
    let w = convert(&s, DType::F32)?;
    Ok((w.ptr(), Keep::Copy(w)))
}

/// x must be [N, S, C] with C divisible by `groups` (re-checked here: the kernels rely on it).
fn check_x(x: &Tensor, groups: usize, op: &'static str) -> Result<()> {
    if x.rank() != 3 || x.dim(2).checked_rem(groups) != Some(0) {
        return Err(Error::shape(
            op,
            format!(
                "x {:?} is not [N, S, C] with C divisible by {groups} groups",
                x.shape()
            ),
        ));
    }
    Ok(())
}

/// Per-(n, chunk, column vector) partial moments + per-group merge into `out` (f32):
/// mode 0 -> [N, G, 3] (count, mean, M2); mode 1 -> [N, G, 2] (mean, biased var).
fn moments(x: &Tensor, groups: usize, mode: i32, op: &'static str) -> Result<CudaStorage> {
    check_x(x, groups, op)?;
    let xs = storage(x, op)?;
    let dev = xs.dev();
    let (n, s, c) = (x.dim(0), x.dim(1), x.dim(2));
    let cg = c / groups;
    let per = if mode == 0 { 3 } else { 2 };
    let out = dev.alloc(DType::F32, n * groups * per)?;
    if n * groups == 0 {
        return Ok(out);
    }
    if n > 65535 || groups > 65535 {
        return Err(Error::shape(
            op,
            format!("N = {n} / G = {groups} exceed the grid limit 65535"),
        ));
    }
    let v = vec_width(x.dtype(), cg, &[xs.ptr()]);
    let nvec = c / v;
    let bdx = nvec.min(512);
    let bdy = (512 / bdx).clamp(1, 8);
    // ~1024 blocks in total, each thread getting >= 2 rows of its chunk.
    let max_chunks = s.div_ceil(bdy * 2).max(1);
    let want = 1024usize.div_ceil(n).clamp(1, max_chunks);
    let rows_per_chunk = s.div_ceil(want).max(1);
    let nchunks = s.div_ceil(rows_per_chunk).max(1);
    let part = dev.alloc(DType::F32, n * nchunks * nvec * 3)?;
    let name = format!("gn_partial_{}_v{v}", dtype_suffix(x.dtype()));
    let f = dev.func(MODULE, &name)?;
    let (s_i, c_i, rpc) = (
        i32_arg(op, "S", s)?,
        i32_arg(op, "C", c)?,
        i32_arg(op, "rows per chunk", rows_per_chunk)?,
    );
    let (xp, pp) = (xs.ptr(), part.ptr());
    let cfg = LaunchConfig {
        grid_dim: (nchunks as u32, n as u32, 1),
        block_dim: (bdx as u32, bdy as u32, 1),
        shared_mem_bytes: (bdx * bdy * 3 * 4) as u32,
    };
    // SAFETY: gn_partial_<dt>_v<v>(x, part, S, C, rows per chunk): x holds N*S*C elements
    // (ops-validated [N, S, C]), v divides C/G and x is aligned to v elements (vec_width); part
    // holds N*nchunks*(C/v)*3 f32; the shared memory is bdx*bdy*3 floats as the kernel's contract
    // requires.
    unsafe {
        launch(dev, &f, cfg, &name, |b| {
            b.arg(&xp).arg(&pp).arg(&s_i).arg(&c_i).arg(&rpc);
        })
    }?;
    let f = dev.func(MODULE, "gn_finalize")?;
    let (nch, nv, vpg) = (nchunks as i32, nvec as i32, (cg / v) as i32);
    let op_ = out.ptr();
    let cfg = LaunchConfig {
        grid_dim: (groups as u32, n as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: gn_finalize(part, out, nchunks, nvec, vectors per group, mode): part holds
    // N*nchunks*nvec*3 f32 written by gn_partial above, out N*G*(3 or 2) f32 for the mode; grid (G,
    // N) as the kernel expects.
    unsafe {
        launch(dev, &f, cfg, "gn_finalize", |b| {
            b.arg(&pp).arg(&op_).arg(&nch).arg(&nv).arg(&vpg).arg(&mode);
        })
    }?;
    drop(part); // stream-ordered free after the kernels that use it
    Ok(out)
}

/// x [N, S, C] -> f32 [N, G, 3] = (count, mean, M2) per (n, group).
pub(crate) fn group_norm_stats(x: &Tensor, groups: usize) -> Result<Tensor> {
    const OP: &str = "group_norm_stats";
    let out = moments(x, groups, 0, OP)?;
    Ok(out.into_tensor(&[x.dim(0), groups, 3]))
}

/// Apply with stats [N, G, 2] (f32 or x's dtype) of `groups` = stats.dim(1) groups, writing `p.out`
/// (x's dtype, or bf16/f16 from an f32 x); gamma/beta f32 or any dtype (widened once).
fn apply(
    x: &Tensor,
    stats: &CudaStorage,
    groups: usize,
    p: &GroupNormParams,
    op: &'static str,
) -> Result<Tensor> {
    let GroupNormParams {
        gamma,
        beta,
        eps,
        silu,
        out: out_dt,
    } = *p;
    check_x(x, groups, op)?;
    let (n, s, c) = (x.dim(0), x.dim(1), x.dim(2));
    if gamma.shape() != [c] || beta.shape() != [c] || stats.len() != n * groups * 2 {
        return Err(Error::shape(
            op,
            format!(
                "x {:?}: gamma {:?}, beta {:?} must be [{c}], stats [{n}, {groups}, 2]",
                x.shape(),
                gamma.shape(),
                beta.shape()
            ),
        ));
    }
    if !fused_pair(x.dtype(), out_dt) {
        return Err(Error::dtype(
            op,
            format!("no kernel writes {out_dt:?} from {:?} x", x.dtype()),
        ));
    }
    let xs = storage(x, op)?;
    let dev = xs.dev();
    let out = dev.alloc(out_dt, x.elem_count())?;
    if x.elem_count() == 0 {
        return Ok(out.into_tensor(x.shape()));
    }
    let sdt = stats.dtype();
    if sdt != DType::F32 && sdt != x.dtype() {
        return Err(Error::dtype(
            op,
            format!("stats dtype {sdt:?} must be F32 or {:?}", x.dtype()),
        ));
    }
    if n > 65535 {
        return Err(Error::shape(
            op,
            format!("N = {n} exceeds the grid limit 65535"),
        ));
    }
    if s * c > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("S*C = {} exceeds 2^31 - 1", s * c),
        ));
    }
    if c * 8 > 48 * 1024 {
        return Err(Error::shape(
            op,
            format!("C = {c} too large for the apply kernel (<= 6144)"),
        ));
    }
    let (gp, g_keep) = f32_param(gamma, op)?;
    let (bp, b_keep) = f32_param(beta, op)?;
    // gamma/beta are staged through shared memory element by element: no alignment needed.
    let v = vec_width_mixed(c, &[(xs.ptr(), x.dtype()), (out.ptr(), out_dt)]);
    let name = format!(
        "gn_apply_{}_{}_s{}_v{v}",
        dtype_suffix(x.dtype()),
        dtype_suffix(out_dt),
        dtype_suffix(sdt)
    );
    let f = dev.func(MODULE, &name)?;
    let per_n = s * c / v;
    let bx = per_n.div_ceil(256 * 8).clamp(1, 65535);
    let cfg = LaunchConfig {
        grid_dim: (bx as u32, n as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (2 * c * 4) as u32,
    };
    let (s_i, c_i, g_i) = (
        i32_arg(op, "S", s)?,
        i32_arg(op, "C", c)?,
        i32_arg(op, "G", groups)?,
    );
    let silu_i = silu as i32;
    let (xp, sp, yp) = (xs.ptr(), stats.ptr(), out.ptr());
    // SAFETY: gn_apply_<x>_<y>_s<stats>_v<v>(x, stats, gamma, beta, y, S, C, G, eps, silu): x and y
    // hold N*S*C elements of their dtypes, aligned to v elements (vec_width_mixed); stats N*G*2 of
    // its dtype, gamma/beta C f32 (widened copies kept alive until after the launch); shared memory
    // 2*C floats (C <= 6144 checked).
    unsafe {
        launch(dev, &f, cfg, &name, |b| {
            b.arg(&xp)
                .arg(&sp)
                .arg(&gp)
                .arg(&bp)
                .arg(&yp)
                .arg(&s_i)
                .arg(&c_i)
                .arg(&g_i)
                .arg(&eps)
                .arg(&silu_i);
        })
    }?;
    drop((g_keep, b_keep)); // stream-ordered free after the kernel
    Ok(out.into_tensor(x.shape()))
}

/// Normalise x [N, S, C] with stats [N, G, 2] = (mean, biased var), f32 or x's dtype; output `out`
/// (x's dtype, or bf16/f16 from an f32 x).
pub(crate) fn group_norm_apply(x: &Tensor, stats: &Tensor, p: &GroupNormParams) -> Result<Tensor> {
    const OP: &str = "group_norm_apply";
    if stats.rank() != 3 || stats.dim(2) != 2 {
        return Err(Error::shape(
            OP,
            format!("stats {:?} is not [N, G, 2]", stats.shape()),
        ));
    }
    let ss = storage(stats, OP)?;
    apply(x, &ss, stats.dim(1), p, OP)
}

/// GroupNorm of x [N, S, C] (+ SiLU) written as `p.out`: stats kernel, merge kernel, apply kernel.
pub(crate) fn group_norm(x: &Tensor, groups: usize, p: &GroupNormParams) -> Result<Tensor> {
    const OP: &str = "group_norm";
    if x.elem_count() == 0 {
        return Ok(storage(x, OP)?
            .dev()
            .alloc(p.out, 0)?
            .into_tensor(x.shape()));
    }
    let mv = moments(x, groups, 1, OP)?;
    apply(x, &mv, groups, p, OP)
}

/// Row kernels (one warp per row of the last dim): `layer_norm_*` and `softmax_*`.
fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(4) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// LayerNorm over the last dim (fp32 two-pass statistics per row), written as `out_dt` (x's dtype,
/// or bf16/f16 from an f32 x); gamma/beta read as fp32.
pub(crate) fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    out_dt: DType,
) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let c = *x
        .shape()
        .last()
        .ok_or_else(|| Error::shape(OP, "scalar input"))?;
    if gamma.shape() != [c] || beta.shape() != [c] {
        return Err(Error::shape(
            OP,
            format!(
                "gamma {:?} / beta {:?} for x {:?}",
                gamma.shape(),
                beta.shape(),
                x.shape()
            ),
        ));
    }
    if !fused_pair(x.dtype(), out_dt) {
        return Err(Error::dtype(
            OP,
            format!("no kernel writes {out_dt:?} from {:?} x", x.dtype()),
        ));
    }
    let xs = storage(x, OP)?;
    let dev = xs.dev();
    let out = dev.alloc(out_dt, x.elem_count())?;
    if x.elem_count() == 0 {
        return Ok(out.into_tensor(x.shape()));
    }
    let rows = x.elem_count() / c;
    if rows.div_ceil(4) > i32::MAX as usize {
        return Err(Error::shape(
            OP,
            format!("{rows} rows exceed the grid limit"),
        ));
    }
    let (gp, g_keep) = f32_param(gamma, OP)?;
    let (bp, b_keep) = f32_param(beta, OP)?;
    // The kernel reads gamma/beta in pieces of min(VEC, 4) floats: align them like 4-byte data of
    // at most 4 elements per piece (an 8-wide bf16 vector reads them as two 16-byte pieces).
    let v = vec_width_mixed(c, &[(xs.ptr(), x.dtype()), (out.ptr(), out_dt)]);
    let piece = v.min(4) * 4;
    let v = if gp % piece as u64 == 0 && bp % piece as u64 == 0 {
        v
    } else {
        1
    };
    let name = format!(
        "layer_norm_{}_{}_v{v}",
        dtype_suffix(x.dtype()),
        dtype_suffix(out_dt)
    );
    let f = dev.func(MODULE, &name)?;
    let (r_i, c_i) = (i32_arg(OP, "rows", rows)?, i32_arg(OP, "C", c)?);
    let (xp, yp) = (xs.ptr(), out.ptr());
    // SAFETY: layer_norm_<x>_<y>_v<v>(x, gamma, beta, y, rows, C, eps): x and y hold rows*C
    // elements aligned to v elements of their dtypes, gamma/beta C f32 aligned to the kernel's
    // parameter pieces (checked above); one warp per row, 4 rows per 128-thread block (rows_cfg).
    unsafe {
        launch(dev, &f, rows_cfg(rows), &name, |b| {
            b.arg(&xp)
                .arg(&gp)
                .arg(&bp)
                .arg(&yp)
                .arg(&r_i)
                .arg(&c_i)
                .arg(&eps);
        })
    }?;
    drop((g_keep, b_keep)); // stream-ordered free after the kernel
    Ok(out.into_tensor(x.shape()))
}

/// Softmax over the last dim (a row of all -inf gives zeros, like the CPU reference).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax";
    let xs = storage(x, OP)?;
    let dev = xs.dev();
    let c = if x.rank() == 0 {
        1
    } else {
        x.dim(x.rank() - 1)
    };
    let out = dev.alloc(x.dtype(), x.elem_count())?;
    if x.elem_count() == 0 {
        return Ok(out.into_tensor(x.shape()));
    }
    let rows = x.elem_count() / c;
    if rows.div_ceil(4) > i32::MAX as usize {
        return Err(Error::shape(
            OP,
            format!("{rows} rows exceed the grid limit"),
        ));
    }
    let v = vec_width(x.dtype(), c, &[xs.ptr(), out.ptr()]);
    let name = format!("softmax_{}_v{v}", dtype_suffix(x.dtype()));
    let f = dev.func(MODULE, &name)?;
    let (r_i, c_i) = (i32_arg(OP, "rows", rows)?, i32_arg(OP, "C", c)?);
    let (xp, yp) = (xs.ptr(), out.ptr());
    // SAFETY: softmax_<dt>_v<v>(x, y, rows, C): x and y hold rows*C elements aligned to v elements
    // (vec_width); one warp per row, 4 rows per 128-thread block (rows_cfg).
    unsafe {
        launch(dev, &f, rows_cfg(rows), &name, |b| {
            b.arg(&xp).arg(&yp).arg(&r_i).arg(&c_i);
        })
    }?;
    Ok(out.into_tensor(x.shape()))
}
