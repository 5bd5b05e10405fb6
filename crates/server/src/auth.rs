//! Users, password hashes and permissions, as RabbitMQ models them.
//!
//! - Passwords are stored as RabbitMQ's `rabbit_password_hashing_sha256`
//!   hashes — base64 of a 4-octet salt followed by SHA-256(salt ‖ password) —
//!   so hashes from RabbitMQ definition files work as they are.
//! - Each user has per-vhost `configure` / `write` / `read` regular
//!   expressions and optional per-exchange topic permissions (routing-key
//!   patterns, with `{username}` and `{vhost}` expanded). They are looked up
//!   on every operation, so changes apply to live connections at once.
//! - Everything here is persisted as definitions through the store.

use std::collections::HashMap;

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use base64::Engine as _;
use bytes::Bytes;
use parking_lot::RwLock;
use queue_store::{DefKind, Write, scoped_name};
use regex::Regex;
use sha2::{Digest, Sha256};

use crate::error::AmqpError;

/// A user.
#[derive(Debug, Clone)]
pub struct User {
    /// Name.
    pub name: String,
    /// RabbitMQ-format SHA-256 hash; `None` means the user cannot log in with a password.
    pub password_hash: Option<String>,
    /// Tags (`administrator`, `monitoring`, `management`, `policymaker`, `impersonator`).
    pub tags: Vec<String>,
}

/// A user's permissions in one vhost.
#[derive(Debug, Clone)]
pub struct Permission {
    /// Pattern for declare/delete.
    pub configure: Regex,
    /// Pattern for publish/bind-to.
    pub write: Regex,
    /// Pattern for consume/get/purge/bind-from.
    pub read: Regex,
}

/// A user's permissions in one vhost, as listed (patterns as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionView {
    /// User.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// Configure pattern.
    pub configure: String,
    /// Write pattern.
    pub write: String,
    /// Read pattern.
    pub read: String,
}

/// Topic permissions of a user on one exchange in one vhost.
#[derive(Debug, Clone)]
pub struct TopicPermission {
    /// Pattern routing keys must match to publish.
    pub write: String,
    /// Pattern binding keys must match to bind for consuming.
    pub read: String,
}

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Declare, delete.
    Configure,
    /// Publish to an exchange, bind to a queue/exchange.
    Write,
    /// Consume, get, purge, bind from an exchange.
    Read,
}

/// Kind of resource, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// An exchange.
    Exchange,
    /// A queue.
    Queue,
}

/// Hashes a password as RabbitMQ's `rabbit_password_hashing_sha256` does.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; 4] = rand::random();
    hash_with_salt(&salt, password)
}

