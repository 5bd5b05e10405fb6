//! Transactions: `tx.select`, `tx.commit`, `tx.rollback`. Publishes wait in
//! the channel's mode until the commit; acknowledgements take their
//! deliveries out of the channel's outstanding set at once (held in
//! [`super::ChannelShared`]) and settle them at the commit.

use std::sync::Arc;

use amqp_codec::methods::*;
use amqp_codec::{ContentHeader, Method};
use bytes::Bytes;

use super::{Channel, Mode, Settle};
use crate::error::AmqpError;
use crate::node::Node;
use crate::vhost::Vhost;

/// A publish or a settlement held back by a transaction.
#[derive(Debug)]
pub(super) enum TxAction {
    Publish(BasicPublish, ContentHeader, Bytes),
    /// An ack, nack or reject: the deliveries (held on the channel) it settles.
    Settle(Vec<u64>, Settle),
}

impl Channel {
    pub(super) fn handle_tx_select(&mut self) -> Result<(), AmqpError> {
        match self.mode {
            Mode::Confirm(_) => {
                return Err(AmqpError::precondition_failed(
                    "cannot switch from confirm to tx mode",
                ));
            }
            Mode::Plain => self.mode = Mode::Transactional(Vec::new()),
            Mode::Transactional(_) => {}
        }
        self.shared.note_mode(false);
        self.shared.write_method(&Method::TxSelectOk(TxSelectOk {}));
        Ok(())
    }

    pub(super) async fn handle_tx_commit(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
    ) -> Result<(), AmqpError> {
        let Mode::Transactional(actions) = &mut self.mode else {
            return Err(AmqpError::precondition_failed(
                "channel is not transactional",
            ));
        };
        let actions = std::mem::take(actions);
        self.shared
            .uncommitted_publishes
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.commit(node, vhost, actions)?;
        node.store.commit().await?;
        // Messages routed to queues on other nodes: commit-ok once their
        // home nodes have them (on disk, if persistent to a durable queue).
        // One that did not arrive fails the commit as RabbitMQ fails a
        // transaction a queue rejected: 406 "partial tx completion".
        let mut failed = None;
        for pending in std::mem::take(&mut self.tx_remote) {
            if let Err(e) = pending.0.await {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "tx.commit: an enqueue on another node failed");
            return Err(AmqpError::precondition_failed("partial tx completion"));
        }
        self.shared.write_method(&Method::TxCommitOk(TxCommitOk {}));
        Ok(())
    }

    /// Publishes of the transaction are dropped; deliveries it acknowledged
    /// are outstanding again (RabbitMQ).
    pub(super) fn handle_tx_rollback(&mut self) -> Result<(), AmqpError> {
        let Mode::Transactional(actions) = &mut self.mode else {
            return Err(AmqpError::precondition_failed(
                "channel is not transactional",
            ));
        };
        actions.clear();
        self.shared
            .uncommitted_publishes
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.shared.restore_held();
        self.shared
            .write_method(&Method::TxRollbackOk(TxRollbackOk {}));
        Ok(())
    }

    pub(super) fn commit(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        actions: Vec<TxAction>,
    ) -> Result<(), AmqpError> {
        for a in actions {
            match a {
                TxAction::Publish(m, header, body) => self.publish(node, vhost, m, header, body)?,
                TxAction::Settle(tags, how) => {
                    let taken = self.shared.take_held(&tags);
                    self.settle(vhost, taken, how);
                }
            }
        }
        Ok(())
    }
}
