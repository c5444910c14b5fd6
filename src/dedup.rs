//! Duplicate detection (domain reference, section 4).
//!
//! Key: the source (listener), DE32, DE41, DE11, DE7 and the message class (so a reversal that
//! reuses its original's STAN is not taken for a copy of it). Content: a keyed hash of DE2, DE3
//! and DE4. A repeat (xxx1) has the same key as its original, so it takes this path too, and
//! goes ahead as new when no original was seen.
//!
//! Copies arriving on this node while the first is in flight wait for its answer here; copies
//! on another node (or after a restart) find the key in the database and wait for it to
//! complete there. Once completed, the stored decision (the reply's decision fields, sealed) is
//! sent again. Same key, other content: 94.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cardswitch_codec::{Message, Pan, ResponseCode};
use tokio::sync::watch;

use crate::journal::claims::Claim;
use crate::journal::Journal;

/// Fields of a reply that carry the decision; what a copy is answered with.
pub(crate) const DECISION_FIELDS: &[u8] = &[38, 39, 44, 54, 55, 102, 103];

/// The decision fields of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision(Vec<(u8, Vec<u8>)>);

impl Decision {
    /// The decision carried by `reply`; a partial approval's includes the amounts approved
    /// (DE4, DE6), which differ from the request's.
    #[must_use]
    pub(crate) fn of(reply: &Message) -> Self {
        let amounts: &[u8] = if reply.response_code() == Some(ResponseCode::PARTIAL_APPROVAL) {
            &[4, 6]
        } else {
            &[]
        };
        Self(
            DECISION_FIELDS
                .iter()
                .chain(amounts)
                .filter_map(|&f| reply.get(f).map(|v| (f, v.to_vec())))
                .collect(),
        )
    }