fn hash_with_salt(salt: &[u8], password: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// Checks a password against a RabbitMQ-format hash (constant-time compare).
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(hash) else {
        return false;
    };
    let Some(salt) = raw.get(..4) else {
        return false;
    };
    let Ok(expected) =
        base64::engine::general_purpose::STANDARD.decode(hash_with_salt(salt, password))
    else {
        return false;
    };
    raw.len() == expected.len()
        && raw
            .iter()
            .zip(&expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Compiles a permission pattern. Like RabbitMQ's, it matches anywhere in
/// the name unless it anchors itself (`^...$`).
/// Compiles a permission pattern. As in RabbitMQ, patterns match anywhere in
/// the name (use `^...$` to anchor), and the empty pattern is a synonym for
/// `^$`: it matches no name at all.
fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(if pattern.is_empty() { "^$" } else { pattern })
}

/// A compiled permission pattern as the user gave it (`^$` lists as the
/// empty pattern it is a synonym for).
fn pattern_text(r: &Regex) -> String {
    match r.as_str() {
        "^$" => String::new(),
        p => p.to_owned(),
    }
}

/// The registry of users and permissions.
#[derive(Debug, Default)]
pub struct Auth {
    users: RwLock<HashMap<String, User>>,
    permissions: RwLock<HashMap<(String, String), Permission>>,
    topic: RwLock<HashMap<(String, String, String), TopicPermission>>,
}

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

fn text(t: &FieldTable, k: &str) -> Option<String> {
    t.get(k).and_then(FieldValue::as_str).map(str::to_owned)
}

impl Auth {
    /// Adds or replaces a user; returns the definition write to persist.
    pub fn put_user(&self, user: User) -> Write {
        let mut record = FieldTable::new();
        record.insert(s("name"), FieldValue::from(user.name.as_str()));
        if let Some(h) = &user.password_hash {
            record.insert(s("password_hash"), FieldValue::from(h.as_str()));
        }
        record.insert(s("tags"), FieldValue::from(user.tags.join(",").as_str()));
        let key = Bytes::from(user.name.clone().into_bytes());
        self.users.write().insert(user.name.clone(), user);
        Write::PutDefinition {
            kind: DefKind::User,
            key,
            value: record,
        }
    }

    /// Every user's permissions, by vhost then user (the patterns as given).
    pub fn permissions(&self) -> Vec<PermissionView> {
        let mut out: Vec<PermissionView> = self
            .permissions
            .read()
            .iter()
            .map(|((user, vhost), p)| PermissionView {
                user: user.clone(),
                vhost: vhost.clone(),
                configure: pattern_text(&p.configure),
                write: pattern_text(&p.write),
                read: pattern_text(&p.read),
            })
            .collect();
        out.sort_by(|a, b| (&a.vhost, &a.user).cmp(&(&b.vhost, &b.user)));
        out
    }

    /// Every topic permission as (user, vhost, exchange, write, read).
    pub fn topic_permissions(&self) -> Vec<(String, String, String, String, String)> {
        let mut out: Vec<_> = self
            .topic
            .read()
            .iter()
            .map(|((u, v, x), p)| {
                (
                    u.clone(),
                    v.clone(),
                    x.clone(),
                    p.write.clone(),
                    p.read.clone(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Removes a user and their permissions; returns the writes to persist.
    pub fn delete_user(&self, name: &str) -> Vec<Write> {
        self.users.write().remove(name);
        let mut writes = vec![Write::DeleteDefinition {
            kind: DefKind::User,
            key: Bytes::from(name.to_owned().into_bytes()),
        }];
        let gone: Vec<(String, String)> = self
            .permissions
            .read()
            .keys()
            .filter(|(u, _)| u == name)
            .cloned()
            .collect();
        for (u, v) in gone {
            writes.extend(self.clear_permissions(&u, &v));
        }
        writes
    }

    /// A user by name.
    pub fn user(&self, name: &str) -> Option<User> {
        self.users.read().get(name).cloned()
    }

    /// Every user.
    pub fn users(&self) -> Vec<User> {
        self.users.read().values().cloned().collect()
    }

    /// Sets a user's permissions in a vhost; returns the write to persist.
    pub fn set_permissions(
        &self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<Write, regex::Error> {
        let p = Permission {
            configure: anchored(configure)?,
            write: anchored(write)?,
            read: anchored(read)?,
        };
        self.permissions
            .write()
            .insert((user.to_owned(), vhost.to_owned()), p);
        let record: FieldTable = [
            (s("user"), FieldValue::from(user)),
            (s("vhost"), FieldValue::from(vhost)),
            (s("configure"), FieldValue::from(configure)),
            (s("write"), FieldValue::from(write)),
            (s("read"), FieldValue::from(read)),
        ]
        .into_iter()
        .collect();
        Ok(Write::PutDefinition {
            kind: DefKind::Permission,
            key: scoped_name(vhost, &[user.as_bytes()]),
            value: record,
        })
    }

    /// Removes every permission and topic permission in a vhost (the vhost is
    /// deleted); returns the writes to persist.
    pub fn clear_vhost(&self, vhost: &str) -> Vec<Write> {
        let users: Vec<String> = self
            .permissions
            .read()
            .keys()
            .filter(|(_, v)| v == vhost)
            .map(|(u, _)| u.clone())
            .collect();
        let mut writes: Vec<Write> = users
            .iter()
            .flat_map(|u| self.clear_permissions(u, vhost))
            .collect();
        let topics: Vec<(String, String, String)> = self
            .topic
            .read()
            .keys()
            .filter(|(_, v, _)| v == vhost)
            .cloned()
            .collect();
        for (u, v, x) in topics {
            self.topic
                .write()
                .remove(&(u.clone(), v.clone(), x.clone()));
            writes.push(Write::DeleteDefinition {
                kind: DefKind::TopicPermission,
                key: scoped_name(&v, &[u.as_bytes(), x.as_bytes()]),
            });
        }
        writes
    }

    /// Removes a user's permissions in a vhost.
    pub fn clear_permissions(&self, user: &str, vhost: &str) -> Vec<Write> {
        self.permissions
            .write()
            .remove(&(user.to_owned(), vhost.to_owned()));
        vec![Write::DeleteDefinition {
            kind: DefKind::Permission,
            key: scoped_name(vhost, &[user.as_bytes()]),
        }]
    }

    /// Sets a user's topic permissions on an exchange; returns the write to persist.
    pub fn set_topic_permissions(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> Write {
        self.topic.write().insert(
            (user.to_owned(), vhost.to_owned(), exchange.to_owned()),
            TopicPermission {
                write: write.to_owned(),
                read: read.to_owned(),
            },
        );
        let record: FieldTable = [
            (s("user"), FieldValue::from(user)),
            (s("vhost"), FieldValue::from(vhost)),
            (s("exchange"), FieldValue::from(exchange)),
            (s("write"), FieldValue::from(write)),
            (s("read"), FieldValue::from(read)),
        ]
        .into_iter()
        .collect();
        Write::PutDefinition {
            kind: DefKind::TopicPermission,
            key: scoped_name(vhost, &[user.as_bytes(), exchange.as_bytes()]),
            value: record,
        }
    }

    /// Whether the user has any permissions in the vhost (may open it).
    pub fn may_open(&self, user: &str, vhost: &str) -> bool {
        self.permissions
            .read()
            .contains_key(&(user.to_owned(), vhost.to_owned()))
    }

    /// Checks one operation; denied is 403 with RabbitMQ's text.
    pub fn check(
        &self,
        user: &str,
        vhost: &str,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Result<(), AmqpError> {
        let allowed = self
            .permissions
            .read()
            .get(&(user.to_owned(), vhost.to_owned()))
            .is_some_and(|p| {
                let re = match access {
                    Access::Configure => &p.configure,
                    Access::Write => &p.write,
                    Access::Read => &p.read,
                };
                re.is_match(name)
            });
        if allowed {
            return Ok(());
        }
        let kind = match resource {
            Resource::Exchange => "exchange",
            Resource::Queue => "queue",
        };
        Err(AmqpError::access_refused(format!(
            "{} access to {kind} '{name}' in vhost '{vhost}' refused for user '{user}'",
            match access {
                Access::Configure => "configure",
                Access::Write => "write",
                Access::Read => "read",
            }
        )))
    }

    /// Checks a topic permission: publishing `routing_key` to topic exchange
    /// `exchange` (write) or binding with it (read). No topic permission for
    /// the exchange means no restriction, as RabbitMQ.
    pub fn check_topic(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        access: Access,
    ) -> Result<(), AmqpError> {
        let topic = self.topic.read();
        let Some(t) = topic.get(&(user.to_owned(), vhost.to_owned(), exchange.to_owned())) else {
            return Ok(());
        };
        let pattern = if access == Access::Write {
            &t.write
        } else {
            &t.read
        };
        let expanded = pattern
            .replace("{username}", user)
            .replace("{vhost}", vhost);
        if Regex::new(&expanded).is_ok_and(|re| re.is_match(routing_key)) {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "{} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{vhost}' refused for user '{user}'",
            if access == Access::Write {
                "write"
            } else {
                "read"
            }
        )))
    }

    /// Loads users and permissions from stored definitions.
    pub fn recover(&self, defs: &[(DefKind, Bytes, FieldTable)]) {
        for (kind, _, t) in defs {
            match kind {
                DefKind::User => {
                    let Some(name) = text(t, "name") else {
                        continue;
                    };
                    let tags = text(t, "tags")
                        .map(|t| {
                            t.split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default();
                    self.users.write().insert(
                        name.clone(),
                        User {
                            name,
                            password_hash: text(t, "password_hash"),
                            tags,
                        },
                    );
                }
                DefKind::Permission => {
                    let (Some(user), Some(vhost), Some(c), Some(w), Some(r)) = (
                        text(t, "user"),
                        text(t, "vhost"),
                        text(t, "configure"),
                        text(t, "write"),
                        text(t, "read"),
                    ) else {
                        continue;
                    };
                    if let Err(e) = self.set_permissions(&user, &vhost, &c, &w, &r) {
                        tracing::warn!(%user, %vhost, error = %e, "cannot recover permissions");
                    }
                }
                DefKind::TopicPermission => {
                    if let (Some(user), Some(vhost), Some(exchange), Some(w), Some(r)) = (
                        text(t, "user"),
                        text(t, "vhost"),
                        text(t, "exchange"),
                        text(t, "write"),
                        text(t, "read"),
                    ) {
                        let _ = self.set_topic_permissions(&user, &vhost, &exchange, &w, &r);
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether no user exists (first boot).
    pub fn is_empty(&self) -> bool {
        self.users.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_sha256_hashes_verify() {
        let h = hash_password("s3cret");
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "S3cret"));
        assert!(!verify_password("not base64!", "x"));
        // A hash in RabbitMQ's format built by hand: salt 01020304.
        let known = hash_with_salt(&[1, 2, 3, 4], "guest");
        assert!(verify_password(&known, "guest"));
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&known)
                .unwrap()
                .len(),
            36
        );
    }

    #[test]
    fn permissions_are_checked_per_access_kind() {
        let a = Auth::default();
        a.set_permissions("bob", "/", "^bob-", "^amq\\.topic$|^bob-", ".*")
            .unwrap();
        assert!(
            a.check("bob", "/", Resource::Queue, "bob-q", Access::Configure)
                .is_ok()
        );
        let e = a
            .check("bob", "/", Resource::Queue, "alice-q", Access::Configure)
            .unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(
            e.text,
            "configure access to queue 'alice-q' in vhost '/' refused for user 'bob'"
        );
        assert!(
            a.check("bob", "/", Resource::Exchange, "amq.topic", Access::Write)
                .is_ok()
        );
        assert!(
            a.check("bob", "/", Resource::Exchange, "amq.direct", Access::Write)
                .is_err()
        );
        assert!(
            a.check("bob", "other", Resource::Queue, "bob-q", Access::Read)
                .is_err()
        );
        assert!(a.may_open("bob", "/") && !a.may_open("bob", "other"));
    }

    #[test]
    fn topic_permissions_expand_username_and_vhost() {
        let a = Auth::default();
        let _ = a.set_topic_permissions("bob", "/", "amq.topic", "^{username}\\.", "^{vhost}");
        assert!(
            a.check_topic("bob", "/", "amq.topic", "bob.news", Access::Write)
                .is_ok()
        );
        let e = a
            .check_topic("bob", "/", "amq.topic", "alice.news", Access::Write)
            .unwrap_err();
        assert_eq!(
            e.text,
            "write access to topic 'alice.news' in exchange 'amq.topic' in vhost '/' refused for user 'bob'"
        );
        assert!(
            a.check_topic("bob", "/", "other", "anything", Access::Write)
                .is_ok(),
            "no topic permission: no restriction"
        );
    }
}
