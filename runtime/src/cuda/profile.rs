//! Optional per-op-kind GPU timing (`VI_PROFILE=1`, or [`set_enabled`]): every backend op records
//! a CUDA event before and after its work on the device stream (`timing.rs`); [`take_report`]
//! synchronises and sums the elapsed times per kind.

use super::device::{device, storage};
pub use super::timing::ProfileRow;
use super::timing::Scope;
use crate::{Result, Tensor};

/// Start timing an op of `kind` on the device of `t` (None when profiling is off).
pub(crate) fn scope(t: &Tensor, kind: &'static str) -> Result<Option<Scope>> {
    let dev = storage(t, kind)?.dev().clone();
    dev.profiler.scope(dev.ctx(), dev.stream(), kind)
}

/// Turn profiling on or off for device `ordinal` (overrides `VI_PROFILE`).
pub fn set_enabled(ordinal: usize, on: bool) -> Result<()> {
    device(ordinal)?.profiler.set_enabled(on);
    Ok(())
}

/// Synchronise device `ordinal`, return the time per op kind recorded since the last call (sorted by
/// time, largest first) and clear the record.
pub fn take_report(ordinal: usize) -> Result<Vec<ProfileRow>> {
    let dev = device(ordinal)?;
    dev.synchronize()?;
    dev.profiler.report()
}