    /// The reply to `request` carrying this decision.
    #[must_use]
    pub(crate) fn reply_to(&self, request: &Message) -> Option<Message> {
        let mut out = request.response()?;
        for (f, v) in &self.0 {
            out.set(*f, v);
        }
        Some(out)
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (f, v) in &self.0 {
            out.push(*f);
            out.extend_from_slice(&u16::try_from(v.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    fn from_bytes(mut b: &[u8]) -> Option<Self> {
        let mut fields = Vec::new();
        while let [f, h, l, rest @ ..] = b {
            let n = usize::from(u16::from_be_bytes([*h, *l]));
            fields.push((*f, rest.get(..n)?.to_vec()));
            b = rest.get(n..)?;
        }
        b.is_empty().then_some(Self(fields))
    }

    /// The sealed form stored in the database.
    #[must_use]
    pub(crate) fn seal(&self, journal: &Journal) -> String {
        journal.sealer().seal(&self.to_bytes())
    }

    /// A stored decision; `None` when it cannot be opened.
    #[must_use]
    pub(crate) fn open(journal: &Journal, sealed: &str) -> Option<Self> {
        Self::from_bytes(&journal.sealer().open(sealed)?)
    }
}

/// What to do with a request after the duplicate check.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// New: go ahead, and complete the guard with the reply.
    Go(Guard),
    /// A copy of a completed request: answer with its decision.
    Replay(Decision),
    /// Same key, other content: 94.
    Conflict,
    /// The first is still in flight past every deadline: its outcome is unknown.
    Stuck,
    /// The database cannot tell.
    Unknown,
}

type Waiters = watch::Sender<Option<Decision>>;

/// Most completed decisions remembered on this node (for copies while the database cannot be
/// asked): about 10 MB.
const RECENT_MAX: usize = 100_000;

#[derive(Debug, Default)]
struct Local {
    in_flight: HashMap<String, (String, Waiters)>,
    /// Decisions completed here lately, by key: content hash and decision. Oldest first in
    /// `order`. (A bounded first-in first-out map: the few lines are simpler than an LRU crate,
    /// and recency of use does not matter here.)
    recent: HashMap<String, (String, Decision)>,
    order: VecDeque<String>,
}

impl Local {
    fn remember(&mut self, key: &str, hash: &str, decision: &Decision) {
        if self
            .recent
            .insert(key.to_owned(), (hash.to_owned(), decision.clone()))
            .is_none()
        {
            self.order.push_back(key.to_owned());
        }
        while self.order.len() > RECENT_MAX {
            if let Some(old) = self.order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }
}

/// The duplicate checker.
#[derive(Debug)]
pub(crate) struct Dedup {
    journal: Journal,
    local: Arc<Mutex<Local>>,
    wait: Duration,
}

/// A claimed key; completing it answers the copies waiting on this node. Dropped without
/// completing, the waiters are released with nothing.
#[derive(Debug)]
pub(crate) struct Guard {
    key: String,
    hash: String,
    local: Arc<Mutex<Local>>,
}

impl Guard {
    /// The key.
    #[must_use]
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// The content hash it was claimed with.
    pub(crate) fn hash(&self) -> &str {
        &self.hash
    }

    /// Hands the decision to the copies waiting here, and remembers it.
    pub(crate) fn complete(self, decision: &Decision) {
        if let Ok(mut l) = self.local.lock() {
            if let Some((_, tx)) = l.in_flight.remove(&self.key) {
                let _ = tx.send(Some(decision.clone()));
            }
            l.remember(&self.key, &self.hash, decision);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut l) = self.local.lock() {
            l.in_flight.remove(&self.key);
        }
    }
}

impl Dedup {
    /// A checker over the journal's database; copies wait at most `wait` for their first.
    #[must_use]
    pub(crate) fn new(journal: Journal, wait: Duration) -> Self {
        Self {
            journal,
            local: Arc::default(),
            wait,
        }
    }

    /// The key of a request from `listener`.
    #[must_use]
    pub(crate) fn key(listener: &str, request: &Message) -> String {
        let f = |n| request.get_str(n).unwrap_or("");
        format!(
            "{listener}|{}|{}|{}|{}|{}",
            f(32),
            f(41),
            f(11),
            f(7),
            request.mti().class()
        )
    }

    /// The content hash: a keyed hash of DE2, DE3 and DE4.
    #[must_use]
    pub(crate) fn content_hash(&self, request: &Message, pan: Option<&Pan>) -> String {
        let pan = pan.map(|p| p.expose().as_bytes()).unwrap_or_default();
        self.journal.keyed_hash(&[
            pan,
            request.get(3).unwrap_or_default(),
            request.get(4).unwrap_or_default(),
        ])
    }

    /// Checks a request; `Go` claims its key. A key left in flight by a request that never
    /// completed (its node died) is taken over when `may_take_over` (reversals: doing one
    /// twice changes nothing); otherwise the copy learns the outcome is unknown.
    pub(crate) async fn check(
        &self,
        key: String,
        hash: String,
        txn_id: i64,
        may_take_over: bool,
    ) -> Verdict {
        // A copy of a request in flight on this node waits for it here.
        if let Some(v) = self.in_flight_here(&key, &hash, true).await {
            return v;
        }
        let guard = Guard {
            key: key.clone(),
            hash: hash.clone(),
            local: Arc::clone(&self.local),
        };
        match self
            .journal
            .claims()
            .claim(key.clone(), hash.clone(), txn_id)
            .await
        {
            Claim::New => Verdict::Go(guard),
            Claim::Conflict => Verdict::Conflict,
            Claim::Done(sealed) => {
                let v = self.replay(&sealed);
                if let Verdict::Replay(d) = &v {
                    guard.complete(d);
                }
                v
            }
            Claim::Unavailable => {
                drop(guard);
                self.recalled(&key, &hash)
            }
            Claim::InFlight => {
                // Claimed on another node or before a restart: wait for it to complete.
                let wait_us = i64::try_from(self.wait.as_micros()).unwrap_or(i64::MAX / 4);
                let deadline = tokio::time::Instant::now() + self.wait;
                let claims = self.journal.claims();
                let node = self.journal.node();
                loop {
                    if may_take_over
                        && claims
                            .take_over(&key, &hash, txn_id, node, Journal::now_us() - wait_us)
                            .await
                    {
                        return Verdict::Go(guard);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    match claims.look(&key, &hash).await {
                        Claim::Done(sealed) => return self.replay(&sealed),
                        Claim::Conflict => return Verdict::Conflict,
                        _ if tokio::time::Instant::now() >= deadline => return Verdict::Stuck,
                        _ => {}
                    }
                }
            }
        }
    }

    /// Checks a request while the database cannot be asked: a copy of one in flight here waits
    /// for it, a copy of one completed here lately gets its decision; anything else is
    /// `Unknown`. Claims nothing.
    pub(crate) async fn check_offline(&self, key: &str, hash: &str) -> Verdict {
        match self.in_flight_here(key, hash, false).await {
            Some(v) => v,
            None => self.recalled(key, hash),
        }
    }

    /// What a request in flight on this node with the same key says of this one: a conflict
    /// (other content), or its decision once it has one (waited for, at most the wait).
    /// `None` when none is in flight; with `enter`, this one is then entered as in flight.
    async fn in_flight_here(&self, key: &str, hash: &str, enter: bool) -> Option<Verdict> {
        let mut rx = {
            let Ok(mut l) = self.local.lock() else {
                return Some(Verdict::Unknown);
            };
            match l.in_flight.get(key) {
                Some((h, _)) if h != hash => return Some(Verdict::Conflict),
                Some((_, tx)) => tx.subscribe(),
                None => {
                    if enter {
                        let (tx, _) = watch::channel(None);
                        l.in_flight.insert(key.to_owned(), (hash.to_owned(), tx));
                    }
                    return None;
                }
            }
        };
        let done = tokio::time::timeout(self.wait, rx.wait_for(Option::is_some)).await;
        Some(match done {
            Ok(Ok(d)) => d.clone().map_or(Verdict::Stuck, Verdict::Replay),
            _ => Verdict::Stuck,
        })
    }

    /// What this node remembers of a completed key.
    fn recalled(&self, key: &str, hash: &str) -> Verdict {
        let Ok(l) = self.local.lock() else {
            return Verdict::Unknown;
        };
        match l.recent.get(key) {
            Some((h, _)) if h != hash => Verdict::Conflict,
            Some((_, d)) => Verdict::Replay(d.clone()),
            None => Verdict::Unknown,
        }
    }

    /// Fills the memory of recent decisions from the journal (the latest completed keys), so
    /// that after a restart copies are still answered while the database cannot be asked.
    pub(crate) async fn warm(&self) {
        let st = crate::journal::db::Statement::new(
            "SELECT dkey, content_hash, reply FROM dedup WHERE state = 'done' AND reply IS NOT NULL \
             ORDER BY created_us DESC LIMIT 100000",
        );
        let Ok(rows) = self.journal.reader().fetch_all(&st).await else {
            return;
        };
        let Ok(mut l) = self.local.lock() else {
            return;
        };
        // Oldest first, so that the newest are kept longest.
        for r in rows.iter().rev() {
            let (Ok(key), Ok(hash), Ok(sealed)) =
                (r.get::<String>(0), r.get::<String>(1), r.get::<String>(2))
            else {
                continue;
            };
            if let Some(d) = Decision::open(&self.journal, &sealed) {
                l.remember(&key, &hash, &d);
            }
        }
    }

    /// Remembers the decision a request got without a claim (the database could not be
    /// asked): copies on this node get it too.
    pub(crate) fn remember(&self, key: &str, hash: &str, decision: &Decision) {
        if let Ok(mut l) = self.local.lock() {
            l.remember(key, hash, decision);
        }
    }

    /// Waits (at most as long as a copy would) for a request in flight on this node under
    /// `key` to complete; whether one was in flight.
    pub(crate) async fn wait_in_flight(&self, key: &str) -> bool {
        let waiting = self
            .local
            .lock()
            .ok()
            .and_then(|l| l.in_flight.get(key).map(|(_, tx)| tx.subscribe()));
        let Some(mut rx) = waiting else {
            return false;
        };
        let _ = tokio::time::timeout(self.wait, rx.wait_for(Option::is_some)).await;
        true
    }

    fn replay(&self, sealed: &str) -> Verdict {
        Decision::open(&self.journal, sealed).map_or(Verdict::Unknown, Verdict::Replay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_round_trip_through_bytes() {
        let d = Decision(vec![
            (38, b"A1B2C3".to_vec()),
            (39, b"00".to_vec()),
            (55, vec![0x91, 2, 1, 2]),
        ]);
        assert_eq!(Decision::from_bytes(&d.to_bytes()), Some(d));
        assert_eq!(Decision::from_bytes(&[39, 0, 5, b'0']), None);
        assert_eq!(Decision::from_bytes(&[]), Some(Decision(vec![])));
    }

    #[test]
    fn a_partial_approval_is_replayed_with_the_amount_approved() {
        #![allow(clippy::unwrap_used)]
        let mut request = Message::new(cardswitch_codec::Mti::new(*b"0200").unwrap());
        request.set_amount(4_010);
        request.set(11, b"000001");
        let mut reply = request
            .response_with(ResponseCode::PARTIAL_APPROVAL)
            .unwrap();
        reply.set_amount(2_005);
        reply.set(38, b"A1B2C3");
        let again = Decision::of(&reply).reply_to(&request).unwrap();
        assert_eq!(
            (again.amount(), again.auth_code()),
            (Some(2_005), Some("A1B2C3"))
        );
        // A full approval carries no amount: the request's is echoed.
        reply.set_response_code(ResponseCode::APPROVED);
        assert!(Decision::of(&reply).0.iter().all(|(f, _)| *f != 4));
    }
}
