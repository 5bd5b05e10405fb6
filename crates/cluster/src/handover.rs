//! Leadership hand-over when a node stops gracefully: a group this node
//! leads gets a new leader before the node goes, instead of waiting out
//! its followers' election timeout (about two seconds without a leader).
//!
//! openraft 0.9 has no leadership transfer (0.10 adds one, still an alpha:
//! see the cluster README). What it has is enough in a group of up to
//! three voters: the leader picks a follower that holds its whole log and
//! asks it (over the links, `rpc::Request::Elect`) to start an election
//! at once (`Raft::trigger().elect()`). The other follower refuses that
//! vote while it still hears the leader (openraft's leader lease), but the
//! leader itself grants it: its own vote dates from its election, so its
//! lease has run out once it has led for longer than
//! `election_timeout_max`, and the candidate's log is as long as its own.
//! Two votes of three elect the candidate; the old leader follows it.
//!
//! With more voters the candidate cannot win before the lease runs out on
//! the others, and a failed campaign deposes the leader anyway: no
//! hand-over is tried there. Whatever is appended after the follower was
//! found up to date makes the leader refuse the vote (the caller holds new
//! proposals meanwhile); a refused campaign costs what no hand-over costs,
//! one election.

use std::future::Future;
use std::time::Duration;

use openraft::{Raft, RaftTypeConfig, ServerState};

/// openraft's leader lease, which it takes from `election_timeout_max`
/// (the same for every group of this crate): until it has led this long,
/// a leader refuses any vote.
pub const LEASE: Duration = Duration::from_millis(1_200);

/// Longest wait for a follower to catch up, and for its election.
const PATIENCE: Duration = Duration::from_secs(2);

/// What became of a hand-over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandOver {
    /// This node does not lead the group: nothing to do.
    NotLeader,
    /// Node `0` leads now.
    To(u64),
    /// Not handed over, and why (its followers elect a leader once it has
    /// gone, as after a crash).
    Failed(String),
}

/// Hands `raft`'s leadership to an up-to-date follower, if this node
/// (`me`) leads it. `led_for` is how long it has led, if known: a leader
/// younger than [`LEASE`] waits until it could grant the vote. `elect`
/// asks a follower to stand for election.
pub async fn hand_over<C, F, Fut>(
    raft: &Raft<C>,
    me: u64,
    led_for: Option<Duration>,
    elect: F,
) -> HandOver
where
    C: RaftTypeConfig<NodeId = u64>,
    F: FnOnce(u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let m = raft.metrics().borrow().clone();
    if m.state != ServerState::Leader || m.current_leader != Some(me) {
        return HandOver::NotLeader;
    }
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    if voters.len() < 2 {
        return HandOver::Failed("it is the group's only voter".into());
    }
    if voters.len() > 3 {
        return HandOver::Failed(format!(
            "a group of {} voters elects only once the leader has gone (openraft 0.9's lease)",
            voters.len()
        ));
    }
    if let Some(led) = led_for.filter(|l| *l < LEASE) {
        tokio::time::sleep(LEASE - led + Duration::from_millis(20)).await;
    }
    let up_to_date = |m: &openraft::RaftMetrics<u64, C::Node>| -> Option<u64> {
        let last = m.last_log_index?;
        let replication = m.replication.as_ref()?;
        voters
            .iter()
            .filter(|v| **v != me)
            .find(|v| {
                replication
                    .get(v)
                    .and_then(|matched| matched.as_ref())
                    .is_some_and(|l| l.index >= last)
            })
            .copied()
    };
    let target = match raft
        .wait(Some(PATIENCE))
        .metrics(
            |m| m.state != ServerState::Leader || up_to_date(m).is_some(),
            "a follower with the whole log",
        )
        .await
    {
        Ok(m) if m.state != ServerState::Leader => return HandOver::NotLeader,
        Ok(m) => up_to_date(&m),
        Err(_) => None,
    };
    let Some(target) = target else {
        return HandOver::Failed("no follower caught up in time".into());
    };
    if let Err(e) = elect(target).await {
        return HandOver::Failed(format!("node {target} could not stand: {e}"));
    }
    match raft
        .wait(Some(PATIENCE))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != me),
            "another node's leadership",
        )
        .await
    {
        Ok(m) => HandOver::To(m.current_leader.unwrap_or(target)),
        Err(_) => HandOver::Failed(format!("node {target} was not elected in time")),
    }
}

/// Asks the node at `addr` to stand for election in group `group` (the
/// `elect` of [`hand_over`]).
pub async fn ask_to_stand(
    links: &std::sync::Arc<crate::link::Links>,
    addr: &str,
    group: u64,
) -> Result<(), String> {
    match links
        .send_ordered(addr, crate::rpc::Request::Elect { group })
        .await
    {
        Ok(Ok(crate::rpc::Response::Settled)) => Ok(()),
        Ok(Ok(crate::rpc::Response::Unavailable(e))) => Err(e),
        Ok(Ok(crate::rpc::Response::NoSuchGroup(_))) => Err("it holds no replica".into()),
        Ok(Ok(_)) => Err("an unexpected answer".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the link closed".into()),
    }
}
