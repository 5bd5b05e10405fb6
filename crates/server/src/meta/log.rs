//! [`MetaLog`]: where metadata commands are committed, and
//! [`LocalMetaLog`], the single-node one.
//!
//! `commit` completes once the command is durable, applied to the
//! [`MetaState`] and projected: handed, in log order, to the node's
//! [`MetaProjection`] (users and permissions, vhosts and their limits,
//! policies), which updates the runtime views. The projection is driven by
//! the log, not by the caller, because in a cluster the commands a node
//! applies are mostly not its own.
//!
//! The local log validates and applies under one lock and submits the
//! definitions to the store under that same lock (so the store sees changes
//! in the order the state took them), then waits for the store's group
//! commit outside it; a task of its own then projects every command up to
//! this one that is not projected yet, so projections follow the log's
//! order whichever commit finishes first, and happen even if the caller
//! stops waiting. The cluster's metadata Raft group will be a second
//! implementation: commit = append to the replicated log, wait for a
//! majority, apply the same `MetaState` and projection on every node.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
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
    /// Validates, persists, applies and projects `command`; completes when
    /// it is durable and projected. A refused command changes nothing. The
    /// command takes its place in the order when `commit` is called, not
    /// when the future is first polled.
    fn commit(&self, command: MetaCommand) -> Commit<'_>;

    /// Where committed commands are projected from now on (set once, at
    /// start, before the first commit that must be projected).
    fn set_projection(&self, projection: Weak<dyn MetaProjection>);

    /// For a log that keeps its own state (a cluster's): sets the
    /// projection and returns the state as of that moment, atomically, so
    /// that every command not in the returned state is projected. The
    /// broker then rebuilds its vhosts and queues from that state instead
    /// of the store's definitions. `None` (the local log): the store's
    /// definitions are the state.
    fn attach(&self, projection: Weak<dyn MetaProjection>) -> Option<super::MetaState> {
        self.set_projection(projection);
        None
    }
}

/// A node's runtime views of the metadata, kept up to date from the log:
/// every command that changed the state, once durable, in log order.
pub trait MetaProjection: Send + Sync {
    /// Applies a committed command to the runtime views. Called with no
    /// lock of the log's held but its projection order; must not commit.
    fn project(&self, command: &MetaCommand);
}

/// The state and the commands applied to it but not projected yet.
#[derive(Debug)]
struct Logged {
    state: MetaState,
    next_seq: u64,
    unprojected: VecDeque<(u64, MetaCommand)>,
}

#[derive(Default)]
struct Projector {
    target: OnceLock<Weak<dyn MetaProjection>>,
    /// Held while projecting: one projector at a time, so in order.
    order: Mutex<()>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("set", &self.target.get().is_some())
            .finish()
    }
}

#[derive(Debug)]
struct Inner {
    logged: Mutex<Logged>,
    projector: Projector,
}

impl Inner {
    /// Projects every command up to `seq` not projected yet, in order.
    fn project_through(&self, seq: u64) {
        let _order = self.projector.order.lock();
        let due: Vec<MetaCommand> = {
            let mut logged = self.logged.lock();
            let n = logged
                .unprojected
                .iter()
                .take_while(|(s, _)| *s <= seq)
                .count();
            logged.unprojected.drain(..n).map(|(_, c)| c).collect()
        };
        let Some(target) = self.projector.target.get().and_then(Weak::upgrade) else {
            return;
        };
        for command in &due {
            target.project(command);
        }
    }
}

/// The single-node log: the state in memory, the definitions in the store.
#[derive(Debug)]
pub struct LocalMetaLog {
    inner: Arc<Inner>,
    store: Arc<Store>,
    /// Added to each commit that changed something (see
    /// `Config::metadata_commit_delay`).
    delay: Duration,
}

