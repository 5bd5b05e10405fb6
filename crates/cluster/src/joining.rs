//! `join_cluster`: a running node leaves whatever cluster it is in (or its
//! life alone) and joins another node's cluster, as `rabbitmqctl
//! join_cluster` does after `stop_app` and `reset`.
//!
//! [`Joiner`] (the server's `ClusterJoin`) checks the target over an
//! authenticated link (it answers with the secret, belongs to a formed
//! cluster, and this node is not already a member of it) and records the
//! join in `<data dir>/cluster/join.json`; the node then restarts. On the
//! restart [`apply_pending_reset`] (called by [`crate::start`]) wipes the
//! node's Raft state (`<data dir>/raft`: log, vote, metadata) and its Raft
//! id, so it joins as a new member and can never claim log entries of its
//! old cluster; formation then finds the target's cluster through the
//! recorded seeds and joins it. From then on the recorded seeds replace the
//! configured ones ([`stored_seeds`]): a node joined this way restarts into
//! the cluster it joined, and runs as a cluster node even if it was started
//! without `--peer`.
//!
//! The server refuses the join while the node holds a durable queue (the
//! reset would lose its messages). The definitions the node had (users,
//! vhosts, ...) are replaced by the cluster's, as in RabbitMQ.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::{NodeInfo, write_durably};
use crate::link::Links;
use crate::node::ClusterNode;
use crate::rpc::{Request, Response};

/// A recorded join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct JoinRecord {
    /// The joined node's cluster address (the node's seeds from now on).
    seeds: Vec<String>,
    /// The node's Raft state is still to be wiped (the restart after the
    /// join has not happened yet).
    reset: bool,
}

fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster").join("join.json")
}

fn read_record(data_dir: &Path) -> Result<Option<JoinRecord>, String> {
    let path = record_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_record(data_dir: &Path, record: &JoinRecord) -> Result<(), String> {
    let path = record_path(data_dir);
    let dir = data_dir.join("cluster");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let body = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    write_durably(&dir.join("join.json.tmp"), &path, &body)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The seeds a `join_cluster` recorded in `data_dir`, if any: they replace
/// the configured seeds, and make the node a cluster node.
pub fn stored_seeds(data_dir: &Path) -> Result<Option<Vec<String>>, String> {
    Ok(read_record(data_dir)?.map(|r| r.seeds))
}

/// On start: if a join is recorded and its reset not yet done, wipes this
/// node's Raft state and identity (a new Raft id is made next). Each step
/// can be repeated, so a crash in between only repeats it; the record is
/// marked done last.
pub(crate) fn apply_pending_reset(data_dir: &Path) -> Result<bool, String> {
    let Some(record) = read_record(data_dir)? else {
        return Ok(false);
    };
    if !record.reset {
        return Ok(false);
    }
    let identity = data_dir.join("cluster").join("node.json");
    match std::fs::remove_file(&identity) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", identity.display())),
    }
    let raft = data_dir.join("raft");
    match std::fs::remove_dir_all(&raft) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", raft.display())),
    }
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", data_dir.display()))?;
    write_record(
        data_dir,
        &JoinRecord {
            seeds: record.seeds,
            reset: false,
        },
    )?;
    Ok(true)
}

/// `host:port` for a join target: a cluster address as given, or a node
/// name's host (`name@host`) on `default_port`.
fn target_addr(target: &str, default_port: u16) -> Result<String, String> {
    let target = target.trim();
    let host = target.split_once('@').map_or(target, |(_, h)| h);
    if host.is_empty() {
        return Err(format!(
            "'{target}' names no host: give the node's cluster address (host:port) or its name (name@host)"
        ));
    }
    if host.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(host.to_owned());
    }
    match host.rsplit_once(':') {
        // host:port (not a bare IPv6 address, which has several colons)
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => Ok(host.to_owned()),
        _ if host.contains(':') && !host.starts_with('[') => Ok(format!("[{host}]:{default_port}")),
        _ => Ok(format!("{host}:{default_port}")),
    }
}

/// This node's way to join another cluster (see the module comment).
#[derive(Debug)]
pub struct Joiner {
    data_dir: PathBuf,
    node_name: String,
    cluster_name: String,
    secret: Option<Arc<[u8]>>,
    default_port: u16,
    tls: Option<crate::link::LinkTls>,
    node: OnceLock<Weak<ClusterNode>>,
}

impl Joiner {
    /// A joiner for the node named `node_name` with its data in `data_dir`;
    /// without `secret` (a node started without `--cluster-secret-file`) it
    /// refuses every join. A name@host target is dialled on `default_port`.
    pub fn new(
        data_dir: PathBuf,
        node_name: String,
        cluster_name: String,
        secret: Option<Arc<[u8]>>,
        default_port: u16,
    ) -> Joiner {
        Joiner {
            data_dir,
            node_name,
            cluster_name,
            secret,
            default_port,
            tls: None,
            node: OnceLock::new(),
        }
    }

    /// Asks the target over TLS (a cluster whose links use it).
    pub fn with_tls(mut self, tls: Option<crate::link::LinkTls>) -> Joiner {
        self.tls = tls;
        self
    }

