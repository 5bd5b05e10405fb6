//! [`MetaLog`]: where metadata commands are committed, and
//! [`LocalMetaLog`], the single-node one.
//!
//! `commit` completes once the command is durable and applied to the
//! [`MetaState`]. The local log validates and applies under one lock and
//! submits the definitions to the store under that same lock (so the store
//! sees changes in the order the state took them), then waits for the
//! store's group commit outside it. The cluster's metadata Raft group will
//! be a second implementation: commit = append to the replicated log, wait
//! for a majority, apply the same `MetaState` on every node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use queue_store::Store;

use super::command::MetaCommand;
use super::error::MetaError;
use super::state::{Applied, MetaState};

/// A commit in flight.
pub type Commit<'a> = Pin<Box<dyn Future<Output = Result<Applied, MetaError>> + Send + 'a>>;

/// Where metadata commands are committed.
pub trait MetaLog: Send + Sync + std::fmt::Debug {
    /// Validates, persists and applies `command`; completes when it is
    /// durable. A refused command changes nothing. The command takes its
    /// place in the order when `commit` is called, not when the future is
    /// first polled.
    fn commit(&self, command: MetaCommand) -> Commit<'_>;
}

/// The single-node log: the state in memory, the definitions in the store.
#[derive(Debug)]
pub struct LocalMetaLog {
    state: Mutex<MetaState>,
    store: Arc<Store>,
    /// Added to each commit that changed something (see
    /// `Config::metadata_commit_delay`).
    delay: Duration,
}

impl LocalMetaLog {
    /// A log over `state` (recovered from `store`'s definitions).
    pub fn new(state: MetaState, store: Arc<Store>, delay: Duration) -> LocalMetaLog {
        LocalMetaLog {
            state: Mutex::new(state),
            store,
            delay,
        }
    }
}

impl MetaLog for LocalMetaLog {
    fn commit(&self, command: MetaCommand) -> Commit<'_> {
        let applied = {
            let mut state = self.state.lock();
            state.apply(&command).inspect(|applied| {
                if !applied.is_empty() {
                    self.store.submit(applied.writes());
                }
            })
        };
        let durable = self.store.commit();
        let delay = self.delay;
        Box::pin(async move {
            let applied = applied?;
            if !applied.is_empty() {
                durable.await?;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                tracing::debug!(command = %command.describe(), "metadata committed");
            }
            Ok(applied)
        })
    }
}
