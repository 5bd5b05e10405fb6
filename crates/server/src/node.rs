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
use crate::meta::MetaLog;

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
    next_queue: AtomicU64,
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
            next_queue: AtomicU64::new(1),
        }
    }

    /// A fresh queue storage id.
    pub fn next_queue_id(&self) -> u64 {
        self.next_queue.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps fresh ids above a recovered one.
    pub fn note_queue_id(&self, id: u64) {
        self.next_queue.fetch_max(id + 1, Ordering::Relaxed);
    }
}
