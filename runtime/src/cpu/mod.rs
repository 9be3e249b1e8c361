//! The CPU reference backend: f32, multi-threaded with rayon, GEMMs through the `gemm` crate.
//! (Being filled in: every op must match a straightforward reference on random inputs.)

use crate::ops::{Backend, BinaryOp, DualScopeParams, UnaryOp};
use crate::{Error, Result, Tensor};

pub(crate) struct CpuBackend;

fn todo(op: &str) -> Error {
    Error::Msg(format!("cpu backend: {op} not implemented yet"))
}

impl Backend for CpuBackend {
    fn matmul(&self, _a: &Tensor, _b: &Tensor, _trans_b: bool) -> Result<Tensor> {
        Err(todo("matmul"))
    }
    fn linear(&self, _x: &Tensor, _w: &Tensor, _bias: Option<&Tensor>) -> Result<Tensor> {
        Err(todo("linear"))
    }
    fn conv2d(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _b: Option<&Tensor>,
        _s: usize,
        _p: usize,
    ) -> Result<Tensor> {
        Err(todo("conv2d"))
    }
    fn temporal_conv(&self, _x: &Tensor, _w: &Tensor, _b: Option<&Tensor>) -> Result<Tensor> {
        Err(todo("temporal_conv"))
    }
    fn group_norm_stats(&self, _x: &Tensor, _g: usize) -> Result<Tensor> {
        Err(todo("group_norm_stats"))
    }
    fn group_norm_apply(
        &self,
        _x: &Tensor,
        _s: &Tensor,
        _g: &Tensor,
        _b: &Tensor,
        _e: f32,
        _silu: bool,
    ) -> Result<Tensor> {
        Err(todo("group_norm_apply"))
    }
    fn group_norm(
        &self,
        _x: &Tensor,
        _g: usize,
        _gm: &Tensor,
        _b: &Tensor,
        _e: f32,
        _silu: bool,
    ) -> Result<Tensor> {
        Err(todo("group_norm"))
    }
    fn layer_norm(&self, _x: &Tensor, _g: &Tensor, _b: &Tensor, _e: f32) -> Result<Tensor> {
        Err(todo("layer_norm"))
    }
    fn softmax_last(&self, _x: &Tensor) -> Result<Tensor> {
        Err(todo("softmax"))
    }
    fn attention(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _s: f32,
        _b: Option<&Tensor>,
        _c: bool,
    ) -> Result<Tensor> {
        Err(todo("attention"))
    }
    fn dual_scope_attention(
        &self,
        _q: &Tensor,
        _kl: &Tensor,
        _vl: &Tensor,
        _kg: &Tensor,
        _vg: &Tensor,
        _p: &DualScopeParams,
    ) -> Result<Tensor> {
        Err(todo("dual_scope_attention"))
    }
    fn unary(&self, _x: &Tensor, _op: UnaryOp) -> Result<Tensor> {
        Err(todo("unary"))
    }
    fn geglu(&self, _x: &Tensor) -> Result<Tensor> {
        Err(todo("geglu"))
    }
    fn binary(&self, _a: &Tensor, _b: &Tensor, _op: BinaryOp, _s: &[usize]) -> Result<Tensor> {
        Err(todo("binary"))
    }
    fn affine(&self, _x: &Tensor, _m: f32, _a: f32) -> Result<Tensor> {
        Err(todo("affine"))
    }
    fn clamp(&self, _x: &Tensor, _lo: f32, _hi: f32) -> Result<Tensor> {
        Err(todo("clamp"))
    }
    fn concat(&self, _xs: &[&Tensor], _axis: usize) -> Result<Tensor> {
        Err(todo("concat"))
    }
    fn index_select(&self, _x: &Tensor, _axis: usize, _i: &[usize]) -> Result<Tensor> {
        Err(todo("index_select"))
    }
    fn permute(&self, _x: &Tensor, _p: &[usize]) -> Result<Tensor> {
        Err(todo("permute"))
    }
    fn upsample_nearest2x(&self, _x: &Tensor) -> Result<Tensor> {
        Err(todo("upsample"))
    }
    fn embedding(&self, _ids: &[u32], _t: &Tensor) -> Result<Tensor> {
        Err(todo("embedding"))
    }
}
