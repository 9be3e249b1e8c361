//! The handle of an exchange in flight: returned by the `start_*` forms of the
//! [`Communicator`](super::Communicator), completed by [`Pending::wait`].

use std::time::Instant;

use crate::Result;

/// What an implementation hands out for an exchange it has started: `wait` blocks until the
/// result is there (bounded by the group's timeout, like every call).
///
/// Dropping it without `wait` must leave the communicator usable: the next calls pair up as if
/// this one had been waited for (its messages are discarded when they arrive).
pub trait PendingOp<T>: Send {
    fn wait(self: Box<Self>) -> Result<T>;
    /// [`PendingOp::wait`], and when the last message of the exchange reached this rank (None:
    /// not known). A wrapper that delays delivery ([`super::DelayComm`]) counts its latency
    /// from there, without a thread of its own per exchange.
    fn wait_arrived(self: Box<Self>) -> Result<(T, Option<Instant>)> {
        Ok((self.wait()?, None))
    }
}

/// An exchange in flight (see [`super::Communicator::start_exchange_neighbors`]). The call index
/// was taken when it started; `wait` gives the result. It may be waited for on any thread.
///
/// Dropping it without `wait` is allowed (e.g. on an error path): the exchange still pairs with
/// the peers' calls of the same index, what they send for it is thrown away, and the next call
/// is unaffected. The peers still receive what this rank sent.
#[must_use = "an exchange in flight is completed by `wait`"]
pub struct Pending<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    Done(Result<T>),
    Op(Box<dyn PendingOp<T>>),
}

impl<T> Pending<T> {
    /// An exchange that completed when it started (the default, eager implementation).
    pub fn done(r: Result<T>) -> Self {
        Pending {
            inner: Inner::Done(r),
        }
    }

    /// An exchange whose remaining part runs in `op.wait()`.
    pub fn from_op(op: impl PendingOp<T> + 'static) -> Self {
        Pending {
            inner: Inner::Op(Box::new(op)),
        }
    }

    /// Blocks until the exchange is complete and returns what the peers sent.
    pub fn wait(self) -> Result<T> {
        match self.inner {
            Inner::Done(r) => r,
            Inner::Op(op) => op.wait(),
        }
    }

    /// [`Pending::wait`], and when the exchange's last message reached this rank (None: not
    /// known; for an exchange completed at start, it arrived before it started).
    pub fn wait_arrived(self) -> Result<(T, Option<Instant>)> {
        match self.inner {
            Inner::Done(r) => Ok((r?, None)),
            Inner::Op(op) => op.wait_arrived(),
        }
    }

    /// Whether the result was already there when the exchange started (an eager implementation).
    pub fn is_done(&self) -> bool {
        matches!(self.inner, Inner::Done(_))
    }

    /// The same exchange with its result transformed by `f` once it is waited for.
    pub fn map<U: 'static>(self, f: impl FnOnce(T) -> Result<U> + Send + 'static) -> Pending<U>
    where
        T: Send + 'static,
    {
        struct Mapped<T, F> {
            inner: Pending<T>,
            f: F,
        }
        impl<T: Send, U, F: FnOnce(T) -> Result<U> + Send> PendingOp<U> for Mapped<T, F> {
            fn wait(self: Box<Self>) -> Result<U> {
                (self.f)(self.inner.wait()?)
            }
            fn wait_arrived(self: Box<Self>) -> Result<(U, Option<Instant>)> {
                let (t, at) = self.inner.wait_arrived()?;
                Ok(((self.f)(t)?, at))
            }
        }
        match self.inner {
            Inner::Done(r) => Pending::done(r.and_then(f)),
            op => Pending::from_op(Mapped {
                inner: Pending { inner: op },
                f,
            }),
        }
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_done() {
            "Pending(done)"
        } else {
            "Pending(in flight)"
        })
    }
}
