//! Deadlock detection over the waits-for graph.
//!
//! Nodes are sessions; a waiting session has an edge to every session it waits for on each lock
//! it awaits ([`Lock::blockers`](super::Lock::blockers)). The graph is never stored: edges are
//! derived from the lock table when a search needs them, so they can never disagree with it.

use std::collections::BTreeSet;

use sync_proto::sync::v1 as api;

use super::LockTable;

/// One step of a cycle: `session` waits for `lock`, held (or awaited ahead) by the next step's
/// session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CycleStep {
    /// The waiting session.
    pub session: u64,
    /// The lock it waits for.
    pub lock: String,
}

/// One frame of the depth-first search: a session, its out-edges `(lock, blocker)`, and how
/// many of them were tried.
type Frame = (u64, Vec<(String, u64)>, usize);

impl LockTable {
    /// The edges out of `session`: `(lock, blocking session)` for every lock it awaits, in lock
    /// name order, then blocker order.
    fn wait_edges(&self, session: u64) -> Vec<(String, u64)> {
        let Some(s) = self.sessions.get(session) else {
            return Vec::new();
        };
        let mut edges = Vec::new();
        for (name, &waiter) in &s.waiting {
            let Some(lock) = self.locks.get(name) else {
                continue;
            };
            let Some(pos) = lock.position_of(waiter) else {
                continue;
            };
            edges.extend(lock.blockers(pos).into_iter().map(|b| (name.clone(), b)));
        }
        edges
    }

    /// A cycle through `start`, if one exists, as the steps from `start` around back to it.
    /// Depth-first and deterministic: every replica finds the same cycle.
    pub(super) fn find_cycle(&self, start: u64) -> Option<Vec<CycleStep>> {
        let mut visited = BTreeSet::from([start]);
        let mut stack: Vec<Frame> = vec![(start, self.wait_edges(start), 0)];
        while let Some((_, edges, tried)) = stack.last_mut() {
            let Some((_, to)) = edges.get(*tried).cloned() else {
                stack.pop();
                continue;
            };
            *tried += 1;
            if to == start {
                return Some(
                    stack
                        .iter()
                        .map(|(session, edges, tried)| CycleStep {
                            session: *session,
                            lock: edges[*tried - 1].0.clone(),
                        })
                        .collect(),
                );
            }
            if visited.insert(to) {
                let next = self.wait_edges(to);
                stack.push((to, next, 0));
            }
        }
        None
    }

    /// Who's who: "cli-1 (session 7)", or "session 7" for a session without a name.
    fn who(&self, session: u64) -> String {
        match self.sessions.get(session).map(|s| s.client_name.as_str()) {
            Some(n) if !n.is_empty() => format!("{n} (session {session})"),
            _ => format!("session {session}"),
        }
    }

    /// The ABORTED message for a cycle, e.g. "deadlock: cli-1 (session 7) waits for res-B held
    /// by cli-2 (session 9), which waits for res-A held by cli-1 (session 7); this request was
    /// refused ...".
    pub(super) fn describe_cycle(&self, cycle: &[CycleStep]) -> String {
        let mut out = String::from("deadlock: ");
        for (i, step) in cycle.iter().enumerate() {
            let next = &cycle[(i + 1) % cycle.len()];
            if i > 0 {
                out.push_str(", which ");
            } else {
                out.push_str(&self.who(step.session));
                out.push(' ');
            }
            let holds = self
                .locks
                .get(&step.lock)
                .is_some_and(|l| l.hold_of(next.session).is_some());
            let how = if holds { "held by" } else { "queued ahead by" };
            out.push_str(&format!(
                "waits for `{}` {how} {}",
                step.lock,
                self.who(next.session)
            ));
        }
        out.push_str(
            "; this request (the youngest of the cycle) was refused and the others keep \
             waiting: release a lock before retrying, or take locks in a fixed order",
        );
        out
    }

    /// The cycle as the API's wait edges.
    pub(super) fn cycle_edges(&self, cycle: &[CycleStep]) -> Vec<api::WaitEdge> {
        cycle
            .iter()
            .map(|s| api::WaitEdge {
                session_id: s.session,
                client_name: self
                    .sessions
                    .get(s.session)
                    .map(|x| x.client_name.clone())
                    .unwrap_or_default(),
                lock_name: s.lock.clone(),
            })
            .collect()
    }
}
