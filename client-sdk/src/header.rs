//! Numbering mutating calls for de-duplication (`RequestHeader`, common.proto).
//!
//! A [`Client`](crate::Client) is one de-duplication client: a random nonzero `client_id`, and
//! one sequence counter for every mutating call it makes, whatever the service. Each logical call
//! takes a [`Ticket`] with the next sequence number; every attempt of that call (a retry after a
//! timeout, a dropped connection, a leader change) sends the same header, so the cluster applies
//! the call at most once and answers the retry with the first attempt's answer.
//!
//! `lowest_unacked` lets the server forget answers: it is the lowest sequence whose call is still
//! in flight (taken but not yet answered or abandoned) when the ticket is taken. A ticket leaves
//! the in-flight set when it is dropped, after the call's last attempt, so a later call never
//! declares an earlier one acknowledged while it may still be retried.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use sync_proto::sync::v1::RequestHeader;

/// The de-duplication identity of one client and its calls in flight.
#[derive(Debug)]
pub(crate) struct Sequencer {
    /// 64 random bits, never 0 (0 means "do not de-duplicate").
    client_id: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last sequence number handed out; the first call gets 1.
    last: u64,
    /// Sequences taken and not yet released: their calls may still be (re)sent.
    in_flight: BTreeSet<u64>,
}

impl Sequencer {
    /// A sequencer with a fresh random client id.
    pub(crate) fn new() -> Arc<Sequencer> {
        Arc::new(Sequencer {
            client_id: random_nonzero(),
            state: Mutex::new(State::default()),
        })
    }

    /// The client id every header carries.
    pub(crate) fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The header for a new logical call, held until the ticket is dropped.
    pub(crate) fn ticket(self: &Arc<Self>) -> Ticket {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.last += 1;
        let sequence = state.last;
        state.in_flight.insert(sequence);
        let lowest_unacked = state.in_flight.first().copied().unwrap_or(sequence);
        Ticket {
            header: RequestHeader {
                client_id: self.client_id,
                sequence,
                lowest_unacked,
            },
            sequencer: Arc::clone(self),
        }
    }
}

/// One logical mutating call's header; repeat it unchanged on every attempt.
#[derive(Debug)]
pub(crate) struct Ticket {
    header: RequestHeader,
    sequencer: Arc<Sequencer>,
}

impl Ticket {
    /// The header to send (the same on every attempt).
    pub(crate) fn header(&self) -> Option<RequestHeader> {
        Some(self.header)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self
            .sequencer
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.in_flight.remove(&self.header.sequence);
    }
}

fn random_nonzero() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_start_at_one_and_increase_by_one() {
        let s = Sequencer::new();
        assert_ne!(s.client_id(), 0);
        let a = s.ticket();
        drop(a);
        let b = s.ticket();
        let h = b.header().unwrap();
        assert_eq!((h.sequence, h.lowest_unacked), (2, 2));
        assert_eq!(h.client_id, s.client_id());
    }

    #[test]
    fn lowest_unacked_is_the_oldest_call_still_in_flight() {
        let s = Sequencer::new();
        let first = s.ticket();
        let second = s.ticket();
        assert_eq!(second.header().unwrap().lowest_unacked, 1);
        drop(first);
        let third = s.ticket();
        assert_eq!(third.header().unwrap().lowest_unacked, 2);
        drop(second);
        drop(third);
        let fourth = s.ticket();
        let h = fourth.header().unwrap();
        assert_eq!((h.sequence, h.lowest_unacked), (4, 4));
    }
}
