//! [`ConnectionShared`]: what other tasks need of a connection — its
//! outbox and negotiated limits, who it is, the flow gates it waits on, its
//! channels (for listings) and the switch that closes it from outside.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use amqp_codec::FieldTable;
use queue_store::FlowGate;

use crate::outbox::Outbox;

/// What other tasks need of a connection.
#[derive(Debug)]
pub struct ConnectionShared {
    /// Broker-unique id.
    pub id: u64,
    /// Outgoing frames (the same outbox the handshake wrote to).
    pub outbox: Arc<Outbox>,
    /// Negotiated `frame_max`.
    pub frame_max: AtomicU32,
    /// The client wants `basic.cancel` when the broker cancels its consumers.
    pub cancel_notify: bool,
    /// Negotiated `channel_max`.
    pub channel_max: u16,
    /// The client understands `connection.blocked` / `unblocked`.
    pub blocked_notify: bool,
    /// The connection has published: it is blocked while an alarm is raised.
    pub has_published: std::sync::atomic::AtomicBool,
    /// Flow gates of the queues (or the store) this connection's publishes
    /// found congested: it is not read until they are all lowered.
    pub congested: parking_lot::Mutex<Vec<Arc<FlowGate>>>,
    /// Authenticated user.
    pub user: String,
    /// The broker's counters (deliveries are counted per channel).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// RabbitMQ-style name, `peer -> local`.
    pub name: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// The vhost it opened.
    pub vhost: String,
    /// Over TLS.
    pub tls: bool,
    /// When the handshake completed (ms since the epoch).
    pub connected_at: u64,
    /// Open channels (weak: the connection task owns them).
    pub channels: parking_lot::Mutex<HashMap<u16, std::sync::Weak<super::ChannelShared>>>,
    /// Cancelled to close the connection from outside (management API),
    /// with `close_reason` as the `connection.close` text.
    pub force_close: tokio_util::sync::CancellationToken,
    /// See `force_close`.
    pub close_reason: parking_lot::Mutex<String>,
    /// The broker's end of the socket.
    pub local: SocketAddr,
    /// The SASL mechanism the client logged in with.
    pub auth_mechanism: String,
    /// The negotiated heartbeat, seconds (0: none).
    pub heartbeat: u16,
    /// Octets read from the socket since open-ok, and in how many reads
    /// (the management API's `recv_oct` and `recv_cnt`).
    pub recv_oct: std::sync::atomic::AtomicU64,
    /// Socket reads since open-ok.
    pub recv_cnt: std::sync::atomic::AtomicU64,
    /// How `recv_oct` and the octets sent moved (`recv_oct_details`,
    /// `send_oct_details`), sampled every 5 s by the monitor.
    pub octet_rates: crate::rates::SampledRates<2>,
    /// What the client said of itself in `connection.start-ok` (product,
    /// version, capabilities, `connection_name`), for the management API.
    pub client_properties: FieldTable,
}

impl ConnectionShared {
    /// Its open channels, by number (for listings, metrics and sampling;
    /// the lock is let go before the caller looks at them).
    pub fn open_channels(&self) -> Vec<(u16, Arc<super::ChannelShared>)> {
        let mut open: Vec<_> = self
            .channels
            .lock()
            .iter()
            .filter_map(|(n, ch)| Some((*n, ch.upgrade()?)))
            .collect();
        open.sort_by_key(|(n, _)| *n);
        open
    }

    /// Octets received and sent so far.
    pub fn octets(&self) -> [u64; 2] {
        [
            self.recv_oct.load(std::sync::atomic::Ordering::Relaxed),
            self.outbox.sent().0,
        ]
    }

    /// Samples [`octets`](Self::octets) for their rates.
    pub fn sample_octets(&self) {
        self.octet_rates.sample(self.octets());
    }

    /// Records that a publish found `gate` raised: the connection stops
    /// being read after the current batch of frames, until it lowers.
    pub fn note_congested(&self, gate: &Arc<FlowGate>) {
        let mut gates = self.congested.lock();
        if !gates.iter().any(|g| Arc::ptr_eq(g, gate)) {
            gates.push(gate.clone());
        }
    }
}
