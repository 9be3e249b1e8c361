//! Optional per-op-kind GPU timing (set `VI_PROFILE=1`): every backend op records a CUDA event before
//! and after its work on the device stream; [`take_report`] synchronises and sums the elapsed times
//! per kind. Off (the default) it costs one relaxed atomic load per op.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use super::{cuda_err, storage, CudaDevice};
use crate::{Result, Tensor};

/// Per-device list of recorded (kind, start, end) events.
pub(crate) struct Profiler {
    enabled: AtomicBool,
    events: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

impl Profiler {
    pub(crate) fn from_env() -> Profiler {
        let on = std::env::var("VI_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
        Profiler {
            enabled: AtomicBool::new(on),
            events: Mutex::new(Vec::new()),
        }
    }
}

/// Records the end event when dropped.
pub(crate) struct Scope {
    dev: Arc<CudaDevice>,
    kind: &'static str,
    start: Option<CudaEvent>,
}

fn timing_event(dev: &CudaDevice) -> Result<CudaEvent> {
    let ev = dev
        .ctx()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| cuda_err("profiling event", e))?;
    ev.record(dev.stream())
        .map_err(|e| cuda_err("profiling event record", e))?;
    Ok(ev)
}

/// Start timing an op of `kind` on the device of `t` (None when profiling is off).
pub(crate) fn scope(t: &Tensor, kind: &'static str) -> Result<Option<Scope>> {
    let dev = storage(t, kind)?.dev();
    if !dev.profiler.enabled.load(Ordering::Relaxed) {
        return Ok(None);
    }
    Ok(Some(Scope {
        dev: dev.clone(),
        kind,
        start: Some(timing_event(dev)?),
    }))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let (Some(start), Ok(end)) = (self.start.take(), timing_event(&self.dev)) {
            let mut events = self.dev.profiler.events.lock().unwrap();
            events.push((self.kind, start, end));
        }
    }
}

/// One row of a profile: total GPU milliseconds and call count of an op kind.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    pub kind: &'static str,
    pub ms: f64,
    pub calls: usize,
}

/// Turn profiling on or off for device `ordinal` (overrides `VI_PROFILE`).
pub fn set_enabled(ordinal: usize, on: bool) -> Result<()> {
    super::device(ordinal)?
        .profiler
        .enabled
        .store(on, Ordering::Relaxed);
    Ok(())
}

/// Synchronise device `ordinal`, return the time per op kind recorded since the last call (sorted by
/// time, largest first) and clear the record.
pub fn take_report(ordinal: usize) -> Result<Vec<ProfileRow>> {
    let dev = super::device(ordinal)?;
    dev.synchronize()?;
    let events = std::mem::take(&mut *dev.profiler.events.lock().unwrap());
    let mut rows: Vec<ProfileRow> = Vec::new();
    for (kind, s, e) in events {
        let ms = s
            .elapsed_ms(&e)
            .map_err(|err| cuda_err("profiling elapsed time", err))? as f64;
        match rows.iter_mut().find(|r| r.kind == kind) {
            Some(r) => {
                r.ms += ms;
                r.calls += 1;
            }
            None => rows.push(ProfileRow { kind, ms, calls: 1 }),
        }
    }
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(rows)
}
