//! Damaged data directories: a cleanly stopped store holding confirmed
//! messages is damaged the way disks and operators damage them (bit flips,
//! truncations, deleted, emptied and duplicated files). The store must either
//! open with every confirmed message or refuse to open naming the damage —
//! never open with less and say nothing. A repair moves the damage to
//! quarantine and reports what it cost.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use amqp_codec::FieldTable;
use bytes::Bytes;
use common::{apply, block_on, durable_queue};
use proptest::prelude::*;
use queue_store::{DefKind, Effects, MessageId, SegmentLogStorage, Store, StoreError, Write};

/// Messages published by [`stopped_store`].
const PUBLISHED: u64 = 300;

/// Builds a cleanly stopped store: queue 1 (defined) holds the confirmed
/// messages returned (every third one acked), spread over many small log
/// segments, some of them already reclaimed.
fn stopped_store(dir: &Path) -> BTreeSet<MessageId> {
    stopped_store_acking(dir, true)
}

/// [`stopped_store`], acking the oldest third only if `ack` (without acks
/// every frame holds live messages).
fn stopped_store_acking(dir: &Path, ack: bool) -> BTreeSet<MessageId> {
    let storage = Arc::new(SegmentLogStorage::open(dir).unwrap());
    storage.set_segment_target(2048);
    let (store, _) = Store::with_storage(storage).unwrap();
    store.submit([Write::PutDefinition {
        kind: DefKind::Queue,
        key: Bytes::from_static(b"/\0q"),
        value: FieldTable::new(),
    }]);
    let mut q = durable_queue(FieldTable::new());
    let mut fx = Effects::default();
    let mut kept = BTreeSet::new();
    for i in 0..PUBLISHED {
        let id = store.next_message_id();
        let m = common::build(id, Bytes::from(format!("message {}", id.0)), true, None);
        q.publish(&m, 0, &mut fx);
        kept.insert(id);
        if i % 10 == 9 {
            apply(&store, &mut fx);
            block_on(store.commit()).unwrap();
        }
    }
    // Acks of the oldest third: their segments empty and are reclaimed.
    for _ in 0..if ack { PUBLISHED / 3 } else { 0 } {
        let d = q.deliver(0, true, &mut fx).unwrap();
        q.ack(d.seq, &mut fx);
        kept.remove(&d.message.id());
    }
    apply(&store, &mut fx);
    block_on(store.commit()).unwrap();
    store.close().unwrap();
    kept
}

/// Opens the store; on success checks that every confirmed message is there
/// and intact, and that the queue's definition survived. `Ok(false)`: refused.
fn opens_whole(dir: &Path, kept: &BTreeSet<MessageId>) -> Result<bool, String> {
    let (store, mut recovered) = match Store::open(dir) {
        Ok(x) => x,
        Err(
            StoreError::Damaged(_) | StoreError::Corrupt { .. } | StoreError::SchemaMismatch { .. },
        ) => {
            return Ok(false);
        }
        Err(e) => return Err(format!("refused, but not as damage: {e}")),
    };
    if !recovered
        .definitions
        .iter()
        .any(|(k, name, _)| *k == DefKind::Queue && name.as_ref() == b"/\0q")
    {
        return Err("opened without the queue's definition".into());
    }
    let entries = recovered.queues.remove(&1).unwrap_or_default();
    let found: BTreeSet<MessageId> = entries.iter().map(|(_, e)| e.message).collect();
    if let Some(missing) = kept.difference(&found).next() {
        return Err(format!(
            "opened with {} of {} confirmed messages (missing {missing:?}), saying nothing",
            kept.intersection(&found).count(),
            kept.len()
        ));
    }
    for id in kept {
        match store.load(*id) {
            Ok(Some(m)) if m.body == format!("message {}", id.0) => {}
            other => return Err(format!("message {id:?} not intact: {other:?}")),
        }
    }
    Ok(true)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn damage_of(r: Result<(Store, queue_store::Recovered), StoreError>) -> queue_store::Damage {
    match r {
        Err(StoreError::Damaged(d)) => d,
        Err(e) => panic!("refused, but not as damage: {e}"),
        Ok((_, rec)) => panic!(
            "opened a damaged store ({} queues recovered)",
            rec.queues.len()
        ),
    }
}

#[test]
fn a_flipped_checksum_after_a_clean_shutdown_is_refused_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    // No acks: whichever frame the damage hits holds confirmed messages.
    let kept = stopped_store_acking(dir.path(), false);
    let segs = segments(dir.path());
    assert!(segs.len() > 5, "{} segments", segs.len());
    // 8 octets in the middle of the oldest segment, as the issue found them.
    let first = &segs[0];
    let mut raw = std::fs::read(first).unwrap();
    let mid = raw.len() / 2;
    for b in &mut raw[mid..mid + 8] {
        *b ^= 0xa5;
    }
    std::fs::write(first, raw).unwrap();
    let d = damage_of(Store::open(dir.path()));
    assert_eq!(&d.path, first, "{d}");
    assert!(d.problem.contains("after a clean shutdown"), "{d}");
    assert_eq!(segments(dir.path()), segs, "no segment was deleted");
    // Refused again: nothing was changed by the refusal.
    damage_of(Store::open(dir.path()));

    // The repair quarantines the damaged frame and says what it cost.
    let (store, mut recovered, report) = Store::repair(dir.path()).unwrap();
    let quarantine = report.quarantine.clone().expect("a quarantine directory");
    assert!(std::fs::read_dir(&quarantine).unwrap().count() >= 1);
    assert!(!report.actions.is_empty());
    let entries = recovered.queues.remove(&1).unwrap_or_default();
    let found: BTreeSet<MessageId> = entries.iter().map(|(_, e)| e.message).collect();
    let lost: BTreeSet<MessageId> = kept.difference(&found).copied().collect();
    let reported: BTreeSet<MessageId> = report.lost_entries.iter().map(|&(_, _, m)| m).collect();
    // The report names exactly the confirmed messages the queue lost: the
    // damaged frame's own entries (read from it as well as it still parses)
    // and entries elsewhere whose bodies it held.
    assert!(
        !lost.is_empty() && lost.len() < kept.len() / 2,
        "{} of {} lost",
        lost.len(),
        kept.len()
    );
    assert_eq!(reported, lost);
    drop(store);
    assert!(Store::open(dir.path()).is_ok(), "repaired for good");
}

