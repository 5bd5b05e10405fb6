//! Membership by gossip: chitchat (scuttlebutt reconciliation with a
//! phi-accrual failure detector) on UDP, on the same port number as the
//! cluster's TCP port. Each node publishes its own keys — its AMQP and
//! cluster addresses, version, figures (`stats`), the members it has
//! links to (`sees`) and those it cannot reach though gossip hears from
//! them (`partitions`) — and reads everyone else's into a [`GossipView`].
//!
//! Gossip is an address book and a hint: `/api/nodes` reads it (running,
//! figures, partitions), nothing else does. It never decides a leader,
//! membership or the fate of data; the metadata Raft group does.
//!
//! Datagrams carry an HMAC-SHA256 tag (16 octets) under a key derived from
//! the cluster secret and name, so a process without the secret cannot
//! inject state; a datagram with a wrong tag is dropped before chitchat
//! decodes it. (Replaying an old datagram is harmless: scuttlebutt keeps the
//! newest version of each key.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable,
    FailureDetectorConfig, Serializable,
};
use hmac::{Hmac, Mac};
use parking_lot::RwLock;
use server::peers::NodeStats;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Octets of the tag at the end of each datagram.
const TAG_LEN: usize = 16;

/// The largest UDP payload (what chitchat sizes its messages to).
const MAX_DATAGRAM: usize = 65_507;

/// How often a node gossips (and how often it refreshes its own keys).
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(250);

/// Keys each node publishes.
pub mod keys {
    /// Its AMQP address.
    pub const AMQP: &str = "amqp_addr";
    /// Its cluster address.
    pub const CLUSTER: &str = "cluster_addr";
    /// Warren's version.
    pub const VERSION: &str = "version";
    /// Its figures, JSON ([`server::peers::NodeStats`]).
    pub const STATS: &str = "stats";
    /// Members it has links to, comma-separated.
    pub const SEES: &str = "sees";
    /// Members it cannot reach that others see running, comma-separated.
    pub const PARTITIONS: &str = "partitions";
}

/// What gossip last said of one live node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heard {
    /// Its AMQP address.
    pub amqp_addr: String,
    /// Its cluster address.
    pub cluster_addr: String,
    /// Its version.
    pub version: String,
    /// Its figures.
    pub stats: Option<NodeStats>,
    /// Members it has links to.
    pub sees: BTreeSet<String>,
    /// Members it is partitioned from.
    pub partitions: Vec<String>,
}

/// The nodes the failure detector deems live, by node name (this node
/// included once it has heard itself, which is at once).
#[derive(Debug, Clone, Default)]
pub struct GossipView {
    /// Live nodes.
    pub live: BTreeMap<String, Heard>,
}

/// The view, shared between the gossip task and its readers.
pub type SharedView = Arc<RwLock<GossipView>>;

/// How this node gossips.
#[derive(Debug, Clone)]
pub struct GossipSettings {
    /// Node name (chitchat's node id).
    pub node_name: String,
    /// The cluster's name (chitchat drops other clusters' messages).
    pub cluster_name: String,
    /// Where to listen (UDP).
    pub bind: SocketAddr,
    /// Where peers send to.
    pub advertise: SocketAddr,
    /// Seeds, `host:port` (chitchat resolves them again every minute).
    pub seeds: Vec<String>,
    /// The cluster secret.
    pub secret: Arc<[u8]>,
    /// Keys published from the start.
    pub initial: Vec<(String, String)>,
}

/// This node's gossip.
pub struct Gossip {
    handle: ChitchatHandle,
    view: SharedView,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip").finish_non_exhaustive()
    }
}

