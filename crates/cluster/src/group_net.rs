//! Raft's RPCs for any group over the cluster [`Links`]: one network type,
//! [`GroupNetwork`], for the metadata group and every replicated queue's
//! group. A request names its group; the receiving node hands it to that
//! group's `Raft` (the metadata group's, or one of its [`QueueGroups`]), so
//! all groups between two nodes share their one link.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Raft, RaftTypeConfig};
use parking_lot::RwLock;

use crate::identity::NodeInfo;
use crate::link::Links;
use crate::meta_group::MetaTypes;
use crate::queue_group::QueueTypes;
use crate::rpc::{Request, Response};

/// How a group type's RPCs travel as [`Request`]s.
pub trait GroupWire: RaftTypeConfig<NodeId = u64, Node = NodeInfo> {
    /// An append-entries request for `group`.
    fn append(group: u64, rpc: AppendEntriesRequest<Self>) -> Request;
    /// A snapshot chunk for `group`.
    fn snapshot(group: u64, rpc: InstallSnapshotRequest<Self>) -> Request;
}

impl GroupWire for MetaTypes {
    fn append(group: u64, rpc: AppendEntriesRequest<Self>) -> Request {
        Request::Append { group, rpc }
    }

    fn snapshot(group: u64, rpc: InstallSnapshotRequest<Self>) -> Request {
        Request::Snapshot { group, rpc }
    }
}

impl GroupWire for QueueTypes {
    fn append(group: u64, rpc: AppendEntriesRequest<Self>) -> Request {
        Request::QueueAppend { group, rpc }
    }

    fn snapshot(group: u64, rpc: InstallSnapshotRequest<Self>) -> Request {
        Request::QueueSnapshot { group, rpc }
    }
}

/// The most octets of entries one append-entries request carries when it
/// has more than one entry. openraft bounds a request by its number of
/// entries only (`max_payload_entries`), and an entry may hold a message of
/// up to 512 MiB: a follower far behind would be sent more than a link
/// frame holds, for ever. A longer run goes in parts instead (openraft's
/// `PartialSuccess`: it sends the rest next). Small enough to be sent,
/// written and fsync'd within openraft's time for one append (the
/// heartbeat interval, 150 ms) on a 1 Gb/s link.
pub const MAX_APPEND_OCTETS: u64 = 4 << 20;

/// The smallest part an append of several entries is cut down to when
/// appends are slow (a slow link or follower; a debug build).
const MIN_APPEND_OCTETS: u64 = 64 << 10;

/// How an append of several entries went, for the size of the next part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendOutcome {
    /// Answered, after this long.
    Answered(std::time::Duration),
    /// Not answered within openraft's time for it.
    TimedOut,
}

/// The size of the next part of an append to one follower (see
/// [`MAX_APPEND_OCTETS`]), from how the last one went within openraft's
/// `budget` for one append: a quarter after a timeout, half when it took
/// over half the budget, twice (up to `max`) when it took under an eighth
/// and used most of its part. What fits the time left to the link and
/// the follower, whatever they are.
fn next_part(
    part: u64,
    max: u64,
    used: u64,
    outcome: AppendOutcome,
    budget: std::time::Duration,
) -> u64 {
    let floor = MIN_APPEND_OCTETS.min(max);
    match outcome {
        AppendOutcome::TimedOut => (part / 4).max(floor),
        AppendOutcome::Answered(took) if took > budget / 2 => (part / 2).max(floor),
        AppendOutcome::Answered(took) if took < budget / 8 && used >= part / 2 => {
            part.saturating_mul(2).min(max)
        }
        AppendOutcome::Answered(_) => part,
    }
}

/// Makes [`GroupNetwork`]s for group `group` over the node's links.
#[derive(Debug)]
pub struct GroupNetworkFactory<C> {
    links: Arc<Links>,
    group: u64,
    max_append: u64,
    _types: PhantomData<fn() -> C>,
}

impl<C> GroupNetworkFactory<C> {
    /// The network of group `group`.
    pub fn new(links: Arc<Links>, group: u64) -> Self {
        GroupNetworkFactory {
            links,
            group,
            max_append: MAX_APPEND_OCTETS,
            _types: PhantomData,
        }
    }
}

