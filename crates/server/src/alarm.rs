//! Resource alarms: the memory high watermark and the disk free-space limit.
//!
//! A monitor task (`monitor.rs`) samples the broker's own memory accounting (message bodies
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
//!
//! Both limits start from the configuration and can be changed while the
//! broker runs (`warrenctl set_vm_memory_high_watermark` /
//! `set_disk_free_limit`, as with rabbitmqctl): the alarms are re-evaluated
//! at once, which also makes them a switch for drills and tests.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Estimated memory per queued message beyond its body: the queue entry and
/// bookkeeping. Used so that many tiny messages still count.
pub const ENTRY_OVERHEAD: u64 = 64;

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
    /// The memory high watermark in effect, in octets.
    memory_limit: AtomicU64,
    /// The free disk space limit in effect, in octets.
    disk_limit: AtomicU64,
    /// Free space on the data directory's disk at the last sample, octets.
    disk_free: AtomicU64,
    /// Wakes the monitor to re-evaluate at once (a limit changed).
    recheck: tokio::sync::Notify,
    /// Whether any alarm is raised: `state` mirrored for the publish path,
    /// which looks at it for every message.
    raised: std::sync::atomic::AtomicBool,
}

impl Alarms {
    /// Takes a sample of the monitor's (`monitor.rs`): `queued` octets the
    /// queues account for, and whether the disk is under its free-space
    /// limit; raises or clears the alarms accordingly.
    pub fn record_sample(&self, queued: u64, disk: bool) {
        self.estimate.store(queued, Ordering::Relaxed);
        let used = queued + self.partial_bodies();
        self.peak.fetch_max(used, Ordering::Relaxed);
        let memory = over(used, self.memory_limit());
        self.set(AlarmState { memory, disk });
    }

    /// Completes when a limit changed (the monitor then samples at once).
    pub async fn limits_changed(&self) {
        self.recheck.notified().await;
    }

    /// Alarms with the configured memory watermark and disk limit (octets).
    pub fn new(memory_limit: u64, disk_limit: u64) -> Alarms {
        Alarms {
            state: watch::channel(AlarmState::default()).0,
            estimate: AtomicU64::new(0),
            partial_bodies: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            partial_peak: AtomicU64::new(0),
            body_permit: watch::channel(0).0,
            memory_limit: AtomicU64::new(memory_limit),
            disk_limit: AtomicU64::new(disk_limit),
            disk_free: AtomicU64::new(0),
            recheck: tokio::sync::Notify::new(),
            raised: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether any alarm is raised (cheap: one atomic load).
    #[inline]
    pub fn any_raised(&self) -> bool {
        self.raised.load(Ordering::Relaxed)
    }

    /// The memory high watermark in effect (octets).
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit.load(Ordering::Relaxed)
    }

    /// The free disk space limit in effect (octets).
    pub fn disk_limit(&self) -> u64 {
        self.disk_limit.load(Ordering::Relaxed)
    }

    /// Notes the free space the monitor read on the data directory's disk.
    pub fn record_disk_free(&self, octets: u64) {
        self.disk_free.store(octets, Ordering::Relaxed);
    }

    /// Free space on the data directory's disk at the last sample (octets).
    pub fn disk_free(&self) -> u64 {
        self.disk_free.load(Ordering::Relaxed)
    }

    /// Changes the memory high watermark; the alarm follows at once.
    pub fn set_memory_limit(&self, octets: u64) {
        tracing::warn!(octets, "memory high watermark set");
        self.memory_limit.store(octets, Ordering::Relaxed);
        self.recheck.notify_one();
    }

    /// Changes the free disk space limit; the alarm follows at once.
    pub fn set_disk_limit(&self, octets: u64) {
        tracing::warn!(octets, "disk free limit set");
        self.disk_limit.store(octets, Ordering::Relaxed);
        self.recheck.notify_one();
    }

    /// Watches the alarm state.
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.state.subscribe()
    }

    /// Current state.
    pub fn current(&self) -> AlarmState {
        *self.state.borrow()
    }

