//! Resource alarms: the memory high watermark and the disk free-space limit.
//!
//! A monitor task samples the broker's own memory accounting (message bodies
//! held by queues plus a per-message overhead for entries, plus the body
//! octets of messages still arriving) and the free space of the data
//! directory's file system. While either alarm is raised, connections that
//! publish are not read from, even in the middle of a message (TCP pushes
//! back on the publisher) and, if they advertise the `connection.blocked`
//! capability, are told so with `connection.blocked`, and
//! `connection.unblocked` when it clears. Consumers keep draining, which is
//! what clears a memory alarm; one publisher at a time may finish a message
//! it is halfway through while the queues alone are under the watermark, so
//! half-received bodies cannot hold the alarm up forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::broker::Broker;

use crate::queue::ENTRY_OVERHEAD;

/// Which alarms are raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmState {
    /// Memory above the high watermark.
    pub memory: bool,
    /// Free disk below the limit.
    pub disk: bool,
}

impl AlarmState {
    /// Whether publishers must wait.
    pub fn any(&self) -> bool {
        self.memory || self.disk
    }

    /// The reason sent in `connection.blocked`.
    pub fn reason(&self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory and disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// The broker's alarms: current state and a channel to watch changes.
#[derive(Debug)]
pub struct Alarms {
    state: watch::Sender<AlarmState>,
    /// Memory in use: recomputed exactly by the monitor, and raised by every
    /// publish in between, so a flood trips the alarm within one socket read
    /// rather than one sampling period.
    estimate: AtomicU64,
    /// Body octets of messages still arriving (partly received), over every
    /// connection: they count against the watermark too.
    partial_bodies: AtomicU64,
    /// The highest `estimate + partial_bodies` seen (for tests and operators).
    peak: AtomicU64,
    /// The highest `partial_bodies` seen.
    partial_peak: AtomicU64,
    /// The connection allowed to go on receiving a message body while the
    /// memory alarm is raised (0: none); see [`Alarms::may_finish_body`].
    body_permit: watch::Sender<u64>,
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms {
            state: watch::channel(AlarmState::default()).0,
            estimate: AtomicU64::new(0),
            partial_bodies: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            partial_peak: AtomicU64::new(0),
            body_permit: watch::channel(0).0,
        }
    }
}

impl Alarms {
    /// Watches the alarm state.
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.state.subscribe()
    }

    /// Current state.
    pub fn current(&self) -> AlarmState {
        *self.state.borrow()
    }

    /// Accounts a published message enqueued `copies` times; raises the
    /// memory alarm at once if that crosses `watermark`.
    pub fn note_published(&self, size: u64, copies: u64, watermark: u64) {
        let added = (size + ENTRY_OVERHEAD) * copies;
        let now = self.estimate.fetch_add(added, Ordering::Relaxed) + added;
        self.check(now + self.partial_bodies.load(Ordering::Relaxed), watermark);
    }

    /// Accounts body octets of messages still arriving (`delta` may be
    /// negative: a body completed or was dropped); raises the memory alarm at
    /// once if that crosses `watermark`, so that a publisher is stopped in
    /// the middle of a large message rather than after it.
    pub fn note_partial_bodies(&self, delta: i64, watermark: u64) {
        let now = if delta >= 0 {
            let d = delta.unsigned_abs();
            self.partial_bodies.fetch_add(d, Ordering::Relaxed) + d
        } else {
            let d = delta.unsigned_abs();
            self.partial_bodies.fetch_sub(d, Ordering::Relaxed) - d
        };
        if delta > 0 {
            self.partial_peak.fetch_max(now, Ordering::Relaxed);
            self.check(now + self.estimate.load(Ordering::Relaxed), watermark);
        }
    }

    /// The most body octets of messages still arriving held at once.
    pub fn partial_bodies_peak(&self) -> u64 {
        self.partial_peak.load(Ordering::Relaxed)
    }

    /// Body octets of messages still arriving, over every connection.
    pub fn partial_bodies(&self) -> u64 {
        self.partial_bodies.load(Ordering::Relaxed)
    }

