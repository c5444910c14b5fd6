//! The journal writer: one task with group commit. It takes every change already waiting (up to
//! `batch_max`, optionally waiting `batch_delay_us` for more), writes them in one database
//! transaction and tells each waiting transaction the outcome.
//!
//! When a commit fails, every change of the batch that has a waiting transaction goes back to
//! it ([`Written::Failed`]): the transaction answers 96 and hands back the change as it must now
//! be written (its rows a 96, its stand-in advice withdrawn, a reversal of the acquirer's
//! approval queued). What must be written goes to the backlog, and with it to the local spool
//! (flushed to disk before the terminal is answered), and the breaker opens. The backlog is
//! written first, every 200 ms, until it succeeds; then the spool is emptied and the breaker
//! closes.
//!
//! A batch refused for what it holds (a constraint a change breaks) is split until the change at
//! fault is found: the others commit. From the backlog, such a change is set aside in
//! `journal_dead_letters` (an alarm), and everything behind it flows. Writing from the backlog
//! is idempotent: a commit that reported failure but had committed is not applied twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::backend::{is_data_error, Backend};
use super::breaker::Breaker;
use super::change::{Change, Committed};
use super::ids::Ids;
use super::spool::Spool;
use crate::telemetry;

/// How a submitted change ended.
#[derive(Debug)]
pub(super) enum Written {
    /// Committed.
    Done(Committed),
    /// Not committed: the change comes back to its submitter.
    Failed(Box<Change>),
}

pub(super) enum Job {
    Change(Box<Change>, Option<oneshot::Sender<Written>>),
    /// A change to keep until it can be written; told once it is in the spool (or, with the
    /// spool failing, at least in memory).
    Keep(Box<Change>, oneshot::Sender<()>),
    Flush(oneshot::Sender<()>),
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Rows committed.
    pub committed: AtomicU64,
    /// Commits (batches).
    pub batches: AtomicU64,
    /// Failed commits.
    pub failures: AtomicU64,
    /// Changes waiting for the database to come back.
    pub backlog: AtomicU64,
    /// Changes set aside as dead letters.
    pub dead_letters: AtomicU64,
}

/// How often the writer wakes while commits fail.
const RETRY: Duration = Duration::from_millis(200);
/// How often the database is probed while commits fail, and how long a probe may take: the
/// writer keeps answering (and spooling) in between.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);

type Waiter = oneshot::Sender<Written>;

pub(super) struct Writer {
    pub(super) backend: Backend,
    pub(super) node: String,
    pub(super) batch_max: usize,
    pub(super) delay: Duration,
    pub(super) stats: Arc<JournalStats>,
    /// Changes not yet written, in order; mirrored in the spool.
    pub(super) backlog: VecDeque<Change>,
    pub(super) spool: Spool,
    pub(super) breaker: Arc<Breaker>,
    pub(super) ids: Ids,
    /// Told after each commit that queued store-and-forward entries.
    pub(super) saf_queued: Arc<tokio::sync::Notify>,
    pub(super) durable: bool,
    /// While commits fail: when the database is probed next.
    pub(super) next_probe: tokio::time::Instant,
}

