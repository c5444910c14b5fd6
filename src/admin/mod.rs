//! The admin side: Prometheus metrics, the live dashboard and transaction look-up over HTTP.
//!
//! | route | what | token |
//! |---|---|---|
//! | `GET /metrics` | Prometheus text format | no |
//! | `GET /healthz` | 200 while the process answers | no |
//! | `GET /readyz` | 200 ready, 503 not ready (draining, journal not writable, links down): see [`crate::health`] | no |
//! | `GET /api/readiness` | why, per endpoint (JSON) | yes |
//! | `GET /` | the dashboard (HTML, no external assets) | yes |
//! | `GET /api/status` | the dashboard's numbers once (JSON) | yes |
//! | `GET /api/live` | the same every second (server-sent events) | yes |
//! | `GET /api/transactions?rrn=&stan=&terminal=&merchant=&from_us=&to_us=&rc=&limit=` | look-up | yes |
//! | `GET /api/transactions/{id}` | one transaction's story | yes |
//!
//! The token comes from `[admin] token`, as `Authorization: Bearer <token>` or, for a browser
//! (which cannot set headers on a page load or an `EventSource`), `?token=<token>`.

pub(crate) mod live;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::journal::lookup::TxnQuery;
use crate::pipeline::Pipeline;
use crate::telemetry;

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Where to listen.
    pub address: SocketAddr,
    /// Bearer token for everything but `/metrics`, `/healthz` and `/readyz` (at least 16
    /// characters).
    pub token: String,
    /// Which acquirer links `/readyz` needs up: `every` endpoint with a ready link (default),
    /// `any` endpoint, or `ignore`.
    #[serde(default)]
    pub readiness_links: crate::health::ReadinessLinks,
}

const PAGE: &str = include_str!("dashboard.html");

#[derive(Clone)]
struct AdminState {
    pipeline: Arc<Pipeline>,
    token: Arc<str>,
    prometheus: Option<PrometheusHandle>,
    saf_depth: Arc<Mutex<BTreeMap<String, i64>>>,
    /// Ends the live streams, so that a shutdown does not wait for open dashboards.
    shutdown: CancellationToken,
    readiness_links: crate::health::ReadinessLinks,
}

/// Binds the admin address and serves until `shutdown`; also refreshes the SAF depth gauge.
///
/// # Errors
/// The address cannot be bound.
pub(crate) async fn start(
    cfg: &AdminSection,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(cfg.address).await?;
    let addr = listener.local_addr()?;
    let state = AdminState {
        pipeline,
        token: Arc::from(cfg.token.as_str()),
        prometheus: telemetry::handle(),
        saf_depth: Arc::new(Mutex::new(BTreeMap::new())),
        shutdown: shutdown.clone(),
        readiness_links: cfg.readiness_links,
    };
    tracker.spawn(refresh(state.clone(), shutdown.clone()));
    let protected = Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/live", get(live))
        .route("/api/transactions", get(transactions))
        .route("/api/transactions/{id}", get(transaction))
        .route("/api/settlement", get(settlement))
        .route("/api/batches/{terminal}/{batch}", get(batch))
        .route("/api/fraud", get(fraud_rules))
        .route("/api/fraud/reload", axum::routing::post(fraud_reload))
        .route("/api/readiness", get(readiness))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let app = Router::new()
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state);
    info!(%addr, "admin listening");
    tracker.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            warn!(error = %e, "admin server ended");
        }
    });
    Ok(addr)
}

