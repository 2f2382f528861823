//! Leases, from both ends.
//!
//! A node may serve hits only under a lease from the directory. The two ends count it
//! differently, and the difference is what makes the directory's count safe to act on:
//!
//! - the node ([`NodeLease`]) counts `L` from when it *sent* the renewal, on its own clock: it
//!   cannot know when the directory granted it, only that it was later;
//! - the directory ([`LeaseTable`]) counts `L + margin` from when it *granted* it, on its clock.
//!
//! So whenever the directory believes a node's lease has ended, it has ended on the node too,
//! provided no clock's rate is off by more than the margin allows (`docs/cache.md` gives the
//! bound). The directory relies on that in three places: a write may complete without a
//! holder's acknowledgement once the holder's lease has ended (Chubby's rule); a node whose lease
//! has ended is forgotten (its lines no longer recorded); and a new epoch waits `L + margin`
//! before its first write.
//!
//! The directory also keeps, per node, the demands (invalidations and recalls) the node has not
//! acknowledged. Every lease grant carries them, and the node applies them before extending its
//! lease: a lease that outlives a write's deadline can only exist on a node that dropped the
//! line.

use std::collections::BTreeMap;

use super::message::{Demand, Stamp};
use super::{Epoch, NodeId, Session};

/// The node's own lease.
#[derive(Clone, Debug, Default)]
pub struct NodeLease {
    /// The highest directory epoch heard of, and the session held in it (0: none yet).
    stamp: Stamp,
    /// Hits are served while the node's clock is below this.
    until: u64,
    /// When to ask for the next renewal.
    next_renew_at: u64,
    /// The node has already reported that its lease ran out (so it reports it once).
    lapse_reported: bool,
}

/// What a lease grant means for the node's lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantEffect {
    /// The grant belongs to an older epoch or session: ignore it, demands included.
    Ignored,
    /// A new session (or epoch): the directory no longer records any line the node holds, so
    /// the node must drop them all before serving again.
    NewSession,
    /// The current session, extended.
    Extended,
}

impl NodeLease {
    /// The epoch and session the node's requests carry and its lines are tagged with.
    pub fn stamp(&self) -> Stamp {
        self.stamp
    }

    /// True if hits may be served at `now` (the node's clock).
    pub fn serves(&self, now: u64) -> bool {
        self.stamp.session != 0 && now < self.until
    }

    /// The node's clock at which the lease ends (hits stop); 0 without a lease.
    pub fn until(&self) -> u64 {
        self.until
    }

    /// Milliseconds of lease left at `now`.
    pub fn remaining(&self, now: u64) -> u64 {
        if self.stamp.session == 0 {
            0
        } else {
            self.until.saturating_sub(now)
        }
    }

    /// A message of a newer epoch arrived: the node now belongs to that epoch, with no session.
    /// Returns true if the epoch is newer, in which case the caller drops every line (they
    /// belong to a directory that no longer exists) and renews at once.
    pub fn observe_epoch(&mut self, epoch: Epoch, now: u64) -> bool {
        if epoch <= self.stamp.epoch {
            return false;
        }
        *self = NodeLease {
            stamp: Stamp { epoch, session: 0 },
            until: 0,
            next_renew_at: now,
            lapse_reported: true,
        };
        true
    }

    /// Applies a grant stamped `stamp` that answers a renewal sent at `sent_at`. The caller
    /// drops its lines on [`GrantEffect::NewSession`] and applies the grant's demands before
    /// serving anything, in the same step.
    pub fn on_grant(&mut self, stamp: Stamp, sent_at: u64, lease_ms: u64) -> GrantEffect {
        let end = sent_at.saturating_add(lease_ms);
        let effect = if (stamp.epoch, stamp.session) < (self.stamp.epoch, self.stamp.session) {
            return GrantEffect::Ignored;
        } else if stamp == self.stamp {
            self.until = self.until.max(end);
            GrantEffect::Extended
        } else {
            // A newer session or epoch: the old lease's time does not carry over.
            self.stamp = stamp;
            self.until = end;
            GrantEffect::NewSession
        };
        self.lapse_reported = false;
        effect
    }

