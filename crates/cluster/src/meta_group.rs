//! The metadata Raft group: its openraft types ([`MetaTypes`]), its log on
//! the node's WAL (a [`GroupLog`](crate::group_log::GroupLog) in JSON), its state machine
//! ([`MetaMachine`]: the server's `MetaState`, applied on every node and
//! handed to the node's projection). Its network is a
//! [`GroupNetwork`](crate::group_net::GroupNetwork) over the cluster links.
//!
//! The state machine is in memory; what makes it durable is the log (every
//! entry fsync'd before it is acknowledged) and snapshots
//! (`<data dir>/raft/meta.snapshot`, written durably before openraft purges
//! the entries they cover). At boot the snapshot is loaded and openraft
//! re-applies the committed entries after it, before the server rebuilds
//! its vhosts and queues from the result.
//!
//! A refused command (say, a permission for a vhost that does not exist) is
//! still a log entry: every node refuses it the same way, since
//! `MetaState::apply` is deterministic.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::sync::{Arc, OnceLock, Weak};

use amqp_codec::FieldTable;
use bytes::{Bytes, BytesMut};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use queue_store::DefKind;
use serde::{Deserialize, Serialize};
use server::meta::{MetaCommand, MetaError, MetaProjection, MetaState};

use crate::group_log::SnapshotFile;
use crate::identity::NodeInfo;

/// The metadata group's id on the links and in the WAL.
pub const META_GROUP: u64 = 0;

/// The metadata group's log: JSON records (what existing data directories
/// hold).
impl crate::group_log::LogFormat for MetaTypes {
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
        serde_json::to_vec(value).map_err(|e| e.to_string())
    }

    fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

openraft::declare_raft_types!(
    /// The metadata group's types.
    pub MetaTypes:
        D = MetaRequest,
        R = MetaResponse,
        NodeId = u64,
        Node = NodeInfo,
        Entry = Entry<MetaTypes>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What the metadata log holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaRequest {
    /// A metadata command, in the server's wire form.
    Command(Vec<u8>),
    /// A node removed from the cluster: it may never talk to it again.
    Forget {
        /// Its Raft id.
        id: u64,
        /// Its name.
        name: String,
    },
}

/// A command's outcome, as every node computed it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaResponse {
    /// `Ok(created)`: whether it created or removed something; or why it
    /// was refused.
    pub result: Option<Result<bool, WireError>>,
}

/// A [`MetaError`] as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WireError {
    /// `MetaError::NotFound`.
    NotFound(String),
    /// `MetaError::Conflict`.
    Conflict(String),
    /// `MetaError::Invalid`.
    Invalid(String),
    /// Anything else (store, availability).
    Other(String),
}

impl From<&MetaError> for WireError {
    fn from(e: &MetaError) -> WireError {
        match e {
            MetaError::NotFound(t) => WireError::NotFound(t.clone()),
            MetaError::Conflict(t) => WireError::Conflict(t.clone()),
            MetaError::Invalid(t) => WireError::Invalid(t.clone()),
            other => WireError::Other(other.to_string()),
        }
    }
}

impl From<WireError> for MetaError {
    fn from(e: WireError) -> MetaError {
        match e {
            WireError::NotFound(t) => MetaError::NotFound(t),
            WireError::Conflict(t) => MetaError::Conflict(t),
            WireError::Invalid(t) => MetaError::Invalid(t),
            WireError::Other(t) => MetaError::Unavailable(t),
        }
    }
}

fn io_err<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

// ---- the state machine ----

/// What the state machine holds.
#[derive(Debug, Default, Clone)]
struct Machine {
    state: MetaState,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, NodeInfo>,
    /// Forgotten nodes, by id (never readmitted).
    forgotten: BTreeMap<u64, String>,
}

/// A snapshot's contents.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotBody {
    meta: SnapshotMeta<u64, NodeInfo>,
    /// Definitions: kind octet, key, encoded record.
    definitions: Vec<(u8, Vec<u8>, Vec<u8>)>,
    forgotten: BTreeMap<u64, String>,
}

struct MachineShared {
    machine: Mutex<Machine>,
    projection: OnceLock<Weak<dyn MetaProjection>>,
    snapshot: SnapshotFile,
}

impl Debug for MachineShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineShared").finish_non_exhaustive()
    }
}

/// The metadata state machine (cheap to clone: a handle).
#[derive(Debug, Clone)]
pub struct MetaMachine {
    shared: Arc<MachineShared>,
}

impl MetaMachine {
    /// Loads the last snapshot from `dir` (if any).
    pub fn open(dir: &std::path::Path) -> Result<MetaMachine, String> {
        let snapshot = SnapshotFile::new(dir.join("meta.snapshot"));
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", snapshot.path().display());
        let mut machine = Machine::default();
        if let Some(bytes) = snapshot.read().map_err(|e| at(&e))? {
            let body: SnapshotBody = serde_json::from_slice(&bytes).map_err(|e| at(&e))?;
            machine = machine_from(&body)?;
        }
        Ok(MetaMachine {
            shared: Arc::new(MachineShared {
                machine: Mutex::new(machine),
                projection: OnceLock::new(),
                snapshot,
            }),
        })
    }

    /// Where applied commands are projected from now on.
    pub fn set_projection(&self, projection: Weak<dyn MetaProjection>) {
        let _ = self.shared.projection.set(projection);
    }

    /// Sets the projection and returns the state as of that moment: every
    /// command applied after it is projected.
    pub fn attach(&self, projection: Weak<dyn MetaProjection>) -> MetaState {
        let m = self.shared.machine.lock();
        let _ = self.shared.projection.set(projection);
        m.state.clone()
    }