impl Gossip {
    /// Binds the UDP port and starts gossiping.
    pub async fn start(settings: GossipSettings) -> anyhow::Result<Gossip> {
        // A new generation each start: peers then take a restarted node's
        // keys afresh instead of keeping the old incarnation's.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(
                settings.node_name.as_str(),
                generation,
                settings.advertise,
            ),
            cluster_id: settings.cluster_name.clone(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: settings.bind,
            seed_nodes: settings.seeds.clone(),
            // Phi 8 over a 250 ms heartbeat: a silent node is deemed dead
            // after about 4-5 s.
            failure_detector_config: FailureDetectorConfig {
                initial_interval: GOSSIP_INTERVAL * 4,
                max_interval: Duration::from_secs(2),
                dead_node_grace_period: Duration::from_secs(3_600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3_600),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let transport = SignedUdp {
            key: gossip_key(&settings.secret, &settings.cluster_name),
        };
        let handle = chitchat::spawn_chitchat(config, settings.initial, &transport)
            .await
            .with_context(|| format!("gossip on UDP {}", settings.bind))?;
        Ok(Gossip {
            handle,
            view: SharedView::default(),
        })
    }

    /// The view readers share.
    pub fn view(&self) -> SharedView {
        self.view.clone()
    }

    /// Publishes this node's `keys` and refreshes the view from what the
    /// failure detector deems live.
    pub async fn publish_and_refresh(&self, keys: &[(&str, String)]) {
        let view = self
            .handle
            .with_chitchat(|c| {
                let me = c.self_node_state();
                for (k, v) in keys {
                    if me.get(k) != Some(v.as_str()) {
                        me.set(*k, v);
                    }
                }
                let live: Vec<ChitchatId> = c.live_nodes().cloned().collect();
                let mut view = GossipView::default();
                for id in live {
                    let Some(state) = c.node_state(&id) else {
                        continue;
                    };
                    let text = |k: &str| state.get(k).unwrap_or_default().to_owned();
                    let list = |k: &str| -> Vec<String> {
                        state
                            .get(k)
                            .unwrap_or_default()
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    };
                    view.live.insert(
                        id.node_id.to_string(),
                        Heard {
                            amqp_addr: text(keys::AMQP),
                            cluster_addr: text(keys::CLUSTER),
                            version: text(keys::VERSION),
                            stats: state
                                .get(keys::STATS)
                                .and_then(|s| serde_json::from_str(s).ok()),
                            sees: list(keys::SEES).into_iter().collect(),
                            partitions: list(keys::PARTITIONS),
                        },
                    );
                }
                view
            })
            .await;
        *self.view.write() = view;
    }

    /// Stops gossiping.
    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}

/// The key gossip datagrams are tagged with: HMAC(secret, label | name).
fn gossip_key(secret: &[u8], cluster_name: &str) -> HmacSha256 {
    let derived = match HmacSha256::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(b"warren gossip v1\0");
            mac.update(cluster_name.as_bytes());
            mac.finalize().into_bytes()
        }
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => Default::default(),
    };
    match HmacSha256::new_from_slice(&derived) {
        Ok(k) => k,
        Err(_) => unreachable_key(),
    }
}

#[allow(clippy::expect_used)]
fn unreachable_key() -> HmacSha256 {
    HmacSha256::new_from_slice(&[0u8; 32]).expect("HMAC accepts any key length")
}

fn tag(key: &HmacSha256, payload: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = key.clone();
    mac.update(payload);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&full[..TAG_LEN]);
    tag
}

/// Chitchat's transport: UDP datagrams of `envelope | tag`.
struct SignedUdp {
    key: HmacSha256,
}

#[async_trait::async_trait]
impl Transport for SignedUdp {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("cannot bind UDP {listen_addr} for gossip"))?;
        Ok(Box::new(SignedSocket {
            socket,
            key: self.key.clone(),
            buf_send: Vec::with_capacity(MAX_DATAGRAM),
            buf_recv: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
            dropped: 0,
        }))
    }
}

struct SignedSocket {
    socket: tokio::net::UdpSocket,
    key: HmacSha256,
    buf_send: Vec<u8>,
    buf_recv: Box<[u8]>,
    /// Datagrams dropped for a bad tag or a bad envelope.
    dropped: u64,
}

/// Receive errors that say nothing about the socket itself (an ICMP
/// "port unreachable" from a peer that is down shows as one of these).
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::OutOfMemory
    )
}

