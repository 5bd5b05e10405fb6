//! [`Identity`]: who this node is — its name (`--node-name`, stable across
//! restarts) and its Raft id (random, made once) — kept in
//! `<data dir>/cluster/node.json`; and [`NodeInfo`], what peers learn of a
//! node (name, id, addresses) in the handshake and in Raft's membership.
//!
//! The Raft id is not derived from the name: a node whose data directory
//! was wiped joins as a new member under a new id, so it can never claim
//! log entries it no longer has (which Raft could not survive).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What peers know of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Raft id.
    pub id: u64,
    /// Node name (`warren@host`).
    pub name: String,
    /// Where its cluster port listens (`host:port`).
    pub cluster_addr: String,
    /// Where its AMQP listener is (`host:port`), for clients and listings.
    pub amqp_addr: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.cluster_addr)
    }
}

/// This node's stored identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Node name.
    pub name: String,
    /// Raft id.
    pub id: u64,
}

impl Identity {
    /// Loads the identity stored in `data_dir`, or makes one named `name`.
    /// A data directory that belongs to a node of another name is refused.
    pub fn load_or_create(data_dir: &Path, name: &str) -> Result<Identity, String> {
        let dir = data_dir.join("cluster");
        let path = dir.join("node.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let id: Identity = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if id.name != name {
                    return Err(format!(
                        "{} belongs to node '{}', not '{name}': start it with --node-name {} or use another data directory",
                        data_dir.display(),
                        id.name,
                        id.name
                    ));
                }
                Ok(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity {
                    name: name.to_owned(),
                    // Never 0: openraft's ids are compared, and 0 reads as unset in logs.
                    id: rand::random::<u64>().max(1),
                };
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let tmp = dir.join("node.json.tmp");
                let body = serde_json::to_vec_pretty(&id).map_err(|e| e.to_string())?;
                write_durably(&tmp, &path, &body)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(id)
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

/// Writes `body` to `path` through `tmp`: fsync'd, renamed, directory fsync'd.
pub(crate) fn write_durably(tmp: &Path, path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_identity_is_kept_and_a_rename_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "warren@a").unwrap();
        let again = Identity::load_or_create(dir.path(), "warren@a").unwrap();
        assert_eq!(a, again);
        let err = Identity::load_or_create(dir.path(), "warren@b").unwrap_err();
        assert!(err.contains("belongs to node 'warren@a'"), "{err}");
    }
}