#[test]
fn an_empty_or_garbage_metadata_database_is_not_a_first_boot() {
    for garbage in [&b""[..], &[0x5a; 4096][..]] {
        let dir = tempfile::tempdir().unwrap();
        stopped_store(dir.path());
        std::fs::write(dir.path().join("db"), garbage).unwrap();
        let d = damage_of(Store::open(dir.path()));
        assert!(d.path.ends_with("db"), "{d}");
        assert!(d.problem.contains("metadata database"), "{d}");
        assert!(!segments(dir.path()).is_empty(), "the log is untouched");
        // The repair keeps everything in quarantine and starts empty.
        let (_store, recovered, report) = Store::repair(dir.path()).unwrap();
        assert!(recovered.queues.is_empty() && recovered.definitions.is_empty());
        let q = report.quarantine.unwrap();
        assert!(q.join("log").is_dir(), "the log moved to quarantine");
    }
}

#[test]
fn a_deleted_middle_segment_is_refused_and_repair_names_the_lost_messages() {
    let dir = tempfile::tempdir().unwrap();
    let kept = stopped_store_acking(dir.path(), false);
    let segs = segments(dir.path());
    let victim = &segs[segs.len() / 2];
    std::fs::remove_file(victim).unwrap();
    let d = damage_of(Store::open(dir.path()));
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(d.problem.contains("missing"), "{d}");
    assert!(d.problem.contains(&name), "{d} names {name}");

    let (_store, mut recovered, report) = Store::repair(dir.path()).unwrap();
    let entries = recovered.queues.remove(&1).unwrap_or_default();
    let found: BTreeSet<MessageId> = entries.iter().map(|(_, e)| e.message).collect();
    let lost: Vec<MessageId> = kept.difference(&found).copied().collect();
    assert!(!lost.is_empty());
    assert!(
        report.actions.iter().any(|a| a.contains(&name)),
        "{report:?}"
    );
}

#[test]
fn a_missing_removal_journal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kept = stopped_store(dir.path());
    std::fs::remove_file(dir.path().join("log/removed")).unwrap();
    let d = damage_of(Store::open(dir.path()));
    assert!(d.path.ends_with("removed"), "{d}");
    drop(Store::repair(dir.path()).unwrap());
    assert_eq!(opens_whole(dir.path(), &kept), Ok(true));
}

