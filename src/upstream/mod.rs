//! Acquirer links and endpoints.
//!
//! A link is one TCP connection to an acquirer host, owned by one task that connects, signs on,
//! sends echo tests when idle, writes requests and matches replies. Its life:
//!
//! ```text
//!   Disconnected --connect--> Connected --0810/00 to 0800/001--> Ready
//!        ^                        |                                 |
//!        +---- backoff <----------+---- error, EOF, missed echoes --+
//! ```
//!
//! Requests carry a per-link STAN (DE11); the reply is matched on that STAN and the request's
//! message class, then handed back to the waiting transaction, which restores the terminal's
//! STAN. A request is either *not sent* (the link was not ready, full, or its queue refused it),
//! which lets the endpoint try another link, or *sent*: from then on it is never sent again, and
//! a lost connection or a timeout makes its outcome unknown (answered 91; the reversal hook is
//! [`Upstream::Lost`]/[`Upstream::TimedOut`]).
//!
//! An endpoint picks links with the routing crate's strategies; when nothing can take a request
//! the caller learns it at once (no queue).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cardswitch_codec::framing::{Frame, FrameCodec, Framing};
use cardswitch_codec::{Dialect, Message, Mti, ResponseCode};
use cardswitch_routing::{LinkView, Strategy};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub(crate) mod config;
mod network;

pub(crate) use config::{EndpointConfig, ValidEndpoint};

use crate::settlement::{BusinessDay, Cutover};
use cardswitch_codec::hsm::KeyType;

use crate::hsm::Hsm;
use crate::journal::ahead::{Forward, WriteAhead};
use crate::net::connection::{keep_connected, Backoff, Ended, Peer};
use crate::net::write::write_coalesced;
use crate::security::{EndpointSecurity, Key};
use crate::telemetry;
use crate::tls::Connector;
use tokio::io::{AsyncRead, AsyncWrite};

/// Link states, stored in an atomic for the endpoint's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    /// No connection (connecting or waiting to retry).
    Disconnected = 0,
    /// Connected, not yet signed on.
    Connected = 1,
    /// Signed on: takes traffic.
    Ready = 2,
}

impl LinkState {
    /// Lower-case name, as the dashboard and logs show it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disconnected => "down",
            Self::Connected => "connected",
            Self::Ready => "ready",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            2 => Self::Ready,
            1 => Self::Connected,
            _ => Self::Disconnected,
        }
    }
}

/// What became of a request handed to an endpoint.
#[derive(Debug)]
pub(crate) enum Upstream {
    /// The acquirer's reply (DE11 restored to the terminal's), the link it came over and the
    /// STAN the acquirer saw.
    Reply(Message, Arc<str>, u32),
    /// No link could take it; it was never written anywhere.
    NotSent,
    /// Written on this link (with this STAN), then the connection was lost before the reply:
    /// outcome unknown.
    Lost(Arc<str>, u32),
    /// Written on this link (with this STAN), no reply within the endpoint's timeout: outcome
    /// unknown.
    TimedOut(Arc<str>, u32),
    /// The request needs a MAC and the HSM could not give one; never written anywhere.
    Unsigned,
    /// Its write-ahead record could not be committed; never written anywhere.
    Unrecorded,
}

/// The write-ahead of one forwarded request: what the pipeline knows of it (terminal keys,
/// the sealed request), completed with what the link choice fixes (link, STAN and the fields as
/// sent) and committed before the request goes on the link.
#[derive(Debug)]
pub(crate) struct Ahead<'a> {
    pub(crate) journal: &'a WriteAhead,
    pub(crate) record: Forward,
}

impl Ahead<'_> {
    /// Records `sent` going on `link`; whether the record is committed.
    async fn record(&self, endpoint: &str, link: &str, sent: &Message) -> bool {
        let text = |f: u8| sent.get_str(f).map(str::to_owned);
        let record = Forward {
            endpoint: endpoint.to_owned(),
            link: link.to_owned(),
            mti: sent.mti().to_string(),
            upstream_stan: text(11).unwrap_or_default(),
            transmission_time: text(7),
            acquirer_id: text(32),
            forwarding_id: text(33),
            amount_minor: sent.amount().and_then(|a| i64::try_from(a).ok()),
            currency: text(49),
            ..self.record.clone()
        };
        self.journal.record(record).await
    }
}

