//! A Jepsen-style test of replicated queues: a three-node cluster, each
//! node in its own network namespace; on every node a client publishes
//! numbered persistent messages with confirms to one quorum queue, and
//! another consumes it with acknowledgements, throughout. Nemeses, one
//! after another: `kill -9` of a random node, `kill -9` of the queue's
//! leader, a partition into halves, the leader isolated, a node stopped
//! (`SIGSTOP`) for longer than an election, every node restarted at once.
//! Then everything heals, the publishers stop, and the queue is drained
//! from every node.
//!
//! The checker reports what was attempted, confirmed, lost (confirmed,
//! never consumed), unexpected (consumed, never published), duplicated and
//! recovered (not confirmed, yet consumed). It passes only with nothing
//! lost and nothing unexpected.
//!
//! `WARREN_JEPSEN_ROUNDS` (default 1) repeats the schedule; `docs/jepsen.md`
//! records a long run. Needs root for the namespaces (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use warren_tests::{NetLab, TestCluster, serve_cluster_node_if_child};

/// What every node runs.
#[test]
fn jepsen_node() {
    serve_cluster_node_if_child();
}

const CHILD: &str = "jepsen_node";
const QUEUE: &str = "jepsen";
/// Traffic between faults.
const QUIET: Duration = Duration::from_secs(3);
/// How long a fault lasts (longer than an election: 0.6 to 1.2 s).
const FAULT: Duration = Duration::from_secs(4);
/// Bound on the cluster's recovery after a fault, and on the drain.
const PATIENCE: Duration = Duration::from_secs(90);

/// What the clients saw.
#[derive(Default)]
struct History {
    attempted: HashSet<String>,
    confirmed: HashSet<String>,
    consumed: HashMap<String, u32>,
}

/// The checker's counts.
#[derive(Debug, PartialEq, Eq)]
struct Report {
    attempted: usize,
    confirmed: usize,
    lost: usize,
    unexpected: usize,
    duplicated: usize,
    recovered: usize,
}

fn check(h: &History) -> (Report, Vec<String>) {
    let mut lost: Vec<String> = h
        .confirmed
        .iter()
        .filter(|m| !h.consumed.contains_key(*m))
        .cloned()
        .collect();
    lost.sort();
    let report = Report {
        attempted: h.attempted.len(),
        confirmed: h.confirmed.len(),
        lost: lost.len(),
        unexpected: h
            .consumed
            .keys()
            .filter(|m| !h.attempted.contains(*m))
            .count(),
        duplicated: h.consumed.values().filter(|n| **n > 1).count(),
        recovered: h
            .consumed
            .keys()
            .filter(|m| h.attempted.contains(*m) && !h.confirmed.contains(*m))
            .count(),
    };
    (report, lost)
}

#[test]
fn the_checker_counts_each_kind_of_outcome() {
    let mut h = History::default();
    for m in ["a", "b", "c", "d"] {
        h.attempted.insert(m.into());
    }
    for m in ["a", "b", "c"] {
        h.confirmed.insert(m.into());
    }
    h.consumed.insert("a".into(), 1);
    h.consumed.insert("b".into(), 2);
    h.consumed.insert("d".into(), 1);
    h.consumed.insert("zz".into(), 1);
    let (report, lost) = check(&h);
    assert_eq!(
        report,
        Report {
            attempted: 4,
            confirmed: 3,
            lost: 1,
            unexpected: 1,
            duplicated: 1,
            recovered: 1,
        }
    );
    assert_eq!(lost, vec!["c".to_owned()]);
}

/// Where the clients of each node connect (an AMQP port changes when its
/// node restarts; `None` while it is down).
type Uris = Arc<Mutex<Vec<Option<String>>>>;

async fn connect(uris: &Uris, i: usize) -> Option<lapin::Connection> {
    let uri = uris.lock().unwrap()[i].clone()?;
    tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()
}

async fn channel(conn: &lapin::Connection) -> Option<lapin::Channel> {
    tokio::time::timeout(Duration::from_secs(5), conn.create_channel())
        .await
        .ok()?
        .ok()
}