/// What one turn of the writer took from its channel.
#[derive(Default)]
struct Turn {
    changes: Vec<(Change, Option<Waiter>)>,
    keeps: Vec<(Change, oneshot::Sender<()>)>,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Turn {
    fn take(&mut self, job: Job) {
        match job {
            Job::Change(c, w) => self.changes.push((*c, w)),
            Job::Keep(c, done) => self.keeps.push((*c, done)),
            Job::Flush(done) => self.flushes.push(done),
        }
    }
}

impl Writer {
    /// Writes what the spool holds from an earlier run, before anything else is written.
    ///
    /// # Errors
    /// The spool unreadable, or the database refusing it for a reason other than what a change
    /// holds.
    pub(super) async fn replay_spool(&mut self) -> anyhow::Result<()> {
        let held = self.spool.load()?;
        if held.is_empty() {
            self.spool.clear()?;
            return Ok(());
        }
        warn!(
            changes = held.len(),
            spool = %self.spool.path().display(),
            "journal spool from an earlier run: writing it first"
        );
        self.backlog.extend(held);
        self.write_backlog().await;
        if !self.backlog.is_empty() {
            anyhow::bail!(
                "journal spool {}: {} changes could not be written; the database must take them before this node starts",
                self.spool.path().display(),
                self.backlog.len()
            );
        }
        Ok(())
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        loop {
            let mut turn = Turn::default();
            let calm = self.backlog.is_empty() && !self.breaker.is_open();
            let first = if calm {
                match rx.recv().await {
                    Some(job) => Some(job),
                    None => break,
                }
            } else {
                match tokio::time::timeout(RETRY, rx.recv()).await {
                    Ok(Some(job)) => Some(job),
                    Ok(None) => break,
                    Err(_) => None,
                }
            };
            if let Some(job) = first {
                turn.take(job);
                let deadline = tokio::time::Instant::now() + self.delay;
                while turn.changes.len() < self.batch_max {
                    match rx.try_recv() {
                        Ok(job) => turn.take(job),
                        Err(_) if self.delay.is_zero() => break,
                        Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(job)) => turn.take(job),
                            _ => break,
                        },
                    }
                }
            }
            self.turn(turn).await;
        }
        // Channel closed: last attempt for what is left; the spool keeps the rest.
        self.write_backlog().await;
        if !self.backlog.is_empty() {
            error!(
                changes = self.backlog.len(),
                spool = %self.spool.path().display(),
                "journal stopped with changes not written: they are in the spool and are written at the next start"
            );
        }
    }

    async fn turn(&mut self, turn: Turn) {
        let Turn {
            changes,
            keeps,
            flushes,
        } = turn;
        if !keeps.is_empty() {
            let (kept, acks): (Vec<Change>, Vec<_>) = keeps.into_iter().unzip();
            self.keep(kept);
            for a in acks {
                let _ = a.send(());
            }
        }
        if (!self.backlog.is_empty() || self.breaker.is_open()) && self.database_back().await {
            if self.backlog.is_empty() {
                self.breaker.reset();
            } else {
                self.write_backlog().await;
            }
        }
        if !changes.is_empty() {
            if self.backlog.is_empty() && !self.breaker.is_open() {
                self.commit_split(changes).await;
            } else {
                // Behind the backlog (nothing is written out of order), or with the database
                // not back yet.
                for (c, w) in changes {
                    self.failed(c, w);
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }

    /// While commits fail: whether a probe (at most one per [`PROBE_EVERY`], cut short after
    /// [`PROBE_TIMEOUT`]) finds the database taking commits again.
    async fn database_back(&mut self) -> bool {
        if !self.breaker.is_open() {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now < self.next_probe {
            return false;
        }
        self.next_probe = now + PROBE_EVERY;
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, self.backend.probe()).await,
            Ok(Ok(()))
        )
    }

    /// Commits a batch; a batch refused for what one of its changes holds is split until the
    /// changes at fault are found, and the rest commits.
    async fn commit_split(&mut self, batch: Vec<(Change, Option<Waiter>)>) {
        // Each part: its changes, and their waiters in the same order.
        let mut pending: Vec<(Vec<Change>, Vec<Option<Waiter>>)> = vec![batch.into_iter().unzip()];
        while let Some((mut changes, mut waiters)) = pending.pop() {
            match self.commit(&mut changes).await {
                Ok(applied) => {
                    for (w, applied) in waiters.into_iter().zip(applied) {
                        if let Some(w) = w {
                            let _ = w.send(Written::Done(Committed { ok: true, applied }));
                        }
                    }
                }
                Err(e) if is_data_error(&e) && changes.len() > 1 => {
                    let half = changes.len() / 2;
                    let back = (changes.split_off(half), waiters.split_off(half));
                    // Popped last first: the front half goes first.
                    pending.push(back);
                    pending.push((changes, waiters));
                }
                Err(e) => {
                    if !is_data_error(&e) {
                        self.breaker.trip("journal commit failed");
                    }
                    for (c, w) in changes.into_iter().zip(waiters) {
                        self.failed(c, w);
                    }
                }
            }
        }
    }

    /// A change that was not committed goes back to its waiter, or is kept.
    fn failed(&mut self, change: Change, waiter: Option<Waiter>) {
        let change = match waiter {
            Some(w) => match w.send(Written::Failed(Box::new(change))) {
                Ok(()) => return,
                // Nobody waits any more: its terminal was told nothing.
                Err(Written::Failed(mut c)) => {
                    if self.durable {
                        c.answered_unrecorded();
                    }
                    *c
                }
                Err(Written::Done(_)) => return,
            },
            None => change,
        };
        self.keep(vec![change]);
    }

    /// Keeps changes until they can be written: in the backlog, and in the spool.
    fn keep(&mut self, changes: Vec<Change>) {
        let changes: Vec<Change> = changes.into_iter().filter(|c| !c.is_empty()).collect();
        if changes.is_empty() {
            return;
        }
        if let Err(e) = self.spool.append(&changes) {
            // Never dropped: kept in memory, and nothing more is forwarded.
            error!(error = %e, changes = changes.len(), "journal spool refused changes: kept in memory");
            self.breaker.trip("journal spool full or failing");
        }
        self.backlog.extend(changes);
        self.gauges();
    }

    fn gauges(&self) {
        self.stats.backlog.store(
            u64::try_from(self.backlog.len()).unwrap_or(0),
            Ordering::Relaxed,
        );
        metrics::gauge!(telemetry::JOURNAL_SPOOL_BYTES).set(self.spool.len() as f64);
    }

    /// Commits a batch; per change whether it applied.
    async fn commit(&self, changes: &mut [Change]) -> Result<Vec<bool>, sqlx::Error> {
        let rows: usize = changes.iter().map(|c| c.rows.len()).sum();
        let saf = changes.iter().any(|c| !c.saf.is_empty());
        let started = std::time::Instant::now();
        let result = self.backend.apply(&self.node, changes).await;
        metrics::histogram!(telemetry::JOURNAL_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::JOURNAL_BATCH_ROWS).record(rows as f64);
        match &result {
            Ok(_) => self.committed(rows, saf),
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, rows, "journal commit failed");
            }
        }
        result
    }

    fn committed(&self, rows: usize, saf: bool) {
        self.stats
            .committed
            .fetch_add(u64::try_from(rows).unwrap_or(0), Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if saf {
            self.saf_queued.notify_waiters();
        }
    }

    /// Writes the backlog in order, idempotently; a change refused for what it holds becomes a
    /// dead letter. Stops at the first outage.
    async fn write_backlog(&mut self) {
        let mut written = 0usize;
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(self.batch_max);
            let mut batch: Vec<Change> = self.backlog.drain(..n).collect();
            let result = self.backend.apply_again(&self.node, &mut batch).await;
            if result.is_err() {
                // Back in front, in order.
                for c in batch.drain(..).rev() {
                    self.backlog.push_front(c);
                }
            }
            match result {
                Ok(()) => {
                    let rows = batch.iter().map(|c| c.rows.len()).sum();
                    self.committed(rows, batch.iter().any(|c| !c.saf.is_empty()));
                    written += n;
                }
                Err(e) if is_data_error(&e) => {
                    if !self.isolate(n).await {
                        break;
                    }
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, left = self.backlog.len(), "journal backlog not written yet");
                    self.breaker.trip("journal commit failed");
                    break;
                }
            }
        }
        if written > 0 {
            info!(
                changes = written,
                left = self.backlog.len(),
                "journal backlog written"
            );
        }
        if self.backlog.is_empty() {
            if let Err(e) = self.spool.clear() {
                error!(error = %e, "journal spool not emptied");
            } else {
                self.breaker.reset();
            }
        }
        self.gauges();
    }

    /// The first `n` changes of the backlog were refused for what one of them holds: writes
    /// them one by one, and sets aside those refused. False at an outage.
    async fn isolate(&mut self, n: usize) -> bool {
        for _ in 0..n {
            let Some(mut one) = self.backlog.pop_front() else {
                break;
            };
            let result = self
                .backend
                .apply_again(&self.node, std::slice::from_mut(&mut one))
                .await;
            match result {
                Ok(()) => self.committed(one.rows.len(), !one.saf.is_empty()),
                Err(e) if is_data_error(&e) => {
                    let id = self.ids.next();
                    // What must reach an acquirer (its queued reversal) and the resolution of
                    // its write-ahead record are written without the rest, when they can be.
                    let mut messages = Change {
                        saf: one.saf.clone(),
                        saf_progress: one.saf_progress.clone(),
                        saf_cancel: one.saf_cancel.clone(),
                        resolves: one.resolves.clone(),
                        ..Change::default()
                    };
                    let queued = messages.is_empty()
                        || self
                            .backend
                            .apply_again(&self.node, std::slice::from_mut(&mut messages))
                            .await
                            .is_ok();
                    let why = format!(
                        "{e}; its queued messages {}",
                        if queued {
                            "were written"
                        } else {
                            "were not written"
                        }
                    );
                    if let Err(e2) = self.backend.dead_letter(id, &self.node, &why, &one).await {
                        warn!(error = %e2, "journal dead letter not written");
                        self.backlog.push_front(one);
                        return false;
                    }
                    self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(telemetry::JOURNAL_DEAD_LETTERS).increment(1);
                    error!(
                        dead_letter = id,
                        error = %why,
                        "journal change refused by the database: set aside in journal_dead_letters; an operator must resolve it"
                    );
                }
                Err(_) => {
                    self.backlog.push_front(one);
                    return false;
                }
            }
        }
        true
    }
}