/// The card-security side of an endpoint: its keys, the HSM, and where key changes are kept.
#[derive(Debug, Clone)]
pub struct EndpointKeys {
    /// The keys.
    pub keys: Arc<EndpointSecurity>,
    /// The HSM pool.
    pub hsm: Arc<Hsm>,
    /// A new ZPK, under the LMK, to be kept in the database.
    pub changes: mpsc::Sender<(String, Key)>,
}

/// A reply from an acquirer that no request was waiting for.
#[derive(Debug)]
pub enum Stray {
    /// The reply to a request that had timed out: the transaction's id and the reply.
    Late {
        /// The transaction.
        txn_id: i64,
        /// The reply.
        reply: Message,
    },
    /// A reply to nothing the switch asked (or asked on a connection since lost).
    Unmatched {
        /// The reply.
        reply: Message,
    },
}

struct Pending {
    mti: Mti,
    txn_id: i64,
    reply: oneshot::Sender<Message>,
}

/// Requests that timed out (their late replies are recognised) and requests answered (a second
/// copy of their reply is a duplicate, not an unmatched reply). Bounded.
#[derive(Default)]
struct Book {
    late: HashMap<u32, (i64, Mti)>,
    late_order: std::collections::VecDeque<u32>,
    answered: std::collections::HashSet<u32>,
    answered_order: std::collections::VecDeque<u32>,
}

const LATE_KEPT: usize = 100_000;
const ANSWERED_KEPT: usize = 16_384;

impl Book {
    fn timed_out(&mut self, stan: u32, txn_id: i64, mti: Mti) {
        if self.late_order.len() >= LATE_KEPT {
            if let Some(old) = self.late_order.pop_front() {
                self.late.remove(&old);
            }
        }
        self.late.insert(stan, (txn_id, mti));
        self.late_order.push_back(stan);
    }

    fn answered(&mut self, stan: u32) {
        if self.answered_order.len() >= ANSWERED_KEPT {
            if let Some(old) = self.answered_order.pop_front() {
                self.answered.remove(&old);
            }
        }
        if self.answered.insert(stan) {
            self.answered_order.push_back(stan);
        }
    }
}

/// One connection to an acquirer host.
pub struct Link {
    addr: Arc<str>,
    state: AtomicU8,
    in_flight: AtomicU32,
    cap: u32,
    /// The endpoint's STAN counter, shared by its links: an acquirer matching reversals by
    /// STAN and DE7 must never see one STAN twice from two links at once.
    stan: Arc<AtomicU32>,
    queue: mpsc::Sender<Frame>,
    pending: Mutex<HashMap<u32, Pending>>,
    book: Mutex<Book>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("addr", &self.addr)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// The link's state.
    #[must_use]
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The `host:port` it connects to.
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn view(&self) -> LinkView {
        LinkView {
            ready: self.state() == LinkState::Ready,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            cap: self.cap,
        }
    }

    fn next_stan(&self) -> u32 {
        // 1..=999_999, wrapping
        self.stan.fetch_add(1, Ordering::Relaxed) % 999_999 + 1
    }