/// Raft RPCs of one group to one peer.
#[derive(Debug)]
pub struct GroupNetwork<C> {
    links: Arc<Links>,
    group: u64,
    target: u64,
    node: NodeInfo,
    /// [`MAX_APPEND_OCTETS`] (smaller in tests).
    max_append: u64,
    /// The part of a long append sent now (see [`next_part`]).
    part: u64,
    /// The last append of several entries: its octets, if it was not
    /// answered (openraft drops a call that runs out of time).
    unanswered: Option<u64>,
    _types: PhantomData<fn() -> C>,
}

impl<C: GroupWire> RaftNetworkFactory<C> for GroupNetworkFactory<C> {
    type Network = GroupNetwork<C>;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> GroupNetwork<C> {
        GroupNetwork {
            links: self.links.clone(),
            group: self.group,
            target,
            node: node.clone(),
            max_append: self.max_append,
            part: self.max_append,
            unanswered: None,
            _types: PhantomData,
        }
    }
}

/// How many of `entries`, from the first, fit in `max` octets (at least
/// one: a single entry always goes, and a frame holds the largest), and
/// their octets.
fn entries_that_fit<E: serde::Serialize>(entries: &[E], max: u64) -> (usize, u64) {
    let mut octets = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let more = octets.saturating_add(crate::link::encoded_len(e).unwrap_or(u64::MAX));
        if more > max {
            return if i == 0 { (1, more) } else { (i, octets) };
        }
        octets = more;
    }
    (entries.len(), octets)
}

impl<C> GroupNetwork<C> {
    async fn call<E: std::error::Error>(
        &self,
        request: Request,
        option: &RPCOption,
    ) -> Result<Response, RPCError<u64, NodeInfo, E>> {
        self.links
            .request(
                Some(self.target),
                &self.node.cluster_addr,
                &request,
                option.hard_ttl(),
            )
            .await
            .map(|(_, r)| r)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }

    fn unexpected<E: std::error::Error>(r: Response) -> RPCError<u64, NodeInfo, E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
            "unexpected response {r:?}"
        ))))
    }
}

