//! The running switch: terminal listeners, their connections, the endpoints, and the order in
//! which it all stops.
//!
//! Each listener caps its connections with a semaphore (a connection past the cap is closed at
//! once). Each connection reads frames and hands each request to its own task, so several
//! requests are in flight on one connection and replies go out as they are ready, in any order;
//! a per-connection semaphore bounds that, and a full connection stops being read (back
//! pressure) rather than queueing without bound.
//!
//! Shutdown: stop accepting, stop reading, let in-flight transactions finish (up to the grace
//! period), then stop the links (which sign off). A drain (SIGTERM) first answers `/readyz` 503
//! and keeps serving for the drain delay, so that a balancer moves new connections away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cardswitch_codec::framing::{Frame, FrameCodec, Framing};
use cardswitch_codec::Dialect;
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use cardswitch_codec::hsm::{KeyType, WrappedKey};

use crate::config::{ListenerConfig, Validated};
use crate::hsm::Hsm;
use crate::journal::notify::Wake;
use crate::journal::Journal;
use crate::net::write::write_coalesced;
use crate::pipeline::Pipeline;
use crate::security::{Key, ListenerSecurity};
use crate::settlement::Cutover;
use crate::tls::Acceptor;
use crate::upstream::{Endpoint, EndpointDay, EndpointKeys};

/// A started switch.
#[derive(Debug)]
pub struct Switch {
    pipeline: Arc<Pipeline>,
    admin: Option<SocketAddr>,
    listeners: Vec<SocketAddr>,
    /// Cancelled to stop accepting and reading.
    stop_intake: CancellationToken,
    /// Cancelled to stop the links, after the intake has drained.
    stop_links: CancellationToken,
    sessions: TaskTracker,
    links: TaskTracker,
    writer: TaskTracker,
    journal: Journal,
    grace: Duration,
    drain_delay: Duration,
}

struct ListenerCtx {
    name: String,
    tls: Option<Acceptor>,
    dialect: Dialect,
    framing: Framing,
    idle: Duration,
    per_connection: usize,
    proxy_protocol: bool,
}

/// The tasks and tokens a switch runs with, in the order they stop.
struct Running {
    stop_intake: CancellationToken,
    stop_links: CancellationToken,
    links: TaskTracker,
    sessions: TaskTracker,
    writer: TaskTracker,
}

impl Switch {
    /// Loads keys received in earlier key exchanges, then has the HSM confirm every key's
    /// check value; the switch does not start on a mismatch.
    async fn verify_keys(config: &Validated, hsm: &Hsm, journal: &Journal) -> Result<()> {
        let wait = Duration::from_millis(
            config
                .config
                .hsm
                .as_ref()
                .map_or(1_000, |h| h.timeout_ms)
                .max(2_000),
        );
        if !hsm.wait_ready(wait).await {
            anyhow::bail!("no HSM reachable: key check values cannot be verified");
        }
        for l in &config.listeners {
            if let Some(sec) = &l.security {
                sec.verify(hsm, &l.config.name).await?;
            }
        }
        for e in &config.endpoints {
            let Some(sec) = &e.security else { continue };
            let name = &e.config.name;
            if let Some((key, check)) = journal
                .load_key(name, "zpk")
                .await
                .with_context(|| format!("endpoint {name}: reading its last ZPK"))?
            {
                let key = WrappedKey::parse(&key)
                    .map_err(|_| anyhow::anyhow!("endpoint {name}: stored ZPK unreadable"))?;
                info!(endpoint = %name, check_value = %check, "using the ZPK from the last key exchange");
                sec.set_zpk(Key {
                    key,
                    check,
                    kind: KeyType::ZPK,
                });
            }
            sec.verify(hsm, name).await?;
        }
        info!("key check values verified by the HSM");
        Ok(())
    }

