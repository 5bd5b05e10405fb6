//! [`Node`]: what the vhosts, queues and channels of this node share — the
//! settings, the store, the metadata log, the metrics, the alarms, users and
//! permissions, the direct reply-to registry, the task tracker and shutdown
//! signal, the queue id counter — handed to each vhost when it is made and
//! to each channel with every command, instead of the whole `Broker` (which
//! holds the vhosts and the connections on top of it).
//!
//! `Broker` dereferences to its `Node`, so code that has a broker reads
//! these fields as before.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use queue_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::meta::{MetaLog, queue_counter};

/// What every vhost and queue of this node uses.
#[derive(Debug)]
pub struct Node {
    /// Settings.
    pub config: Config,
    /// Durable storage.
    pub store: Arc<Store>,
    /// Where metadata changes are committed (the only writer of definitions).
    pub meta: Box<dyn MetaLog>,
    /// Where deep queues spill the entries behind their in-memory window
    /// (`<data dir>/spill`; the files in it are anonymous). `None` if it
    /// could not be created: queues then keep every entry in memory.
    pub spill_dir: Option<Arc<Path>>,
    /// Memory and disk alarms.
    pub alarms: crate::alarm::Alarms,
    /// Prometheus counters and gauges.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Users and permissions (the view of the metadata a connection and a
    /// channel check against).
    pub auth: crate::auth::Auth,
    /// Direct reply-to consumers (`amq.rabbitmq.reply-to`), by address.
    pub reply_consumers: crate::reply_to::ReplyConsumers,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// Every task the broker spawned.
    pub tracker: TaskTracker,
    /// The cluster's way to queues on other nodes (unset: a node alone).
    pub peers: std::sync::OnceLock<Arc<dyn crate::peers::Peers>>,
    /// How this node joins a cluster (`join_cluster`); unset: it cannot
    /// (started without a cluster secret).
    pub cluster_join: std::sync::OnceLock<Arc<dyn crate::peers::ClusterJoin>>,
    /// Notified when the node must restart (it joined another cluster).
    restart: tokio::sync::Notify,
    next_queue: AtomicU64,
    /// The queue counter this run started at (a cluster only): a
    /// transient queue homed here with a lower one died with an earlier run.
    run_start: AtomicU64,
    /// Set once this run's [`MetaCommand::DropTransient`] is committed.
    transient_dropped: tokio::sync::OnceCell<()>,
}

impl Node {
    /// The node's shared parts.
    pub fn new(
        config: Config,
        store: Arc<Store>,
        meta: Box<dyn MetaLog>,
        spill_dir: Option<Arc<Path>>,
        alarms: crate::alarm::Alarms,
    ) -> Node {
        Node {
            config,
            store,
            meta,
            spill_dir,
            alarms,
            metrics: Arc::default(),
            auth: crate::auth::Auth::default(),
            reply_consumers: crate::reply_to::ReplyConsumers::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            peers: std::sync::OnceLock::new(),
            cluster_join: std::sync::OnceLock::new(),
            restart: tokio::sync::Notify::new(),
            next_queue: AtomicU64::new(1),
            run_start: AtomicU64::new(0),
            transient_dropped: tokio::sync::OnceCell::new(),
        }
    }

    /// Asks whoever runs the node to shut it down and start it again (a
    /// `join_cluster` takes effect on the restart).
    pub fn request_restart(&self) {
        self.restart.notify_one();
    }

    /// Resolves once a restart was asked for.
    pub async fn restart_requested(&self) {
        self.restart.notified().await;
    }

    /// Starts this run's queue ids, once recovery has noted every id it
    /// found. In a cluster the counter also starts no lower than the
    /// milliseconds since 2025 began, so that it is above the ids of an
    /// earlier run that this node has not applied yet (unless that run
    /// declared more than one queue per millisecond of its life).
    pub fn begin_run(&self) {
        if self.peers.get().is_some() {
            const EPOCH_2025_MS: u64 = 1_735_689_600_000;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let floor = queue_counter(now.saturating_sub(EPOCH_2025_MS));
            self.next_queue.fetch_max(floor, Ordering::Relaxed);
        }
        self.run_start
            .store(self.next_queue.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Commits, once per run, that the transient and exclusive queues this
    /// node held in an earlier run are gone ([`MetaCommand::DropTransient`]);
    /// a transient declare waits for it, so that a stale queue of the same
    /// name is gone first. Nothing to do on a node alone.
    pub async fn drop_earlier_transient(&self) -> Result<(), crate::meta::MetaError> {
        if self.peers.get().is_none() {
            return Ok(());
        }
        self.transient_dropped
            .get_or_try_init(|| async {
                let command = crate::meta::MetaCommand::DropTransient {
                    home: self.config.node_name.clone(),
                    before: self.run_start.load(Ordering::Relaxed),
                };
                self.meta.commit(command).await.map(|_| ())
            })
            .await
            .map(|_| ())
    }

    /// A fresh queue storage id. In a cluster, ids carry 20 bits of the
    /// node's name's hash above a 40-bit counter, so queues declared on
    /// different nodes do not share an id in any node's router.
    pub fn next_queue_id(&self) -> u64 {
        let n = self.next_queue.fetch_add(1, Ordering::Relaxed);
        match self.peers.get() {
            None => n,
            Some(_) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                self.config.node_name.hash(&mut h);
                ((h.finish() & 0xF_FFFF) << 40) | queue_counter(n)
            }
        }
    }

    /// The home to record for a queue declared here: this node's name in a
    /// cluster, none for a node alone (whose records stay as they were).
    pub fn queue_home(&self) -> Option<String> {
        self.peers.get().map(|_| self.config.node_name.clone())
    }

    /// Whether a queue whose definition names `home` lives on this node.
    pub fn is_home(&self, home: &Option<String>) -> bool {
        home.as_ref().is_none_or(|h| *h == self.config.node_name)
    }

    /// Keeps fresh ids above a recovered one.
    pub fn note_queue_id(&self, id: u64) {
        self.next_queue
            .fetch_max(queue_counter(id) + 1, Ordering::Relaxed);
    }
}