impl<C: GroupWire> RaftNetwork<C> for GroupNetwork<C> {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        // Only what fits the part (at most [`MAX_APPEND_OCTETS`]); then
        // the rest, as openraft sends what follows a partial success.
        let budget = option.hard_ttl();
        if let Some(used) = self.unanswered.take() {
            self.part = next_part(
                self.part,
                self.max_append,
                used,
                AppendOutcome::TimedOut,
                budget,
            );
        }
        let mut sent_up_to = None;
        let mut several = None;
        if rpc.entries.len() > 1 {
            let (fit, octets) = entries_that_fit(&rpc.entries, self.part);
            several = Some(octets);
            if fit < rpc.entries.len() {
                rpc.entries.truncate(fit);
                sent_up_to = rpc
                    .entries
                    .last()
                    .map(|e| *openraft::RaftLogId::get_log_id(e));
            }
        }
        let n = rpc.entries.len();
        let target = self.target;
        tracing::trace!(target: "latency", to = target, n, "append_entries send");
        let started = std::time::Instant::now();
        self.unanswered = several;
        let r = self.call(C::append(self.group, rpc), &option).await;
        self.unanswered = None;
        if let Some(used) = several {
            let outcome = match &r {
                Ok(_) => AppendOutcome::Answered(started.elapsed()),
                Err(_) => AppendOutcome::TimedOut,
            };
            let part = next_part(self.part, self.max_append, used, outcome, budget);
            if part != self.part {
                tracing::debug!(
                    to = target,
                    from = self.part,
                    to_octets = part,
                    ?outcome,
                    "append part resized"
                );
                self.part = part;
            }
        }
        tracing::trace!(target: "latency", to = target, n, "append_entries answered");
        match r? {
            Response::Append(Ok(AppendEntriesResponse::Success)) if sent_up_to.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(sent_up_to))
            }
            Response::Append(Ok(r)) => Ok(r),
            Response::Append(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(Self::unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeInfo, RaftError<u64, InstallSnapshotError>>,
    > {
        match self.call(C::snapshot(self.group, rpc), &option).await? {
            Response::Snapshot(Ok(r)) => Ok(r),
            Response::Snapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(Self::unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let request = Request::Vote {
            group: self.group,
            rpc,
        };
        match self.call(request, &option).await? {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(Self::unexpected(other)),
        }
    }
}

/// The replicated queues' groups this node is a member of, by group id:
/// where their peers' RPCs are handed.
#[derive(Default)]
pub struct QueueGroups {
    groups: RwLock<HashMap<u64, Raft<QueueTypes>>>,
}

impl std::fmt::Debug for QueueGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGroups")
            .field("groups", &self.groups.read().len())
            .finish()
    }
}

impl QueueGroups {
    /// Serves group `group`'s RPCs with `raft` from now on.
    pub fn insert(&self, group: u64, raft: Raft<QueueTypes>) {
        self.groups.write().insert(group, raft);
    }

    /// Stops serving group `group`; its `Raft`, if it was served.
    pub fn remove(&self, group: u64) -> Option<Raft<QueueTypes>> {
        self.groups.write().remove(&group)
    }

    /// Group `group`'s `Raft`, if this node is a member.
    pub fn get(&self, group: u64) -> Option<Raft<QueueTypes>> {
        self.groups.read().get(&group).cloned()
    }

    /// The answer to a peer's Raft RPC for a queue group; `Err` gives back
    /// a request that is not one.
    pub async fn serve(&self, request: Request) -> Result<Response, Request> {
        let group = match &request {
            Request::QueueAppend { group, .. }
            | Request::QueueSnapshot { group, .. }
            | Request::Vote { group, .. }
            | Request::Elect { group } => *group,
            _ => return Err(request),
        };
        let Some(raft) = self.get(group) else {
            return Ok(Response::NoSuchGroup(group));
        };
        Ok(match request {
            Request::QueueAppend { rpc, .. } => {
                let n = rpc.entries.len();
                tracing::trace!(target: "latency", n, "append_entries received");
                let r = raft.append_entries(rpc).await;
                tracing::trace!(target: "latency", n, "append_entries served");
                Response::Append(r)
            }
            Request::QueueSnapshot { rpc, .. } => {
                Response::Snapshot(raft.install_snapshot(rpc).await)
            }
            Request::Vote { rpc, .. } => Response::Vote(raft.vote(rpc).await),
            Request::Elect { .. } => match raft.trigger().elect().await {
                Ok(()) => Response::Settled,
                Err(e) => Response::Unavailable(e.to_string()),
            },
            other => return Err(other),
        })
    }
}

#[cfg(test)]
mod tests {
    //! A replicated queue's group of three replicas in one process, each
    //! with its own links on loopback (authenticated TCP, as between nodes)
    //! and its own WAL.

    use super::*;
    use crate::group_log::GroupLog;
    use crate::link::RequestHandler;

    /// The part of a long append shrinks when appends time out or take
    /// over half of openraft's time for one, down to a floor, and grows
    /// back (up to the most) while they are quick and fill their part.
    #[test]
    fn the_append_part_follows_how_long_appends_take() {
        use std::time::Duration;
        let budget = Duration::from_millis(150);
        let max = MAX_APPEND_OCTETS;
        let quick = AppendOutcome::Answered(Duration::from_millis(5));
        let slow = AppendOutcome::Answered(Duration::from_millis(100));
        assert_eq!(
            next_part(max, max, max, AppendOutcome::TimedOut, budget),
            max / 4
        );
        assert_eq!(next_part(max, max, max, slow, budget), max / 2);
        assert_eq!(
            next_part(MIN_APPEND_OCTETS, max, 0, AppendOutcome::TimedOut, budget),
            MIN_APPEND_OCTETS
        );
        assert_eq!(next_part(max / 4, max, max / 4, quick, budget), max / 2);
        assert_eq!(
            next_part(max, max, max, quick, budget),
            max,
            "never past the most"
        );
        // A quick append that used little of its part says nothing of a
        // bigger one.
        assert_eq!(next_part(max / 4, max, 1000, quick, budget), max / 4);
        let middling = AppendOutcome::Answered(Duration::from_millis(40));
        assert_eq!(next_part(max / 4, max, max / 4, middling, budget), max / 4);
        // With a smaller most (tests), the floor is that most.
        assert_eq!(
            next_part(4096, 4096, 4096, AppendOutcome::TimedOut, budget),
            4096
        );
    }
    use crate::queue_group::test_support::{applied, identity, leader_seen_by, message};
    use crate::queue_group::{QueueMachine, QueueResponse};
    use crate::raft_wal::RaftWal;
    use std::collections::BTreeMap;
    use std::time::Duration;

    const GROUP: u64 = 42;

    /// A node's handler that serves queue groups only; while `refusing`,
    /// it refuses appends. It notes the most octets of entries one append
    /// carried.
    struct GroupsOnly(Arc<QueueGroups>, Arc<Appends>);

    #[derive(Default)]
    struct Appends {
        refusing: std::sync::atomic::AtomicBool,
        most_octets: std::sync::atomic::AtomicU64,
    }

    impl RequestHandler for GroupsOnly {
        fn handle(
            &self,
            _from: NodeInfo,
            request: Request,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
            use std::sync::atomic::Ordering;
            let groups = self.0.clone();
            if let Request::QueueAppend { rpc, .. } = &request {
                if self.1.refusing.load(Ordering::Acquire) {
                    return Box::pin(std::future::ready(Response::Unavailable(
                        "refusing appends".into(),
                    )));
                }
                let octets = rpc
                    .entries
                    .iter()
                    .filter_map(crate::link::encoded_len)
                    .sum::<u64>();
                self.1.most_octets.fetch_max(octets, Ordering::AcqRel);
            }
            Box::pin(async move {
                groups
                    .serve(request)
                    .await
                    .unwrap_or_else(|_| Response::Unavailable("not a queue group's RPC".into()))
            })
        }

        fn admits(&self, _id: u64) -> Result<(), String> {
            Ok(())
        }

        fn peer_gone(&self, _id: u64) {}
    }

    struct Member {
        raft: Raft<QueueTypes>,
        machine: QueueMachine,
        links: Arc<Links>,
        appends: Arc<Appends>,
    }

    /// Three members of group `GROUP` in `dir`, each with its own links
    /// on loopback and its own WAL, initialised by member 1.
    async fn three_members(dir: &std::path::Path) -> BTreeMap<u64, Member> {
        three_members_sending(dir, MAX_APPEND_OCTETS).await
    }

    /// [`three_members`], whose appends carry at most `max_append` octets
    /// of entries (but one).
    async fn three_members_sending(
        dir: &std::path::Path,
        max_append: u64,
    ) -> BTreeMap<u64, Member> {
        let secret: Arc<[u8]> = Arc::from(&b"a test secret of some length"[..]);
        let mut listeners = Vec::new();
        let mut nodes = BTreeMap::new();
        for id in 1..=3u64 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            nodes.insert(
                id,
                NodeInfo {
                    id,
                    name: format!("n{id}@127.0.0.1"),
                    cluster_addr: addr.clone(),
                    amqp_addr: addr,
                },
            );
            listeners.push((id, listener));
        }
        let mut members = BTreeMap::new();
        for (id, listener) in listeners {
            let links = Links::new(nodes[&id].clone(), "test".into(), secret.clone());
            let groups = Arc::new(QueueGroups::default());
            let appends = Arc::new(Appends::default());
            links.set_handler(Arc::new(GroupsOnly(groups.clone(), appends.clone())));
            tokio::spawn(links.clone().serve(listener));
            let d = dir.join(format!("n{id}"));
            std::fs::create_dir_all(&d).unwrap();
            let (wal, _) = RaftWal::open(&d).unwrap();
            let machine = QueueMachine::open(identity(), d.join("q.snapshot")).unwrap();
            let config = openraft::Config {
                heartbeat_interval: 50,
                election_timeout_min: 300,
                election_timeout_max: 600,
                ..Default::default()
            }
            .validate()
            .unwrap();
            let raft = Raft::new(
                id,
                Arc::new(config),
                GroupNetworkFactory::<QueueTypes> {
                    max_append,
                    ..GroupNetworkFactory::new(links.clone(), GROUP)
                },
                GroupLog::<QueueTypes>::new(wal, GROUP),
                machine.clone(),
            )
            .await
            .unwrap();
            groups.insert(GROUP, raft.clone());
            members.insert(
                id,
                Member {
                    raft,
                    machine,
                    links,
                    appends,
                },
            );
        }
        members[&1].raft.initialize(nodes.clone()).await.unwrap();
        members
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_group_replicates_over_the_links_and_survives_its_leader_leaving() {
        let dir = tempfile::tempdir().unwrap();
        let mut members = three_members(dir.path()).await;
        let first = leader_seen_by(&members[&1].raft, None).await;
        for n in 1..=20 {
            let r = members[&first].raft.client_write(message(n)).await.unwrap();
            assert_eq!(r.data, QueueResponse::Enqueued(true));
        }
        let index = members[&first].machine.applied_index();
        for m in members.values() {
            applied(&m.raft, index).await;
            assert_eq!(m.machine.with_state(|s| s.queue().ready_count()), 20);
        }

        // The leader leaves (its Raft and its links stop): the other two
        // elect a leader over their link and go on.
        let gone = members.remove(&first).unwrap();
        gone.raft.shutdown().await.unwrap();
        gone.links.shutdown();
        let other = members.values().next().unwrap();
        let second = leader_seen_by(&other.raft, Some(first)).await;
        for n in 21..=30 {
            members[&second]
                .raft
                .client_write(message(n))
                .await
                .unwrap();
        }
        let index = members[&second].machine.applied_index();
        for m in members.values() {
            applied(&m.raft, index).await;
            assert_eq!(m.machine.with_state(|s| s.queue().ready_count()), 30);
        }
        for m in members.values() {
            m.raft.shutdown().await.unwrap();
            m.links.shutdown();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_far_behind_catches_up_in_appends_of_bounded_size() {
        use std::sync::atomic::Ordering;
        // Entries of 20 KiB, appends of at most 64 KiB: three of them.
        const BODY: usize = 20 << 10;
        let dir = tempfile::tempdir().unwrap();
        let members = three_members_sending(dir.path(), 64 << 10).await;
        let first = leader_seen_by(&members[&1].raft, None).await;
        let behind = members.keys().copied().find(|id| *id != first).unwrap();
        members[&behind]
            .appends
            .refusing
            .store(true, Ordering::Release);
        // Committed by the other two while it refuses every append.
        for n in 1..=60 {
            let body = bytes::Bytes::from(vec![n as u8; BODY]);
            let r = members[&first]
                .raft
                .client_write(crate::queue_group::test_support::message_with(n, body))
                .await
                .unwrap();
            assert_eq!(r.data, QueueResponse::Enqueued(true));
        }
        assert_eq!(
            members[&behind]
                .machine
                .with_state(|s| s.queue().ready_count()),
            0
        );
        members[&behind]
            .appends
            .most_octets
            .store(0, Ordering::Release);
        members[&behind]
            .appends
            .refusing
            .store(false, Ordering::Release);
        // It gets all sixty (1.2 MiB), in appends of at most 64 KiB.
        let index = members[&first].machine.applied_index();
        applied(&members[&behind].raft, index).await;
        assert_eq!(
            members[&behind]
                .machine
                .with_state(|s| s.queue().ready_count()),
            60
        );
        let most = members[&behind].appends.most_octets.load(Ordering::Acquire);
        assert!(
            (BODY as u64..=64 << 10).contains(&most),
            "an append of {most} octets"
        );
        for m in members.values() {
            m.raft.shutdown().await.unwrap();
            m.links.shutdown();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_hands_over_to_an_up_to_date_follower_that_goes_on_with_every_entry() {
        use crate::handover::{HandOver, ask_to_stand, hand_over};
        let dir = tempfile::tempdir().unwrap();
        let members = three_members(dir.path()).await;
        let first = leader_seen_by(&members[&1].raft, None).await;
        for n in 1..=20 {
            members[&first].raft.client_write(message(n)).await.unwrap();
        }
        // A follower cannot hand anything over.
        let follower = members.keys().copied().find(|id| *id != first).unwrap();
        let not_leader = hand_over(&members[&follower].raft, follower, None, |_| async {
            Err::<(), String>("not asked".into())
        })
        .await;
        assert_eq!(not_leader, HandOver::NotLeader);

        // The leader, just elected, waits out its lease, then asks a
        // follower holding its whole log to stand.
        let leader = &members[&first];
        let links = leader.links.clone();
        let addr_of: BTreeMap<u64, String> = members
            .iter()
            .map(|(id, m)| (*id, m.links.me().cluster_addr.clone()))
            .collect();
        let outcome = hand_over(&leader.raft, first, Some(Duration::ZERO), |to| {
            let addr = addr_of[&to].clone();
            async move { ask_to_stand(&links, &addr, GROUP).await }
        })
        .await;
        let HandOver::To(second) = outcome else {
            panic!("not handed over: {outcome:?}");
        };
        assert_ne!(second, first);
        assert_eq!(
            members[&second].raft.metrics().borrow().current_leader,
            Some(second)
        );
        // The new leader has every entry and takes new ones; the old one
        // follows it.
        for n in 21..=25 {
            members[&second]
                .raft
                .client_write(message(n))
                .await
                .unwrap();
        }
        let index = members[&second].machine.applied_index();
        for m in members.values() {
            applied(&m.raft, index).await;
            assert_eq!(m.machine.with_state(|s| s.queue().ready_count()), 25);
        }
        assert_eq!(
            members[&first].raft.metrics().borrow().current_leader,
            Some(second)
        );
        for m in members.values() {
            m.raft.shutdown().await.unwrap();
            m.links.shutdown();
        }
    }
}