    /// If a renewal is due at `now`, schedules the next one and returns true.
    pub fn renewal_due(&mut self, now: u64, every: u64) -> bool {
        if now < self.next_renew_at {
            return false;
        }
        self.next_renew_at = now.saturating_add(every);
        true
    }

    /// True once per lapse: the lease ran out at `now` and this was not reported yet.
    pub fn take_lapse(&mut self, now: u64) -> bool {
        if self.lapse_reported || self.stamp.session == 0 || now < self.until {
            return false;
        }
        self.lapse_reported = true;
        true
    }
}

/// One node's lease as the directory counts it.
#[derive(Clone, Debug)]
struct HolderLease {
    /// The session the directory gave the node.
    session: Session,
    /// The directory's clock at which the node's lease has certainly ended.
    expires_at: u64,
    /// Demands not yet acknowledged, by key. Kept until acknowledged or the session ends, and
    /// sent with every grant.
    demands: BTreeMap<String, Demand>,
}

/// The directory's lease table: one lease per node, with the demands it still owes.
#[derive(Clone, Debug)]
pub struct LeaseTable {
    /// Live (or not yet forgotten) leases.
    leases: BTreeMap<NodeId, HolderLease>,
    /// The last session number given out (sessions increase, so a node can tell newer ones).
    last_session: Session,
    /// `L + margin`.
    lease_ms: u64,
}

/// The result of a renewal at the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// The session granted.
    pub session: Session,
    /// True if an expired session of this node had to be forgotten first: the caller must
    /// drop every line it recorded for the node.
    pub forgot_expired: bool,
}

impl LeaseTable {
    /// An empty table whose grants last `lease_ms` (the directory's count: `L + margin`).
    pub fn new(lease_ms: u64) -> Self {
        LeaseTable {
            leases: BTreeMap::new(),
            last_session: 0,
            lease_ms,
        }
    }

    /// Renews `node`'s lease at `now`. A live lease keeps its session, whatever session the
    /// request names: a delayed renewal must not end a session whose lines the node may still
    /// serve. Only a lease that has run out is replaced by a new session.
    pub fn renew(&mut self, node: NodeId, now: u64) -> Renewal {
        let expires_at = now.saturating_add(self.lease_ms);
        if let Some(l) = self.leases.get_mut(&node)
            && now < l.expires_at
        {
            l.expires_at = expires_at;
            return Renewal {
                session: l.session,
                forgot_expired: false,
            };
        }
        let forgot_expired = self.leases.remove(&node).is_some();
        self.last_session += 1;
        self.leases.insert(
            node,
            HolderLease {
                session: self.last_session,
                expires_at,
                demands: BTreeMap::new(),
            },
        );
        Renewal {
            session: self.last_session,
            forgot_expired,
        }
    }

    /// `node`'s session if its lease is live at `now`.
    pub fn live_session(&self, node: NodeId, now: u64) -> Option<Session> {
        self.leases
            .get(&node)
            .filter(|l| now < l.expires_at)
            .map(|l| l.session)
    }

    /// When `node`'s lease certainly ends (directory clock), if it has one.
    pub fn expires_at(&self, node: NodeId) -> Option<u64> {
        self.leases.get(&node).map(|l| l.expires_at)
    }

    /// Nodes whose lease has run out at `now`.
    pub fn expired(&self, now: u64) -> Vec<NodeId> {
        self.leases
            .iter()
            .filter(|(_, l)| now >= l.expires_at)
            .map(|(&n, _)| n)
            .collect()
    }

    /// Forgets `node`'s lease and its demands (its lease has ended: it serves nothing, and its
    /// next grant starts a new session, which makes it drop every line).
    pub fn forget(&mut self, node: NodeId) {
        self.leases.remove(&node);
    }

