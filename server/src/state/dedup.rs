//! Request de-duplication: a retried client request is applied at most once (Raft dissertation
//! §6.3).
//!
//! A client tags each mutating request with its id and a sequence number, and reuses them when
//! it retries (after a timeout, a leader change, or a forward that failed half-way). The table
//! remembers, per client, the response of every request applied but not yet known to be
//! delivered; a retry of one of those gets the remembered response and changes nothing.
//!
//! The table is part of the replicated state (it is in every snapshot), and every decision it
//! makes depends only on the committed log, so all replicas agree on which request was a
//! duplicate. Its memory is bounded in two deterministic ways:
//! - a client says, with `lowest_unacked`, which responses it no longer needs;
//! - at most `max_clients` clients are remembered; the one whose latest request is oldest in the
//!   log is forgotten first. A forgotten client's old retries are then refused as
//!   [`Dedup::Expired`], never applied twice.

use std::collections::BTreeMap;

use sync_proto::raft::v1::RequestId;

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dedup<R> {
    /// First time seen: apply it, then call [`ClientTable::record`].
    Apply,
    /// Already applied: answer with the remembered response, apply nothing.
    Duplicate(R),
    /// Too old to tell (its response was released or its client forgotten): refuse it, apply
    /// nothing.
    Expired,
}

/// What the table remembers of one client.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClientRecord<R> {
    /// Sequence numbers below this were released by the client; a request below it is
    /// [`Dedup::Expired`].
    floor: u64,
    /// Responses of applied requests at or above `floor`.
    responses: BTreeMap<u64, R>,
    /// Log index of the client's latest applied request (for deterministic eviction).
    last_index: u64,
}

/// The client table (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTable<R> {
    /// Remembered clients by id.
    clients: BTreeMap<u64, ClientRecord<R>>,
    /// At most this many clients.
    max_clients: usize,
    /// At most this many remembered responses per client; past it the oldest are released (as
    /// if the client had acknowledged them).
    max_responses_per_client: usize,
    /// Clients forgotten by eviction, with the highest sequence each had reached: a retry at
    /// or below it is refused as [`Dedup::Expired`] instead of being applied again.
    forgotten: BTreeMap<u64, u64>,
    /// At most this many forgotten clients are remembered as such (oldest dropped first).
    max_forgotten: usize,
}

impl<R: Clone> ClientTable<R> {
    /// A table remembering up to `max_clients` clients and `max_responses_per_client`
    /// responses each.
    pub fn new(max_clients: usize, max_responses_per_client: usize) -> Self {
        ClientTable {
            clients: BTreeMap::new(),
            max_clients: max_clients.max(1),
            max_responses_per_client: max_responses_per_client.max(1),
            forgotten: BTreeMap::new(),
            max_forgotten: max_clients.max(1) * 4,
        }
    }

    /// Decides what to do with `request`, and releases the responses the client no longer
    /// needs (those below `lowest_unacked`).
    pub fn check(&mut self, request: &RequestId) -> Dedup<R> {
        let Some(record) = self.clients.get_mut(&request.client_id) else {
            return match self.forgotten.get(&request.client_id) {
                Some(&reached) if request.sequence <= reached => Dedup::Expired,
                _ => Dedup::Apply,
            };
        };
        if request.lowest_unacked > record.floor {
            record.floor = request.lowest_unacked;
            let keep = record.responses.split_off(&record.floor);
            record.responses = keep;
        }
        if let Some(response) = record.responses.get(&request.sequence) {
            return Dedup::Duplicate(response.clone());
        }
        if request.sequence < record.floor {
            return Dedup::Expired;
        }
        Dedup::Apply
    }

    /// Remembers the response of a request just applied at log `index`.
    pub fn record(&mut self, request: &RequestId, index: u64, response: R) {
        let record = self
            .clients
            .entry(request.client_id)
            .or_insert_with(|| ClientRecord {
                floor: 0,
                responses: BTreeMap::new(),
                last_index: 0,
            });
        record.last_index = index;
        record.responses.insert(request.sequence, response);
        while record.responses.len() > self.max_responses_per_client {
            if let Some((seq, _)) = record.responses.pop_first() {
                record.floor = record.floor.max(seq + 1);
            }
        }
        self.forgotten.remove(&request.client_id);
        if self.clients.len() > self.max_clients {
            self.evict_oldest();
        }
    }

    /// Replaces the remembered response of an applied request, if it is still remembered: a
    /// request whose outcome is decided later than its application (an Acquire that queued and
    /// was granted afterwards) is then answered, on retry, with that final outcome.
    pub fn replace(&mut self, client_id: u64, sequence: u64, response: R) {
        if let Some(slot) = self
            .clients
            .get_mut(&client_id)
            .and_then(|r| r.responses.get_mut(&sequence))
        {
            *slot = response;
        }
    }