    /// The cluster side this node runs, if it is a cluster node (a join to
    /// the cluster it is already a member of is refused).
    pub fn attach(&self, node: &Arc<ClusterNode>) {
        let _ = self.node.set(Arc::downgrade(node));
    }

    async fn join(&self, target: String) -> Result<server::peers::JoinTarget, String> {
        let secret = self.secret.clone().ok_or(
            "this node cannot join a cluster: start it with --cluster-secret-file (the secret the cluster's nodes share)",
        )?;
        let addr = target_addr(&target, self.default_port)?;
        // Asked as an observer with an id of its own: a node the cluster
        // forgot may still ask (its own id would be refused).
        let observer = NodeInfo {
            id: rand::random::<u64>().max(1),
            name: self.node_name.clone(),
            cluster_addr: String::new(),
            amqp_addr: String::new(),
        };
        let links = Links::new(observer, self.cluster_name.clone(), secret);
        if let Some(tls) = &self.tls {
            links.set_tls(tls.clone());
        }
        let answer = links
            .request(None, &addr, &Request::Status, Duration::from_secs(5))
            .await;
        links.shutdown();
        let status = match answer {
            Ok((_, Response::Status(status))) => status,
            Ok((_, other)) => return Err(format!("{addr} answered {other:?}")),
            Err(e) => return Err(format!("cannot ask {target} to join its cluster: {e}")),
        };
        if status.voters.is_empty() {
            return Err(format!(
                "node '{}' is not in a formed cluster yet",
                status.node.name
            ));
        }
        let me = self.node.get().and_then(Weak::upgrade).map(|n| n.me.id);
        if let Some(me) = me {
            if status
                .voters
                .iter()
                .chain(&status.learners)
                .any(|n| n.id == me)
            {
                return Err(format!(
                    "this node is already a member of node '{}''s cluster",
                    status.node.name
                ));
            }
        }
        if status
            .voters
            .iter()
            .chain(&status.learners)
            .any(|n| n.name == self.node_name)
        {
            return Err(format!(
                "node '{}''s cluster has a member named '{}' already: forget it there first (forget_cluster_node)",
                status.node.name, self.node_name
            ));
        }
        write_record(
            &self.data_dir,
            &JoinRecord {
                seeds: vec![status.node.cluster_addr.clone()],
                reset: true,
            },
        )?;
        tracing::info!(target = %status.node, "join_cluster recorded; the node restarts to join");
        Ok(server::peers::JoinTarget {
            node: status.node.name,
            cluster: self.cluster_name.clone(),
        })
    }
}

impl server::peers::ClusterJoin for Joiner {
    fn join(
        &self,
        target: &str,
    ) -> Pin<
        Box<
            dyn std::future::Future<Output = Result<server::peers::JoinTarget, String>> + Send + '_,
        >,
    > {
        Box::pin(Joiner::join(self, target.to_owned()))
    }
}

/// Replaces this process with a fresh start of the same program (same
/// arguments and environment): how a node restarts after a join, once the
/// broker and its cluster side are shut down. Returns only on failure.
pub fn restart_process() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn targets_are_addresses_or_node_names_on_the_default_port() {
        assert_eq!(
            target_addr("10.0.0.1:25999", 25672).unwrap(),
            "10.0.0.1:25999"
        );
        assert_eq!(target_addr("warren@node1", 25672).unwrap(), "node1:25672");
        assert_eq!(
            target_addr("warren@node1:4000", 25672).unwrap(),
            "node1:4000"
        );
        assert_eq!(target_addr("node1", 25672).unwrap(), "node1:25672");
        assert_eq!(target_addr("warren@::1", 25672).unwrap(), "[::1]:25672");
        assert_eq!(target_addr("[::1]:4000", 25672).unwrap(), "[::1]:4000");
        assert!(target_addr("warren@", 25672).is_err());
    }

    #[test]
    fn a_recorded_join_wipes_the_raft_state_and_identity_once_and_keeps_its_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        assert_eq!(stored_seeds(data).unwrap(), None);
        assert!(!apply_pending_reset(data).unwrap(), "nothing recorded");
        let before = crate::identity::Identity::load_or_create(data, "warren@a").unwrap();
        std::fs::create_dir_all(data.join("raft")).unwrap();
        std::fs::write(data.join("raft").join("log"), b"old cluster").unwrap();
        write_record(
            data,
            &JoinRecord {
                seeds: vec!["b:25672".into()],
                reset: true,
            },
        )
        .unwrap();
        assert!(apply_pending_reset(data).unwrap());
        assert!(!data.join("raft").exists());
        let after = crate::identity::Identity::load_or_create(data, "warren@a").unwrap();
        assert_ne!(before.id, after.id, "a new Raft id");
        // Done once: a later start keeps the state it has since joined with.
        std::fs::create_dir_all(data.join("raft")).unwrap();
        assert!(!apply_pending_reset(data).unwrap());
        assert!(data.join("raft").exists());
        assert_eq!(
            crate::identity::Identity::load_or_create(data, "warren@a").unwrap(),
            after
        );
        assert_eq!(stored_seeds(data).unwrap(), Some(vec!["b:25672".into()]));
    }
}
