//! Publisher confirms: `confirm.select`, and the acks and nacks sent after
//! each batch of frames, once the store's commit point covers the batch's
//! writes (in order, even though each batch's wait is its own task).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use amqp_codec::Method;
use amqp_codec::methods::*;

use super::{Channel, Mode, State};
use crate::error::AmqpError;
use crate::node::Node;

/// Publisher-confirm bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Confirms {
    /// Sequence number of the last publish.
    pub(super) published: u64,
    /// Highest sequence number already acked or nacked.
    confirmed: u64,
    /// Publishes of the current batch that were refused (nack).
    pub(super) nacked: Vec<u64>,
    /// Whether the current batch wrote to the store (ack after fsync).
    pub(super) needs_sync: bool,
    /// The current batch's enqueues into queues on other nodes, by
    /// sequence number: acked once the home node has them, nacked if it
    /// refused or could not be reached.
    pub(super) remote: Vec<(u64, crate::peers::Pending)>,
    /// Commits in flight for earlier batches (later acks must wait for them).
    in_flight: Arc<AtomicUsize>,
    /// Resolves when the previous batch's confirms were written: each batch
    /// waits for it, so confirms leave in order even though each batch's
    /// task wakes independently.
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Channel {
    pub(super) fn handle_confirm_select(&mut self, m: ConfirmSelect) -> Result<(), AmqpError> {
        match self.mode {
            Mode::Transactional(_) => {
                return Err(AmqpError::precondition_failed(
                    "cannot switch from tx to confirm mode",
                ));
            }
            Mode::Plain => self.mode = Mode::Confirm(Confirms::default()),
            Mode::Confirm(_) => {}
        }
        self.shared.note_mode(true);
        if !m.nowait {
            self.shared
                .write_method(&Method::ConfirmSelectOk(ConfirmSelectOk {}));
        }
        Ok(())
    }

    /// Sends the confirms for publishes handled since the last call: at once,
    /// or after the store's commit point if any of them (or an earlier batch
    /// still waiting) wrote to the store.
    pub fn flush_confirms(&mut self, node: &Arc<Node>) {
        if self.state == State::Closing {
            return;
        }
        let Mode::Confirm(c) = &mut self.mode else {
            return;
        };
        if c.published == c.confirmed {
            return;
        }
        let (from, to) = (c.confirmed, c.published);
        c.confirmed = to;
        let mut nacked = std::mem::take(&mut c.nacked);
        let remote = std::mem::take(&mut c.remote);
        let frames = confirm_frames(from, to, &nacked);
        let wait = std::mem::take(&mut c.needs_sync)
            || !remote.is_empty()
            || c.in_flight.load(Ordering::Acquire) > 0;
        let confirmed = (to - from).saturating_sub(nacked.len() as u64);
        if !wait {
            for f in &frames {
                self.shared.write_method(f);
            }
            self.shared.note_confirmed(to - from);
            self.shared
                .stats
                .add(crate::session::stat::CONFIRM, confirmed);
            node.metrics.confirmed.inc_by(confirmed);
            return;
        }
        let metrics = node.metrics.clone();
        c.in_flight.fetch_add(1, Ordering::AcqRel);
        let in_flight = c.in_flight.clone();
        let commit = node.store.commit();
        let shared = self.shared.clone();
        let previous = c.previous.take();
        let (done, next) = tokio::sync::oneshot::channel();
        c.previous = Some(next);
        node.tracker.spawn(async move {
            let result = commit.await;
            let mut frames = frames;
            let mut confirmed = confirmed;
            if !remote.is_empty() {
                for (seq, pending) in remote {
                    match pending.0.await {
                        Ok(r) if !r.refused => {}
                        Ok(_) => nacked.push(seq),
                        Err(e) => {
                            tracing::warn!(error = %e, "enqueue on another node failed: nacking");
                            nacked.push(seq);
                        }
                    }
                }
                nacked.sort_unstable();
                nacked.dedup();
                frames = confirm_frames(from, to, &nacked);
                confirmed = (to - from).saturating_sub(nacked.len() as u64);
            }
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            // Nothing is written once the channel closed (its close-ok went
            // out, and its number may already be reused).
            match result {
                Ok(()) => {
                    if shared.write_methods_if_open(&frames) {
                        metrics.confirmed.inc_by(confirmed);
                        shared.stats.add(crate::session::stat::CONFIRM, confirmed);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "commit failed: nacking publishes");
                    shared.write_methods_if_open(&[Method::BasicNack(BasicNack {
                        delivery_tag: to,
                        multiple: true,
                        requeue: false,
                    })]);
                }
            }
            shared.note_confirmed(to - from);
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let _ = done.send(());
        });
    }
}

/// The frames confirming publishes `from+1 ..= to`, with `nacked` refused:
/// multiple acks for the runs between refusals, a single nack for each.
fn confirm_frames(from: u64, to: u64, nacked: &[u64]) -> Vec<Method> {
    let mut frames = Vec::new();
    let mut last = from;
    for &n in nacked {
        if n > last + 1 {
            frames.push(Method::BasicAck(BasicAck {
                delivery_tag: n - 1,
                multiple: true,
            }));
        }
        frames.push(Method::BasicNack(BasicNack {
            delivery_tag: n,
            multiple: false,
            requeue: false,
        }));
        last = n;
    }
    if to > last {
        frames.push(Method::BasicAck(BasicAck {
            delivery_tag: to,
            multiple: to - last > 1,
        }));
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirm_frames_coalesce_runs_around_nacks() {
        let f = confirm_frames(0, 5, &[]);
        assert_eq!(
            f,
            [Method::BasicAck(BasicAck {
                delivery_tag: 5,
                multiple: true
            })]
        );
        let f = confirm_frames(5, 6, &[]);
        assert_eq!(
            f,
            [Method::BasicAck(BasicAck {
                delivery_tag: 6,
                multiple: false
            })]
        );
        let f = confirm_frames(0, 6, &[3]);
        assert_eq!(
            f,
            [
                Method::BasicAck(BasicAck {
                    delivery_tag: 2,
                    multiple: true
                }),
                Method::BasicNack(BasicNack {
                    delivery_tag: 3,
                    multiple: false,
                    requeue: false
                }),
                Method::BasicAck(BasicAck {
                    delivery_tag: 6,
                    multiple: true
                }),
            ]
        );
        let f = confirm_frames(2, 3, &[3]);
        assert_eq!(
            f,
            [Method::BasicNack(BasicNack {
                delivery_tag: 3,
                multiple: false,
                requeue: false
            })]
        );
    }
}