    /// Registers an encoded request under its link STAN (from [`Link::next_stan`]) and queues
    /// it; `None` when not sent.
    fn submit(
        &self,
        stan: u32,
        mti: Mti,
        body: Vec<u8>,
        txn_id: i64,
    ) -> Option<oneshot::Receiver<Message>> {
        if self.state() != LinkState::Ready {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().ok()?;
            pending.insert(
                stan,
                Pending {
                    mti,
                    txn_id,
                    reply: tx,
                },
            );
        }
        if self.queue.try_send(Frame::new(Bytes::from(body))).is_err() {
            self.forget(stan);
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(rx)
    }

    /// Gives up waiting for a request; its reply, if it comes, is late.
    fn forget(&self, stan: u32) -> bool {
        let Some(p) = self.pending.lock().ok().and_then(|mut p| p.remove(&stan)) else {
            return false;
        };
        if let Ok(mut book) = self.book.lock() {
            book.timed_out(stan, p.txn_id, p.mti);
        }
        true
    }

    /// What an unmatched reply is: late, a second copy of an answered one, or a stray.
    fn classify(&self, reply: Message) -> Option<Stray> {
        let stan = reply.stan()?;
        let Ok(mut book) = self.book.lock() else {
            return None;
        };
        match book.late.get(&stan) {
            Some(&(txn_id, mti)) if mti.original() == reply.mti().request() => {
                book.late.remove(&stan);
                book.answered(stan);
                Some(Stray::Late { txn_id, reply })
            }
            _ if book.answered.contains(&stan) => None,
            _ => Some(Stray::Unmatched { reply }),
        }
    }

    /// Drops every pending request: their waiters see the loss.
    fn fail_all(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
        self.in_flight.store(0, Ordering::Relaxed);
    }

    /// Hands a reply to the request waiting for it; the reply back when nothing waits.
    fn deliver(&self, reply: Message) -> Result<(), Message> {
        let Some(stan) = reply.stan() else {
            return Err(reply);
        };
        let Ok(mut pending) = self.pending.lock() else {
            return Err(reply);
        };
        match pending.get(&stan) {
            Some(p) if p.mti.original() == reply.mti().request() => {}
            _ => return Err(reply),
        }
        let Some(p) = pending.remove(&stan) else {
            return Err(reply);
        };
        drop(pending);
        if let Ok(mut book) = self.book.lock() {
            book.answered(stan);
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        // A waiter that gave up in the same instant: its reply is late.
        p.reply.send(reply).inspect_err(|_| {
            if let Ok(mut book) = self.book.lock() {
                book.timed_out(stan, p.txn_id, p.mti);
            }
        })
    }
}

/// An acquirer: its dialect, its links and how requests are spread over them.
pub struct Endpoint {
    name: String,
    dialect: Dialect,
    links: Vec<Arc<Link>>,
    strategy: Strategy,
    turn: AtomicUsize,
    timeout: Duration,
    acquirer_id: Option<String>,
    config: Arc<EndpointConfig>,
    security: Option<EndpointKeys>,
    day: Arc<BusinessDay>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

/// Fields copied from the acquirer's reply into the terminal's.
const REPLY_FIELDS: &[u8] = &[38, 39, 44, 54, 55, 102, 103];

impl Endpoint {
    /// Starts the endpoint's link tasks.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &EndpointConfig,
        dialect: Dialect,
        framing: Framing,
        strategy: Strategy,
        tls: Option<Connector>,
        default_acquirer_id: Option<String>,
        security: Option<EndpointKeys>,
        day: &EndpointDay,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> (Arc<Self>, mpsc::Receiver<Stray>) {
        let (strays, strays_rx) = mpsc::channel(4096);
        let stan = Arc::new(AtomicU32::new(fastrand::u32(0..999_999)));
        let mut links = Vec::new();
        for addr in &config.links {
            let (tx, rx) =
                mpsc::channel(usize::try_from(config.max_in_flight_per_link).unwrap_or(512));
            let link = Arc::new(Link {
                addr: Arc::from(addr.as_str()),
                state: AtomicU8::new(LinkState::Disconnected as u8),
                in_flight: AtomicU32::new(0),
                cap: config.max_in_flight_per_link,
                stan: Arc::clone(&stan),
                queue: tx,
                pending: Mutex::new(HashMap::new()),
                book: Mutex::new(Book::default()),
            });
            let task = LinkTask {
                link: Arc::clone(&link),
                endpoint: config.name.clone(),
                dialect: dialect.clone(),
                framing,
                sign_on: config.sign_on,
                echo_interval: Duration::from_millis(config.echo_interval_ms.max(1)),
                max_missed: config.max_missed_echoes,
                reconnect: (
                    Duration::from_millis(config.reconnect_min_ms.max(1)),
                    Duration::from_millis(config.reconnect_max_ms.max(1)),
                ),
                timeout: config.request_timeout(),
                shutdown: shutdown.clone(),
                tls: tls.clone(),
                strays: strays.clone(),
                security: security.clone(),
                day: day.clone(),
            };
            tracker.spawn(task.run(rx));
            links.push(link);
        }
        let endpoint = Arc::new(Self {
            name: config.name.clone(),
            dialect,
            links,
            strategy,
            turn: AtomicUsize::new(0),
            timeout: config.request_timeout(),
            acquirer_id: config.acquirer_id.clone().or(default_acquirer_id),
            config: Arc::new(config.clone()),
            security,
            day: Arc::clone(&day.day),
        });
        (endpoint, strays_rx)
    }

    /// The endpoint's open business date.
    #[must_use]
    pub fn business_day(&self) -> &BusinessDay {
        &self.day
    }

    /// The endpoint's configuration.
    #[must_use]
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// The acquirer's dialect.
    #[must_use]
    pub fn dialect(&self) -> &Dialect {
        &self.dialect
    }

    /// DE32 sent to this acquirer.
    #[must_use]
    pub fn acquirer_id(&self) -> Option<&str> {
        self.acquirer_id.as_deref()
    }

    /// Keys and HSM, when the endpoint has security configured.
    #[must_use]
    pub fn security(&self) -> Option<&EndpointKeys> {
        self.security.as_ref()
    }

    /// Encodes a request for the wire, with a MAC under the ZAK when configured. A MAC the
    /// terminal sent is never passed on.
    async fn seal(&self, msg: &mut Message) -> Result<Option<Vec<u8>>, ()> {
        msg.remove(64);
        msg.remove(128);
        let Some(s) = self.security.as_ref().filter(|s| s.keys.generate_mac) else {
            return Ok(self.dialect.encode_to_vec(msg).ok());
        };
        let Some(zak) = &s.keys.zak else {
            return Err(());
        };
        let Ok((field, data)) = self.dialect.mac_input(msg) else {
            return Ok(None);
        };
        let mac = s
            .hsm
            .generate_mac(KeyType::ZAK, &zak.key, &data)
            .await
            .map_err(|e| warn!(endpoint = %self.name, error = %e, "MAC not generated"))?;
        msg.set(field, &mac);
        Ok(self.dialect.encode_to_vec(msg).ok())
    }

    /// The endpoint's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The links, in configured order.
    #[must_use]
    pub fn links(&self) -> &[Arc<Link>] {
        &self.links
    }

    /// Whether any link is ready.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.links.iter().any(|l| l.state() == LinkState::Ready)
    }

    /// DE32 and DE33 as this endpoint sends `request`: its acquirer id, else the request's.
    #[must_use]
    pub fn sent_ids<'a>(&'a self, request: &'a Message) -> (Option<&'a str>, Option<&'a str>) {
        (
            self.acquirer_id.as_deref().or_else(|| request.get_str(32)),
            request.get_str(33),
        )
    }

    /// Sends a request of transaction `txn_id` to the acquirer and waits for the answer; with
    /// `ahead`, its write-ahead record is committed before it goes on a link.
    pub(crate) async fn exchange(
        &self,
        request: &Message,
        txn_id: i64,
        ahead: Option<&Ahead<'_>>,
    ) -> Upstream {
        let mut outgoing = request.clone();
        if let Some(id) = &self.acquirer_id {
            outgoing.set(32, id.as_bytes());
        }
        let mut excluded = 0u64;
        let views: Vec<LinkView> = self.links.iter().map(|l| l.view()).collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        loop {
            let Some(i) = self.strategy.choose(&views, turn, excluded) else {
                return Upstream::NotSent;
            };
            excluded |= 1u64 << i;
            let Some(link) = self.links.get(i) else {
                return Upstream::NotSent;
            };
            if link.state() != LinkState::Ready {
                continue;
            }
            let stan = link.next_stan();
            let mut msg = outgoing.clone();
            msg.set_stan(stan);
            let body = match self.seal(&mut msg).await {
                Ok(Some(body)) => body,
                Ok(None) => continue,
                Err(()) => return Upstream::Unsigned,
            };
            if let Some(a) = ahead {
                if !a.record(&self.name, &link.addr, &msg).await {
                    return Upstream::Unrecorded;
                }
            }
            let Some(rx) = link.submit(stan, msg.mti(), body, txn_id) else {
                continue;
            };
            return match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(mut reply)) => {
                    if let Some(terminal_stan) = request.get(11) {
                        reply.set(11, terminal_stan);
                    }
                    Upstream::Reply(reply, Arc::clone(&link.addr), stan)
                }
                Ok(Err(_)) => Upstream::Lost(Arc::clone(&link.addr), stan),
                Err(_) => {
                    if link.forget(stan) {
                        link.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                    Upstream::TimedOut(Arc::clone(&link.addr), stan)
                }
            };
        }
    }