/// Node `i`'s publisher: numbered persistent messages, ten at a time with
/// confirms, reconnecting whenever its connection breaks.
async fn publisher(i: usize, uris: Uris, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(conn) = connect(&uris, i).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Some(ch) = channel(&conn).await else {
            continue;
        };
        if ch
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        'connected: while !stop.load(Ordering::Relaxed) {
            let mut window = Vec::new();
            for _ in 0..10 {
                let body = format!("n{i}-{seq}");
                seq += 1;
                history.lock().unwrap().attempted.insert(body.clone());
                let publish = ch.basic_publish(
                    "".into(),
                    QUEUE.into(),
                    lapin::options::BasicPublishOptions::default(),
                    body.as_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                );
                match tokio::time::timeout(Duration::from_secs(5), publish).await {
                    Ok(Ok(confirm)) => window.push((body, confirm)),
                    _ => break 'connected,
                }
            }
            for (body, confirm) in window {
                // A confirm later than any election: the node is stopped or
                // cut off from the leader; the message stays unconfirmed.
                match tokio::time::timeout(Duration::from_secs(20), confirm).await {
                    Ok(Ok(c)) if c.is_ack() => {
                        history.lock().unwrap().confirmed.insert(body);
                    }
                    Ok(Ok(_)) => {}
                    _ => break 'connected,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
    }
}

/// Node `i`'s consumer: acknowledges each delivery after recording it,
/// reconnecting whenever its connection breaks.
async fn consumer(i: usize, uris: Uris, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(conn) = connect(&uris, i).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Some(ch) = channel(&conn).await else {
            continue;
        };
        if ch
            .basic_qos(20, lapin::options::BasicQosOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        let consume = ch.basic_consume(
            QUEUE.into(),
            format!("c{i}").as_str().into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        );
        let Ok(Ok(mut deliveries)) = tokio::time::timeout(Duration::from_secs(20), consume).await
        else {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(d))) => {
                    let body = String::from_utf8_lossy(&d.data).into_owned();
                    *history.lock().unwrap().consumed.entry(body).or_insert(0) += 1;
                    let ack = d.ack(lapin::options::BasicAckOptions::default());
                    if tokio::time::timeout(Duration::from_secs(5), ack)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(_) => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
    }
}

/// `GET` on node `i`'s management API (`None` if it does not answer).
async fn api_get(cluster: &TestCluster, i: usize, path: &str) -> Option<Value> {
    let url = format!("{}{path}", cluster.node(i).api);
    let response = reqwest::Client::new()
        .get(url)
        .basic_auth(&cluster.user.0, Some(&cluster.user.1))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

/// The queue as the first running node in `up` lists it.
async fn listed(cluster: &TestCluster, up: &[bool]) -> Option<Value> {
    for (i, _) in up.iter().enumerate().filter(|(_, u)| **u) {
        if let Some(all) = api_get(cluster, i, "/api/queues").await {
            return all.as_array()?.iter().find(|q| q["name"] == QUEUE).cloned();
        }
    }
    None
}

/// The index of the queue's leader, once one is listed with every member
/// online.
async fn healthy_leader(cluster: &TestCluster, lab: &NetLab, up: &[bool]) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(q) = listed(cluster, up).await {
            let online = q["online"].as_array().map_or(0, Vec::len);
            if let (Some(leader), 3) = (q["leader"].as_str(), online) {
                if let Some(i) = (0..3).find(|&i| leader == format!("n{}@{}", i + 1, lab.hosts[i]))
                {
                    return i;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the queue has no leader with every member online within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn random_below(n: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    nanos % n
}

#[derive(Debug, Clone, Copy)]
enum Nemesis {
    KillRandom,
    KillLeader,
    PartitionHalves,
    IsolateLeader,
    Pause,
    RestartAll,
}

const SCHEDULE: [Nemesis; 6] = [
    Nemesis::KillRandom,
    Nemesis::KillLeader,
    Nemesis::PartitionHalves,
    Nemesis::IsolateLeader,
    Nemesis::Pause,
    Nemesis::RestartAll,
];

fn respawn(cluster: &mut TestCluster, uris: &Uris, i: usize) {
    cluster.spawn(i, None);
    uris.lock().unwrap()[i] = Some(cluster.node(i).uri(&cluster.user.0, &cluster.user.1, "%2f"));
}

fn kill(cluster: &mut TestCluster, uris: &Uris, i: usize) {
    uris.lock().unwrap()[i] = None;
    cluster.kill(i);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicated_queue_loses_no_confirmed_message_under_kills_partitions_and_pauses() {
    let lab = match NetLab::new(3) {
        Ok(lab) => lab,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: network namespaces need root: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let rounds: usize = std::env::var("WARREN_JEPSEN_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut cluster = TestCluster::start_in_lab(CHILD, lab);
    let all_up = [true; 3];
    // The queue, declared once the cluster has formed.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let declared = async {
            let uri = cluster.node(0).uri(&cluster.user.0, &cluster.user.1, "%2f");
            let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
                .await
                .ok()?;
            let ch = conn.create_channel().await.ok()?;
            let args = warren_tests::quorum_queue_args();
            let options = lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(QUEUE.into(), options, args).await.ok()?;
            Some(())
        };
        if declared.await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "cannot declare the queue");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    {
        let lab = cluster.lab.as_ref().unwrap();
        healthy_leader(&cluster, lab, &all_up).await;
    }
    let uris: Uris = Arc::new(Mutex::new(
        (0..3)
            .map(|i| Some(cluster.node(i).uri(&cluster.user.0, &cluster.user.1, "%2f")))
            .collect(),
    ));
    let history = Arc::new(Mutex::new(History::default()));
    let (stop_publishing, stop_consuming) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut publishers = Vec::new();
    let mut consumers = Vec::new();
    for i in 0..3 {
        publishers.push(tokio::spawn(publisher(
            i,
            uris.clone(),
            history.clone(),
            stop_publishing.clone(),
        )));
        consumers.push(tokio::spawn(consumer(
            i,
            uris.clone(),
            history.clone(),
            stop_consuming.clone(),
        )));
    }

    for round in 0..rounds {
        for nemesis in SCHEDULE {
            tokio::time::sleep(QUIET).await;
            let before = history.lock().unwrap().confirmed.len();
            let leader = {
                let lab = cluster.lab.as_ref().unwrap();
                healthy_leader(&cluster, lab, &all_up).await
            };
            eprintln!("round {round}: {nemesis:?} (leader: node {})", leader + 1);
            match nemesis {
                Nemesis::KillRandom | Nemesis::KillLeader => {
                    let victim = match nemesis {
                        Nemesis::KillLeader => leader,
                        _ => random_below(3),
                    };
                    kill(&mut cluster, &uris, victim);
                    tokio::time::sleep(FAULT).await;
                    respawn(&mut cluster, &uris, victim);
                }
                Nemesis::PartitionHalves | Nemesis::IsolateLeader => {
                    let alone = match nemesis {
                        Nemesis::IsolateLeader => leader,
                        _ => random_below(3),
                    };
                    let lab = cluster.lab.as_ref().unwrap();
                    let others: Vec<usize> = (0..3).filter(|&j| j != alone).collect();
                    for &j in &others {
                        lab.cut(alone, j);
                    }
                    tokio::time::sleep(FAULT).await;
                    for &j in &others {
                        lab.heal(alone, j);
                    }
                }
                Nemesis::Pause => {
                    let victim = random_below(3);
                    cluster.signal(victim, "STOP");
                    tokio::time::sleep(FAULT).await;
                    cluster.signal(victim, "CONT");
                }
                Nemesis::RestartAll => {
                    for i in 0..3 {
                        kill(&mut cluster, &uris, i);
                    }
                    for i in 0..3 {
                        respawn(&mut cluster, &uris, i);
                    }
                }
            }
            let lab = cluster.lab.as_ref().unwrap();
            healthy_leader(&cluster, lab, &all_up).await;
            let now = history.lock().unwrap().confirmed.len();
            eprintln!("  healed; confirmed so far {now} (+{})", now - before);
        }
    }

    // Healed: the publishers stop; the consumers drain the queue.
    tokio::time::sleep(QUIET).await;
    stop_publishing.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let deadline = Instant::now() + PATIENCE;
    let mut empty_for = 0;
    while empty_for < 3 {
        let q = listed(&cluster, &all_up).await.unwrap_or(Value::Null);
        empty_for = if q["messages"] == 0 && q["leader"].is_string() {
            empty_for + 1
        } else {
            0
        };
        assert!(
            Instant::now() < deadline,
            "the queue was not drained within {PATIENCE:?}: {q}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop_consuming.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await.unwrap();
    }
    let (report, lost) = check(&history.lock().unwrap());
    eprintln!("{report:?}");
    assert!(report.confirmed > 0, "nothing was confirmed: {report:?}");
    assert_eq!(
        (report.lost, report.unexpected),
        (0, 0),
        "{report:?}; lost: {:?}",
        lost.iter().take(20).collect::<Vec<_>>()
    );
}
