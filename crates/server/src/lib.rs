//! # server
//!
//! Warren's broker: it turns the codec, the router and the queue store into a
//! running AMQP 0-9-1 server.
//!
//! - [`broker`]: configuration, startup (store recovery, listener), shutdown.
//! - [`node`]: what the vhosts and queues share (store, metadata log,
//!   metrics, alarms, settings, tasks), handed to each vhost.
//! - [`alarm`]: memory and disk alarms that block publishers.
//! - [`auth`]: users, password hashes, permissions.
//! - [`connection`]: one task per connection: handshake, frame loop, heartbeats.
//! - [`channel`]: the channel state machine and publisher confirms.
//! - [`meta`]: metadata as commands (`MetaCommand`, `MetaState`, `MetaLog`):
//!   the one path by which definitions change and are persisted.
//! - [`vhost`]: a vhost's router and queues; declare/bind/delete (durable
//!   parts committed through `meta`); dead-letter routing.
//! - [`queue`]: a queue with its consumers and the dispatch loop.
//! - [`outbox`]: a connection's coalescing writer.
//! - [`reply_to`]: direct reply-to (`amq.rabbitmq.reply-to`).
//! - [`tls`]: the AMQPS listener and client-certificate identities.
//! - [`error`]: `AmqpError`, the one place errors become reply codes.
//! - [`definitions`]: export/import in RabbitMQ's definitions JSON.
//! - [`policy`]: policies (`set_policy`) merged into queue arguments.
//! - [`metrics`]: Prometheus metrics with RabbitMQ's names.
//! - [`management`]: the management HTTP API (RabbitMQ's paths and JSON).

pub mod alarm;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod config;
pub mod connection;
pub mod definitions;
pub mod error;
pub mod json;
pub mod logging;
pub mod management;
pub mod meta;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod outbox;
pub mod peers;
pub mod policy;
pub mod prometheus;
pub mod queue;
pub mod rates;
pub mod repair;
pub mod reply_to;
pub mod session;
pub mod start;
pub mod tls;
pub mod trace;
pub mod vhost;

pub use broker::{Broker, Config};
pub use start::{BrokerHandle, ClusterParts, StartError, start, start_with};

/// The module graph inside the crate is one-way (ARCHITECTURE.md, "Layers
/// inside `server`"): no module reaches, through `crate::` paths, a module
/// that reaches it back.
#[cfg(test)]
mod layering {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Every `.rs` file under `path` (a module's file or directory).
    fn sources(path: &Path, out: &mut String) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                sources(&entry.unwrap().path(), out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }

    #[test]
    fn the_module_graph_is_one_way() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut modules: BTreeMap<String, String> = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if name == "lib" || name == "main" {
                continue;
            }
            // (A module's file and its directory of submodules are one.)
            let text: &mut String = modules.entry(name).or_default();
            sources(&path, text);
        }
        let names: BTreeSet<&str> = modules.keys().map(String::as_str).collect();
        let imports: BTreeMap<&str, BTreeSet<&str>> = modules
            .iter()
            .map(|(name, text)| {
                let deps = text
                    .match_indices("crate::")
                    .filter_map(|(i, _)| {
                        let rest = &text[i + 7..];
                        let end = rest
                            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .unwrap_or(rest.len());
                        names.get(&rest[..end]).copied()
                    })
                    .filter(|d| d != name)
                    .collect();
                (name.as_str(), deps)
            })
            .collect();
        // Depth-first search for a back edge.
        fn visit<'a>(
            m: &'a str,
            imports: &BTreeMap<&'a str, BTreeSet<&'a str>>,
            done: &mut BTreeSet<&'a str>,
            path: &mut Vec<&'a str>,
        ) {
            if done.contains(m) {
                return;
            }
            if let Some(i) = path.iter().position(|p| *p == m) {
                panic!("import cycle: {} -> {m}", path[i..].join(" -> "));
            }
            path.push(m);
            for d in &imports[m] {
                visit(d, imports, done, path);
            }
            path.pop();
            done.insert(m);
        }
        let mut done = BTreeSet::new();
        for m in imports.keys() {
            visit(m, &imports, &mut done, &mut Vec::new());
        }
        assert!(done.len() > 20, "found the crate's modules");
    }
}