impl LocalMetaLog {
    /// A log over `state` (recovered from `store`'s definitions).
    pub fn new(state: MetaState, store: Arc<Store>, delay: Duration) -> LocalMetaLog {
        LocalMetaLog {
            inner: Arc::new(Inner {
                logged: Mutex::new(Logged {
                    state,
                    next_seq: 0,
                    unprojected: VecDeque::new(),
                }),
                projector: Projector::default(),
            }),
            store,
            delay,
        }
    }
}

impl MetaLog for LocalMetaLog {
    fn commit(&self, command: MetaCommand) -> Commit<'_> {
        let result = {
            let mut logged = self.inner.logged.lock();
            match logged.state.apply(&command) {
                Ok(applied) if !applied.is_empty() => {
                    self.store.submit(applied.writes());
                    let seq = logged.next_seq;
                    logged.next_seq += 1;
                    logged.unprojected.push_back((seq, command.clone()));
                    Ok((applied, Some(seq)))
                }
                Ok(applied) => Ok((applied, None)),
                Err(e) => Err(e),
            }
        };
        let (applied, seq) = match result {
            Ok(r) => r,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let Some(seq) = seq else {
            return Box::pin(std::future::ready(Ok(applied)));
        };
        // Waited for and projected by a task of its own: a caller that stops
        // waiting does not leave the command unprojected.
        let durable = self.store.commit();
        let delay = self.delay;
        let inner = self.inner.clone();
        let done = tokio::spawn(async move {
            let result = durable.await;
            if result.is_ok() && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // Projected even if the store failed: the state has it.
            inner.project_through(seq);
            result
        });
        Box::pin(async move {
            match done.await {
                Ok(Ok(())) => {
                    tracing::debug!(command = %command.describe(), "metadata committed");
                    Ok(applied)
                }
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(MetaError::Store(queue_store::StoreError::Engine(format!(
                    "metadata commit did not finish: {e}"
                )))),
            }
        })
    }

    fn set_projection(&self, projection: Weak<dyn MetaProjection>) {
        if self.inner.projector.target.set(projection).is_err() {
            tracing::warn!("the metadata projection was already set");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::meta::User;

    /// Records what it is handed.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl MetaProjection for Recorder {
        fn project(&self, command: &MetaCommand) {
            self.0.lock().push(command.describe());
        }
    }

    fn log(dir: &std::path::Path) -> (LocalMetaLog, Arc<Recorder>) {
        let (store, _) = Store::open(dir).unwrap();
        let log = LocalMetaLog::new(MetaState::default(), Arc::new(store), Duration::ZERO);
        let recorder = Arc::new(Recorder::default());
        let weak = Arc::downgrade(&recorder);
        let projection: Weak<dyn MetaProjection> = weak;
        log.set_projection(projection);
        (log, recorder)
    }

    fn user(name: &str) -> MetaCommand {
        MetaCommand::PutUser(User {
            name: name.to_owned(),
            password_hash: None,
            tags: Vec::new(),
        })
    }

    /// Commands are projected in the log's order, whichever commit is
    /// awaited first, by the time their own commit completes; a refused or
    /// no-op command is not projected.
    #[tokio::test]
    async fn projections_follow_the_log_order() {
        let dir = tempfile::tempdir().unwrap();
        let (log, recorder) = log(dir.path());
        let put = log.commit(user("a"));
        let delete = log.commit(MetaCommand::DeleteUser { name: "a".into() });
        let again = log.commit(MetaCommand::DeleteUser { name: "a".into() });
        delete.await.unwrap();
        assert!(matches!(again.await, Err(MetaError::NotFound(_))));
        put.await.unwrap();
        let seen = recorder.0.lock().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen[0].contains("put user") && seen[1].contains("delete user"),
            "{seen:?}"
        );
    }

    /// A commit whose caller stops waiting is still projected.
    #[tokio::test]
    async fn an_abandoned_commit_is_still_projected() {
        let dir = tempfile::tempdir().unwrap();
        let (log, recorder) = log(dir.path());
        drop(log.commit(user("b")));
        log.commit(user("c")).await.unwrap();
        let seen = recorder.0.lock().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
    }
}
