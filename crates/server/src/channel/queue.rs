//! `queue.*`: declare (with the redeclare checks), bind, unbind, purge and
//! delete.

use std::sync::Arc;

use ::exchange::{BindingDef, Destination};
use amqp_codec::Method;
use amqp_codec::methods::*;
use queue_store::{QueueArgs, args::first_difference};

use super::{Channel, server_name};
use crate::auth::{Access, Resource};
use crate::broker::Broker;
use crate::error::AmqpError;
use crate::queue::QueueHandle;
use crate::reply_to;
use crate::vhost::Vhost;

impl Channel {
    pub(super) async fn handle_queue_declare(
        &mut self,
        broker: &Arc<Broker>,
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
            || broker.reply_consumers.is_live_address(&m.queue)
        {
            // Direct reply-to, as RabbitMQ: the pseudo-queue, or a reply
            // address whose consumer is alive, has one consumer.
            (m.queue.clone(), 0, 1)
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
            self.allow(broker, vhost, Resource::Queue, &name, Access::Configure)?;
            let args = QueueArgs::parse(&m.arguments, &name, vhost.name())?;
            // As RabbitMQ: naming a dead-letter exchange needs read access
            // to the queue and write access to the exchange.
            if let Some(dlx) = &args.dead_letter_exchange {
                self.allow(broker, vhost, Resource::Queue, &name, Access::Read)?;
                self.allow(broker, vhost, Resource::Exchange, dlx, Access::Write)?;
            }
            args.check_properties(m.durable, m.exclusive, m.auto_delete, &name, vhost.name())?;
            // As RabbitMQ: an exclusive queue is never durable, whatever the
            // declare says (so redeclaring it either way is equivalent).
            let m = QueueDeclare {
                durable: m.durable && !m.exclusive,
                ..m
            };
            let q = match vhost.find_queue(&name) {
                Some(existing) => {
                    vhost.check_same_owner(&existing, m.exclusive.then_some(conn))?;
                    check_equivalent(&existing, &m, vhost.name())?;
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
        };
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
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: QueueBind,
    ) -> Result<(), AmqpError> {
        self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Write)?;
        self.allow(broker, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
        vhost.check_topic(
            &broker.auth,
            &self.shared.connection.user,
            &m.exchange,
            &m.routing_key,
            Access::Read,
        )?;
        let queue = vhost
            .queue_for(&m.queue, self.shared.connection.id)?
            .name
            .clone();
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
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: QueueUnbind,
    ) -> Result<(), AmqpError> {
        self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Write)?;
        self.allow(broker, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
        // Unbinding is idempotent (a missing queue or binding is fine), but
        // another connection's exclusive queue is off limits (405).
        if let Some(q) = vhost.find_queue(&m.queue) {
            vhost.check_exclusive(&q, self.shared.connection.id)?;
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

    pub(super) fn handle_queue_purge(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: QueuePurge,
    ) -> Result<(), AmqpError> {
        self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Read)?;
        let queue = vhost.queue_for(&m.queue, self.shared.connection.id)?;
        let count = vhost.purge(&queue);
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
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: amqp_codec::methods::QueueDelete,
    ) -> Result<(), AmqpError> {
        self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Configure)?;
        let count = match vhost.find_queue(&m.queue) {
            None => 0,
            Some(q) => {
                vhost.check_exclusive(&q, self.shared.connection.id)?;
                {
                    let counts = q.counters();
                    if m.if_unused && counts.consumers > 0 {
                        return Err(AmqpError::precondition_failed(format!(
                            "queue '{}' in vhost '{}' in use",
                            q.name,
                            vhost.name()
                        )));
                    }
                    if m.if_empty && counts.ready > 0 {
                        return Err(AmqpError::precondition_failed(format!(
                            "queue '{}' in vhost '{}' not empty",
                            q.name,
                            vhost.name()
                        )));
                    }
                }
                self.consumers.retain(|(_, cq)| cq.id != q.id);
                vhost.delete_queue(&q, false).await?
            }
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

/// The 406 for redeclaring `q` with different properties or arguments.
pub(crate) fn check_equivalent(
    q: &QueueHandle,
    m: &QueueDeclare,
    vhost: &str,
) -> Result<(), AmqpError> {
    let ineq = |arg: &str, received: String, current: String| {
        AmqpError::precondition_failed(format!(
            "inequivalent arg '{arg}' for queue '{}' in vhost '{vhost}': received {received} but current is {current}",
            q.name
        ))
    };
    if q.durable != m.durable {
        return Err(ineq(
            "durable",
            format!("'{}'", m.durable),
            format!("'{}'", q.durable),
        ));
    }
    if q.auto_delete != m.auto_delete {
        return Err(ineq(
            "auto_delete",
            format!("'{}'", m.auto_delete),
            format!("'{}'", q.auto_delete),
        ));
    }
    if let Some((arg, received, current)) = first_difference(&q.arguments, &m.arguments) {
        return Err(ineq(arg, received, current));
    }
    Ok(())
}
