//! The journal writer: one task with group commit. It takes every change already waiting (up to
//! `batch_max`, optionally waiting `batch_delay_us` for more), writes them in one database
//! transaction and tells each waiting transaction the outcome. Changes whose commit failed are
//! kept in a bounded backlog and written first once the database answers again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cardswitch_routing::Failure;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use super::backend::Backend;
use super::change::{Change, Committed};
use super::row::DecidedBy;
use crate::state::TxnState;

pub(super) enum Job {
    Change(Box<Change>, Option<oneshot::Sender<Committed>>),
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
    /// Rows waiting for the database to come back.
    pub backlog: AtomicU64,
    /// Rows given up because the backlog was full.
    pub lost: AtomicU64,
}

/// Most rows kept while the database is unreachable.
const BACKLOG_MAX: usize = 100_000;

pub(super) struct Writer {
    pub(super) backend: Backend,
    pub(super) node: String,
    pub(super) batch_max: usize,
    pub(super) delay: Duration,
    pub(super) stats: Arc<JournalStats>,
    /// Changes whose commit failed, written first once the database answers again.
    pub(super) backlog: VecDeque<Change>,
    /// Told after each commit that queued store-and-forward entries.
    pub(super) saf_queued: Arc<tokio::sync::Notify>,
    pub(super) durable: bool,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut changes: Vec<Change> = Vec::with_capacity(self.batch_max);
        let mut waiters: Vec<(usize, oneshot::Sender<Committed>)> =
            Vec::with_capacity(self.batch_max);
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let first = if self.backlog.is_empty() {
                match rx.recv().await {
                    Some(job) => Some(job),
                    None => break,
                }
            } else {
                // Retry the backlog now and then even when no new rows arrive.
                match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    Ok(Some(job)) => Some(job),
                    Ok(None) => break,
                    Err(_) => None,
                }
            };
            let take = |job: Job,
                        changes: &mut Vec<Change>,
                        waiters: &mut Vec<(usize, oneshot::Sender<Committed>)>,
                        flushes: &mut Vec<oneshot::Sender<()>>| match job {
                Job::Change(change, waiter) => {
                    if let Some(w) = waiter {
                        waiters.push((changes.len(), w));
                    }
                    changes.push(*change);
                }
                Job::Flush(done) => flushes.push(done),
            };
            if let Some(job) = first {
                take(job, &mut changes, &mut waiters, &mut flushes);
                let deadline = tokio::time::Instant::now() + self.delay;
                while changes.len() < self.batch_max {
                    match rx.try_recv() {
                        Ok(job) => take(job, &mut changes, &mut waiters, &mut flushes),
                        Err(_) if self.delay.is_zero() => break,
                        Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(job)) => take(job, &mut changes, &mut waiters, &mut flushes),
                            _ => break,
                        },
                    }
                }
            }
            self.write_backlog().await;
            if !changes.is_empty() {
                let applied = if self.backlog.is_empty() {
                    self.commit(&mut changes).await
                } else {
                    None
                };
                let ok = applied.is_some();
                for (i, w) in waiters.drain(..) {
                    let applied = applied
                        .as_ref()
                        .and_then(|a| a.get(i).copied())
                        .unwrap_or(false);
                    let _ = w.send(Committed { ok, applied });
                }
                if !ok {
                    // In durable mode the terminals of these rows were answered 96.
                    let answered_96 = self.durable;
                    self.keep(&mut changes, answered_96);
                }
                changes.clear();
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
        // Channel closed: last attempt for what is left.
        self.write_backlog().await;
        if !self.backlog.is_empty() {
            error!(
                changes = self.backlog.len(),
                "journal stopped with rows not written"
            );
        }
    }

    /// Commits a batch; per change whether it applied, `None` when the commit failed.
    async fn commit(&self, changes: &mut [Change]) -> Option<Vec<bool>> {
        let rows: usize = changes.iter().map(|c| c.rows.len()).sum();
        let saf = changes.iter().any(|c| !c.saf.is_empty());
        let started = std::time::Instant::now();
        let result = self.backend.apply(&self.node, changes).await;
        metrics::histogram!(crate::telemetry::JOURNAL_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::telemetry::JOURNAL_BATCH_ROWS).record(rows as f64);
        match result {
            Ok(applied) => {
                self.stats
                    .committed
                    .fetch_add(u64::try_from(rows).unwrap_or(0), Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                if saf {
                    self.saf_queued.notify_waiters();
                }
                Some(applied)
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, rows, "journal commit failed");
                None
            }
        }
    }

    /// Keeps changes whose commit failed; in durable mode their terminals were answered 96.
    fn keep(&mut self, changes: &mut Vec<Change>, answered_96: bool) {
        for mut change in changes.drain(..) {
            if change.is_empty() {
                continue;
            }
            if answered_96 {
                for row in &mut change.rows {
                    Failure::JournalUnavailable
                        .response_code()
                        .as_str()
                        .clone_into(&mut row.response_code);
                    row.decided_by = DecidedBy::Switch;
                    row.auth_code = None;
                    if row.state.is_charged() {
                        row.state = TxnState::Declined;
                    }
                }
            }
            if self.backlog.len() >= BACKLOG_MAX {
                self.backlog.pop_front();
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
            self.backlog.push_back(change);
        }
        self.stats.backlog.store(
            u64::try_from(self.backlog.len()).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    async fn write_backlog(&mut self) {
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(self.batch_max);
            let mut batch: Vec<Change> = self.backlog.drain(..n).collect();
            if self.commit(&mut batch).await.is_none() {
                for (i, c) in batch.into_iter().enumerate() {
                    self.backlog.insert(i, c);
                }
                return;
            }
            self.stats.backlog.store(
                u64::try_from(self.backlog.len()).unwrap_or(0),
                Ordering::Relaxed,
            );
            info!(
                changes = n,
                left = self.backlog.len(),
                "journal backlog written"
            );
        }
    }
}
