//! Per-op-kind GPU timing state of one device: when enabled, every backend op records a CUDA event
//! before and after its work on the device stream ([`Profiler::scope`]); [`Profiler::report`] sums
//! the elapsed times per kind. Off (the default, `VI_PROFILE` unset) it costs one relaxed atomic
//! load per op. The public switches are in `profile.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use crate::{Error, Result};

/// One row of a profile: total GPU milliseconds and call count of an op kind.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    pub kind: &'static str,
    pub ms: f64,
    pub calls: usize,
}

/// Per-device list of recorded (kind, start, end) events.
pub(crate) struct Profiler {
    enabled: AtomicBool,
    events: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

/// Records the end event when dropped. Owns what it needs (it outlives the op's storage handles).
pub(crate) struct Scope {
    profiler: Arc<Profiler>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kind: &'static str,
    start: Option<CudaEvent>,
}

fn timing_event(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<CudaEvent> {
    let ev = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| Error::Cuda(format!("profiling event: {e:?}")))?;
    ev.record(stream)
        .map_err(|e| Error::Cuda(format!("profiling event record: {e:?}")))?;
    Ok(ev)
}

impl Profiler {
    pub(crate) fn new(enabled: bool) -> Profiler {
        Profiler {
            enabled: AtomicBool::new(enabled),
            events: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Start timing an op of `kind` on `stream` (None when profiling is off).
    pub(crate) fn scope(
        self: &Arc<Self>,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        kind: &'static str,
    ) -> Result<Option<Scope>> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        Ok(Some(Scope {
            profiler: self.clone(),
            ctx: ctx.clone(),
            stream: stream.clone(),
            kind,
            start: Some(timing_event(ctx, stream)?),
        }))
    }

    /// The time per op kind recorded since the last call (sorted by time, largest first); clears
    /// the record. The caller synchronises the stream first.
    pub(crate) fn report(&self) -> Result<Vec<ProfileRow>> {
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        let mut rows: Vec<ProfileRow> = Vec::new();
        for (kind, s, e) in events {
            let ms = s
                .elapsed_ms(&e)
                .map_err(|err| Error::Cuda(format!("profiling elapsed time: {err:?}")))?
                as f64;
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
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let (Some(start), Ok(end)) = (self.start.take(), timing_event(&self.ctx, &self.stream)) {
            let mut events = self.profiler.events.lock().unwrap();
            events.push((self.kind, start, end));
        }
    }
}