    /// Binds every listener and starts every link.
    ///
    /// # Errors
    /// When a listener address cannot be bound.
    pub async fn start(config: Validated) -> Result<Self> {
        let run = Running {
            stop_intake: CancellationToken::new(),
            stop_links: CancellationToken::new(),
            links: TaskTracker::new(),
            sessions: TaskTracker::new(),
            writer: TaskTracker::new(),
        };
        let cfg = &config.config;
        let journal = Journal::start(&cfg.journal, &cfg.switch.node, &run.writer).await?;
        let hsm = cfg
            .hsm
            .as_ref()
            .map(|h| Hsm::start(h, &run.stop_links, &run.links));
        if let Some(hsm) = &hsm {
            Self::verify_keys(&config, hsm, &journal).await?;
        }
        let days = open_days(&config, &journal, &run).await?;
        let (key_changes, key_rx) = mpsc::channel::<(String, Key)>(64);
        let (endpoints, strays): (Vec<Arc<Endpoint>>, Vec<_>) = config
            .endpoints
            .iter()
            .zip(&days)
            .map(|(e, day)| {
                let keys = match (&e.security, &hsm) {
                    (Some(keys), Some(hsm)) => Some(EndpointKeys {
                        keys: Arc::clone(keys),
                        hsm: Arc::clone(hsm),
                        changes: key_changes.clone(),
                    }),
                    _ => None,
                };
                Endpoint::start(
                    &e.config,
                    e.dialect.clone(),
                    e.framing,
                    e.strategy,
                    e.tls.clone(),
                    cfg.switch.acquirer_id.clone(),
                    keys,
                    day,
                    &run.stop_links,
                    &run.links,
                )
            })
            .unzip();
        keep_exchanged_keys(journal.clone(), key_rx, &run);
        follow_keys(
            journal.clone(),
            config
                .endpoints
                .iter()
                .filter_map(|e| e.security.clone().map(|s| (e.config.name.clone(), s)))
                .collect(),
            &run,
        );
        let listener_security: HashMap<String, ListenerSecurity> = config
            .listeners
            .iter()
            .filter_map(|l| l.security.clone().map(|s| (l.config.name.clone(), s)))
            .collect();
        let pipeline = Arc::new(
            Pipeline::new(config.bins.clone(), endpoints, journal.clone())
                .with_security(hsm, listener_security)
                .with_fraud(config.fraud.clone())
                .with_batch_field(cfg.settlement.batch_field)
                .with_partial_approvals(
                    cfg.listeners
                        .iter()
                        .filter(|l| l.partial_approvals)
                        .map(|l| l.name.clone()),
                ),
        );
        serve_endpoints(&pipeline, strays, &journal, &run);
        purge_duplicate_keys(journal.clone(), &run);
        // What an earlier run of this node forwarded without recording the outcome is
        // reversed before any terminal is heard.
        pipeline.recover().await?;
        take_over_gone_nodes(&pipeline, &run);
        pipeline.warm_duplicates().await;
        let bound = bind_listeners(&config, &pipeline, &run).await?;
        let admin = match &cfg.admin {
            Some(a) => Some(
                crate::admin::start(a, Arc::clone(&pipeline), run.stop_links.clone(), &run.links)
                    .await
                    .with_context(|| format!("admin: binding {}", a.address))?,
            ),
            None => None,
        };
        Ok(Self {
            pipeline,
            admin,
            listeners: bound,
            stop_intake: run.stop_intake,
            stop_links: run.stop_links,
            sessions: run.sessions,
            links: run.links,
            writer: run.writer,
            journal,
            grace: Duration::from_millis(cfg.switch.shutdown_grace_ms),
            drain_delay: Duration::from_millis(cfg.switch.drain_delay_ms),
        })
    }

