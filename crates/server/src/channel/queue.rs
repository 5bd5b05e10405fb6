//! `queue.*`: declare (with the redeclare checks), bind, unbind, purge and
//! delete.

use std::sync::Arc;

use ::exchange::{BindingDef, Destination};
use amqp_codec::Method;
use amqp_codec::methods::*;
use queue_store::QueueArgs;

use super::{Channel, server_name};
use crate::auth::{Access, Resource};
use crate::error::AmqpError;
use crate::node::Node;

use crate::reply_to;
use crate::vhost::Vhost;

impl Channel {
    pub(super) async fn handle_queue_declare(
        &mut self,
        node: &Arc<Node>,
        vhost: &Arc<Vhost>,
        m: QueueDeclare,
    ) -> Result<(), AmqpError> {
        let conn = self.shared.connection.id;
        let name = if m.queue.is_empty() && !m.passive {
            server_name("amq.gen-")
        } else {
            m.queue.clone()
        };
        let (queue, messages, consumers) = if m.queue.as_str() == reply_to::PSEUDO_QUEUE
            || node.reply_consumers.is_live_address(&m.queue)
        {
            // Direct reply-to, as RabbitMQ: the pseudo-queue, or a reply
            // address whose consumer is alive, has one consumer.
            (m.queue.clone(), 0, 1)
        } else if let Some(remote) = match vhost.find_queue(&name) {
            None => vhost.usable_remote_queue(&name)?,
            Some(_) => None,
        } {
            // A queue homed on another node of the cluster: a redeclare
            // must be equivalent; its counts come from there. Home
            // down: RabbitMQ's 404 for a durable queue on a node that is
            // down.
            if !m.passive {
                self.allow(node, vhost, Resource::Queue, &name, Access::Configure)?;
                if m.exclusive {
                    // Not this connection's (it lives on another node).
                    return Err(vhost.locked(&remote.name));
                }
                crate::queue::check_equivalent(
                    &remote.name,
                    vhost.name(),
                    (remote.durable, remote.auto_delete, &remote.arguments),
                    &m,
                )?;
            }
            let counts = match node.peers.get() {
                Some(peers) => peers.counts(&remote.home, vhost.name(), &name).await,
                None => Err("this node is not in a cluster".to_owned()),
            };
            match counts {
                Ok(Some((ready, consumers))) => (remote.name, u64::from(ready), consumers as usize),
                // Deleted there, the deletion not yet applied here.
                Ok(None) => {
                    return Err(AmqpError::not_found(format!(
                        "no queue '{name}' in vhost '{}'",
                        vhost.name()
                    )));
                }
                Err(e) => {
                    return Err(remote.home_down(vhost.name(), "declare", &e));
                }
            }
        } else if m.passive {
            let q = vhost.queue_for(&name, conn)?;
            // Any use renews an x-expires lease; a passive declare too.
            let counts = q.kind().touch().unwrap_or_default();
            (q.name.clone(), counts.ready, counts.consumers)
        } else {
            if name.starts_with("amq.") && !m.queue.is_empty() {
                return Err(AmqpError::access_refused(format!(
                    "queue name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            self.allow(node, vhost, Resource::Queue, &name, Access::Configure)?;
            let args = QueueArgs::parse(&m.arguments, &name, vhost.name())?;
            if m.queue.is_empty() && args.queue_type == queue_store::QueueType::Quorum {
                return Err(AmqpError::precondition_failed(
                    "Cannot declare a server-named queue for type rabbit_quorum_queue",
                ));
            }
            // As RabbitMQ: naming a dead-letter exchange needs read access
            // to the queue and write access to the exchange.
            if let Some(dlx) = &args.dead_letter_exchange {
                self.allow(node, vhost, Resource::Queue, &name, Access::Read)?;
                self.allow(node, vhost, Resource::Exchange, dlx, Access::Write)?;
            }
            args.check_properties(m.durable, m.exclusive, m.auto_delete, &name, vhost.name())?;
            // As RabbitMQ: an exclusive queue is never durable, whatever the
            // declare says (so redeclaring it either way is equivalent).
            let m = QueueDeclare {
                durable: m.durable && !m.exclusive,
                ..m
            };
            let existing = vhost.find_queue(&name);
            let replicated = match existing {
                None => vhost.members_if_replicated(
                    &name,
                    m.durable,
                    m.exclusive,
                    m.auto_delete,
                    &args,
                    &m.arguments,
                ),
                Some(_) => None,
            };
            if let Some(members) = replicated {
                // A quorum queue in a cluster, or a classic one a
                // mirroring policy matches, is replicated: committed for
                // every node with its members, reached through its group
                // wherever its leader is.
                let remote = vhost
                    .declare_replicated(name.clone(), m.arguments.clone(), members)
                    .await?;
                // Declared by another connection first: it must match.
                crate::queue::check_equivalent(
                    &remote.name,
                    vhost.name(),
                    (remote.durable, remote.auto_delete, &remote.arguments),
                    &m,
                )?;
                node.metrics.queues_declared.inc();
                self.last_queue = remote.name.clone();
                if !m.nowait {
                    self.shared
                        .write_method(&Method::QueueDeclareOk(QueueDeclareOk {
                            queue: remote.name,
                            message_count: 0,
                            consumer_count: 0,
                        }));
                }
                return Ok(());
            }
            // A new queue may belong on another node (queue-leader-locator).
            let placed = match (&existing, node.peers.get()) {
                (None, Some(peers)) if !m.exclusive => vhost
                    .placement(&name, &m.arguments)
                    .map(|home| (home, peers.clone())),
                _ => None,
            };
            let elsewhere = match placed {
                Some((home, peers)) => declare_on(peers.as_ref(), vhost, home, &name, &m).await?,
                None => None,
            };
            match elsewhere {
                Some(done) => done,
                None => {
                    let q = match existing {
                        Some(existing) => {
                            vhost.check_same_owner(&existing, m.exclusive.then_some(conn))?;
                            existing.check_equivalent(&m, vhost.name())?;
                            existing
                        }
                        None => {
                            vhost
                                .declare_queue(
                                    name.clone(),
                                    m.durable,
                                    m.auto_delete,
                                    m.exclusive.then_some(conn),
                                    args,
                                    m.arguments.clone(),
                                )
                                .await?
                        }
                    };
                    let counts = q.kind().touch().unwrap_or_default();
                    (q.name.clone(), counts.ready, counts.consumers)
                }
            }
        };
        node.metrics.queues_declared.inc();
        self.last_queue = queue.clone();
        if !m.nowait {
            self.shared
                .write_method(&Method::QueueDeclareOk(QueueDeclareOk {
                    queue,
                    message_count: messages as u32,
                    consumer_count: consumers as u32,
                }));
        }
        Ok(())
    }

    pub(super) async fn handle_queue_bind(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: QueueBind,
    ) -> Result<(), AmqpError> {
        self.allow(node, vhost, Resource::Queue, &m.queue, Access::Write)?;
        self.allow(node, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
        vhost.check_topic(
            &node.auth,
            &self.shared.connection.user,
            &m.exchange,
            &m.routing_key,
            Access::Read,
        )?;
        let queue = match vhost.queue_for(&m.queue, self.shared.connection.id) {
            Ok(q) => q.name.clone(),
            Err(e) => match vhost.usable_remote_queue(&m.queue)? {
                Some(remote) => remote.name,
                None => return Err(e),
            },
        };
        let def = BindingDef {
            source: m.exchange,
            destination: Destination::Queue(queue),
            routing_key: m.routing_key,
            arguments: m.arguments,
        };
        vhost.bind(&def).await?;
        if !m.nowait {
            self.shared
                .write_method(&Method::QueueBindOk(QueueBindOk {}));
        }
        Ok(())
    }

    pub(super) async fn handle_queue_unbind(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: QueueUnbind,
    ) -> Result<(), AmqpError> {
        self.allow(node, vhost, Resource::Queue, &m.queue, Access::Write)?;
        self.allow(node, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
        // Unbinding is idempotent (a missing queue or binding is fine), but
        // another connection's exclusive queue is off limits (405).
        match vhost.find_queue(&m.queue) {
            Some(q) => vhost.check_exclusive(&q, self.shared.connection.id)?,
            None => {
                vhost.usable_remote_queue(&m.queue)?;
            }
        }
        let def = BindingDef {
            source: m.exchange,
            destination: Destination::Queue(m.queue),
            routing_key: m.routing_key,
            arguments: m.arguments,
        };
        vhost.unbind(&def).await?;
        self.shared
            .write_method(&Method::QueueUnbindOk(QueueUnbindOk {}));
        Ok(())
    }

    pub(super) async fn handle_queue_purge(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: QueuePurge,
    ) -> Result<(), AmqpError> {
        self.allow(node, vhost, Resource::Queue, &m.queue, Access::Read)?;
        let count = match vhost.queue_for(&m.queue, self.shared.connection.id) {
            Ok(queue) => vhost.purge(&queue),
            Err(e) => match (vhost.usable_remote_queue(&m.queue)?, node.peers.get()) {
                (Some(remote), Some(peers)) => {
                    let done = peers.purge(&remote.home, vhost.name(), &remote.name).await;
                    u64::from(remote.answered(done, vhost.name())?)
                }
                _ => return Err(e),
            },
        };
        if !m.nowait {
            self.shared
                .write_method(&Method::QueuePurgeOk(QueuePurgeOk {
                    message_count: count as u32,
                }));
        }
        Ok(())
    }

    pub(super) async fn handle_queue_delete(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: amqp_codec::methods::QueueDelete,
    ) -> Result<(), AmqpError> {
        self.allow(node, vhost, Resource::Queue, &m.queue, Access::Configure)?;
        let count = match vhost.find_queue(&m.queue) {
            Some(q) => {
                vhost.check_exclusive(&q, self.shared.connection.id)?;
                let count = vhost.delete_queue_if(&q, m.if_unused, m.if_empty).await?;
                self.consumers.retain(|(_, cq)| cq.id != q.id);
                count
            }
            // On its home node, which commits the deletion for every node.
            None => match (vhost.usable_remote_queue(&m.queue)?, node.peers.get()) {
                (Some(remote), Some(peers)) => {
                    let done = peers
                        .delete(
                            &remote.home,
                            vhost.name(),
                            &remote.name,
                            m.if_unused,
                            m.if_empty,
                        )
                        .await;
                    u64::from(remote.answered(done, vhost.name())?)
                }
                _ => 0,
            },
        };
        if !m.nowait {
            self.shared
                .write_method(&Method::QueueDeleteOk(QueueDeleteOk {
                    message_count: count as u32,
                }));
        }
        Ok(())
    }
}

/// Declares queue `name` on node `home` (chosen by `queue-leader-locator`),
/// which commits it for every node, and makes it routable here at once.
/// Answers its name and counts; `None` if `home` could not be asked (the
/// queue is then declared here, as `client-local` would).
async fn declare_on(
    peers: &dyn crate::peers::Peers,
    vhost: &Vhost,
    home: String,
    name: &amqp_codec::ShortStr,
    m: &QueueDeclare,
) -> Result<Option<(amqp_codec::ShortStr, u64, usize)>, AmqpError> {
    let declare = crate::peers::RemoteDeclare {
        vhost: vhost.name().to_owned(),
        queue: name.clone(),
        durable: m.durable,
        auto_delete: m.auto_delete,
        arguments: m.arguments.clone(),
    };
    match peers.declare(&home, declare).await {
        Ok((id, ready, consumers)) => {
            vhost.project_queue(&crate::meta::QueueDef {
                name: name.clone(),
                id,
                durable: m.durable,
                exclusive: false,
                auto_delete: m.auto_delete,
                arguments: m.arguments.clone(),
                home: Some(home),
                members: Vec::new(),
                replaces: None,
            });
            Ok(Some((name.clone(), u64::from(ready), consumers as usize)))
        }
        Err(r) if r.code != 0 => Err(AmqpError::channel(r.code, r.text)),
        Err(r) => {
            tracing::warn!(node = %home, queue = %name, error = %r.text, "cannot place the queue on that node; declaring it here");
            Ok(None)
        }
    }
}