    /// Records a demand owed by `node`, merged with any earlier one for the same key: the
    /// stronger kind, the higher grant bound and the newer operation, so one acknowledgement
    /// settles both. Returns the merged demand (what to send), or `None` without a lease.
    pub fn add_demand(&mut self, node: NodeId, demand: Demand) -> Option<Demand> {
        let l = self.leases.get_mut(&node)?;
        let merged = match l.demands.remove(&demand.key) {
            Some(old) => Demand {
                kind: old.kind.max(demand.kind),
                upto: old.upto.max(demand.upto),
                ..demand
            },
            None => demand,
        };
        l.demands.insert(merged.key.clone(), merged.clone());
        Some(merged)
    }

    /// Removes `node`'s demand for `key` if it belongs to operation `op`, returning it.
    pub fn settle_demand(&mut self, node: NodeId, key: &str, op: u64) -> Option<Demand> {
        let l = self.leases.get_mut(&node)?;
        if l.demands.get(key).is_some_and(|d| d.op == op) {
            return l.demands.remove(key);
        }
        None
    }

    /// Every demand `node` still owes, for its next grant.
    pub fn demands(&self, node: NodeId) -> Vec<Demand> {
        self.leases
            .get(&node)
            .map(|l| l.demands.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::message::DemandKind;

    #[test]
    fn node_lease_runs_from_the_renewal_it_answers_not_from_arrival() {
        let mut l = NodeLease::default();
        let s = Stamp::new(1, 1);
        assert_eq!(l.on_grant(s, 100, 50), GrantEffect::NewSession);
        assert!(l.serves(149));
        assert!(!l.serves(150));
        // A delayed grant of an earlier renewal does not shorten the lease.
        assert_eq!(l.on_grant(s, 90, 50), GrantEffect::Extended);
        assert!(l.serves(149));
    }

    #[test]
    fn grants_of_older_sessions_or_epochs_are_ignored() {
        let mut l = NodeLease::default();
        l.on_grant(Stamp::new(2, 5), 0, 100);
        let old_session = Stamp::new(2, 4);
        let old_epoch = Stamp::new(1, 9);
        assert_eq!(l.on_grant(old_session, 50, 100), GrantEffect::Ignored);
        assert_eq!(l.on_grant(old_epoch, 50, 100), GrantEffect::Ignored);
        assert!(!l.serves(100));
    }

    #[test]
    fn a_newer_epoch_ends_the_lease_at_once() {
        let mut l = NodeLease::default();
        l.on_grant(Stamp::new(1, 1), 0, 100);
        assert!(l.observe_epoch(2, 10));
        assert!(!l.serves(10));
        assert!(l.renewal_due(10, 30));
    }

    #[test]
    fn a_live_lease_keeps_its_session_and_an_expired_one_is_replaced() {
        let mut t = LeaseTable::new(100);
        let a = t.renew(7, 0);
        assert_eq!(t.renew(7, 99).session, a.session);
        let b = t.renew(7, 500);
        assert_ne!(b.session, a.session);
        assert!(b.forgot_expired);
    }

    #[test]
    fn demands_merge_to_the_stronger_kind_and_higher_bound() {
        let mut t = LeaseTable::new(100);
        t.renew(1, 0);
        let d = |op, upto, kind| Demand {
            key: "k".into(),
            op,
            upto,
            kind,
        };
        t.add_demand(1, d(1, 5, DemandKind::Invalidate));
        let merged = t.add_demand(1, d(2, 7, DemandKind::Recall));
        assert_eq!(merged, Some(d(2, 7, DemandKind::Invalidate)));
        assert!(t.settle_demand(1, "k", 1).is_none());
        assert!(t.settle_demand(1, "k", 2).is_some());
        assert!(t.demands(1).is_empty());
    }
}
