//! Readiness and draining: requests in flight are counted by guards; on SIGTERM the worker
//! stops taking work (503, `/health` 503) and waits, up to a grace period, for the count to
//! reach zero.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::error::ServerError;

#[derive(Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
}

/// Held while a request is in flight (moved into the stream task for streaming responses).
pub struct InflightGuard(Arc<Lifecycle>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    /// Admits a request unless draining.
    pub fn admit(self: &Arc<Self>) -> Result<InflightGuard, ServerError> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let guard = InflightGuard(self.clone());
        if self.draining.load(Ordering::SeqCst) {
            return Err(ServerError::Unavailable("the worker is shutting down"));
        }
        Ok(guard)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Waits until no request is in flight or `grace` passes; true when drained.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let drained = async {
            loop {
                let notified = self.idle.notified();
                if self.inflight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, drained).await.is_ok()
    }
}