/// One way a disk or an operator damages a data directory.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR `mask` into 1..=8 octets at a fraction of a file's length.
    Flip {
        file: usize,
        at: f64,
        len: usize,
        mask: u8,
    },
    /// Cut a file to a fraction of its length.
    Truncate {
        file: usize,
        at: f64,
    },
    /// Cut a segment where one of its frames starts (or right after its
    /// header): what is left parses as a whole, shorter segment.
    CutAtFrame {
        file: usize,
        frame: usize,
    },
    Delete {
        file: usize,
    },
    /// Copy a segment to another segment number (`offset` from its own).
    Duplicate {
        file: usize,
        offset: i64,
    },
    /// Fill a file with one octet.
    Garbage {
        file: usize,
        octet: u8,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0.0..1.0f64, 1..=8usize, 1..=255u8).prop_map(|(file, at, len, mask)| {
            Mutation::Flip {
                file,
                at,
                len,
                mask,
            }
        }),
        (any::<usize>(), 0.0..1.0f64).prop_map(|(file, at)| Mutation::Truncate { file, at }),
        (any::<usize>(), any::<usize>())
            .prop_map(|(file, frame)| Mutation::CutAtFrame { file, frame }),
        any::<usize>().prop_map(|file| Mutation::Delete { file }),
        (any::<usize>(), -40..40i64)
            .prop_map(|(file, offset)| Mutation::Duplicate { file, offset }),
        (any::<usize>(), any::<u8>()).prop_map(|(file, octet)| Mutation::Garbage { file, octet }),
    ]
}

/// The files a mutation picks from: the log's and the store's own (sled's
/// `db` included; its `conf` and snapshots are sled's business).
fn targets(dir: &Path) -> Vec<PathBuf> {
    let mut v = segments(dir);
    v.push(dir.join("log/removed"));
    v.push(dir.join("warren-store"));
    v.push(dir.join("db"));
    v.retain(|p| p.exists());
    v
}

