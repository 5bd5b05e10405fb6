//! Direct reply-to: RPC replies without a reply queue (RabbitMQ's
//! `amq.rabbitmq.reply-to`).
//!
//! A client consumes from the pseudo-queue `amq.rabbitmq.reply-to` in no-ack
//! mode and publishes requests with `reply-to: amq.rabbitmq.reply-to`; the
//! broker rewrites that to `amq.rabbitmq.reply-to.<token>`, a name routable
//! through the default exchange that leads straight to the consumer's channel.
//! Replies published to it are delivered at once; nothing is queued, so a reply
//! to a consumer that is gone is unroutable.

use std::sync::Arc;

use amqp_codec::methods::BasicDeliver;
use amqp_codec::{ContentHeader, Method, ShortStr};
use dashmap::DashMap;

use crate::metrics::DeliveryKind;
use crate::session::ChannelShared;

/// The pseudo-queue clients consume from.
pub const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";

/// Reply consumers by token.
#[derive(Debug, Default)]
pub struct ReplyConsumers {
    by_token: DashMap<String, (Arc<ChannelShared>, ShortStr)>,
}

impl ReplyConsumers {
    /// Registers a channel's reply consumer; returns its token.
    pub fn register(&self, channel: Arc<ChannelShared>, tag: ShortStr) -> String {
        use rand::Rng;
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let token: String = (0..24)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        self.by_token.insert(token.clone(), (channel, tag));
        token
    }

    /// Whether `name` is the full reply address of a live reply consumer
    /// (`amq.rabbitmq.reply-to.<token>`): a passive declare of it succeeds.
    pub fn is_live_address(&self, name: &str) -> bool {
        name.strip_prefix(PSEUDO_QUEUE)
            .and_then(|t| t.strip_prefix('.'))
            .is_some_and(|token| self.by_token.contains_key(token))
    }

    /// Forgets a token (consumer cancelled, channel closed).
    pub fn unregister(&self, token: &str) {
        self.by_token.remove(token);
    }

    /// Delivers a reply published to `routing_key` (`amq.rabbitmq.reply-to.<token>`).
    /// Returns false if no such consumer exists (the reply is unroutable).
    pub fn deliver(&self, routing_key: &ShortStr, header: &ContentHeader, body: &[u8]) -> bool {
        let Some(token) = routing_key
            .strip_prefix(PSEUDO_QUEUE)
            .and_then(|t| t.strip_prefix('.'))
        else {
            return false;
        };
        let Some(entry) = self.by_token.get(token) else {
            return false;
        };
        let (channel, tag) = entry.value();
        let delivery_tag = channel.next_delivery(DeliveryKind::Consume, false, None);
        // (A channel closing right now takes no more frames.)
        channel.write_content_if_open(
            &Method::BasicDeliver(BasicDeliver {
                consumer_tag: tag.clone(),
                delivery_tag,
                redelivered: false,
                exchange: ShortStr::default(),
                routing_key: routing_key.clone(),
            }),
            header,
            body,
        )
    }
}

/// The routable name for a token.
pub fn reply_address(token: &str) -> ShortStr {
    ShortStr::try_from(format!("{PSEUDO_QUEUE}.{token}")).unwrap_or_default()
}
