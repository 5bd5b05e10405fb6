//! Counters with rates, as RabbitMQ's management API shows them: each
//! count beside `{name}_details: {"rate": per second}`, the rate being the
//! change between the last two samples (the monitor samples every 5 s).
//! Bumping a counter is one relaxed atomic add; sampling takes a short lock.
//! [`SampledRates`] does the same for values kept elsewhere (gauges such as
//! open file descriptors, or another crate's counters).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// How `N` values changed per second between their last two samples (a
/// gauge's rate may be negative).
#[derive(Debug)]
pub struct SampledRates<const N: usize> {
    last: parking_lot::Mutex<Option<Sample<N>>>,
}

/// When a sample was taken, the values then, and the rates since the one
/// before.
type Sample<const N: usize> = (Instant, [u64; N], [f64; N]);

impl<const N: usize> Default for SampledRates<N> {
    fn default() -> Self {
        SampledRates {
            last: parking_lot::Mutex::new(None),
        }
    }
}

impl<const N: usize> SampledRates<N> {
    /// Takes a sample of `values`: the rates become their change per second
    /// since the last one (0 at the first).
    pub fn sample(&self, values: [u64; N]) {
        let now = Instant::now();
        let mut last = self.last.lock();
        let rates = match *last {
            Some((at, before, _)) => {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                std::array::from_fn(|i| (values[i] as f64 - before[i] as f64) / secs)
            }
            None => [0.0; N],
        };
        *last = Some((now, values, rates));
    }

    /// The rates at the last sample.
    pub fn rates(&self) -> [f64; N] {
        self.last.lock().map_or([0.0; N], |l| l.2)
    }
}

/// `N` counters and their rates at the last sample.
#[derive(Debug)]
pub struct RatedCounters<const N: usize> {
    counts: [AtomicU64; N],
    rates: SampledRates<N>,
}

impl<const N: usize> Default for RatedCounters<N> {
    fn default() -> Self {
        RatedCounters {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            rates: SampledRates::default(),
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
        self.rates.sample(self.counts());
    }

    /// The counts now and the rates at the last sample.
    pub fn snapshot(&self) -> ([u64; N], [f64; N]) {
        (self.counts(), self.rates.rates())
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

/// The fraction of time something was in a state (a queue able to deliver
/// at once: RabbitMQ's consumer utilisation), over each sampling period.
/// Its owner reports the state after every change ([`set`](Self::set): a
/// compare unless it flipped) and takes the fraction every period
/// ([`take`](Self::take)); both under the owner's lock.
#[derive(Debug, Default)]
pub struct TimeInState {
    /// Since when it has been in the state (ms since the epoch), if it is.
    since: Option<u64>,
    /// Time in the state this period before `since`, ms.
    accumulated: u64,
    /// When this period began (0: not yet).
    period_start: u64,
}

impl TimeInState {
    /// Out of the state, the first period beginning at `now`.
    pub fn starting(now: u64) -> TimeInState {
        TimeInState {
            period_start: now,
            ..TimeInState::default()
        }
    }

    /// The state now is `on`; `now` gives the time, asked only on a flip.
    pub fn set(&mut self, on: bool, now: impl FnOnce() -> u64) {
        match (self.since, on) {
            (None, true) => self.since = Some(now()),
            (Some(since), false) => {
                self.accumulated += now().saturating_sub(since.max(self.period_start));
                self.since = None;
            }
            _ => {}
        }
    }

    /// The fraction of the period now ending (at `now`) spent in the state,
    /// between 0 and 1; a new period begins. Without [`starting`](Self::starting)
    /// the first period begins at the first take (0 then, unless in the
    /// state).
    pub fn take(&mut self, now: u64) -> f64 {
        let start = if self.period_start == 0 {
            now
        } else {
            self.period_start
        };
        let mut on = self.accumulated;
        if let Some(since) = self.since {
            on += now.saturating_sub(since.max(start));
        }
        let elapsed = now.saturating_sub(start);
        self.period_start = now;
        self.accumulated = 0;
        if elapsed == 0 {
            return if self.since.is_some() { 1.0 } else { 0.0 };
        }
        (on as f64 / elapsed as f64).clamp(0.0, 1.0)
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

    #[test]
    fn time_in_state_is_the_fraction_of_each_period() {
        let mut t = TimeInState::default();
        assert_eq!(t.take(1_000), 0.0);
        t.set(true, || 1_000);
        t.set(true, || unreachable!("no flip, no clock"));
        t.set(false, || 2_000);
        t.set(true, || 3_000);
        // On 1,000 ms then 2,000 ms of the 4,000 ms period.
        assert!((t.take(5_000) - 0.75).abs() < 1e-9);
        // Still on through the next period.
        assert_eq!(t.take(10_000), 1.0);
        t.set(false, || 10_000);
        assert_eq!(t.take(15_000), 0.0);
        // From its start: off 1,000 ms, then on 1,000 ms.
        let mut t = TimeInState::starting(20_000);
        t.set(true, || 21_000);
        assert!((t.take(22_000) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_gauge_that_falls_has_a_negative_rate() {
        let g = SampledRates::<2>::default();
        assert_eq!(g.rates(), [0.0, 0.0]);
        g.sample([100, 5]);
        g.sample([40, 5]);
        let [falling, steady] = g.rates();
        assert!(falling < 0.0 && steady == 0.0, "{falling} {steady}");
    }
}