    /// The admin address (metrics, dashboard, look-up), when configured.
    #[must_use]
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The bound address of each listener, in configured order.
    #[must_use]
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listeners
    }

    /// The pipeline (endpoints, counters).
    #[must_use]
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Waits until every endpoint has a ready link, or the time runs out; whether they all do.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.pipeline.endpoints().iter().all(|e| e.is_ready()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Drains: from now on `/readyz` answers 503; everything is served as before (new
    /// connections too) for the drain delay or until `cut_short` completes, then the switch
    /// shuts down.
    pub async fn drain(self, cut_short: impl std::future::Future<Output = ()>) {
        self.pipeline.drain().start();
        info!(
            delay_ms = u64::try_from(self.drain_delay.as_millis()).unwrap_or(u64::MAX),
            "draining: not ready; serving until the drain delay is over"
        );
        tokio::select! {
            () = tokio::time::sleep(self.drain_delay) => {}
            () = cut_short => info!("drain delay cut short"),
        }
        self.shutdown().await;
    }

    /// Stops accepting, drains in-flight transactions (up to the grace period), signs off.
    pub async fn shutdown(self) {
        self.pipeline.drain().start();
        self.stop_intake.cancel();
        self.sessions.close();
        if tokio::time::timeout(self.grace, self.sessions.wait())
            .await
            .is_err()
        {
            warn!("shutdown grace period over with transactions still in flight");
        }
        self.journal.flush().await;
        self.stop_links.cancel();
        self.links.close();
        self.links.wait().await;
        // The pipeline holds the last journal handle: dropping both ends the writer.
        drop(self.pipeline);
        drop(self.journal);
        self.writer.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer.wait()).await;
        info!("stopped");
    }
}

/// Each endpoint's open business date, its cutovers recorded as they happen, its cutover
/// timer, and the follower of other nodes' cutovers.
async fn open_days(
    config: &Validated,
    journal: &Journal,
    run: &Running,
) -> Result<Vec<EndpointDay>> {
    let (cutover_tx, cutover_rx) = mpsc::channel::<Cutover>(64);
    run.writer.spawn(crate::settlement::cutover_writer(
        journal.backend().clone(),
        config.config.switch.node.clone(),
        cutover_rx,
    ));
    let mut days = Vec::with_capacity(config.endpoints.len());
    for e in config.endpoints.iter().map(|e| &e.config) {
        let day = crate::settlement::load_day(
            journal.backend(),
            &e.name,
            e.settlement.cutover_time.as_deref(),
        )
        .await?;
        info!(endpoint = %e.name, business_date = %crate::settlement::format_date(day.current()), "business date open");
        let day = EndpointDay {
            day: Arc::new(day),
            cutovers: cutover_tx.clone(),
        };
        run.links.spawn(crate::settlement::cutover_timer(
            e.name.clone(),
            Arc::clone(&day.day),
            cutover_tx.clone(),
            run.stop_links.clone(),
        ));
        days.push(day);
    }
    run.links.spawn(crate::settlement::follow_days(
        journal.backend().clone(),
        config
            .endpoints
            .iter()
            .zip(&days)
            .map(|(e, d)| (e.config.name.clone(), Arc::clone(&d.day)))
            .collect(),
        run.stop_links.clone(),
    ));
    Ok(days)
}

/// How often stored keys are compared with the ones in use, for a notification missed while
/// the listening connection was down (and on SQLite, which has none).
const KEY_POLL: Duration = Duration::from_secs(30);

/// Follows key exchanges that reached other nodes: a ZPK stored for an endpoint (under the LMK,
/// with its check value) replaces the one in use when its check value differs. Told at once
/// through PostgreSQL `LISTEN` ([`crate::journal::notify`]); every [`KEY_POLL`] as well.
fn follow_keys(
    journal: Journal,
    endpoints: Vec<(String, Arc<crate::security::EndpointSecurity>)>,
    run: &Running,
) {
    if endpoints.is_empty() {
        return;
    }
    let stop = run.stop_links.clone();
    run.links.spawn(async move {
        let mut follower = crate::journal::notify::Follower::start(
            journal.backend(),
            crate::journal::notify::KEYS,
            KEY_POLL,
        )
        .await;
        loop {
            let wake = tokio::select! {
                () = stop.cancelled() => return,
                w = follower.next() => w,
            };
            for (name, sec) in &endpoints {
                if matches!(&wake, Wake::Told(o) if o != name) {
                    continue;
                }
                follow_key(&journal, name, sec).await;
            }
        }
    });
}

