//! Communication between ranks (logical: several ranks may share one device or one CPU pool).
//!
//! The Video-Infinity exchange needs: neighbour halos (left/right), an all-gather of global tokens,
//! an all-reduce (optional GroupNorm sync), gather to rank 0 (frames), and a barrier.
//! Every call on every rank returns an error within the configured timeout once any rank has failed
//! or aborted: never a hang. (Implementation in progress: `InProcess` below.)

use crate::{Result, Tensor};

/// What a rank can ask of the group. Tensors are exchanged whole; shapes may differ between ranks
/// where noted.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Send `to_left` to rank-1 and `to_right` to rank+1 (None at the video's ends); returns
    /// (what rank-1 sent right, what rank+1 sent left), None at the ends.
    fn exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
    /// Every rank's tensor, in rank order (shapes may differ in the first dim).
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// Elementwise sum over ranks (all shapes equal).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank 0 gets every rank's tensor in rank order; other ranks get None.
    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>>;
    fn barrier(&self) -> Result<()>;
    /// Mark this rank failed: every pending and future call on every rank returns an error.
    fn abort(&self, reason: &str);
}