fn mutate(dir: &Path, m: &Mutation) {
    let files = targets(dir);
    let pick = |i: usize| files[i % files.len()].clone();
    match *m {
        Mutation::Flip {
            file,
            at,
            len,
            mask,
        } => {
            let p = pick(file);
            let mut raw = std::fs::read(&p).unwrap();
            if raw.is_empty() {
                return;
            }
            let start = ((raw.len() as f64 * at) as usize).min(raw.len() - 1);
            let end = (start + len).min(raw.len());
            for b in &mut raw[start..end] {
                *b ^= mask;
            }
            std::fs::write(&p, raw).unwrap();
        }
        Mutation::Truncate { file, at } => {
            let p = pick(file);
            let len = std::fs::metadata(&p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len((len as f64 * at) as u64).unwrap();
        }
        Mutation::CutAtFrame { file, frame } => {
            let segs = segments(dir);
            let p = &segs[file % segs.len()];
            let raw = std::fs::read(p).unwrap();
            // Frame starts: after the 20-octet header, each frame is its
            // length (u32 BE), a CRC-32 and the data.
            let mut starts = vec![20usize];
            while let Some(l) = raw.get(starts[starts.len() - 1]..starts[starts.len() - 1] + 4) {
                let next = starts[starts.len() - 1]
                    + 8
                    + u32::from_be_bytes(l.try_into().unwrap()) as usize;
                if next >= raw.len() {
                    break;
                }
                starts.push(next);
            }
            let at = starts[frame % starts.len()];
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(at as u64).unwrap();
        }
        Mutation::Delete { file } => std::fs::remove_file(pick(file)).unwrap(),
        Mutation::Duplicate { file, offset } => {
            let segs = segments(dir);
            let p = &segs[file % segs.len()];
            let n = u64::from_str_radix(p.file_stem().unwrap().to_str().unwrap(), 16).unwrap();
            let to = n.saturating_add_signed(offset);
            std::fs::copy(p, dir.join(format!("log/{to:016x}.seg"))).unwrap();
        }
        Mutation::Garbage { file, octet } => {
            let p = pick(file);
            let len = std::fs::metadata(&p).unwrap().len() as usize;
            std::fs::write(&p, vec![octet; len]).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The store fuzzer: one or two mutations of a cleanly stopped data
    /// directory; opening it either recovers every confirmed message or
    /// refuses as damage.
    #[test]
    fn a_damaged_store_opens_whole_or_not_at_all(ms in proptest::collection::vec(mutation(), 1..=2)) {
        let dir = tempfile::tempdir().unwrap();
        let kept = stopped_store(dir.path());
        for m in &ms {
            mutate(dir.path(), m);
        }
        let outcome = opens_whole(dir.path(), &kept);
        prop_assert!(outcome.is_ok(), "{:?}: {}", ms, outcome.unwrap_err());
        // Whatever was found, a repair opens the directory, and what it
        // leaves opens normally afterwards.
        if outcome == Ok(false) {
            let repaired = Store::repair(dir.path());
            prop_assert!(repaired.is_ok(), "{:?}: repair failed: {:?}", ms, repaired.err());
            drop(repaired);
            let reopened = Store::open(dir.path());
            prop_assert!(reopened.is_ok(), "{:?}: refused after repair: {:?}", ms, reopened.err());
        }
    }
}

/// Damage that garbles a body record's id leaves noise for an id: the repair
/// names the message once (its entry lost its body), not a second time as a
/// body of an unknown queue under the noise id. (CI caught the double count
/// in the broker's repair test, one run in many.)
#[test]
fn a_garbled_body_id_is_not_a_second_lost_message() {
    let dir = tempfile::tempdir().unwrap();
    let kept = stopped_store(dir.path());
    let victim = kept.iter().nth(kept.len() / 2).copied().unwrap();
    let mut pattern = vec![1u8];
    pattern.extend_from_slice(&victim.0.to_be_bytes());
    let (path, at) = segments(dir.path())
        .into_iter()
        .find_map(|p| {
            let raw = std::fs::read(&p).unwrap();
            raw.windows(pattern.len())
                .position(|w| w == pattern.as_slice())
                .map(|i| (p, i + 1))
        })
        .expect("the body record");
    let mut raw = std::fs::read(&path).unwrap();
    for b in &mut raw[at..at + 8] {
        *b ^= 0xff;
    }
    std::fs::write(&path, raw).unwrap();
    let (_store, recovered, report) = Store::repair(dir.path()).unwrap();
    let back: BTreeSet<MessageId> = recovered
        .queues
        .get(&1)
        .map(|v| v.iter().map(|(_, e)| e.message).collect())
        .unwrap_or_default();
    let named: BTreeSet<MessageId> = report
        .lost_entries
        .iter()
        .map(|&(_, _, m)| m)
        .chain(report.lost_unattributed.iter().copied())
        .collect();
    assert!(named.contains(&victim), "{report:?}");
    assert!(back.is_disjoint(&named), "named lost and back: {report:?}");
    assert_eq!(
        back.len() + report.lost_entries.len() + report.lost_unattributed.len(),
        kept.len(),
        "every message back or named lost, once: {report:?}"
    );
}

/// A middle segment cut at a frame boundary (here: right after its first
/// frame) reads as a shorter segment; its missing seal tells it apart, and
/// open refuses it. The repair keeps the frames that are left.
#[test]
fn a_segment_cut_at_a_frame_boundary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    stopped_store(dir.path());
    let segs = segments(dir.path());
    let victim = &segs[segs.len() / 2];
    let raw = std::fs::read(victim).unwrap();
    let first_len = u32::from_be_bytes(raw[20..24].try_into().unwrap()) as u64;
    let cut = 20 + 8 + first_len;
    assert!(cut < raw.len() as u64, "something follows the first frame");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .unwrap();
    f.set_len(cut).unwrap();
    let d = damage_of(Store::open(dir.path()));
    assert_eq!(&d.path, victim, "{d}");
    assert!(d.problem.contains("does not end with its seal"), "{d}");
    drop(Store::repair(dir.path()).unwrap());
    assert!(Store::open(dir.path()).is_ok());
}

/// A middle segment cut back to its header (20 octets: a valid header and
/// no frames) is refused, not taken for an empty segment: every segment is
/// written with at least one frame. (Found by the store fuzzer: such a cut
/// lost 20 confirmed messages without a word.)
#[test]
fn a_segment_cut_back_to_its_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    stopped_store(dir.path());
    let segs = segments(dir.path());
    let victim = &segs[segs.len() / 2];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .unwrap();
    f.set_len(20).unwrap();
    let d = damage_of(Store::open(dir.path()));
    assert_eq!(&d.path, victim, "{d}");
    assert!(d.problem.contains("no frame after the header"), "{d}");
    // The repair drops the empty file and says so; what is left opens.
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let (store, _, report) = Store::repair(dir.path()).unwrap();
    assert!(
        report.actions.iter().any(|a| a.contains(&name)),
        "{report:?}"
    );
    drop(store);
    assert!(Store::open(dir.path()).is_ok());
}
