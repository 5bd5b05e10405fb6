//! [`FlowGate`]: the congestion signal publishers wait on.
//!
//! Something that can fall behind — a queue holding more than its memory
//! budget, the store holding more unsynced writes than its limit — raises its
//! gate; connections that fed it stop reading from their sockets (TCP pushes
//! back on the publisher) until the gate is lowered, which its owner does once
//! it has drained to half its limit. This is per-resource backpressure, like
//! RabbitMQ's credit flow: only the publishers of the congested queue wait,
//! not every publisher in the broker as under a memory alarm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// A raised/lowered flag with a wake-up for those waiting for it to lower.
#[derive(Debug, Default)]
pub struct FlowGate {
    raised: AtomicBool,
    lowered: Notify,
    /// Times the gate was raised (an operator metric).
    raises: AtomicU64,
}

impl FlowGate {
    /// Raises the gate. Returns whether it was lowered before.
    pub fn raise(&self) -> bool {
        let changed = !self.raised.swap(true, Ordering::AcqRel);
        if changed {
            self.raises.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }

    /// Lowers the gate and wakes every waiter. Returns whether it was raised.
    pub fn lower(&self) -> bool {
        let changed = self.raised.swap(false, Ordering::AcqRel);
        if changed {
            self.lowered.notify_waiters();
        }
        changed
    }

    /// Whether publishers must wait.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// How often the gate was raised.
    pub fn raises(&self) -> u64 {
        self.raises.load(Ordering::Relaxed)
    }

    /// Resolves once the gate is lowered (at once if it is not raised).
    pub async fn wait_lowered(&self) {
        loop {
            // Register before checking, so a `lower` in between is not missed.
            let notified = self.lowered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn waiters_wake_when_the_gate_lowers() {
        let gate = Arc::new(FlowGate::default());
        gate.wait_lowered().await; // not raised: immediate
        assert!(gate.raise());
        assert!(!gate.raise(), "already raised");
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_lowered().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(gate.lower());
        waiter.await.unwrap();
        assert_eq!(gate.raises(), 1);
    }
}