/// Takes the ZPK stored for endpoint `name` when it is not the one in use.
async fn follow_key(journal: &Journal, name: &str, sec: &crate::security::EndpointSecurity) {
    let stored = match journal.load_key(name, "zpk").await {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            warn!(endpoint = %name, error = %e, "stored ZPK not read");
            return;
        }
    };
    let (key, check) = stored;
    if sec.zpk().is_some_and(|k| k.check == check) {
        return;
    }
    match WrappedKey::parse(&key) {
        Ok(key) => {
            info!(endpoint = %name, check_value = %check, "ZPK changed by another node's key exchange: using it");
            sec.set_zpk(Key {
                key,
                check,
                kind: KeyType::ZPK,
            });
        }
        Err(_) => tracing::error!(endpoint = %name, "stored ZPK unreadable; the one in use stays"),
    }
}

/// Keys received in key exchanges are kept (under the LMK) for the next start.
fn keep_exchanged_keys(journal: Journal, mut key_rx: mpsc::Receiver<(String, Key)>, run: &Running) {
    let stop = run.stop_links.clone();
    run.links.spawn(async move {
        while let Some((endpoint, key)) = tokio::select! {
            () = stop.cancelled() => None,
            k = key_rx.recv() => k,
        } {
            if let Err(e) = journal
                .save_key(&endpoint, "zpk", &key.key.to_field(), &key.check)
                .await
            {
                tracing::error!(endpoint = %endpoint, error = %e, "new ZPK not saved: a restart would use the previous one");
            }
        }
    });
}

/// Per endpoint: the store-and-forward sender, and the handler of replies nobody waited for.
/// Both stop with the links.
fn serve_endpoints(
    pipeline: &Arc<Pipeline>,
    strays: Vec<mpsc::Receiver<crate::upstream::Stray>>,
    journal: &Journal,
    run: &Running,
) {
    for (endpoint, mut rx) in pipeline.endpoints().iter().zip(strays) {
        run.links.spawn(crate::saf::run(
            journal.clone(),
            Arc::clone(endpoint),
            run.stop_links.clone(),
        ));
        let (p, e, stop) = (
            Arc::clone(pipeline),
            Arc::clone(endpoint),
            run.stop_links.clone(),
        );
        run.links.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    stray = rx.recv() => match stray {
                        Some(s) => p.stray(&e, s).await,
                        None => return,
                    },
                }
            }
        });
    }
}

/// Duplicate keys past their retention, purged every minute.
fn purge_duplicate_keys(journal: Journal, run: &Running) {
    let stop = run.stop_links.clone();
    run.links.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(60)) => {
                    let n = journal.claims().purge(journal.retention()).await;
                    if n > 0 {
                        info!(keys = n, "old duplicate keys purged");
                    }
                }
            }
        }
    });
}

/// Looks for other nodes that are gone, all along, and takes over their work. Only after this
/// node has reached the database without a failure for the whole takeover time: a node that was
/// cut off itself has not seen the others' heartbeats.
fn take_over_gone_nodes(pipeline: &Arc<Pipeline>, run: &Running) {
    let Some(after) = pipeline.journal().takeover_after() else {
        return;
    };
    let (p, stop) = (Arc::clone(pipeline), run.stop_links.clone());
    run.links.spawn(async move {
        let every = (after / 2).max(Duration::from_millis(500));
        let mut reachable_since = Some(tokio::time::Instant::now());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if p.journal().breaker().is_open() {
                reachable_since = None;
            }
            let steady = reachable_since.is_some_and(|t| t.elapsed() >= after);
            if !steady {
                if p.journal().reachable().await {
                    reachable_since.get_or_insert_with(tokio::time::Instant::now);
                } else {
                    reachable_since = None;
                }
                continue;
            }
            if let Err(e) = p.take_over_gone_nodes(after).await {
                warn!(error = %e, "looking for gone nodes failed");
                reachable_since = None;
            }
        }
    });
}

/// Binds each listener and starts its accept loop; the bound addresses, in configured order.
async fn bind_listeners(
    config: &Validated,
    pipeline: &Arc<Pipeline>,
    run: &Running,
) -> Result<Vec<SocketAddr>> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        let c = &l.config;
        let listener = TcpListener::bind(c.address)
            .await
            .with_context(|| format!("listener {}: binding {}", c.name, c.address))?;
        let addr = listener.local_addr()?;
        info!(listener = %c.name, %addr, dialect = l.dialect.name(), "listening");
        bound.push(addr);
        let ctx = Arc::new(ctx(c, l.dialect.clone(), l.framing, l.tls.clone()));
        let limit = Arc::new(Semaphore::new(c.max_connections));
        run.sessions.spawn(accept_loop(
            listener,
            ctx,
            limit,
            Arc::clone(pipeline),
            run.stop_intake.clone(),
            run.sessions.clone(),
        ));
    }
    Ok(bound)
}

