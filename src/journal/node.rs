//! Node identity. Every node name is given a number once (the `nodes` table: 0 to 1023, the
//! smallest free one), and that number is the node part of every id the node makes, so ids
//! of different nodes never meet. While it runs, a node holds a PostgreSQL advisory lock on its
//! number (in the journal's schema) on a connection of its own: a second process started with the same name finds the
//! lock taken and refuses to start. The lock goes with the connection, so a node killed with
//! SIGKILL can be restarted at once. (SQLite is one process's file: it takes the number only.)

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
    /// Dropped with the last journal handle: the lock task then ends.
    pub(super) _held: Option<oneshot::Sender<()>>,
}

/// The number of node `name`, given when it is first seen.
async fn number_of(backend: &Backend, name: &str) -> Result<i32> {
    for _ in 0..8 {
        let st = Statement::new("SELECT number FROM nodes WHERE name = $1").bind(name);
        if let Some(r) = backend.fetch_optional(&st).await? {
            let n: i32 = r.get(0)?;
            let st = Statement::new("UPDATE nodes SET started_us = $1 WHERE name = $2")
                .bind(now_us())
                .bind(name);
            backend.execute(&st).await?;
            return Ok(n);
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

/// Registers node `name` and, on PostgreSQL, holds its lock for as long as the returned handle
/// lives.
///
/// # Errors
/// The database failing, or another running process holding the name.
pub(super) async fn register(
    backend: &Backend,
    name: &str,
    tracker: &TaskTracker,
) -> Result<Registered> {
    let number = number_of(backend, name)
        .await
        .context("registering the node")?;
    let Backend::Postgres(pool) = backend else {
        return Ok(Registered {
            number: u16::try_from(number).unwrap_or(0),
            _held: None,
        });
    };
    let mut conn = pool.acquire().await?.detach();
    if !try_lock(&mut conn, number).await? {
        bail!(
            "node {name:?} (number {number}) is already running against this journal: \
             each node needs a name of its own ([switch] node)"
        );
    }
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
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            let alive = match conn.as_mut() {
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
        _held: Some(held),
    })
}