    /// A copy of the current state.
    pub fn state(&self) -> MetaState {
        self.shared.machine.lock().state.clone()
    }

    /// The last applied index.
    pub fn applied_index(&self) -> u64 {
        self.shared
            .machine
            .lock()
            .last_applied
            .map_or(0, |l| l.index)
    }

    /// Whether node `id` was forgotten.
    pub fn forgotten(&self, id: u64) -> Option<String> {
        self.shared.machine.lock().forgotten.get(&id).cloned()
    }

    fn project(&self, command: &MetaCommand) {
        if let Some(p) = self.shared.projection.get().and_then(Weak::upgrade) {
            p.project(command);
        }
    }
}

fn machine_from(body: &SnapshotBody) -> Result<Machine, String> {
    let mut defs = Vec::with_capacity(body.definitions.len());
    for (kind, key, record) in &body.definitions {
        let kind =
            DefKind::from_octet(*kind).ok_or_else(|| format!("unknown definition kind {kind}"))?;
        let (table, _) = FieldTable::decode(&Bytes::copy_from_slice(record))
            .map_err(|e| format!("a definition's record: {e:?}"))?;
        defs.push((kind, Bytes::copy_from_slice(key), table));
    }
    let (state, _, problems) = MetaState::recover(&defs);
    if let Some(p) = problems.first() {
        return Err(format!("snapshot definition: {p}"));
    }
    Ok(Machine {
        state,
        last_applied: body.meta.last_log_id,
        membership: body.meta.last_membership.clone(),
        forgotten: body.forgotten.clone(),
    })
}

fn snapshot_of(m: &Machine) -> SnapshotBody {
    let definitions = m
        .state
        .definitions()
        .into_iter()
        .map(|d| {
            let mut buf = BytesMut::new();
            // A stored record encoded once already; it encodes again.
            let _ = d.record.encode(&mut buf);
            (d.kind as u8, d.key.to_vec(), buf.to_vec())
        })
        .collect();
    let id = m.last_applied.map_or_else(
        || "empty".to_owned(),
        |l| format!("{}-{}", l.leader_id, l.index),
    );
    SnapshotBody {
        meta: SnapshotMeta {
            last_log_id: m.last_applied,
            last_membership: m.membership.clone(),
            snapshot_id: id,
        },
        definitions,
        forgotten: m.forgotten.clone(),
    }
}

impl RaftSnapshotBuilder<MetaTypes> for MetaMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaTypes>, StorageError<u64>> {
        let body = snapshot_of(&self.shared.machine.lock());
        let bytes =
            serde_json::to_vec(&body).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        self.shared.snapshot.write(bytes.clone()).await?;
        Ok(Snapshot {
            meta: body.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<MetaTypes> for MetaMachine {
    type SnapshotBuilder = MetaMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, NodeInfo>), StorageError<u64>> {
        let m = self.shared.machine.lock();
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<MetaTypes>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for entry in entries {
            let mut projected = None;
            let response = {
                let mut m = self.shared.machine.lock();
                m.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => MetaResponse::default(),
                    EntryPayload::Membership(mem) => {
                        m.membership = StoredMembership::new(Some(entry.log_id), mem);
                        MetaResponse::default()
                    }
                    EntryPayload::Normal(MetaRequest::Forget { id, name }) => {
                        m.forgotten.insert(id, name);
                        MetaResponse {
                            result: Some(Ok(true)),
                        }
                    }
                    EntryPayload::Normal(MetaRequest::Command(bytes)) => {
                        let result = match MetaCommand::from_wire(&bytes) {
                            Ok(command) => match m.state.apply(&command) {
                                Ok(applied) => {
                                    if !applied.is_empty() {
                                        projected = Some(command);
                                    }
                                    Ok(applied.changed_existence)
                                }
                                Err(e) => Err(WireError::from(&e)),
                            },
                            Err(e) => Err(WireError::Invalid(format!("undecodable command: {e}"))),
                        };
                        MetaResponse {
                            result: Some(result),
                        }
                    }
                }
            };
            if let Some(command) = projected {
                self.project(&command);
            }
            out.push(response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let mut body: SnapshotBody = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        body.meta = meta.clone();
        let fresh = machine_from(&body)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &io_err(e)))?;
        let data =
            serde_json::to_vec(&body).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        self.shared.snapshot.write(data).await?;
        // The runtime views follow: what the snapshot removes is deleted,
        // what it holds is put (puts of what exists change nothing).
        let old = std::mem::replace(&mut *self.shared.machine.lock(), fresh.clone());
        let new_defs = fresh.state.definitions();
        for d in old.state.definitions() {
            if !new_defs.iter().any(|n| n.kind == d.kind && n.key == d.key) {
                if let Ok(put) = MetaCommand::from_definition(d.kind, &d.key, &d.record) {
                    if let Some(delete) = put.inverse() {
                        self.project(&delete);
                    }
                }
            }
        }
        let defs: Vec<_> = new_defs
            .into_iter()
            .map(|d| (d.kind, d.key, d.record))
            .collect();
        for command in MetaState::recover(&defs).1 {
            self.project(&command);
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<MetaTypes>>, StorageError<u64>> {
        match self.shared.snapshot.read() {
            Ok(Some(bytes)) => {
                let body: SnapshotBody = serde_json::from_slice(&bytes)
                    .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
                Ok(Some(Snapshot {
                    meta: body.meta,
                    snapshot: Box::new(Cursor::new(bytes)),
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(StorageIOError::read_snapshot(None, &e).into()),
        }
    }
}