    /// The terminal's response built from its request and the acquirer's reply.
    #[must_use]
    pub fn relay(request: &Message, reply: &Message) -> Option<Message> {
        let mut out = request.response()?;
        for &f in REPLY_FIELDS {
            if let Some(v) = reply.get(f) {
                out.set(f, v);
            }
        }
        if !out.has(39) {
            out.set_response_code(ResponseCode::SYSTEM_MALFUNCTION);
        }
        Some(out)
    }
}

struct LinkTask {
    link: Arc<Link>,
    endpoint: String,
    dialect: Dialect,
    framing: Framing,
    sign_on: bool,
    echo_interval: Duration,
    max_missed: u32,
    reconnect: (Duration, Duration),
    timeout: Duration,
    shutdown: CancellationToken,
    tls: Option<Connector>,
    strays: mpsc::Sender<Stray>,
    security: Option<EndpointKeys>,
    day: EndpointDay,
}

/// An endpoint's business date and where its cutovers are recorded.
#[derive(Debug, Clone)]
pub struct EndpointDay {
    /// The open date.
    pub day: Arc<BusinessDay>,
    /// Cutovers to record.
    pub cutovers: mpsc::Sender<Cutover>,
}

/// A link as the reconnecting loop sees it: its task and its queue of requests.
struct LinkPeer<'a> {
    task: &'a LinkTask,
    queue: mpsc::Receiver<Frame>,
}

