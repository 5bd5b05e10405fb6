//! Users, password hashes and permissions, as RabbitMQ models them.
//!
//! - Passwords are stored as RabbitMQ's `rabbit_password_hashing_sha256`
//!   hashes — base64 of a 4-octet salt followed by SHA-256(salt ‖ password) —
//!   so hashes from RabbitMQ definition files work as they are.
//! - Each user has per-vhost `configure` / `write` / `read` regular
//!   expressions and optional per-exchange topic permissions (routing-key
//!   patterns, with `{username}` and `{vhost}` expanded). They are looked up
//!   on every operation, so changes apply to live connections at once.
//! - `Auth` is the runtime view the checks read; changes are committed as
//!   metadata commands first (`crate::meta`) and applied here after.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use parking_lot::RwLock;
use regex::Regex;
use sha2::{Digest, Sha256};

use crate::error::AmqpError;
pub use crate::meta::User;
use crate::meta::{PermissionDef, TopicPermissionDef, compile_pattern};

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
    /// Moves on with every change to who may do what: an [`AuthzCache`]
    /// entry counts only in the generation it was made in.
    generation: AtomicU64,
}

/// A channel's memory of the operations it was allowed, as RabbitMQ's
/// channel keeps one: a publisher's every message checks its exchange
/// without a lookup and a regular expression (they were 3% of S1). Any
/// change to users or permissions empties it, so a permission taken away
/// applies to the next operation, as without it.
#[derive(Debug, Default)]
pub struct AuthzCache {
    generation: u64,
    allowed: Vec<(Resource, Access, Box<str>)>,
}

impl AuthzCache {
    /// Entries kept (the oldest goes first).
    const MAX: usize = 16;
}

impl Auth {
    /// Adds or replaces a user.
    pub fn put_user(&self, user: User) {
        self.users.write().insert(user.name.clone(), user);
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

    /// Removes a user and their permissions and topic permissions.
    pub fn delete_user(&self, name: &str) {
        self.users.write().remove(name);
        self.permissions.write().retain(|(u, _), _| u != name);
        self.topic.write().retain(|(u, _, _), _| u != name);
        self.changed();
    }

    /// After a change to who may do what (see [`AuthzCache`]).
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A user by name.
    pub fn user(&self, name: &str) -> Option<User> {
        self.users.read().get(name).cloned()
    }

    /// Every user.
    pub fn users(&self) -> Vec<User> {
        self.users.read().values().cloned().collect()
    }

    /// Sets a user's permissions in a vhost.
    pub fn set_permissions(&self, p: &PermissionDef) -> Result<(), regex::Error> {
        let compiled = Permission {
            configure: compile_pattern(&p.configure)?,
            write: compile_pattern(&p.write)?,
            read: compile_pattern(&p.read)?,
        };
        self.permissions
            .write()
            .insert((p.user.clone(), p.vhost.clone()), compiled);
        self.changed();
        Ok(())
    }

    /// Removes every permission and topic permission in a vhost (the vhost is
    /// deleted).
    pub fn clear_vhost(&self, vhost: &str) {
        self.permissions.write().retain(|(_, v), _| v != vhost);
        self.topic.write().retain(|(_, v, _), _| v != vhost);
        self.changed();
    }

    /// Removes a user's permissions in a vhost.
    pub fn clear_permissions(&self, user: &str, vhost: &str) {
        self.permissions
            .write()
            .remove(&(user.to_owned(), vhost.to_owned()));
        self.changed();
    }

    /// Sets a user's topic permissions on an exchange.
    pub fn set_topic_permissions(&self, p: &TopicPermissionDef) {
        self.topic.write().insert(
            (p.user.clone(), p.vhost.clone(), p.exchange.clone()),
            TopicPermission {
                write: p.write.clone(),
                read: p.read.clone(),
            },
        );
    }

    /// Removes a user's topic permissions on an exchange.
    pub fn clear_topic_permissions(&self, user: &str, vhost: &str, exchange: &str) {
        self.topic
            .write()
            .remove(&(user.to_owned(), vhost.to_owned(), exchange.to_owned()));
    }

    /// Whether the user has any permissions in the vhost (may open it).
    pub fn may_open(&self, user: &str, vhost: &str) -> bool {
        self.permissions
            .read()
            .contains_key(&(user.to_owned(), vhost.to_owned()))
    }

    /// [`Auth::check`], answered from `cache` when this operation was
    /// allowed before in the current generation.
    pub fn check_cached(
        &self,
        cache: &mut AuthzCache,
        user: &str,
        vhost: &str,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Result<(), AmqpError> {
        let generation = self.generation.load(Ordering::Acquire);
        if cache.generation != generation {
            cache.allowed.clear();
            cache.generation = generation;
        } else if cache
            .allowed
            .iter()
            .any(|(r, a, n)| *r == resource && *a == access && **n == *name)
        {
            return Ok(());
        }
        self.check(user, vhost, resource, name, access)?;
        if cache.allowed.len() >= AuthzCache::MAX {
            cache.allowed.remove(0);
        }
        cache.allowed.push((resource, access, name.into()));
        Ok(())
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
    fn a_cached_permission_goes_with_any_change_to_permissions() {
        let a = Auth::default();
        let bob = |write: &str| PermissionDef {
            user: "bob".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: write.into(),
            read: ".*".into(),
        };
        a.set_permissions(&bob(".*")).unwrap();
        let mut cache = AuthzCache::default();
        let write = |a: &Auth, cache: &mut AuthzCache, name: &str| {
            a.check_cached(cache, "bob", "/", Resource::Exchange, name, Access::Write)
        };
        assert!(write(&a, &mut cache, "x").is_ok());
        // Answered from the cache: the same operation, the same generation.
        assert_eq!(cache.allowed.len(), 1);
        assert!(write(&a, &mut cache, "x").is_ok());
        assert_eq!(cache.allowed.len(), 1);
        // Narrowed: the next check sees it.
        a.set_permissions(&bob("^y$")).unwrap();
        assert_eq!(write(&a, &mut cache, "x").unwrap_err().code, 403);
        assert!(write(&a, &mut cache, "y").is_ok());
        // Taken away altogether, and the user deleted.
        a.clear_permissions("bob", "/");
        assert!(write(&a, &mut cache, "y").is_err());
        a.set_permissions(&bob(".*")).unwrap();
        assert!(write(&a, &mut cache, "y").is_ok());
        a.delete_user("bob");
        assert!(write(&a, &mut cache, "y").is_err());
        // A refusal is not cached, and the cache keeps at most MAX entries.
        a.set_permissions(&bob(".*")).unwrap();
        for i in 0..40 {
            assert!(write(&a, &mut cache, &format!("e{i}")).is_ok());
        }
        assert_eq!(cache.allowed.len(), AuthzCache::MAX);
    }

    #[test]
    fn permissions_are_checked_per_access_kind() {
        let a = Auth::default();
        a.set_permissions(&PermissionDef {
            user: "bob".into(),
            vhost: "/".into(),
            configure: "^bob-".into(),
            write: "^amq\\.topic$|^bob-".into(),
            read: ".*".into(),
        })
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
        a.set_topic_permissions(&TopicPermissionDef {
            user: "bob".into(),
            vhost: "/".into(),
            exchange: "amq.topic".into(),
            write: "^{username}\\.".into(),
            read: "^{vhost}".into(),
        });
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
