//! The owner's side of consuming: who owns a topic, how its consumers wait for work without
//! missing any, and how concurrent consumers avoid asking for the same messages.
//!
//! **Ownership** ([`Ownership`]) is this node's view: the [`Ring`] over the current voters
//! (rebuilt when the voter set changes), walked past the members this node's failure detector
//! believes unreachable. Views can differ for a moment (a node notices a death a little later
//! than another); that costs at most a forwarding hop or two owners proposing deliveries for a
//! while, never a message, because every delivery is a Raft command.
//!
//! **Waiting.** A consumer subscribes to the node's notices *before* it looks at its replica's
//! `ready_count`, then sleeps until a [`Notice::QueueReady`] for its topic, a re-check tick, or
//! its deadline ([`wait_for_work`]). The re-check tick covers what sends no notice: an Ack that
//! lets the next message of an ordering key through, or that returns a subscriber's credit.
//!
//! **Claims** ([`Claims`]). When a batch of messages becomes ready, every waiting consumer of
//! the topic wakes at once; if each proposed a delivery, the first would take the messages and
//! the others would get nothing and answer their long polls empty. So a consumer first claims
//! some of the ready messages that no other consumer on this node has claimed, and keeps the
//! claim until the delivery shows in this node's replica (when the owner is a follower, that is a
//! little after the leader answered: [`wait_applied`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::ring::{Ring, VNODES};
use crate::node::NodeHandle;
use crate::node::driver::NodeStatus;
use crate::raft::NodeId;
use crate::state::Notice;

/// How often a waiting consumer looks at its replica even without a notice (see the module
/// docs): the most an Ack-driven wake-up is late.
pub const RECHECK: Duration = Duration::from_millis(50);
/// How often [`wait_applied`] looks at the applied index.
const APPLIED_POLL: Duration = Duration::from_millis(2);

/// The node that owns a topic, as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Its id.
    pub id: NodeId,
    /// Its gRPC address as this node reaches it (its own advertised address if it is this node).
    pub address: String,
    /// True if it is this node.
    pub is_self: bool,
}

/// This node's view of topic ownership (see the module docs).
#[derive(Default)]
pub struct Ownership {
    /// The ring over the voters last seen; replaced when they change.
    ring: Mutex<Option<Arc<Ring>>>,
}

impl Ownership {
    /// The ring over the voters of `status`, rebuilt only when they changed.
    fn ring(&self, status: &NodeStatus) -> Arc<Ring> {
        let mut voters: Vec<NodeId> = status
            .members
            .iter()
            .filter(|m| !m.member.learner)
            .map(|m| m.member.id)
            .collect();
        voters.sort_unstable();
        let mut cached = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            Some(ring) if ring.nodes() == voters.as_slice() => ring.clone(),
            _ => {
                let ring = Arc::new(Ring::new(voters, VNODES));
                *cached = Some(ring.clone());
                ring
            }
        }
    }

    /// The owner of `topic` given this node's `status`; None while no voter is known (a node
    /// that has not learned its configuration yet).
    pub fn owner(&self, status: &NodeStatus, topic: &str) -> Option<Owner> {
        let live = |id: NodeId| {
            status
                .members
                .iter()
                .any(|m| m.member.id == id && m.reachable)
        };
        let id = self.ring(status).owner(topic, live)?;
        let is_self = id == status.id;
        let address = if is_self {
            status.address.clone()
        } else {
            status.address_of(id).unwrap_or_default().to_string()
        };
        Some(Owner {
            id,
            address,
            is_self,
        })
    }
}

/// Messages of each topic that consumers on this node are about to take (see the module docs).
#[derive(Default)]
pub struct Claims {
    /// Claimed messages per topic; a topic without claims has no entry.
    by_topic: Mutex<HashMap<String, usize>>,
}

/// Some claimed messages of one topic; dropping it gives them back.
pub struct Claim {
    /// Where the claim is counted.
    claims: Arc<Claims>,
    /// The topic.
    topic: String,
    /// How many messages.
    count: usize,
}

impl Claim {
    /// How many messages are claimed.
    pub fn count(&self) -> usize {
        self.count
    }
}