impl Peer for LinkPeer<'_> {
    fn addr(&self) -> &str {
        &self.task.link.addr
    }

    async fn serve(&mut self, stream: TcpStream) -> Ended {
        let t = self.task;
        match &t.tls {
            None => {
                t.set_state(LinkState::Connected);
                info!(endpoint = %t.endpoint, link = %t.link.addr, "link connected");
                t.serve(
                    Framed::new(stream, FrameCodec::new(t.framing)),
                    &mut self.queue,
                )
                .await
            }
            Some(tls) => {
                let Some(secure) = t.handshake(tls, stream).await else {
                    return Ended::NotUp;
                };
                t.set_state(LinkState::Connected);
                info!(endpoint = %t.endpoint, link = %t.link.addr, "link connected (TLS)");
                t.serve(
                    Framed::new(secure, FrameCodec::new(t.framing)),
                    &mut self.queue,
                )
                .await
            }
        }
    }

    fn ended(&mut self, how: Ended) {
        let t = self.task;
        t.set_state(LinkState::Disconnected);
        t.link.fail_all();
        // Requests queued but not written: their waiters were just failed.
        while self.queue.try_recv().is_ok() {}
        if how != Ended::Shutdown {
            warn!(endpoint = %t.endpoint, link = %t.link.addr, "link lost");
        }
    }

    fn unreachable(&mut self) {
        debug!(endpoint = %self.task.endpoint, link = %self.task.link.addr, "connect failed");
    }
}

impl LinkTask {
    fn set_state(&self, state: LinkState) {
        self.link.state.store(state as u8, Ordering::Release);
        metrics::gauge!(telemetry::LINK_STATE, "endpoint" => self.endpoint.clone(), "link" => self.link.addr.to_string())
            .set(f64::from(state as u8));
    }

