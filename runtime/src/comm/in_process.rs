//! Ranks that are threads of one process.
//!
//! [`InProcessGroup`] builds one [`InProcessComm`] per rank for ranks that are threads of one
//! process (CPU ranks, or several clips sharing one GPU). Tensors are handed over as they are (an
//! `Arc` clone: no copy, no device transfer), so a CUDA tensor stays on its device; ranks that
//! share a CUDA device also share its single stream, so a received tensor is ordered after the
//! kernels that produced it. [`InProcessGroup::new_on_devices`] gives each rank a device, and a
//! tensor received from a rank on another device is copied over (through the host).
//!
//! The group shares one [`Mailbox`]: a send puts the message into it at once (so a start form
//! sends at start and receives at wait), a receive takes it out.

use std::sync::Arc;
use std::time::Duration;

use super::mailbox::{forward_communicator, Endpoint, Mailbox, OpKind, Transport};
use crate::{Device, Result, Tensor};

/// The in-process transport: a message goes straight into the group's shared mailbox.
pub(crate) struct Local;

impl Transport for Local {
    fn send(
        &self,
        mb: &Mailbox<Self>,
        src: usize,
        dst: usize,
        kind: OpKind,
        seq: u64,
        payload: Option<&Tensor>,
    ) -> Result<()> {
        // Call indices are taken once per call, so a message is never delivered twice.
        let fresh = mb.deliver(src, dst, kind, seq, payload.cloned());
        debug_assert!(
            fresh,
            "message {kind:?} #{seq} {src}->{dst} delivered twice"
        );
        Ok(())
    }

    fn place(&self, t: Tensor, device: Option<Device>) -> Result<Tensor> {
        match device {
            Some(d) if t.device() != d => t.to_device(d),
            _ => Ok(t),
        }
    }
}

/// Constructor of a group of in-process ranks.
pub struct InProcessGroup;

impl InProcessGroup {
    /// How long a call waits for a peer before it fails (and aborts the group).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// One communicator per rank (index = rank). Each is `Send`: move it to its rank's thread.
    /// A call that waits longer than `timeout` for a peer fails and aborts the whole group.
    // A group is nothing but its members: `new` hands out the per-rank communicators.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize, timeout: Duration) -> Vec<InProcessComm> {
        Self::build(world_size, None, timeout)
    }

    /// Like [`InProcessGroup::new`], one rank per entry of `devices`: a tensor a rank receives that
    /// lives on another device is copied to the rank's device (through the host). Ranks sharing a
    /// device get the sender's tensor as is.
    pub fn new_on_devices(devices: &[Device], timeout: Duration) -> Vec<InProcessComm> {
        Self::build(devices.len(), Some(devices), timeout)
    }

    fn build(
        world_size: usize,
        devices: Option<&[Device]>,
        timeout: Duration,
    ) -> Vec<InProcessComm> {
        assert!(world_size >= 1, "a group needs at least one rank");
        let mb = Arc::new(Mailbox::new(world_size, timeout, Local));
        (0..world_size)
            .map(|rank| InProcessComm {
                ep: Endpoint::new(rank, mb.clone(), devices.map(|d| d[rank])),
            })
            .collect()
    }

    /// [`InProcessGroup::new`] with [`InProcessGroup::DEFAULT_TIMEOUT`].
    pub fn with_default_timeout(world_size: usize) -> Vec<InProcessComm> {
        Self::new(world_size, Self::DEFAULT_TIMEOUT)
    }
}

/// One rank of an [`InProcessGroup`]. Dropping it while its thread unwinds from a panic aborts the
/// group; dropping it otherwise marks the rank as departed, so a peer waiting for a message it
/// never sent fails at once instead of waiting for the timeout.
pub struct InProcessComm {
    ep: Endpoint<Local>,
}

impl InProcessComm {
    /// The timeout of this group.
    pub fn timeout(&self) -> Duration {
        self.ep.mb.timeout
    }

    /// The reason the group was aborted, if it was.
    pub fn abort_reason(&self) -> Option<String> {
        self.ep.mb.abort_reason()
    }

    /// Messages received for this rank that no call has taken yet (tests: a pending handle
    /// dropped without `wait` must not leave its messages behind).
    #[doc(hidden)]
    pub fn held_messages(&self) -> usize {
        self.ep.mb.held_for(self.ep.rank)
    }
}

forward_communicator!(InProcessComm, ep);

impl Drop for InProcessComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.ep.mb.abort(format!("rank {} panicked", self.ep.rank));
        } else {
            self.ep.mb.depart(self.ep.rank);
        }
    }
}