fn ctx(
    l: &ListenerConfig,
    dialect: Dialect,
    framing: Framing,
    tls: Option<Acceptor>,
) -> ListenerCtx {
    ListenerCtx {
        name: l.name.clone(),
        tls,
        dialect,
        framing,
        idle: Duration::from_millis(l.idle_timeout_ms.max(1)),
        per_connection: l.max_in_flight_per_connection,
        proxy_protocol: l.proxy_protocol,
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    limit: Arc<Semaphore>,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
    sessions: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            warn!(listener = %ctx.name, %peer, "connection cap reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (ctx, pipeline, stop, tracker) = (
            Arc::clone(&ctx),
            Arc::clone(&pipeline),
            stop.clone(),
            sessions.clone(),
        );
        sessions.spawn(async move {
            let gauge =
                metrics::gauge!(crate::telemetry::CONNECTIONS, "listener" => ctx.name.clone());
            gauge.increment(1.0);
            connection(stream, peer, &ctx, pipeline, stop, tracker).await;
            gauge.decrement(1.0);
            drop(permit);
        });
    }
}

/// One accepted connection: its PROXY header when the listener wants one (the terminal's
/// address then names the connection in logs), its TLS handshake, then its session.
async fn connection(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let terminal = if ctx.proxy_protocol {
        match crate::net::proxy::read_header(&mut stream, peer).await {
            Ok(t) => t,
            Err(e) => {
                warn!(listener = %ctx.name, %peer, error = %e, "PROXY header refused; closing");
                return;
            }
        }
    } else {
        peer
    };
    let span = if ctx.proxy_protocol {
        info_span!("conn", listener = %ctx.name, peer = %terminal, via = %peer)
    } else {
        info_span!("conn", listener = %ctx.name, %peer)
    };
    async move {
        match &ctx.tls {
            None => session(stream, ctx, pipeline, stop, tracker).await,
            Some(acceptor) => {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.0.accept(stream)).await
                {
                    Ok(Ok(tls)) => session(tls, ctx, pipeline, stop, tracker).await,
                    Ok(Err(e)) => warn!(error = %e, "TLS handshake failed"),
                    Err(_) => warn!("TLS handshake timed out"),
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// One terminal connection: read frames, run each through the pipeline in its own task, write
/// replies as they come.
async fn session<S>(
    stream: S,
    ctx: &ListenerCtx,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
    tracker: TaskTracker,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut sink, mut frames) = Framed::new(stream, FrameCodec::new(ctx.framing)).split();
    let (tx, mut rx) = mpsc::channel::<Frame>(ctx.per_connection);
    let writer = tracker.spawn(async move {
        while let Some(frame) = rx.recv().await {
            if write_coalesced(&mut sink, frame, &mut rx).await.is_err() {
                return;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(ctx.per_connection));
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => break,
            n = tokio::time::timeout(ctx.idle, frames.next()) => n,
        };
        let frame = match next {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                warn!(error = %e, "framing error; closing connection");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                info!("idle timeout; closing connection");
                break;
            }
        };
        if frame.is_keepalive() {
            let _ = tx.send(frame).await;
            continue;
        }
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let (pipeline, tx, dialect, listener) = (
            Arc::clone(&pipeline),
            tx.clone(),
            ctx.dialect.clone(),
            ctx.name.clone(),
        );
        tracker.spawn(
            async move {
                if let Some(body) = pipeline.handle(&listener, &dialect, &frame.body).await {
                    let tpdu = frame.tpdu.map(cardswitch_codec::framing::Tpdu::swapped);
                    let _ = tx.send(Frame { tpdu, body }).await;
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
    // Replies still to come go out before the writer stops: it ends when the last sender (held
    // by in-flight transactions) is dropped.
    drop(tx);
    let _ = writer.await;
}