    /// Accounts a published message enqueued `copies` times; raises the
    /// memory alarm at once if that crosses the watermark.
    pub fn note_published(&self, size: u64, copies: u64) {
        let added = (size + ENTRY_OVERHEAD) * copies;
        let now = self.estimate.fetch_add(added, Ordering::Relaxed) + added;
        self.check(now + self.partial_bodies.load(Ordering::Relaxed));
    }

    /// Accounts body octets of messages still arriving (`delta` may be
    /// negative: a body completed or was dropped); raises the memory alarm at
    /// once if that crosses the watermark, so that a publisher is stopped in
    /// the middle of a large message rather than after it.
    pub fn note_partial_bodies(&self, delta: i64) {
        let now = if delta >= 0 {
            let d = delta.unsigned_abs();
            self.partial_bodies.fetch_add(d, Ordering::Relaxed) + d
        } else {
            let d = delta.unsigned_abs();
            self.partial_bodies.fetch_sub(d, Ordering::Relaxed) - d
        };
        if delta > 0 {
            self.partial_peak.fetch_max(now, Ordering::Relaxed);
            self.check(now + self.estimate.load(Ordering::Relaxed));
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

    fn check(&self, used: u64) {
        self.peak.fetch_max(used, Ordering::Relaxed);
        if over(used, self.memory_limit()) && !self.current().memory {
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
    pub fn may_finish_body(&self, id: u64, partial: u64) -> bool {
        if partial == 0 || self.current().disk {
            self.release_body_permit(id);
            return false;
        }
        if over(self.estimate.load(Ordering::Relaxed), self.memory_limit()) {
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
            self.raised.store(new.any(), Ordering::Relaxed);
            true
        });
    }
}

/// Whether `used` octets are over the memory watermark `limit`. A limit of
/// 0 is always exceeded (as `rabbitmqctl set_vm_memory_high_watermark 0`
/// blocks every publisher), even with nothing queued.
fn over(used: u64, limit: u64) -> bool {
    used > limit || limit == 0
}

/// A memory or disk amount: octets, or a multiple of the machine's RAM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// Octets.
    Octets(u64),
    /// A multiple of the machine's RAM.
    OfRam(f64),
}

impl Amount {
    /// The octets it stands for (RAM taken as 1 GiB if unknown).
    pub fn octets(self) -> u64 {
        self.octets_of(None)
    }

    /// The octets it stands for, a fraction being of `total` if given
    /// (RabbitMQ's `total_memory_available_override_value`), else of
    /// [`total_memory`].
    pub fn octets_of(self, total: Option<u64>) -> u64 {
        match self {
            Amount::Octets(n) => n,
            Amount::OfRam(f) => {
                let ram = total.or_else(total_memory).unwrap_or(1 << 30);
                (ram as f64 * f) as u64
            }
        }
    }
}

/// Parses RabbitMQ's forms: `0.4` (a multiple of RAM: has a decimal point),
/// `1073741824` (octets), or a number with a unit: `k`/`KiB`, `M`/`MiB`,
/// `G`/`GiB` (powers of 2), `kB`/`KB`, `MB`, `GB` (powers of 10), as
/// RabbitMQ reads `vm_memory_high_watermark.absolute` and `disk_free_limit`.
pub fn parse_amount(s: &str) -> Result<Amount, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim();
    let bad = || {
        format!(
            "'{s}' is not an amount: give octets (1073741824), a unit (2GB, 512MiB) or a fraction of RAM (0.4)"
        )
    };
    if unit.is_empty() && number.contains('.') {
        let f: f64 = number.parse().map_err(|_| bad())?;
        if !(f.is_finite() && f > 0.0) {
            return Err(bad());
        }
        return Ok(Amount::OfRam(f));
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit {
        "" => 1,
        "k" | "K" | "kiB" | "KiB" => 1 << 10,
        "M" | "m" | "MiB" => 1 << 20,
        "G" | "g" | "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).map(Amount::Octets).ok_or_else(bad)
}

/// The memory this process may use, for the default watermark (0.4 of it,
/// as RabbitMQ) and watermarks given as a fraction: the machine's RAM, or
/// less where its control group allows less (a container's memory limit,
/// cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`), so that the
/// alarm comes before the kernel's OOM killer.
pub fn total_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let ram = kib * 1024;
    let limit = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|own| cgroup_memory_limit(&own, |path| std::fs::read_to_string(path).ok()));
    Some(limit.map_or(ram, |l| l.min(ram)))
}

/// The memory limit of the control group `own` (`/proc/self/cgroup`'s
/// lines) places this process in, its files read through `read`; `None`
/// when none is set or none can be read.
fn cgroup_memory_limit(own: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_end_matches('/');
        // The group's own file; inside a container's namespace the group is
        // the root of the mount, whatever the path says.
        let files = if controllers.is_empty() {
            [
                format!("/sys/fs/cgroup{path}/memory.max"),
                "/sys/fs/cgroup/memory.max".to_owned(),
            ]
        } else if controllers.split(',').any(|c| c == "memory") {
            [
                format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"),
                "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_owned(),
            ]
        } else {
            continue;
        };
        for file in &files {
            let Some(text) = read(file) else {
                continue;
            };
            // v2 says "max" for none; v1 a number near 2^63.
            return text.trim().parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_groups_memory_limit_is_read_in_either_version() {
        let files = |pairs: &'static [(&'static str, &'static str)]| {
            move |path: &str| {
                pairs
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        // v2, a container's group (its own path, or the namespace's root).
        assert_eq!(
            cgroup_memory_limit(
                "0::/docker/abc\n",
                files(&[("/sys/fs/cgroup/docker/abc/memory.max", "536870912\n")])
            ),
            Some(512 << 20)
        );
        assert_eq!(
            cgroup_memory_limit(
                "0::/docker/abc\n",
                files(&[("/sys/fs/cgroup/memory.max", "268435456\n")])
            ),
            Some(256 << 20)
        );
        assert_eq!(
            cgroup_memory_limit("0::/\n", files(&[("/sys/fs/cgroup/memory.max", "max\n")])),
            None
        );
        // v1 (a hybrid host lists both; the v2 line has no memory file).
        let hybrid = "4:memory:/process_api/x\n1:cpu:/\n0::/\n";
        assert_eq!(
            cgroup_memory_limit(
                hybrid,
                files(&[(
                    "/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes",
                    "1073741824\n"
                )])
            ),
            Some(1 << 30)
        );
        assert_eq!(
            cgroup_memory_limit(
                "5:cpuacct,memory:/\n",
                files(&[(
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                    "9223372036854771712\n"
                )])
            ),
            Some(9_223_372_036_854_771_712)
        );
        assert_eq!(cgroup_memory_limit(hybrid, files(&[])), None);
        assert_eq!(cgroup_memory_limit("", files(&[])), None);
        // On this machine: never more than its RAM.
        let ram = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        });
        if let (Some(kib), Some(total)) = (ram, total_memory()) {
            assert!(total <= kib * 1024);
        }
    }

    #[test]
    fn amounts_read_as_rabbitmq_reads_them() {
        assert_eq!(parse_amount("0.4"), Ok(Amount::OfRam(0.4)));
        assert_eq!(parse_amount("1073741824"), Ok(Amount::Octets(1 << 30)));
        assert_eq!(parse_amount("2GB"), Ok(Amount::Octets(2_000_000_000)));
        assert_eq!(parse_amount("512MiB"), Ok(Amount::Octets(512 << 20)));
        assert_eq!(parse_amount("50MB"), Ok(Amount::Octets(50_000_000)));
        assert_eq!(parse_amount("1 GiB"), Ok(Amount::Octets(1 << 30)));
        for bad in ["", "lots", "2TB", "-1", "0.0", "1.5GB"] {
            assert!(parse_amount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_change_at_run_time() {
        let alarms = Alarms::new(1000, 10);
        alarms.note_published(100, 1);
        assert!(!alarms.current().memory);
        alarms.set_memory_limit(10);
        alarms.note_published(1, 1);
        assert!(alarms.current().memory, "over the new watermark");
        assert_eq!((alarms.memory_limit(), alarms.disk_limit()), (10, 10));
    }
}
