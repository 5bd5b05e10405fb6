//! A durable classic queue that a mirroring policy (RabbitMQ 3.x's
//! `ha-mode`) comes to match after it was declared becomes replicated, as
//! one declared under the policy is. The queue's home node does it:
//!
//! 1. **Commit** ([`Vhost::convert_mirrored`]): a `DeclareQueue` of a
//!    replicated queue of the same name and arguments, with a new id and
//!    `replaces` naming the classic queue's id. The metadata swaps the
//!    records (bindings are by name and stay); every node's projection
//!    ([`Vhost::take_over`]) routes the name to the group from then on; the
//!    members start its replicas.
//! 2. **Move** (`move_into_group`): on the home, the classic queue is no
//!    longer routed to or listed; its consumers are cancelled (told with
//!    `basic.cancel`, as when a queue goes: they consume again from the
//!    replicated queue); its ready messages are taken in order, enqueued
//!    into the group (answered once a majority has them on disk) and only
//!    then removed. Deliveries its consumers still hold are settled here as
//!    before (by id locally; by old id from other nodes, see `moved`); one
//!    returned to the queue is moved too. When nothing is left, the classic
//!    queue is deleted, in one step with its publishes
//!    (`delete_if_drained`): a message routed to it before its name reached
//!    the group is either in it, and moved, or refused by the deleted queue
//!    and sent on to the group (`Vhost::enqueue`, by `moved`).
//! 3. **Restart**: a home that stopped in the middle finds the classic
//!    queue's stored messages under the id `replaces` names, rebuilds it
//!    ([`Vhost::recover_moving`]) and moves what is left. A message moved
//!    and not yet removed when the node stopped is moved again: at least
//!    once, never lost.
//!
//! Messages published while the move runs go to the group at once, so they
//! can be delivered before older messages still being moved.

use std::sync::Arc;
use std::time::Duration;

use exchange::QueueId;
use queue_store::Effects;

use super::Vhost;
use crate::meta::{MetaCommand, MetaError, QueueDef};
use crate::queue::{QueueHandle, Settle, notify_cancel};

/// Messages taken from the classic queue and enqueued into the group at a
/// time.
const MOVE_BATCH: usize = 256;

/// How long the move waits before trying again after the group refused
/// or failed a batch (doubling up to [`MOVE_RETRY_MAX`]), and between
/// looks at deliveries still held.
const MOVE_RETRY: Duration = Duration::from_millis(200);

/// The longest wait between tries of a message the group refuses.
const MOVE_RETRY_MAX: Duration = Duration::from_secs(5);

impl Vhost {
    /// After policies changed (or at start): every durable classic queue of
    /// this node a mirroring policy now matches becomes replicated (see the
    /// module comment). In a cluster only.
    pub fn convert_mirrored(&self) {
        if self.node.peers.get().is_none() {
            return;
        }
        for q in self.queues() {
            if !q.durable
                || q.auto_delete
                || q.exclusive_owner.is_some()
                || q.kind().type_name() != "classic"
            {
                continue;
            }
            let Some(members) = self.mirrored_members(&q.name, &q.arguments) else {
                continue;
            };
            if !self.converting.insert(q.name.clone()) {
                continue;
            }
            let Some(me) = self.me.upgrade() else {
                return;
            };
            self.node.tracker.spawn(async move {
                me.commit_takeover(q.clone(), members).await;
                me.converting.remove(&q.name);
            });
        }
    }

