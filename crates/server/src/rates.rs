//! Counters with rates, as RabbitMQ's management API shows them: each
//! count beside `{name}_details: {"rate": per second}`, the rate being the
//! change between the last two samples (the monitor samples every 5 s).
//! Bumping a counter is one relaxed atomic add; sampling takes a short lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// `N` counters and their rates at the last sample.
#[derive(Debug)]
pub struct RatedCounters<const N: usize> {
    counts: [AtomicU64; N],
    last: parking_lot::Mutex<Option<Sample<N>>>,
}

/// When a sample was taken, the counts then, and the rates since the one
/// before.
type Sample<const N: usize> = (Instant, [u64; N], [f64; N]);

impl<const N: usize> Default for RatedCounters<N> {
    fn default() -> Self {
        RatedCounters {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            last: parking_lot::Mutex::new(None),
        }
    }
}

impl<const N: usize> RatedCounters<N> {
    /// Adds `n` to counter `i` (ignored if there is no such counter).
    pub fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counter `i` now (0 if there is no such counter).
    pub fn get(&self, i: usize) -> u64 {
        self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn counts(&self) -> [u64; N] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    /// Takes a sample: rates become the change per second since the last.
    pub fn sample(&self) {
        let now = Instant::now();
        let counts = self.counts();
        let mut last = self.last.lock();
        let rates = match *last {
            Some((at, before, _)) => {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                std::array::from_fn(|i| counts[i].saturating_sub(before[i]) as f64 / secs)
            }
            None => [0.0; N],
        };
        *last = Some((now, counts, rates));
    }

    /// The counts now and the rates at the last sample.
    pub fn snapshot(&self) -> ([u64; N], [f64; N]) {
        (self.counts(), self.last.lock().map_or([0.0; N], |l| l.2))
    }

    /// The counts as RabbitMQ's `message_stats` entries, named by `names`,
    /// into `out`.
    pub fn write_json(
        &self,
        names: &[&str; N],
        out: &mut serde_json::Map<String, serde_json::Value>,
    ) {
        let (counts, rates) = self.snapshot();
        for (i, name) in names.iter().enumerate() {
            out.insert((*name).to_owned(), serde_json::json!(counts[i]));
            out.insert(
                format!("{name}_details"),
                serde_json::json!({ "rate": rates[i] }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_rates_follow_samples() {
        let c = RatedCounters::<2>::default();
        c.add(0, 3);
        c.add(1, 1);
        c.add(7, 1); // no such counter: ignored
        assert_eq!(c.snapshot(), ([3, 1], [0.0, 0.0]));
        c.sample();
        c.add(0, 10);
        c.sample();
        let (counts, rates) = c.snapshot();
        assert_eq!(counts, [13, 1]);
        assert!(rates[0] > 0.0 && rates[1] == 0.0, "{rates:?}");
        let mut m = serde_json::Map::new();
        c.write_json(&["a", "b"], &mut m);
        assert_eq!(m["a"], 13);
        assert!(m["b_details"]["rate"].is_number());
    }
}
