//! `exchange.*`: declare, delete, bind and unbind, with their permission
//! checks.

use std::sync::Arc;

use ::exchange::{BindingDef, Destination, ExchangeDeclare as RouterDeclare};
use amqp_codec::methods::*;
use amqp_codec::{FieldTable, Method, ShortStr};

use super::Channel;
use crate::auth::{Access, Resource};
use crate::error::AmqpError;
use crate::node::Node;
use crate::vhost::Vhost;

impl Channel {
    pub(super) async fn handle_exchange_declare(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: ExchangeDeclare,
    ) -> Result<(), AmqpError> {
        if !m.passive && !m.exchange.is_empty() {
            self.allow(
                node,
                vhost,
                Resource::Exchange,
                &m.exchange,
                Access::Configure,
            )?;
            // As RabbitMQ: naming an alternate exchange needs read access to
            // this exchange and write access to the alternate.
            if let Some(ae) = m
                .arguments
                .get("alternate-exchange")
                .and_then(amqp_codec::FieldValue::as_str)
            {
                self.allow(node, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
                self.allow(node, vhost, Resource::Exchange, ae, Access::Write)?;
            }
        }
        let decl = RouterDeclare {
            name: &m.exchange,
            kind: &m.kind,
            durable: m.durable,
            auto_delete: m.auto_delete,
            internal: m.internal,
            arguments: &m.arguments,
        };
        vhost.declare_exchange(decl, m.passive).await?;
        if !m.nowait {
            self.shared
                .write_method(&Method::ExchangeDeclareOk(ExchangeDeclareOk {}));
        }
        Ok(())
    }

    pub(super) async fn handle_exchange_delete(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: amqp_codec::methods::ExchangeDelete,
    ) -> Result<(), AmqpError> {
        if !m.exchange.is_empty() {
            self.allow(
                node,
                vhost,
                Resource::Exchange,
                &m.exchange,
                Access::Configure,
            )?;
        }
        vhost.delete_exchange(&m.exchange, m.if_unused).await?;
        if !m.nowait {
            self.shared
                .write_method(&Method::ExchangeDeleteOk(ExchangeDeleteOk {}));
        }
        Ok(())
    }

    pub(super) async fn handle_exchange_bind(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: ExchangeBind,
    ) -> Result<(), AmqpError> {
        let def = self.exchange_binding(
            node,
            vhost,
            m.source,
            m.destination,
            m.routing_key,
            m.arguments,
        )?;
        vhost.bind(&def).await?;
        if !m.nowait {
            self.shared
                .write_method(&Method::ExchangeBindOk(ExchangeBindOk {}));
        }
        Ok(())
    }

    pub(super) async fn handle_exchange_unbind(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: ExchangeUnbind,
    ) -> Result<(), AmqpError> {
        let def = self.exchange_binding(
            node,
            vhost,
            m.source,
            m.destination,
            m.routing_key,
            m.arguments,
        )?;
        vhost.unbind(&def).await?;
        if !m.nowait {
            self.shared
                .write_method(&Method::ExchangeUnbindOk(ExchangeUnbindOk {}));
        }
        Ok(())
    }

    /// The binding an `exchange.bind` or `exchange.unbind` names, once the
    /// user may write the destination and read the source (RabbitMQ's rule).
    pub(super) fn exchange_binding(
        &self,
        node: &Node,
        vhost: &Vhost,
        source: ShortStr,
        destination: ShortStr,
        routing_key: ShortStr,
        arguments: FieldTable,
    ) -> Result<BindingDef, AmqpError> {
        self.allow(node, vhost, Resource::Exchange, &destination, Access::Write)?;
        self.allow(node, vhost, Resource::Exchange, &source, Access::Read)?;
        Ok(BindingDef {
            source,
            destination: Destination::Exchange(destination),
            routing_key,
            arguments,
        })
    }
}
