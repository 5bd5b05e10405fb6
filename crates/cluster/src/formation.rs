//! Formation: how a node with no cluster state finds its cluster.
//!
//! The rule (deterministic, so nodes started together with the same seeds
//! form exactly one cluster): a new node asks every seed for its status
//! over the authenticated link.
//! - If any seed belongs to a formed cluster, the node asks its leader to
//!   add it (a learner, then a voter while the cluster has fewer than 3, or
//!   5 once it has 5 nodes).
//! - If none does, and every seed answered, the node whose **name sorts
//!   first** among the seeds and itself initialises the metadata group with
//!   all of them as voters, and commits the defaults (vhost `/`, the default
//!   user with all permissions on it). The others wait for it.
//!
//! A seed that cannot be reached holds formation back until it can be (a
//! cluster never forms from a subset by accident). A node that already has
//! Raft state (a restart) skips all this: it rejoins with its data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::NodeInfo;
use crate::meta_group::MetaRequest;
use crate::node::ClusterNode;
use crate::rpc::{Request, Response};
use crate::{ClusterSettings, FORMATION_ROUND};

/// Resolves the seed list: static peers, and every address of each DNS name.
async fn seeds(settings: &ClusterSettings, port: u16) -> Vec<String> {
    let mut out = settings.peers.clone();
    for name in &settings.peer_dns {
        match tokio::net::lookup_host((name.as_str(), port)).await {
            Ok(addrs) => out.extend(addrs.map(|a| a.to_string())),
            Err(e) => {
                tracing::debug!(name = %name, error = %e, "peer DNS name does not resolve (yet)")
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

pub(crate) async fn run(node: Arc<ClusterNode>, settings: ClusterSettings) {
    let port = node
        .me
        .cluster_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(crate::DEFAULT_CLUSTER_PORT);
    let mut logged_wait = false;
    loop {
        if node.is_member() {
            return;
        }
        let seeds = seeds(&settings, port).await;
        if seeds.is_empty() {
            // A cluster of one: initialise alone.
            initialise(
                &node,
                BTreeMap::from([(node.me.id, node.me.clone())]),
                &settings,
            )
            .await;
            continue;
        }
        let mut found: BTreeMap<u64, NodeInfo> = BTreeMap::from([(node.me.id, node.me.clone())]);
        let mut missing = Vec::new();
        let mut formed: Option<NodeInfo> = None;
        for seed in &seeds {
            match node
                .links
                .request(None, seed, &Request::Status, Duration::from_secs(2))
                .await
            {
                Ok((peer, Response::Status(status))) => {
                    if !status.voters.is_empty() {
                        let leader = status.leader.and_then(|l| {
                            status
                                .voters
                                .iter()
                                .chain(&status.learners)
                                .find(|n| n.id == l)
                                .cloned()
                        });
                        formed = leader.or(Some(peer.clone()));
                    }
                    found.insert(peer.id, peer);
                }
                Ok((_, other)) => tracing::debug!(%seed, ?other, "unexpected status answer"),
                Err(crate::link::LinkError::Refused { reason, .. })
                    if reason.contains("this node's own id") => {}
                Err(e) => missing.push(format!("{seed}: {e}")),
            }
        }
        if let Some(leader) = formed {
            match node
                .links
                .request(
                    Some(leader.id),
                    &leader.cluster_addr,
                    &Request::Join(node.me.clone()),
                    Duration::from_secs(30),
                )
                .await
            {
                Ok((_, Response::Joined(Ok(())))) => {
                    tracing::info!(leader = %leader, "joined the cluster");
                }
                Ok((_, Response::Joined(Err(e)))) => {
                    tracing::warn!(leader = %leader, error = %e, "join refused")
                }
                Ok((_, other)) => tracing::debug!(?other, "join answered"),
                Err(e) => tracing::debug!(error = %e, "join failed"),
            }
        } else if missing.is_empty() {
            let first = found
                .values()
                .min_by(|a, b| a.name.cmp(&b.name))
                .map(|n| n.id);
            if first == Some(node.me.id) {
                initialise(&node, found, &settings).await;
            }
        } else if !logged_wait {
            logged_wait = true;
            tracing::info!(missing = ?missing, "waiting for every seed node before forming the cluster");
        }
        tokio::time::sleep(FORMATION_ROUND).await;
    }
}

async fn initialise(
    node: &Arc<ClusterNode>,
    members: BTreeMap<u64, NodeInfo>,
    settings: &ClusterSettings,
) {
    let names: Vec<&str> = members.values().map(|n| n.name.as_str()).collect();
    tracing::info!(members = ?names, "forming the cluster (this node's name sorts first)");
    if let Err(e) = node.raft.initialize(members).await {
        tracing::warn!(error = %e, "cannot initialise the metadata group");
        return;
    }
    // The defaults, once, by the node that formed the cluster.
    let (user, pass) = settings.default_user.clone();
    let hash = server::auth::hash_password(&pass);
    let commands = [
        server::meta::MetaCommand::PutVhost {
            name: "/".into(),
            limits: Default::default(),
        },
        server::meta::MetaCommand::PutUser(server::meta::User {
            name: user.clone(),
            password_hash: Some(hash),
            tags: vec!["administrator".into()],
        }),
        server::meta::MetaCommand::SetPermission(server::meta::PermissionDef {
            user: user.clone(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }),
    ];
    for command in commands {
        let mut tries = 0;
        loop {
            match node.commit(MetaRequest::Command(command.to_wire())).await {
                Ok(_) => break,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "defaults wait for the first leader");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot create the cluster's defaults");
                    return;
                }
            }
        }
    }
    tracing::info!(user = %user, "cluster formed: created the default user and vhost '/'");
}