#[async_trait::async_trait]
impl Socket for SignedSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        self.buf_send.clear();
        message.serialize(&mut self.buf_send);
        if self.buf_send.len() + TAG_LEN > MAX_DATAGRAM {
            tracing::warn!(
                octets = self.buf_send.len(),
                to = %to,
                "gossip message too large for a datagram; not sent"
            );
            return Ok(());
        }
        let t = tag(&self.key, &self.buf_send);
        self.buf_send.extend_from_slice(&t);
        match self.socket.send_to(&self.buf_send, to).await {
            Ok(_) => Ok(()),
            // A peer that is down is the failure detector's business.
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(e).context("gossip send"),
        }
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (n, from) = match self.socket.recv_from(&mut self.buf_recv).await {
                Ok(r) => r,
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e).context("gossip receive"),
            };
            let Some(body_len) = n.checked_sub(TAG_LEN) else {
                self.drop_datagram(from, "shorter than its tag");
                continue;
            };
            let (body, their_tag) = self.buf_recv[..n].split_at(body_len);
            let mut mac = self.key.clone();
            mac.update(body);
            if mac.verify_truncated_left(their_tag).is_err() {
                self.drop_datagram(from, "bad tag (another secret or cluster)");
                continue;
            }
            let mut cursor = body;
            match ChitchatMessage::deserialize(&mut cursor) {
                Ok(message) => return Ok((from, message)),
                Err(_) => self.drop_datagram(from, "undecodable"),
            }
        }
    }
}

impl SignedSocket {
    /// Counts a dropped datagram; logs the first and every 1,000th.
    fn drop_datagram(&mut self, from: SocketAddr, why: &str) {
        self.dropped += 1;
        if self.dropped % 1_000 == 1 {
            tracing::warn!(from = %from, why, dropped = self.dropped, "gossip datagram dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn settings(name: &str, port: u16, seeds: Vec<String>, secret: &[u8]) -> GossipSettings {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        GossipSettings {
            node_name: name.into(),
            cluster_name: "test".into(),
            bind: addr,
            advertise: addr,
            seeds,
            secret: secret.into(),
            initial: vec![(keys::AMQP.into(), format!("amqp-of-{name}"))],
        }
    }

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f().await {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn nodes_with_the_secret_see_each_other_and_a_stranger_is_ignored() {
        let (p1, p2, p3) = (free_udp_port(), free_udp_port(), free_udp_port());
        let seed = format!("127.0.0.1:{p1}");
        let a = Gossip::start(settings("a", p1, vec![], b"the-right-secret-0123"))
            .await
            .unwrap();
        let b = Gossip::start(settings(
            "b",
            p2,
            vec![seed.clone()],
            b"the-right-secret-0123",
        ))
        .await
        .unwrap();
        let stranger = Gossip::start(settings("x", p3, vec![seed], b"another-secret-456789"))
            .await
            .unwrap();
        until("a and b hear each other", async || {
            for g in [&a, &b, &stranger] {
                g.publish_and_refresh(&[(keys::SEES, "a,b".into())]).await;
            }
            let (va, vb) = (a.view().read().clone(), b.view().read().clone());
            va.live.contains_key("b") && vb.live.contains_key("a")
        })
        .await;
        let va = a.view().read().clone();
        assert_eq!(va.live["b"].amqp_addr, "amqp-of-b");
        assert_eq!(
            va.live["b"].sees,
            ["a".to_owned(), "b".to_owned()].into_iter().collect()
        );
        // The stranger has been gossiping at `a` all along.
        assert!(!va.live.contains_key("x"), "{va:?}");
        assert!(!stranger.view().read().live.contains_key("a"));

        // `b` stops: `a`'s failure detector drops it within seconds.
        b.shutdown().await;
        until("a deems b dead", async || {
            a.publish_and_refresh(&[]).await;
            !a.view().read().live.contains_key("b")
        })
        .await;
        a.shutdown().await;
        stranger.shutdown().await;
    }

    #[test]
    fn a_tag_covers_every_octet() {
        let key = gossip_key(b"secret-secret-secret", "c");
        let t = tag(&key, b"payload");
        assert_ne!(t, tag(&key, b"pay1oad"));
        assert_ne!(
            t,
            tag(&gossip_key(b"secret-secret-secret", "d"), b"payload")
        );
        assert_ne!(
            t,
            tag(&gossip_key(b"secret-secret-secreT", "c"), b"payload")
        );
    }
}
