//! What one node changes that the others must follow at once, told through PostgreSQL
//! `NOTIFY`/`LISTEN` (sqlx's `PgListener`): key exchanges ([`KEYS`]) and business-date
//! cutovers ([`CUTOVERS`]). A notification is sent in the transaction of the change (or after it
//! committed), so none is heard for a change that is not there to read.
//!
//! Notifications are not stored: one sent while a node's listening connection is down is lost.
//! So each follower also looks at the stored state when its connection comes back and on a
//! slow poll ([`Follower::next`]); on SQLite (one node) the poll is all there is.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tracing::warn;

use super::db::Statement;
use super::Backend;

/// Key changes; the payload is the key's owner (an endpoint).
pub const KEYS: &str = "cardswitch_keys";
/// Business-date cutovers; the payload is the endpoint.
pub const CUTOVERS: &str = "cardswitch_cutovers";

/// Notifies `channel` with `payload` (PostgreSQL; nothing on SQLite).
///
/// # Errors
/// The database refuses the statement.
pub async fn notify(backend: &Backend, channel: &str, payload: &str) -> Result<(), sqlx::Error> {
    if let Backend::Postgres(_) = backend {
        let st = Statement::new("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload);
        backend.execute(&st).await?;
    }
    Ok(())
}

/// What woke a follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A notification on the channel with this payload: look at what it names.
    Told(String),
    /// The poll, or a listening connection back after a loss: look at everything.
    Look,
}

/// Follows one channel: notifications as they come, and a look at everything now and then.
pub struct Follower {
    listener: Option<PgListener>,
    poll: tokio::time::Interval,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("listening", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Listens on `channel` (PostgreSQL), and looks at everything every `poll` (the first look
    /// is at once).
    pub async fn start(backend: &Backend, channel: &str, poll: Duration) -> Self {
        let listener = match backend {
            Backend::Postgres(pool) => match PgListener::connect_with(pool).await {
                Ok(mut l) => match l.listen(channel).await {
                    Ok(()) => Some(l),
                    Err(e) => {
                        warn!(channel, error = %e, "LISTEN failed: polling only");
                        None
                    }
                },
                Err(e) => {
                    warn!(channel, error = %e, "no listening connection: polling only");
                    None
                }
            },
            Backend::Sqlite(_) => None,
        };
        let mut poll = tokio::time::interval(poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { listener, poll }
    }

    /// The next reason to look.
    pub async fn next(&mut self) -> Wake {
        let Some(listener) = self.listener.as_mut() else {
            self.poll.tick().await;
            return Wake::Look;
        };
        tokio::select! {
            _ = self.poll.tick() => Wake::Look,
            n = listener.try_recv() => match n {
                Ok(Some(n)) => Wake::Told(n.payload().to_owned()),
                // Lost: the listener connects again on its next receive (and listens again);
                // what was sent meanwhile is found by looking at everything.
                Ok(None) => {
                    warn!("listening connection lost");
                    Wake::Look
                }
                Err(e) => {
                    warn!(error = %e, "listening connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Wake::Look
                }
            },
        }
    }
}
