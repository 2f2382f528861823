//! The leader's clock duties for the replicated state.
//!
//! Time inside the state only moves when a command is applied (each carries the leader's time),
//! so something has to propose a command when a deadline passes with no traffic: this task, on
//! the leader only. It
//! - proposes a [`ipb::LeaderEpoch`] when the state's epoch is not the leader's term, so that
//!   every session gets a full TTL from the new leader and expiry resumes (see `state`);
//! - proposes a [`ipb::Tick`] once the leader's clock passes the state's next deadline (a
//!   session expiry, a wait deadline, a lock-delay), at most [`POLL`] late.
//!
//! Followers run the same loop but propose nothing. Proposals that fail (leadership lost, no
//! quorum) are simply tried again on the next round by whichever node leads.

use std::time::Duration;

use sync_proto::internal::v1 as ipb;

use super::NodeHandle;
use super::driver::now_unix_ms;

/// How often the leader looks at the state's next deadline: the most a deadline is handled late
/// when nothing else happens.
pub const POLL: Duration = Duration::from_millis(20);

/// Runs until the node shuts down.
pub async fn run(node: NodeHandle) {
    let mut status = node.watch_status();
    loop {
        let current = status.borrow_and_update().clone();
        if current.leader != Some(current.id) {
            // Not leading: sleep until something changes (or a while, to be safe).
            let _ = tokio::time::timeout(Duration::from_secs(1), status.changed()).await;
            continue;
        }
        let Ok((epoch, deadline)) = node
            .read(false, |s| (s.epoch_term(), s.next_deadline()))
            .await
        else {
            return;
        };
        let op = if epoch != current.term {
            Some(ipb::command::Op::LeaderEpoch(ipb::LeaderEpoch {
                term: current.term,
            }))
        } else if deadline.is_some_and(|d| d <= now_unix_ms()) {
            Some(ipb::command::Op::Tick(ipb::Tick {}))
        } else {
            None
        };
        match op {
            Some(op) => {
                if node.propose(op, None).await.is_err() {
                    tokio::time::sleep(POLL).await;
                }
            }
            None => {
                let until = deadline.map_or(POLL, |d| {
                    Duration::from_millis(d.saturating_sub(now_unix_ms())).min(POLL)
                });
                tokio::time::sleep(until).await;
            }
        }
    }
}