    async fn run(self, queue: mpsc::Receiver<Frame>) {
        let mut peer = LinkPeer { task: &self, queue };
        keep_connected(
            &mut peer,
            self.timeout.max(Duration::from_secs(1)),
            Backoff::new(self.reconnect.0, self.reconnect.1),
            &self.shutdown,
        )
        .await;
    }

    async fn handshake(
        &self,
        tls: &Connector,
        stream: TcpStream,
    ) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match tls.name_for(&self.link.addr) {
            Ok(n) => n,
            Err(e) => {
                warn!(endpoint = %self.endpoint, link = %self.link.addr, error = %e, "TLS server name");
                return None;
            }
        };
        match tokio::time::timeout(
            self.timeout.max(Duration::from_secs(1)),
            tls.connector.connect(name, stream),
        )
        .await
        {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                warn!(endpoint = %self.endpoint, link = %self.link.addr, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                warn!(endpoint = %self.endpoint, link = %self.link.addr, "TLS handshake timed out");
                None
            }
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut framed: Framed<S, FrameCodec>,
        queue: &mut mpsc::Receiver<Frame>,
    ) -> Ended {
        if self.sign_on {
            if let Err(ended) = self.sign_on(&mut framed).await {
                return ended;
            }
        }
        self.set_state(LinkState::Ready);
        info!(endpoint = %self.endpoint, link = %self.link.addr, "link ready");
        let mut missed = 0u32;
        let mut echo_stan: Option<u32> = None;
        let mut idle = tokio::time::interval_at(
            tokio::time::Instant::now() + self.echo_interval,
            self.echo_interval,
        );
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    // Sign off; the reply is not awaited.
                    let _ = self.send_network(&mut framed, "002").await;
                    return Ended::Shutdown;
                }
                frame = queue.recv() => {
                    let Some(frame) = frame else { return Ended::Shutdown };
                    if write_coalesced(&mut framed, frame, queue).await.is_err() {
                        return Ended::Broken;
                    }
                }
                incoming = framed.next() => {
                    let Some(Ok(frame)) = incoming else { return Ended::Broken };
                    idle.reset();
                    if frame.is_keepalive() {
                        continue;
                    }
                    let Ok(reply) = self.dialect.decode(&frame.body) else {
                        warn!(endpoint = %self.endpoint, link = %self.link.addr, "undecodable frame from acquirer");
                        continue;
                    };
                    if reply.mti() == Mti::NETWORK_RESPONSE && reply.stan().is_some() && reply.stan() == echo_stan {
                        missed = 0;
                        echo_stan = None;
                        continue;
                    }
                    if reply.mti() == Mti::NETWORK_REQUEST {
                        self.acquirer_request(reply, &mut framed).await;
                        continue;
                    }
                    if let Err(reply) = self.link.deliver(reply) {
                        // Late (already timed out), a second copy, or never asked for.
                        match self.link.classify(reply) {
                            None => debug!(endpoint = %self.endpoint, link = %self.link.addr, "second copy of a reply ignored"),
                            Some(stray) => {
                                if matches!(stray, Stray::Unmatched { .. }) {
                                    warn!(endpoint = %self.endpoint, link = %self.link.addr, "unmatched reply from acquirer");
                                }
                                if self.strays.try_send(stray).is_err() {
                                    warn!(endpoint = %self.endpoint, "stray replies backlog full; one dropped");
                                }
                            }
                        }
                    }
                }
                _ = idle.tick() => {
                    if echo_stan.is_some() {
                        missed += 1;
                        if missed >= self.max_missed {
                            warn!(endpoint = %self.endpoint, link = %self.link.addr, missed, "echo tests missed; dropping link");
                            return Ended::Broken;
                        }
                    }
                    echo_stan = self.send_network(&mut framed, "301").await;
                    if echo_stan.is_none() {
                        return Ended::Broken;
                    }
                }
            }
        }
    }
}
