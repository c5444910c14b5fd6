//! Node identity. Every node name is given a number once (the `nodes` table: 0 to 1023, the
//! smallest free one), and that number is the node part of every id the node makes, so ids
//! of different nodes never meet. While it runs, a node holds a PostgreSQL advisory lock on its
//! number (in the journal's schema) on a connection of its own: a second process started with the same name finds the
//! lock taken and refuses to start. The lock goes with the connection, so a node killed with
//! SIGKILL can be restarted at once. (SQLite is one process's file: it takes the number only.)
//!
//! While it holds its lock, a node writes a heartbeat (`nodes.heartbeat_us`) every quarter of
//! `journal.takeover_after_ms` (at most every 5 s). A node is gone when both say so: its heartbeat
//! is older than `takeover_after_ms` and its lock is free. Another node then takes the lock, so
//! that the gone node (restarted meanwhile) and two survivors never work on the same records,
//! resolves what the gone node left ([`super::Journal::gone_nodes`]) and lets the lock go. A
//! node cut off from PostgreSQL longer than that is taken for gone as well: it cannot commit an
//! outcome meanwhile (durable mode answers 96 and reverses), so what the survivor does (reverse
//! its forwarded requests) is what it does itself.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::Connection;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::db::Statement;
use super::{now_us, Backend};

/// Most node numbers (10 bits of the id).
pub(super) const NODES: i32 = 1024;

/// A registered node: its number, and the lock held for it while this handle lives.
#[derive(Debug)]
pub(super) struct Registered {
    pub(super) number: u16,
    /// The last heartbeat of this node's previous run (0: none).
    pub(super) last_beat_us: i64,
    /// Dropped with the last journal handle: the lock task then ends.
    pub(super) _held: Option<oneshot::Sender<()>>,
}

/// The number of node `name`, given when it is first seen, and its last heartbeat (0 when new).
async fn number_of(backend: &Backend, name: &str) -> Result<(i32, i64)> {
    for _ in 0..8 {
        let st =
            Statement::new("SELECT number, heartbeat_us FROM nodes WHERE name = $1").bind(name);
        if let Some(r) = backend.fetch_optional(&st).await? {
            let n: i32 = r.get(0)?;
            let beat: i64 = r.get(1)?;
            let st = Statement::new("UPDATE nodes SET started_us = $1 WHERE name = $2")
                .bind(now_us())
                .bind(name);
            backend.execute(&st).await?;
            return Ok((n, beat));
        }
        let taken: Vec<i32> = backend
            .fetch_all(&Statement::new("SELECT number FROM nodes ORDER BY number"))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect::<Result<_, _>>()?;
        let Some(free) = (0..NODES).find(|n| taken.binary_search(n).is_err()) else {
            bail!("all {NODES} node numbers are taken (table nodes): remove the rows of nodes that are gone for good");
        };
        let now = now_us();
        let st = Statement::new(
            "INSERT INTO nodes (name, number, registered_us, started_us) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(free)
        .bind(now)
        .bind(now);
        // Another node may have taken the number (or the name) meanwhile: look again.
        backend.execute(&st).await?;
    }
    bail!("node {name:?}: no number could be registered (table nodes)")
}

async fn try_lock(conn: &mut sqlx::PgConnection, number: i32) -> Result<bool, sqlx::Error> {
    // Advisory locks are per database: the key names the journal's schema too.
    sqlx::query_scalar::<_, bool>(
        "SELECT pg_try_advisory_lock(hashtext('cardswitch node ' || current_schema()), $1)",
    )
    .bind(number)
    .fetch_one(conn)
    .await
}

async fn unlock(conn: &mut sqlx::PgConnection, number: i32) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(
        "SELECT pg_advisory_unlock(hashtext('cardswitch node ' || current_schema()), $1)",
    )
    .bind(number)
    .fetch_one(conn)
    .await
}

async fn heartbeat(conn: &mut sqlx::PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE nodes SET heartbeat_us = $1 WHERE name = $2")
        .bind(now_us())
        .bind(name)
        .execute(conn)
        .await
        .map(|_| ())
}

