//! The resource monitor: a task that samples the whole broker — every
//! queue's memory accounting every 100 ms, the data directory's free disk
//! space every second, and every 5 s the rates the management API shows
//! (queues', channels', connections', the node's) — and hands memory and
//! disk to the alarms (`alarm.rs`), which raise or clear them.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;

/// Memory the broker accounts for: bodies queues hold in memory (ready and
/// delivered-but-unacknowledged) plus an overhead per queued message; also
/// samples each queue's message rates if asked.
fn memory_and_stats(broker: &Broker, sample: bool) -> u64 {
    broker
        .vhost_list()
        .iter()
        .flat_map(|v| v.queues())
        .map(|q| {
            if sample {
                q.sample_stats();
            }
            q.memory_in_use()
        })
        .sum()
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
                // A limit changed: look at memory and disk now.
                () = b.alarms.limits_changed() => n = 0,
            }
            // Message rates are sampled every 5 s (50 ticks).
            let queued = memory_and_stats(&b, n % 50 == 0);
            if n % 50 == 0 {
                b.metrics.sample_overview();
                // (It reads /proc: on the blocking pool.)
                let node = b.clone();
                let _ = tokio::task::spawn_blocking(move || node.sample_node()).await;
                for v in b.vhost_list() {
                    v.sample_exchange_rates();
                }
                for c in b.live_connections.iter() {
                    c.sample_octets();
                    for (_, ch) in c.open_channels() {
                        ch.stats.sample();
                    }
                }
            }
            if n % 10 == 0 {
                // (statvfs, on the blocking pool.)
                let dir = b.config.data_dir.clone();
                let free = tokio::task::spawn_blocking(move || fs4::available_space(&dir)).await;
                disk = match free {
                    Ok(Ok(free)) => {
                        b.alarms.record_disk_free(free);
                        free < b.alarms.disk_limit()
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read free disk space");
                        false
                    }
                    Err(_) => false,
                };
            }
            n += 1;
            b.alarms.record_sample(queued, disk);
        }
    });
}
