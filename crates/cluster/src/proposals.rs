//! [`Proposer`]: how a replicated queue's leader puts proposals into its
//! Raft log — several to an entry when they queue up.
//!
//! openraft appends, replicates, fsyncs and applies entry by entry, with a
//! few task wake-ups each; one entry per published message held a group
//! to about 4,000 messages a second however many a publisher had in
//! flight. Here one task per replica takes proposals in the order they
//! were made and writes them with `client_write_ff`: alone while fewer
//! than [`IN_FLIGHT`] entries are uncommitted (no added latency when the
//! queue is quiet), else everything that queued meanwhile as one
//! [`QueueRequest::Batch`] entry (up to [`MAX_BATCH`] proposals or
//! [`MAX_BATCH_BYTES`] of bodies). A batch commits or fails as one; its
//! replicas apply its proposals in order, and each proposer gets its own
//! answer.
//!
//! The order proposals reach this task is the order they are applied:
//! [`Proposer::propose`] queues synchronously.

use std::future::Future;
use std::sync::Arc;

use openraft::Raft;
use openraft::error::ClientWriteError;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::queue_group::{QueueRequest, QueueResponse, QueueTypes};

/// Entries written and not yet committed before proposals wait to go as
/// one batch.
pub const IN_FLIGHT: usize = 2;
/// Most proposals in one entry.
pub const MAX_BATCH: usize = 512;
/// Most message octets in one entry (a larger message goes alone).
pub const MAX_BATCH_BYTES: usize = 256 << 10;

/// What a proposal came to.
#[derive(Debug)]
pub enum Attempt {
    /// Committed and applied (its answer), or failed for good.
    Done(Result<QueueResponse, String>),
    /// Not committed; the leader to try next, if known.
    Retry(Option<u64>),
}

type Proposal = (QueueRequest, oneshot::Sender<Attempt>);

/// What the proposal task takes, in order.
enum Queued {
    Proposal(Proposal),
    /// Answered once everything queued before it is committed (or failed).
    Barrier(oneshot::Sender<()>),
}

/// A replica's proposal queue (its task ends when this is dropped).
#[derive(Debug)]
pub struct Proposer {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Proposer {
    /// Starts the proposal task of the replica `raft`; a proposal not
    /// committed within `timeout` fails (it may still commit).
    pub fn start(raft: Raft<QueueTypes>, timeout: std::time::Duration) -> Proposer {
        let (queue, proposals) = mpsc::unbounded_channel();
        tokio::spawn(write_proposals(raft, proposals, timeout));
        Proposer { queue }
    }

    /// Queues `request` (now: in the caller's order); its outcome.
    pub fn propose(&self, request: QueueRequest) -> impl Future<Output = Attempt> + Send + use<> {
        let (tx, rx) = oneshot::channel();
        let queued = self.queue.send(Queued::Proposal((request, tx))).is_ok();
        async move {
            if !queued {
                return Attempt::Retry(None);
            }
            rx.await.unwrap_or(Attempt::Retry(None))
        }
    }

    /// Done once every proposal queued before this call is committed or
    /// has failed (at once if the task has ended).
    pub fn flushed(&self) -> impl Future<Output = ()> + Send + use<> {
        let (tx, rx) = oneshot::channel();
        let queued = self.queue.send(Queued::Barrier(tx)).is_ok();
        async move {
            if queued {
                let _ = rx.await;
            }
        }
    }
}

fn octets(request: &QueueRequest) -> usize {
    usize::try_from(request.message_octets()).unwrap_or(usize::MAX)
}

async fn write_proposals(
    raft: Raft<QueueTypes>,
    mut proposals: mpsc::UnboundedReceiver<Queued>,
    timeout: std::time::Duration,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut held: Option<Queued> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match held.take() {
            Some(p) => p,
            None => match proposals.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let first = match first {
            Queued::Proposal(p) => p,
            Queued::Barrier(done) => {
                // Every permit back: nothing written is still uncommitted.
                drop(permit);
                let all = u32::try_from(IN_FLIGHT).unwrap_or(u32::MAX);
                if let Ok(all) = in_flight.acquire_many(all).await {
                    drop(all);
                }
                let _ = done.send(());
                continue;
            }
        };
        let mut bytes = octets(&first.0);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match proposals.try_recv() {
                Ok(Queued::Proposal(p)) => {
                    bytes += octets(&p.0);
                    if bytes > MAX_BATCH_BYTES {
                        held = Some(Queued::Proposal(p));
                        break;
                    }
                    batch.push(p);
                }
                Ok(barrier @ Queued::Barrier(_)) => {
                    held = Some(barrier);
                    break;
                }
                Err(_) => break,
            }
        }
        let (entry, answers): (QueueRequest, Vec<oneshot::Sender<Attempt>>) = if batch.len() == 1 {
            let (request, answer) = batch.remove(0);
            (request, vec![answer])
        } else {
            let (requests, answers) = batch.into_iter().unzip();
            (QueueRequest::Batch(requests), answers)
        };
        // Sent here, in order; waited for by a task of its own.
        tracing::trace!(target: "latency", n = answers.len(), "client_write");
        let written = raft.client_write_ff(entry).await;
        tokio::spawn(async move {
            let outcome = match written {
                Err(fatal) => Outcome::Failed(fatal.to_string()),
                Ok(rx) => match tokio::time::timeout(timeout, rx).await {
                    Err(_) => Outcome::Failed(format!(
                        "not committed within {} s (it may still be)",
                        timeout.as_secs()
                    )),
                    // The replica stopped: the entry may be committed.
                    Ok(Err(_)) => Outcome::Failed("the queue's replica stopped".into()),
                    Ok(Ok(Ok(r))) => Outcome::Answered(r.data),
                    Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => {
                        Outcome::Retry(f.leader_id)
                    }
                    Ok(Ok(Err(e))) => Outcome::Failed(e.to_string()),
                },
            };
            tracing::trace!(target: "latency", n = answers.len(), "client_write answered");
            drop(permit);
            outcome.answer(answers);
        });
    }
}

/// What became of one entry, for each of its proposers.
enum Outcome {
    Answered(QueueResponse),
    Retry(Option<u64>),
    Failed(String),
}

impl Outcome {
    fn answer(self, answers: Vec<oneshot::Sender<Attempt>>) {
        match self {
            Outcome::Answered(QueueResponse::Batch(responses)) if answers.len() > 1 => {
                // As many as proposals: every replica applies them all.
                let mut responses = responses.into_iter();
                for a in answers {
                    let r = responses
                        .next()
                        .ok_or_else(|| "a batch answered short".to_owned());
                    let _ = a.send(Attempt::Done(r));
                }
            }
            Outcome::Answered(r) => {
                for a in answers {
                    let _ = a.send(Attempt::Done(Ok(r.clone())));
                }
            }
            Outcome::Retry(hint) => {
                for a in answers {
                    let _ = a.send(Attempt::Retry(hint));
                }
            }
            Outcome::Failed(e) => {
                for a in answers {
                    let _ = a.send(Attempt::Done(Err(e.clone())));
                }
            }
        }
    }
}