impl Claims {
    /// Claims up to `want` of the topic's `ready` messages that nobody on this node claimed yet;
    /// None if every ready message is claimed (or `want` is 0).
    pub fn claim(self: &Arc<Self>, topic: &str, ready: usize, want: usize) -> Option<Claim> {
        let mut by_topic = self.by_topic.lock().unwrap_or_else(|e| e.into_inner());
        let claimed = by_topic.get(topic).copied().unwrap_or(0);
        let count = ready.saturating_sub(claimed).min(want);
        if count == 0 {
            return None;
        }
        *by_topic.entry(topic.to_string()).or_default() += count;
        Some(Claim {
            claims: self.clone(),
            topic: topic.to_string(),
            count,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut by_topic = self
            .claims
            .by_topic
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_topic.get_mut(&self.topic) {
            *n = n.saturating_sub(self.count);
            if *n == 0 {
                by_topic.remove(&self.topic);
            }
        }
    }
}

/// Why [`wait_for_work`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Something may have changed: look at the replica again.
    Look,
    /// The wait's end came.
    Deadline,
    /// The node is shutting down.
    Closed,
}

/// Sleeps until the topic may have work (a [`Notice::QueueReady`] for it, or a missed notice),
/// [`RECHECK`] passes, or `until`. `notices` must have been subscribed before the caller last
/// looked at the replica, so that nothing between that look and this wait is missed.
pub async fn wait_for_work(
    notices: &mut broadcast::Receiver<Notice>,
    topic: &str,
    until: Instant,
) -> Wake {
    let recheck = (Instant::now() + RECHECK).min(until);
    loop {
        tokio::select! {
            n = notices.recv() => match n {
                Ok(Notice::QueueReady(t)) if t == topic => return Wake::Look,
                Ok(_) => {}
                // Some notices were lost: one of them may have been ours.
                Err(broadcast::error::RecvError::Lagged(_)) => return Wake::Look,
                Err(broadcast::error::RecvError::Closed) => return Wake::Closed,
            },
            _ = tokio::time::sleep_until(recheck) => {
                return if recheck >= until { Wake::Deadline } else { Wake::Look };
            }
        }
    }
}

/// Waits (at most `limit`) until this node has applied log index `index`, so that its replica
/// reflects a command the leader just answered. Returns false if it did not happen in time or
/// the node is stopping; the caller then goes on with a slightly stale replica.
pub async fn wait_applied(node: &NodeHandle, index: u64, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        match node.read(false, |s| s.applied_index()).await {
            Ok(applied) if applied >= index => return true,
            Ok(_) if Instant::now() < end => tokio::time::sleep(APPLIED_POLL).await,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_never_exceed_the_ready_messages_and_come_back_when_dropped() {
        let claims = Arc::new(Claims::default());
        let a = claims.claim("t", 5, 3).expect("3 of 5");
        assert_eq!(a.count(), 3);
        let b = claims.claim("t", 5, 3).expect("the other 2");
        assert_eq!(b.count(), 2);
        assert!(claims.claim("t", 5, 1).is_none(), "all 5 are claimed");
        assert!(claims.claim("other", 1, 1).is_some(), "topics are apart");
        drop(a);
        assert_eq!(claims.claim("t", 5, 10).map(|c| c.count()), Some(3));
        drop(b);
        assert!(claims.by_topic.lock().unwrap().get("other").is_none());
    }

    #[tokio::test]
    async fn a_waiter_wakes_for_its_topic_and_not_for_others() {
        let (tx, mut rx) = broadcast::channel(16);
        let until = Instant::now() + Duration::from_secs(10);
        tx.send(Notice::QueueReady("other".into())).unwrap();
        tx.send(Notice::QueueReady("t".into())).unwrap();
        assert_eq!(wait_for_work(&mut rx, "t", until).await, Wake::Look);
        // Nothing for "t": the re-check tick wakes it, and the deadline ends it.
        let started = Instant::now();
        assert_eq!(wait_for_work(&mut rx, "t", until).await, Wake::Look);
        assert!(started.elapsed() >= RECHECK);
        let soon = Instant::now() + Duration::from_millis(5);
        assert_eq!(wait_for_work(&mut rx, "t", soon).await, Wake::Deadline);
        drop(tx);
        assert_eq!(wait_for_work(&mut rx, "t", until).await, Wake::Closed);
    }
}