/// Gauges that are read rather than counted: SAF depth per endpoint, HSM connections up.
async fn refresh(state: AdminState, shutdown: CancellationToken) {
    loop {
        let journal = state.pipeline.journal();
        let mut depths = BTreeMap::new();
        for e in state.pipeline.endpoints() {
            if let Ok(n) = journal.saf_depth(Some(e.name())).await {
                metrics::gauge!(telemetry::SAF_DEPTH, "endpoint" => e.name().to_owned())
                    .set(n as f64);
                depths.insert(e.name().to_owned(), n);
            }
        }
        if let Ok(mut d) = state.saf_depth.lock() {
            *d = depths;
        }
        metrics::gauge!(telemetry::IN_FLIGHT).set(
            state
                .pipeline
                .counters
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
        if let Some(h) = state.pipeline.hsm() {
            metrics::gauge!(telemetry::HSM_UP).set(h.health().up as f64);
        }
        if let Some(engine) = state.pipeline.fraud().and_then(|f| f.engine()) {
            for r in engine.stats() {
                metrics::counter!(telemetry::FRAUD_HITS, "rule" => r.name.clone(), "mode" => "active")
                    .absolute(r.hits);
                metrics::counter!(telemetry::FRAUD_HITS, "rule" => r.name, "mode" => "shadow")
                    .absolute(r.shadow_hits);
            }
        }
        metrics::gauge!(telemetry::JOURNAL_BACKLOG).set(
            journal
                .stats
                .backlog
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn auth(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.or(q.get("token").map(String::as_str));
    let ok = given.is_some_and(|g| {
        subtle::ConstantTimeEq::ct_eq(g.as_bytes(), state.token.as_bytes()).into()
    });
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required\n",
        )
            .into_response();
    }
    next.run(request).await
}

async fn prometheus(State(state): State<AdminState>) -> Response {
    match &state.prometheus {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics are not enabled\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 or 503, with the reasons by kind only (no endpoint names: the route needs no token).
async fn readyz(State(state): State<AdminState>) -> Response {
    let r = state.pipeline.readiness(state.readiness_links);
    if r.ready {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let mut why = Vec::new();
    if r.draining {
        why.push("draining");
    }
    if !r.journal_writable {
        why.push("journal not writable");
    }
    if !r.draining && r.journal_writable {
        why.push("acquirer links down");
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}\n", why.join(", ")),
    )
        .into_response()
}

async fn readiness(State(state): State<AdminState>) -> Response {
    let r = state.pipeline.readiness(state.readiness_links);
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r)).into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// The dashboard's numbers.
#[derive(Debug, Serialize)]
struct Status {
    node_time_ms: u64,
    series: Vec<live::Point>,
    declines: Vec<live::Decline>,
    endpoints: Vec<EndpointView>,
    saf_depth: BTreeMap<String, i64>,
    in_flight: u64,
    received: u64,
    replied: u64,
    hsm: Option<HsmView>,
}

#[derive(Debug, Serialize)]
struct EndpointView {
    name: String,
    links: Vec<LinkView>,
}

#[derive(Debug, Serialize)]
struct LinkView {
    addr: String,
    state: &'static str,
}

#[derive(Debug, Serialize)]
struct HsmView {
    up: usize,
    total: usize,
    failures: u64,
}

fn snapshot(state: &AdminState) -> Status {
    use std::sync::atomic::Ordering::Relaxed;
    let p = &state.pipeline;
    let (series, declines) = p.live().series(300);
    Status {
        node_time_ms: u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(0),
        series,
        declines,
        endpoints: p
            .endpoints()
            .iter()
            .map(|e| EndpointView {
                name: e.name().to_owned(),
                links: e
                    .links()
                    .iter()
                    .map(|l| LinkView {
                        addr: l.addr().to_owned(),
                        state: l.state().as_str(),
                    })
                    .collect(),
            })
            .collect(),
        saf_depth: state
            .saf_depth
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default(),
        in_flight: p.counters.in_flight.load(Relaxed),
        received: p.counters.received.load(Relaxed),
        replied: p.counters.replied.load(Relaxed),
        hsm: p.hsm().map(|h| {
            let health = h.health();
            HsmView {
                up: health.up,
                total: health.total,
                failures: health.failures,
            }
        }),
    }
}

async fn status(State(state): State<AdminState>) -> Json<Status> {
    Json(snapshot(&state))
}

async fn live(
    State(state): State<AdminState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::select! {
                () = state.shutdown.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let data = serde_json::to_string(&snapshot(&state)).unwrap_or_else(|_| "{}".into());
        Some((
            Ok(Event::default().event("status").data(data)),
            (state, false),
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `GET /api/settlement?date=YYYY-MM-DD[&endpoint=E]`: the settlement report.
async fn settlement(
    State(state): State<AdminState>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(date) = q
        .get("date")
        .and_then(|d| crate::settlement::date_arg(d).ok())
    else {
        return (StatusCode::BAD_REQUEST, "date=YYYY-MM-DD needed\n").into_response();
    };
    if let Some(k) = q
        .keys()
        .find(|k| !matches!(k.as_str(), "date" | "endpoint" | "token"))
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {k:?}\n"),
        )
            .into_response();
    }
    let fees = state
        .pipeline
        .endpoints()
        .iter()
        .map(|e| (e.name().to_owned(), e.config().settlement.clone()))
        .collect();
    match crate::settlement::report::build(
        state.pipeline.journal().reader(),
        &date,
        q.get("endpoint").map(String::as_str),
        &fees,
    )
    .await
    {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            warn!(error = %e, "settlement report failed");
            (StatusCode::SERVICE_UNAVAILABLE, "journal unavailable\n").into_response()
        }
    }
}

/// `GET /api/batches/{terminal}/{batch}`: a closed batch, its totals and exceptions.
async fn batch(
    State(state): State<AdminState>,
    Path((terminal, batch)): Path<(String, String)>,
) -> Response {
    match crate::settlement::batch::closed(state.pipeline.journal().reader(), &terminal, &batch)
        .await
    {
        Ok(Some(b)) => Json(b).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no closed batch\n").into_response(),
        Err(e) => {
            warn!(error = %e, "batch look-up failed");
            (StatusCode::SERVICE_UNAVAILABLE, "journal unavailable\n").into_response()
        }
    }
}

async fn transactions(
    State(state): State<AdminState>,
    Query(mut q): Query<BTreeMap<String, String>>,
) -> Response {
    q.remove("token");
    let query: Result<TxnQuery, _> = serde_json::from_value(Value::Object(
        q.into_iter()
            .map(|(k, v)| {
                let v = match k.as_str() {
                    "from_us" | "to_us" | "limit" => {
                        v.parse::<i64>().map_or(Value::String(v), Value::from)
                    }
                    _ => Value::String(v),
                };
                (k, v)
            })
            .collect(),
    ));
    let query = match query {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    match state.pipeline.journal().find_transactions(&query).await {
        Ok(rows) => Json(serde_json::json!({ "transactions": rows })).into_response(),
        Err(e) => {
            warn!(error = %e, "transaction look-up failed");
            (StatusCode::SERVICE_UNAVAILABLE, "journal unavailable\n").into_response()
        }
    }
}

async fn transaction(State(state): State<AdminState>, Path(id): Path<i64>) -> Response {
    match state.pipeline.journal().transaction_story(id).await {
        Ok(Some(story)) => Json(story).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such transaction\n").into_response(),
        Err(e) => {
            warn!(error = %e, "transaction look-up failed");
            (StatusCode::SERVICE_UNAVAILABLE, "journal unavailable\n").into_response()
        }
    }
}

async fn fraud_rules(State(state): State<AdminState>) -> Response {
    let Some(engine) = state.pipeline.fraud().and_then(|f| f.engine()) else {
        return (StatusCode::NOT_FOUND, "no fraud rules configured\n").into_response();
    };
    let rules: Vec<Value> = engine
        .stats()
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "mode": format!("{:?}", r.mode).to_lowercase(),
                "hits": r.hits,
                "shadow_hits": r.shadow_hits,
            })
        })
        .collect();
    Json(serde_json::json!({ "rules": rules, "state_bytes": engine.state_bytes() })).into_response()
}

async fn fraud_reload(State(state): State<AdminState>) -> Response {
    let Some(rules) = state.pipeline.fraud() else {
        return (StatusCode::NOT_FOUND, "no fraud rules configured\n").into_response();
    };
    match rules.reload() {
        Ok(n) => {
            info!(rules = n, "fraud rules reloaded (admin)");
            Json(serde_json::json!({ "reloaded": true, "rules": n })).into_response()
        }
        Err(e) => {
            let why = format!("{e:#}");
            warn!(error = %why, "fraud rules not reloaded; the running rules stay");
            (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "reloaded": false, "error": why })),
            )
                .into_response()
        }
    }
}