/// How often a node writes its heartbeat: a quarter of the takeover time, 200 ms to 5 s.
pub(super) fn beat_every(takeover_after: Duration) -> Duration {
    (takeover_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// A node that is gone, its lock held by this process (on a connection of its own) until
/// [`GoneNode::release`]: while it is held, the gone node cannot start again and no other
/// survivor takes the same work.
#[derive(Debug)]
pub struct GoneNode {
    /// The gone node's name.
    pub name: String,
    /// Its last heartbeat, microseconds since the epoch (0: none was ever written).
    pub heartbeat_us: i64,
    number: i32,
    conn: sqlx::PgConnection,
}

impl GoneNode {
    /// Records that the work of this death is taken over (so that it is not looked at again
    /// until the node beats once more) and lets the lock go.
    pub async fn release(mut self, done: bool) {
        if done {
            let _ = sqlx::query("UPDATE nodes SET taken_over_us = $1 WHERE name = $2")
                .bind(self.heartbeat_us)
                .bind(&self.name)
                .execute(&mut self.conn)
                .await;
        }
        let _ = unlock(&mut self.conn, self.number).await;
        let _ = self.conn.close().await;
    }
}

/// The nodes other than `me` that are gone (heartbeat older than `after`, lock free) and left
/// work behind (write-ahead records, or a death not yet taken over), each locked. Empty on
/// SQLite (one process).
pub(super) async fn gone(backend: &Backend, me: &str, after: Duration) -> Result<Vec<GoneNode>> {
    let Backend::Postgres(pool) = backend else {
        return Ok(Vec::new());
    };
    let stale = now_us() - i64::try_from(after.as_micros()).unwrap_or(i64::MAX / 4);
    let candidates: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT name, number, heartbeat_us FROM nodes WHERE name <> $1 AND heartbeat_us < $2 \
         AND (taken_over_us IS DISTINCT FROM heartbeat_us \
              OR EXISTS (SELECT 1 FROM forwards f WHERE f.node = nodes.name))",
    )
    .bind(me)
    .bind(stale)
    .fetch_all(pool)
    .await?;
    let mut gone = Vec::new();
    for (name, number, heartbeat_us) in candidates {
        let mut conn = pool.acquire().await?.detach();
        if !try_lock(&mut conn, number).await? {
            // Alive after all (or another survivor is at it).
            let _ = conn.close().await;
            continue;
        }
        // Looked at again under the lock: it may have started and beaten meanwhile.
        let beat: Option<i64> =
            sqlx::query_scalar("SELECT heartbeat_us FROM nodes WHERE name = $1")
                .bind(&name)
                .fetch_optional(&mut conn)
                .await?;
        if beat != Some(heartbeat_us) {
            let _ = unlock(&mut conn, number).await;
            let _ = conn.close().await;
            continue;
        }
        gone.push(GoneNode {
            name,
            heartbeat_us,
            number,
            conn,
        });
    }
    Ok(gone)
}

/// Registers node `name` and, on PostgreSQL, holds its lock for as long as the returned handle
/// lives.
///
/// # Errors
/// The database failing, or another running process holding the name.
pub(super) async fn register(
    backend: &Backend,
    name: &str,
    beat: Duration,
    tracker: &TaskTracker,
) -> Result<Registered> {
    let (number, last_beat_us) = number_of(backend, name)
        .await
        .context("registering the node")?;
    let Backend::Postgres(pool) = backend else {
        return Ok(Registered {
            number: u16::try_from(number).unwrap_or(0),
            last_beat_us,
            _held: None,
        });
    };
    let mut conn = pool.acquire().await?.detach();
    // Another node taking over what this one left holds the lock for a moment: wait for it.
    let mut tries = 0;
    while !try_lock(&mut conn, number).await? {
        tries += 1;
        if tries >= 20 {
            bail!(
                "node {name:?} (number {number}) is already running against this journal: \
                 each node needs a name of its own ([switch] node)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    heartbeat(&mut conn, name).await?;
    info!(node = name, number, "node registered");
    let (held, mut gone) = oneshot::channel::<()>();
    let pool = pool.clone();
    let name = name.to_owned();
    tracker.spawn(async move {
        let mut conn = Some(conn);
        let mut locked = true;
        loop {
            tokio::select! {
                _ = &mut gone => break,
                () = tokio::time::sleep(beat) => {}
            }
            // The heartbeat only while the lock is this process's.
            let alive = match conn.as_mut() {
                Some(c) if locked => heartbeat(c, &name).await.is_ok(),
                Some(c) => c.ping().await.is_ok(),
                None => false,
            };
            if alive && locked {
                continue;
            }
            if !alive {
                // The connection (and the lock with it) is gone: take it again.
                conn = pool
                    .acquire()
                    .await
                    .map(sqlx::pool::PoolConnection::detach)
                    .ok();
            }
            let Some(c) = conn.as_mut() else {
                continue;
            };
            match try_lock(c, number).await {
                Ok(true) => {
                    warn!(node = %name, number, "node lock taken again after its connection was lost");
                    let _ = heartbeat(c, &name).await;
                    locked = true;
                }
                Ok(false) => {
                    if locked {
                        error!(node = %name, number, "node lock held by another process with this node's name: ids may clash; stop one of them");
                    }
                    locked = false;
                }
                Err(_) => conn = None,
            }
        }
        if let Some(c) = conn {
            let _ = c.close().await;
        }
    });
    Ok(Registered {
        number: u16::try_from(number).unwrap_or(0),
        last_beat_us,
        _held: Some(held),
    })
}