    /// Forgets the client whose latest request is oldest in the log.
    fn evict_oldest(&mut self) {
        let Some((&id, _)) = self
            .clients
            .iter()
            .min_by_key(|(id, r)| (r.last_index, **id))
        else {
            return;
        };
        if let Some(record) = self.clients.remove(&id) {
            let reached = record
                .responses
                .keys()
                .next_back()
                .copied()
                .unwrap_or(record.floor);
            self.forgotten.insert(id, reached.max(record.floor));
            while self.forgotten.len() > self.max_forgotten {
                self.forgotten.pop_first();
            }
        }
    }

    /// Every remembered client as `(id, floor, last_index, responses)`, and every forgotten
    /// client as `(id, reached)`, in id order: what a snapshot stores.
    #[allow(clippy::type_complexity)]
    pub fn export(&self) -> (Vec<(u64, u64, u64, Vec<(u64, R)>)>, Vec<(u64, u64)>) {
        let clients = self
            .clients
            .iter()
            .map(|(&id, r)| {
                let responses = r.responses.iter().map(|(&s, v)| (s, v.clone())).collect();
                (id, r.floor, r.last_index, responses)
            })
            .collect();
        let forgotten = self.forgotten.iter().map(|(&id, &r)| (id, r)).collect();
        (clients, forgotten)
    }

    /// Rebuilds a table from what [`ClientTable::export`] returned.
    pub fn import(
        &mut self,
        clients: impl IntoIterator<Item = (u64, u64, u64, Vec<(u64, R)>)>,
        forgotten: impl IntoIterator<Item = (u64, u64)>,
    ) {
        self.clients = clients
            .into_iter()
            .map(|(id, floor, last_index, responses)| {
                let record = ClientRecord {
                    floor,
                    responses: responses.into_iter().collect(),
                    last_index,
                };
                (id, record)
            })
            .collect();
        self.forgotten = forgotten.into_iter().collect();
    }

    /// Number of clients remembered.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// True if no client is remembered.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(client_id: u64, sequence: u64, lowest_unacked: u64) -> RequestId {
        RequestId {
            client_id,
            sequence,
            lowest_unacked,
        }
    }

    #[test]
    fn a_retry_gets_the_remembered_response_and_applies_nothing() {
        let mut t = ClientTable::new(10, 10);
        let r = req(7, 1, 1);
        assert_eq!(t.check(&r), Dedup::Apply);
        t.record(&r, 5, "ok-1");
        assert_eq!(t.check(&r), Dedup::Duplicate("ok-1"));
    }

    #[test]
    fn pipelined_requests_applied_out_of_order_are_each_applied_once() {
        let mut t = ClientTable::new(10, 10);
        let (a, b) = (req(1, 2, 1), req(1, 1, 1));
        assert_eq!(t.check(&a), Dedup::Apply);
        t.record(&a, 3, 'a');
        assert_eq!(t.check(&b), Dedup::Apply, "seq 1 was never applied");
        t.record(&b, 4, 'b');
        assert_eq!(t.check(&a), Dedup::Duplicate('a'));
        assert_eq!(t.check(&b), Dedup::Duplicate('b'));
    }

    #[test]
    fn released_responses_make_old_retries_expire() {
        let mut t = ClientTable::new(10, 10);
        t.record(&req(1, 1, 1), 1, ());
        assert_eq!(t.check(&req(1, 2, 2)), Dedup::Apply);
        assert_eq!(t.check(&req(1, 1, 2)), Dedup::Expired);
    }

    #[test]
    fn an_evicted_client_cannot_replay_an_old_request() {
        let mut t = ClientTable::new(1, 10);
        t.record(&req(1, 5, 1), 1, ());
        t.record(&req(2, 1, 1), 2, ());
        assert_eq!(t.len(), 1);
        assert_eq!(t.check(&req(1, 5, 1)), Dedup::Expired);
        assert_eq!(t.check(&req(1, 6, 1)), Dedup::Apply);
    }

    #[test]
    fn per_client_responses_are_bounded() {
        let mut t = ClientTable::new(10, 2);
        for seq in 1..=3 {
            t.record(&req(1, seq, 1), seq, seq);
        }
        assert_eq!(t.check(&req(1, 1, 1)), Dedup::Expired);
        assert_eq!(t.check(&req(1, 3, 1)), Dedup::Duplicate(3));
    }
}