    /// The highest accounted memory (queues plus bodies still arriving) seen
    /// (queues' memory as last sampled or raised by publishes: it may be
    /// stale by up to one 100 ms sampling period).
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn check(&self, used: u64, watermark: u64) {
        self.peak.fetch_max(used, Ordering::Relaxed);
        if used > watermark && !self.current().memory {
            let mut s = self.current();
            s.memory = true;
            self.set(s);
        }
    }

    /// Whether connection `id`, blocked by an alarm with `partial` body
    /// octets of a message half received, may go on reading to finish it.
    ///
    /// Without this, bodies still arriving could hold the memory over the
    /// watermark with every publisher blocked mid-message and nothing
    /// draining: a deadlock. So while the queues alone are under the
    /// watermark (finishing a body only moves its octets from "arriving" to
    /// "queued"), one connection at a time holds a permit to finish its
    /// message. The worst case is the watermark plus one message.
    pub fn may_finish_body(&self, id: u64, partial: u64, watermark: u64) -> bool {
        if partial == 0 || self.current().disk {
            self.release_body_permit(id);
            return false;
        }
        if self.estimate.load(Ordering::Relaxed) > watermark {
            return *self.body_permit.borrow() == id;
        }
        self.body_permit.send_if_modified(|holder| {
            if *holder == 0 {
                *holder = id;
                true
            } else {
                false
            }
        });
        *self.body_permit.borrow() == id
    }

    /// Gives up the body permit if `id` holds it (its body completed, or it
    /// is no longer blocked, or it closed).
    pub fn release_body_permit(&self, id: u64) {
        self.body_permit.send_if_modified(|holder| {
            if *holder == id {
                *holder = 0;
                true
            } else {
                false
            }
        });
    }

    /// Watches the body permit's holder (connections waiting for it).
    pub fn watch_body_permit(&self) -> watch::Receiver<u64> {
        self.body_permit.subscribe()
    }

    fn set(&self, new: AlarmState) {
        self.state.send_if_modified(|s| {
            if *s == new {
                return false;
            }
            tracing::warn!(
                memory = new.memory,
                disk = new.disk,
                "resource alarm {}",
                if new.any() { "raised" } else { "cleared" }
            );
            *s = new;
            true
        });
    }
}

/// Memory the broker accounts for: bodies queues hold in memory (ready and
/// delivered-but-unacknowledged) plus an overhead per queued message.
pub fn memory_in_use(broker: &Broker) -> u64 {
    memory_and_stats(broker, false)
}

/// [`memory_in_use`], also sampling each queue's message rates if asked.
fn memory_and_stats(broker: &Broker, sample: bool) -> u64 {
    broker
        .vhost_list()
        .iter()
        .flat_map(|v| v.queues())
        .map(|q| {
            let st = q.state.lock();
            // Queues shrink in ways that do not dispatch (expiry, purge):
            // their flow gates are checked here too.
            q.relieve_flow(&st);
            if sample {
                q.stats.sample();
            }
            st.memory_in_use()
        })
        .sum()
}

/// Total RAM, for the default watermark (0.4 of it, as RabbitMQ).
pub fn total_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Samples memory every 100 ms and disk every second until shutdown.
pub fn spawn_monitor(broker: &Arc<Broker>) {
    let b = broker.clone();
    broker.tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut n: u64 = 0;
        let mut disk = false;
        loop {
            tokio::select! {
                _ = b.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Message rates are sampled every 5 s (50 ticks).
            let used = memory_and_stats(&b, n % 50 == 0);
            b.alarms.estimate.store(used, Ordering::Relaxed);
            let used = used + b.alarms.partial_bodies();
            b.alarms.peak.fetch_max(used, Ordering::Relaxed);
            let memory = used > b.config.memory_high_watermark;
            if n % 10 == 0 {
                disk = match fs4::available_space(&b.config.data_dir) {
                    Ok(free) => free < b.config.disk_free_limit,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read free disk space");
                        false
                    }
                };
            }
            n += 1;
            b.alarms.set(AlarmState { memory, disk });
        }
    });
}