    /// Commits the replicated queue that takes over classic queue `q`,
    /// trying again while the cluster cannot commit (a minority, an
    /// election) and the queue is still here and still matched.
    async fn commit_takeover(&self, q: Arc<QueueHandle>, mut members: Vec<String>) {
        let mut id = self.node.next_queue_id();
        loop {
            let still_here = self.find_queue(&q.name).is_some_and(|h| h.id == q.id);
            if !still_here {
                return;
            }
            let command = MetaCommand::DeclareQueue {
                vhost: self.name.to_string(),
                queue: QueueDef {
                    name: q.name.clone(),
                    id,
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    arguments: q.arguments.clone(),
                    home: members.first().cloned(),
                    members: members.clone(),
                    replaces: Some(q.id),
                },
            };
            match self.node.meta.commit(command).await {
                Ok(_) => {
                    tracing::info!(queue = %q.name, vhost = %self.name, ?members, "a mirroring policy matches this classic queue: it is replicated from now on and its messages move into its group");
                    return;
                }
                // Deleted or redeclared meanwhile: nothing to take over.
                Err(
                    e @ (MetaError::NotFound(_) | MetaError::Conflict(_) | MetaError::Invalid(_)),
                ) => {
                    tracing::info!(queue = %q.name, vhost = %self.name, error = %e, "the classic queue a mirroring policy matches was not taken over");
                    return;
                }
                Err(e) => {
                    tracing::warn!(queue = %q.name, vhost = %self.name, error = %e, "cannot make the queue a mirroring policy matches replicated yet; trying again");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                () = self.closed.cancelled() => return,
            }
            match self.mirrored_members(&q.name, &q.arguments) {
                // Other members under a new id: an attempt whose answer was
                // lost may have committed, and the same id with other
                // members would be taken for a membership change of that
                // group, which its Raft group never made (the nodes left
                // out would drop their replicas). Under a new id, a
                // committed earlier attempt makes this one a conflict.
                Some(now) if now != members => {
                    members = now;
                    id = self.node.next_queue_id();
                }
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Projects a replicated queue `def` that took over classic queue `old`
    /// of the same name: the name routes to the group (bindings kept); on
    /// another node the old queue is kept by id for settling what was taken
    /// from it. On the classic queue's home, returns it: its messages are to
    /// move ([`Self::start_move`]) once the name reaches the group.
    pub(super) fn take_over(&self, def: &QueueDef, old: u64) -> Option<Arc<QueueHandle>> {
        let here = self
            .queues
            .remove_if(&def.name, |_, q| q.id == old)
            .map(|(_, q)| q);
        if let Some((_, known)) = self.remote.remove_if(&def.name, |_, q| q.id == old) {
            self.remote_ids.remove(&old);
            self.moved.insert(old, known);
        }
        self.router
            .write()
            .replace_queue(def.name.clone(), QueueId(def.id));
        here
    }

    /// Whether `q` is a classic queue of this node moving into its
    /// replicated successor.
    pub(super) fn is_moving(&self, q: &QueueHandle) -> bool {
        self.moving.get(&q.name).is_some_and(|m| m.id == q.id)
    }

    /// At start, on the home of a classic queue that a replicated one
    /// (`def`) took over: rebuilds the classic queue from what the store
    /// still holds of it and moves that into the group. Returns whether
    /// there was anything.
    pub fn recover_moving(
        self: &Arc<Self>,
        def: &QueueDef,
        recovered: &mut queue_store::Recovered,
    ) -> bool {
        let Some(old) = def.replaces else {
            return false;
        };
        if !recovered.queues.contains_key(&old) {
            return false;
        }
        let handle = self.rebuild_queue(def, old, false, recovered);
        tracing::info!(queue = %def.name, vhost = %self.name, ready = handle.counters().ready, "moving the rest of a classic queue into the replicated queue that took it over");
        self.spawn_housekeeping(handle.clone());
        self.start_move(handle, def.id);
        true
    }

    /// Detaches classic queue `q` (its name now routes to replicated queue
    /// `successor`) and moves its messages there.
    pub(super) fn start_move(&self, q: Arc<QueueHandle>, successor: u64) {
        self.by_id.insert(q.id, q.clone());
        self.moving.insert(q.name.clone(), q.clone());
        for c in q.kind().take_consumers() {
            notify_cancel(&c);
        }
        q.wake.notify_one();
        // Its publishers must not wait for a queue no longer routed to.
        q.flow.lower();
        let Some(me) = self.me.upgrade() else {
            return;
        };
        self.node.tracker.spawn(async move {
            me.move_into_group(q, successor).await;
        });
    }

    /// Moves classic queue `q`'s messages, in order, into replicated queue
    /// `successor` (same name), then deletes `q`. Stops, deleting `q`, if
    /// the replicated queue is deleted meanwhile, or the vhost (their
    /// messages go with them, as they would have).
    ///
    /// A batch the group does not take whole (no leader yet, or its
    /// `x-overflow: reject-publish` refused some) goes back to the queue;
    /// then one message at a time is tried, backing off, until one is
    /// taken. With `reject-publish-dlx` a refused message is the group's
    /// to dead-letter: it counts as moved.
    async fn move_into_group(&self, q: Arc<QueueHandle>, successor: u64) {
        let mut moved = 0u64;
        let mut backoff: Option<Duration> = None;
        loop {
            if self.closed.is_cancelled() {
                break;
            }
            let Some(target) = self
                .find_remote_queue(&q.name)
                .filter(|r| r.id == successor)
            else {
                tracing::info!(queue = %q.name, vhost = %self.name, "the replicated queue went before the classic one's messages had moved");
                break;
            };
            let Some(peers) = self.node.peers.get() else {
                return;
            };
            let mut batch = Vec::new();
            {
                let limit = if backoff.is_some() { 1 } else { MOVE_BATCH };
                let mut fx = Effects::default();
                while batch.len() < limit {
                    match q.get(true, &mut fx) {
                        Some(d) => batch.push(d),
                        None => break,
                    }
                }
                self.apply(&mut fx);
            }
            if batch.is_empty() {
                if q.counters().unacked == 0 {
                    // The end. From here a message routed to the old id
                    // (before the name reached the group) and meeting the
                    // deleted queue goes on to the group (`moved`); one
                    // that reached the queue since it was found empty keeps
                    // it from going, and is moved next time round.
                    self.moved.insert(q.id, target.clone());
                    let mut fx = Effects::default();
                    let gone = q.kind().delete_if_drained(&mut fx);
                    self.apply(&mut fx);
                    if gone {
                        break;
                    }
                    continue;
                }
                // Deliveries its consumers hold: they are acked (gone) or
                // returned (moved next time round).
                tokio::select! {
                    () = tokio::time::sleep(MOVE_RETRY) => {}
                    () = self.closed.cancelled() => break,
                }
                continue;
            }
            // Enqueued in order (the group's log keeps the order of these
            // calls), then all answers awaited.
            let mut sent = Vec::with_capacity(batch.len());
            let mut unreadable = Vec::new();
            for d in batch {
                match crate::queue::load_off_worker(&d.message, &self.node.store).await {
                    Some(m) => sent.push((
                        d.seq,
                        self.send_remote(peers.as_ref(), &target.home, q.name.clone(), &m),
                    )),
                    None => unreadable.push(d.seq),
                }
            }
            let dead_letters_refused =
                self.replicated_args(&target).0.overflow == queue_store::Overflow::RejectPublishDlx;
            let (mut done, mut back) = (Vec::new(), Vec::new());
            for (seq, outcome) in sent {
                match outcome.await {
                    Ok(e) if !e.refused || dead_letters_refused => done.push(seq),
                    Ok(_) => back.push(seq),
                    Err(e) => {
                        tracing::debug!(queue = %q.name, error = %e, "a message could not move yet");
                        back.push(seq);
                    }
                }
            }
            moved += done.len() as u64;
            let mut fx = Effects::default();
            q.settle(Settle::Ack, &mut done.into_iter(), false, &mut fx);
            if !unreadable.is_empty() {
                // (Logged by the load.) Rejected: dead-lettered if the queue
                // says where to.
                q.settle(Settle::Reject, &mut unreadable.into_iter(), false, &mut fx);
            }
            let refused = !back.is_empty();
            q.settle(Settle::Requeue, &mut back.into_iter(), false, &mut fx);
            self.apply(&mut fx);
            if !refused {
                backoff = None;
                continue;
            }
            let wait = match backoff {
                None => {
                    tracing::warn!(queue = %q.name, vhost = %self.name, "the replicated queue did not take every message moved into it (no leader yet, or x-overflow reject-publish); trying one at a time");
                    MOVE_RETRY
                }
                Some(last) => (last * 2).min(MOVE_RETRY_MAX),
            };
            backoff = Some(wait);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.closed.cancelled() => break,
            }
        }
        self.moving.remove_if(&q.name, |_, h| h.id == q.id);
        // A message routed to the old id an instant ago reaches the group
        // by name (`enqueue_remote`).
        if let Some(target) = self.find_remote_queue(&q.name) {
            self.moved.insert(q.id, target);
        }
        self.by_id.remove(&q.id);
        let mut fx = Effects::default();
        let _ = q.kind().delete(false, &mut fx);
        q.wake.notify_one();
        self.apply(&mut fx);
        tracing::info!(queue = %q.name, vhost = %self.name, moved, "the classic queue's messages are in its replicated successor; the classic queue is gone");
    }
}
