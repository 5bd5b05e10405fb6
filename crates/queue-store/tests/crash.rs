//! Crash test: a child process publishes persistent messages to a durable
//! queue (and consumes and acknowledges some), reporting on stdout each
//! message whose commit point resolved. The parent `kill -9`s it at a random
//! point, reopens the store, and checks: every confirmed message is present
//! and intact, nothing is present that was never written, confirmed acks are
//! gone, and everything recovered comes back redelivered. Repeated over
//! several rounds on the same data directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};

use amqp_codec::FieldTable;
use common::{apply, assert_intact, block_on, message, recover_queue};
use queue_store::{Effects, Store};

const CHILD_ENV: &str = "WARREN_CRASH_CHILD_DIR";

/// The child's work loop; runs only when started by `crash_recovery_keeps_every_confirmed_message`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    // The parent's previous store may still be letting go of the directory
    // (sled's final flush in its drop can take seconds on a loaded machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (store, mut recovered) = loop {
        match Store::open(std::path::Path::new(&dir)) {
            Ok(opened) => break opened,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("retrying open: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("cannot open the store: {e}"),
        }
    };
    let mut q = recover_queue(&mut recovered, FieldTable::new());
    let mut fx = Effects::default();
    let out = std::io::stdout();
    let mut i: u64 = 0;
    loop {
        // Publish a batch of 10, commit, report.
        let mut batch = Vec::new();
        for _ in 0..10 {
            let m = message(&store, true, None);
            q.publish(&m, 0, &mut fx);
            batch.push(m.id.0);
        }
        apply(&store, &mut fx);
        block_on(store.commit()).unwrap();
        let mut o = out.lock();
        for id in &batch {
            writeln!(o, "confirmed {id}").unwrap();
        }
        o.flush().unwrap();
        drop(o);
        // Every third round, consume three messages and acknowledge two.
        i += 1;
        if i % 3 == 0 {
            let d: Vec<_> = (0..3).filter_map(|_| q.deliver(0, true, &mut fx)).collect();
            let acked: Vec<u64> = d.iter().take(2).map(|d| d.message.id().0).collect();
            // Announce before committing: a kill after the commit but before
            // "acked" is printed leaves the parent knowing they may be gone.
            let mut o = out.lock();
            for id in &acked {
                writeln!(o, "acking {id}").unwrap();
            }
            o.flush().unwrap();
            drop(o);
            for d in d.iter().take(2) {
                q.ack(d.seq, &mut fx);
            }
            apply(&store, &mut fx);
            block_on(store.commit()).unwrap();
            let mut o = out.lock();
            for id in acked {
                writeln!(o, "acked {id}").unwrap();
            }
            o.flush().unwrap();
        }
    }
}

#[test]
fn crash_recovery_keeps_every_confirmed_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut confirmed = BTreeSet::new();
    let mut acked = BTreeSet::new();
    let mut acking = BTreeSet::new();
    let mut seed: u64 = 0x5eed;
    for round in 0..5 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill after a random number of confirmations (an event, not a sleep).
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let kill_after: u64 = 30 + (seed >> 33) % 300;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        let mut record = |line: &str, seen: &mut u64| {
            if let Some(id) = line.strip_prefix("confirmed ") {
                confirmed.insert(id.parse::<u64>().unwrap());
                *seen += 1;
            } else if let Some(id) = line.strip_prefix("acking ") {
                acking.insert(id.parse::<u64>().unwrap());
            } else if let Some(id) = line.strip_prefix("acked ") {
                acked.insert(id.parse::<u64>().unwrap());
            }
        };
        for line in lines.by_ref() {
            record(&line.unwrap(), &mut seen);
            if seen >= kill_after {
                break;
            }
        }
        let mut errors = String::new();
        if seen == 0 {
            use std::io::Read as _;
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut errors);
            }
        }
        assert!(
            seen > 0,
            "round {round}: the child confirmed nothing: {errors}"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The child kept running until the kill landed: what it announced
        // meanwhile is still in the pipe.
        for line in lines {
            let Ok(line) = line else { break };
            let mut ignored = 0;
            record(&line, &mut ignored);
        }

        let (store, mut recovered) = Store::open(dir.path()).unwrap();
        assert!(
            !recovered.clean_shutdown,
            "round {round}: a killed process cannot have closed cleanly"
        );
        let mut q = recover_queue(&mut recovered, FieldTable::new());
        let mut fx = Effects::default();
        let mut present = BTreeSet::new();
        let deliveries: Vec<_> = std::iter::from_fn(|| q.deliver(0, true, &mut fx)).collect();
        for d in &deliveries {
            assert!(
                d.redelivered,
                "after a crash every message may have been delivered"
            );
            let id = d.message.id();
            assert_intact(&store, id);
            present.insert(id.0);
        }
        for d in &deliveries {
            q.requeue(d.seq, &mut fx); // leave the queue as it was
        }
        let lost: Vec<_> = confirmed
            .difference(&present)
            .filter(|id| !acking.contains(id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: confirmed messages lost: {lost:?}"
        );
        let resurrected: Vec<_> = present.intersection(&acked).collect();
        assert!(
            resurrected.is_empty(),
            "round {round}: acknowledged messages back: {resurrected:?}"
        );
        // Anything present beyond what was confirmed was written but its
        // confirmation never reached us: it must still be a real message (checked
        // by assert_intact above) with an id the child allocated.
        let max_id = store.next_message_id().0;
        assert!(present.iter().all(|id| *id < max_id));
        apply(&store, &mut fx);
        store.close().unwrap();
        drop(store);
    }
    assert!(
        confirmed.len() >= 150,
        "only {} confirmations over all rounds",
        confirmed.len()
    );
}
