//! What the end-to-end test files share: a PostgreSQL schema per test (dropped when the test
//! ends), the acquirer simulator, a terminal connection, a sample request. Each file uses a
//! part of it.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use cardswitch_codec::framing::{Frame, FrameCodec, Framing};
use cardswitch_codec::{sample, Dialect, Message};
use cardswitch_simulators::acquirer::AcquirerSecurity;
use cardswitch_simulators::{Acquirer, AcquirerConfig, Rules};
use futures_util::{SinkExt, StreamExt};
use sqlx::PgPool;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// `TEST_DATABASE_URL`, default the local test database.
pub fn pg_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of one test: dropped when this guard is (keep it bound to the end of the test).
pub struct Schema(String);

impl Drop for Schema {
    fn drop(&mut self) {
        // Drop cannot wait on the test's runtime: a thread of its own, with a lock timeout so
        // that a switch still writing cannot hold the test up.
        let schema = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(pool) = PgPool::connect(&pg_url()).await {
                    let _ = sqlx::query("SET lock_timeout = '5s'").execute(&pool).await;
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&pool)
                        .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// A test's database: the URL selecting its schema (through `search_path`), a pool on it, and
/// the guard that drops the schema.
pub struct TestDb(pub String, pub PgPool, pub Schema);

/// A fresh schema for one test.
pub async fn pg_schema(name: &str) -> TestDb {
    let schema = format!("ci_{name}_{}_{}", std::process::id(), fastrand::u32(..));
    let pool = PgPool::connect(&pg_url()).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let sep = if pg_url().contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}options=-csearch_path%3D{schema}", pg_url());
    let pool = PgPool::connect(&url).await.unwrap();
    TestDb(url, pool, Schema(schema))
}

/// The keys (PAN HMAC and data) of the tests' journals.
pub const DATA_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The acquirer simulator's configuration the tests start from: a free port, `iso87-ascii`,
/// 2-byte lengths, default rules, no TLS, no keys. A test changes what it needs
/// (`AcquirerConfig { rules, ..acquirer_config() }`).
pub fn acquirer_config() -> AcquirerConfig {
    AcquirerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dialect: Dialect::builtin("iso87-ascii").unwrap(),
        framing: Framing::default(),
        rules: Rules::default_rules(),
        tls: None,
        security: None,
    }
}

/// The acquirer simulator on a free port: default rules, these keys.
pub async fn acquirer(security: Option<AcquirerSecurity>) -> Acquirer {
    start_acquirer(AcquirerConfig {
        security,
        ..acquirer_config()
    })
    .await
}

/// The acquirer simulator with these rules on `listen` (`127.0.0.1:0`: a free port).
pub async fn acquirer_at(listen: SocketAddr, rules: Rules) -> Acquirer {
    start_acquirer(AcquirerConfig {
        listen,
        rules,
        ..acquirer_config()
    })
    .await
}

/// The acquirer simulator with these rules on a free port.
pub async fn acquirer_with(rules: Rules) -> Acquirer {
    acquirer_at("127.0.0.1:0".parse().unwrap(), rules).await
}

/// Starts the acquirer simulator.
pub async fn start_acquirer(config: AcquirerConfig) -> Acquirer {
    Acquirer::start(config).await.unwrap()
}

/// A loopback address nothing listens on now.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A terminal connection speaking `iso87-ascii` with 2-byte lengths, over TCP or any other
/// stream (TLS).
pub struct Terminal<S = TcpStream> {
    pub framed: Framed<S, FrameCodec>,
    pub dialect: Dialect,
}

impl Terminal {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).await.unwrap())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Terminal<S> {
    /// A terminal on a connected stream.
    pub fn over(stream: S) -> Self {
        Self {
            framed: Framed::new(stream, FrameCodec::new(Framing::default())),
            dialect: Dialect::builtin("iso87-ascii").unwrap(),
        }
    }

    /// The reply to `m`, or `None` when the connection fails or closes or nothing comes
    /// within 5 s.
    pub async fn try_exchange(&mut self, m: &Message) -> Option<Message> {
        let body = self.dialect.encode_to_vec(m).unwrap();
        self.framed.send(Frame::new(body)).await.ok()?;
        let f = tokio::time::timeout(Duration::from_secs(5), self.framed.next())
            .await
            .ok()??
            .ok()?;
        Some(self.dialect.decode(&f.body).unwrap())
    }

    pub async fn send(&mut self, m: &Message) {
        self.send_raw(self.dialect.encode_to_vec(m).unwrap()).await;
    }

    /// Sends a frame body as it is (garbage included).
    pub async fn send_raw(&mut self, body: Vec<u8>) {
        self.framed.send(Frame::new(body)).await.unwrap();
    }

    pub async fn recv(&mut self) -> Message {
        let f = tokio::time::timeout(Duration::from_secs(10), self.framed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        self.dialect.decode(&f.body).unwrap()
    }

    pub async fn exchange(&mut self, m: &Message) -> Message {
        self.send(m).await;
        self.recv().await
    }

    /// The response code of the reply.
    pub async fn code(&mut self, m: &Message) -> String {
        self.exchange(m).await.get_str(39).unwrap().to_owned()
    }
}

/// Runs a command with `stdin` written to its standard input; its output.
pub fn run_with_stdin(mut command: std::process::Command, stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// The response code of a reply.
pub fn rc(msg: &Message) -> String {
    msg.response_code().unwrap().to_string()
}

/// A terminal's reversal of `original` (new STAN, DE90 naming the original by the terminal's
/// own STAN and DE7, as a terminal knows it).
pub fn terminal_reversal(original: &Message, mti: cardswitch_codec::Mti, stan: u32) -> Message {
    let mut r = original.clone();
    r.set_mti(mti);
    let de90 = format!(
        "{}{}{}{:0>11}{:0>11}",
        original.mti(),
        original.get_str(11).unwrap(),
        original.get_str(7).unwrap(),
        "",
        ""
    );
    r.set(90, de90.as_bytes());
    r.set_stan(stan);
    r.remove(52);
    r.remove(55);
    r
}

/// The state of the first journal row with this RRN and MTI.
pub async fn state_of(pool: &PgPool, rrn: &str, mti: &str) -> String {
    sqlx::query_scalar(
        "SELECT state FROM transactions WHERE rrn = $1 AND mti = $2 ORDER BY id LIMIT 1",
    )
    .bind(rrn)
    .bind(mti)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until `check` holds (polling), or fails the test after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `cardswitch run` as a process of its own on a configuration file, killed with SIGKILL
/// (`kill -9`) when dropped, so a failed test leaves nothing running.
pub struct SwitchProcess {
    child: Option<std::process::Child>,
    config: PathBuf,
    /// The terminal listener's address.
    pub addr: SocketAddr,
}

impl SwitchProcess {
    /// Writes `config` with its listener on a free port and starts the switch on it; returns
    /// once the listener accepts.
    pub async fn start(config: SwitchConfig, tag: &str) -> Self {
        let addr = free_addr();
        let config = config.listener("address", addr.to_string()).write(tag);
        let mut p = Self {
            child: None,
            config,
            addr,
        };
        p.restart().await;
        p
    }

    /// Starts the switch (again) on the same configuration and port.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = Some(
            std::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
                .args(["run", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(self.addr).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the switch did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM: the switch drains, then stops.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }

    /// How the process ended, once it has, within `within`; `None` if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SwitchProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// The sample 0100 with this amount, STAN and RRN.
pub fn request(amount: u64, stan: u32, rrn: &str) -> Message {
    let mut m = sample::auth_request();
    m.set_amount(amount);
    m.set_stan(stan);
    m.set(37, rrn.as_bytes());
    m
}

/// A switch configuration for tests: listener `pos` and endpoint `acq` on loopback, the card
/// range 476173 routed to it, the journal at a URL; each test adds what it needs. Built as a TOML
/// document, so it is read exactly as an operator's file is.
pub struct SwitchConfig {
    doc: toml::Table,
    env: Vec<(String, String)>,
}

/// Merges `from` into `into`: tables key by key, any other value replaced.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl SwitchConfig {
    /// The minimal configuration: journal `journal_url` (empty: `DATABASE_URL`), endpoint `acq`
    /// with one link to `link`.
    pub fn new(journal_url: &str, link: impl std::fmt::Display) -> Self {
        static SPOOLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let spool = std::env::temp_dir().join(format!(
            "cardswitch-test-spool-{}-{}",
            std::process::id(),
            SPOOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let spool = spool.display();
        let doc = toml::from_str(&format!(
            r#"
[journal]
url = "{journal_url}"
ephemeral_keys = true
spool_dir = "{spool}"
[[listeners]]
name = "pos"
address = "127.0.0.1:0"
[[endpoints]]
name = "acq"
links = ["{link}"]
[[routes]]
prefix = "476173"
endpoint = "acq"
"#
        ))
        .unwrap();
        Self {
            doc,
            env: Vec::new(),
        }
    }

    /// Merges a TOML fragment (`[switch]\nshutdown_grace_ms = 2000`) into the document.
    pub fn toml(mut self, fragment: &str) -> Self {
        merge(&mut self.doc, toml::from_str(fragment).unwrap());
        self
    }

    /// Merges a TOML fragment into the listener (`tls = {...}`, `[security]` ...).
    pub fn listener_toml(mut self, fragment: &str) -> Self {
        merge(self.first("listeners"), toml::from_str(fragment).unwrap());
        self
    }

    /// Merges a TOML fragment into the endpoint (`request_timeout_ms = 300`, `[saf]` ...).
    pub fn endpoint_toml(mut self, fragment: &str) -> Self {
        merge(self.first("endpoints"), toml::from_str(fragment).unwrap());
        self
    }

    fn first(&mut self, array: &str) -> &mut toml::Table {
        self.doc[array].as_array_mut().unwrap()[0]
            .as_table_mut()
            .unwrap()
    }

    /// Sets `key` of section `section` (`journal`, `admin`, `fraud` ...), making the section.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<toml::Value>) -> Self {
        self.doc
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap()
            .insert(key.to_owned(), value.into());
        self
    }

    /// The journal's PAN HMAC and data keys set (`DATA_KEY`), as a production switch has them.
    pub fn keys(mut self) -> Self {
        if let Some(j) = self
            .doc
            .get_mut("journal")
            .and_then(toml::Value::as_table_mut)
        {
            j.remove("ephemeral_keys");
        }
        self.set("journal", "pan_hmac_key", DATA_KEY)
            .set("journal", "data_key", DATA_KEY)
    }

    /// The admin side on a free port with this token.
    pub fn admin(self, token: &str) -> Self {
        self.set("admin", "address", "127.0.0.1:0")
            .set("admin", "token", token)
    }

    /// Sets `key` of the endpoint, or of its sub-section with `sub` (`settlement`, `saf` ...).
    pub fn endpoint(mut self, sub: Option<&str>, key: &str, value: impl Into<toml::Value>) -> Self {
        let e = self.first("endpoints");
        let t = match sub {
            None => e,
            Some(s) => e
                .entry(s)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap(),
        };
        t.insert(key.to_owned(), value.into());
        self
    }

    /// The endpoint's links.
    pub fn links<L: std::fmt::Display>(self, links: &[L]) -> Self {
        let links: Vec<String> = links.iter().map(ToString::to_string).collect();
        self.endpoint(None, "links", links)
    }

    /// Sets `key` of the listener.
    pub fn listener(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.first("listeners").insert(key.to_owned(), value.into());
        self
    }

    /// One more listener, `name` on a free loopback port, with these settings (a TOML fragment).
    pub fn add_listener(mut self, name: &str, fragment: &str) -> Self {
        let mut l: toml::Table = toml::from_str(fragment).unwrap();
        l.insert("name".into(), name.into());
        l.insert("address".into(), "127.0.0.1:0".into());
        self.doc["listeners"]
            .as_array_mut()
            .unwrap()
            .push(toml::Value::Table(l));
        self
    }

    /// Routes one more card range to the endpoint.
    pub fn route(self, prefix: &str) -> Self {
        self.route_to(prefix, "acq", None)
    }

    /// Routes a card range to an endpoint, with a fallback endpoint.
    pub fn route_to(mut self, prefix: &str, endpoint: &str, fallback: Option<&str>) -> Self {
        let mut r = toml::Table::new();
        r.insert("prefix".into(), prefix.into());
        r.insert("endpoint".into(), endpoint.into());
        if let Some(f) = fallback {
            r.insert("fallback".into(), f.into());
        }
        self.doc["routes"]
            .as_array_mut()
            .unwrap()
            .push(toml::Value::Table(r));
        self
    }

    /// Only these routes (the default 476173 -> `acq` goes).
    pub fn no_routes(mut self) -> Self {
        self.doc["routes"].as_array_mut().unwrap().clear();
        self
    }

    /// One more endpoint, `name` with one link, and these settings (a TOML fragment).
    pub fn add_endpoint(
        mut self,
        name: &str,
        link: impl std::fmt::Display,
        fragment: &str,
    ) -> Self {
        let mut e: toml::Table = toml::from_str(fragment).unwrap();
        e.insert("name".into(), name.into());
        e.insert("links".into(), vec![link.to_string()].into());
        self.doc["endpoints"]
            .as_array_mut()
            .unwrap()
            .push(toml::Value::Table(e));
        self
    }

    /// An override in the environment form (`CARDSWITCH__ENDPOINTS__0__...`), read at start.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The configuration as TOML.
    pub fn text(&self) -> String {
        toml::to_string(&self.doc).unwrap()
    }

    /// Writes the configuration to a file of its own (unique per `tag` and process); its path.
    pub fn write(&self, tag: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("cardswitch-{tag}-{}.toml", std::process::id()));
        std::fs::write(&path, self.text()).unwrap();
        path
    }

    /// The validated configuration.
    pub fn config(&self) -> cardswitch::config::Validated {
        cardswitch::config::Config::from_toml(&self.text(), self.env.clone()).unwrap()
    }

    /// Starts the switch without waiting for its links (a test whose acquirer is down).
    pub async fn launch(&self) -> cardswitch::server::Switch {
        cardswitch::server::Switch::start(self.config())
            .await
            .unwrap()
    }

    /// Starts the switch and waits until its link is ready.
    pub async fn start(&self) -> cardswitch::server::Switch {
        let sw = self.launch().await;
        assert!(sw.wait_ready(Duration::from_secs(5)).await);
        sw
    }
}

/// An HTTP GET (blocking, run off the runtime): status and body, `None` when nothing answers.
pub async fn http_get(url: String, token: Option<&str>) -> Option<(u16, String)> {
    let token = token.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut req = ureq::get(&url);
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut r = req
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .call()
            .ok()?;
        Some((
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ))
    })
    .await
    .unwrap()
}

/// HAProxy (from the system, `haproxy` on the PATH) running `specs/haproxy.cfg`, its addresses
/// set through the environment; killed when dropped.
pub struct Haproxy {
    child: std::process::Child,
    /// Where terminals connect.
    pub front: SocketAddr,
    stats: SocketAddr,
}

impl Haproxy {
    /// In front of two nodes, each given by its terminal listener and admin addresses.
    pub fn start(nodes: [(SocketAddr, SocketAddr); 2]) -> Self {
        let front = free_addr();
        let stats = free_addr();
        let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/specs/haproxy.cfg");
        let [(a, a_admin), (b, b_admin)] = nodes;
        let child = std::process::Command::new("haproxy")
            .args(["-db", "-f", spec])
            .env("CARDSWITCH_FRONT", front.to_string())
            .env("CARDSWITCH_STATS", stats.to_string())
            .env("CARDSWITCH_NODE_A", a.to_string())
            .env("CARDSWITCH_NODE_A_ADMIN", a_admin.port().to_string())
            .env("CARDSWITCH_NODE_B", b.to_string())
            .env("CARDSWITCH_NODE_B_ADMIN", b_admin.port().to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Fails when HAProxy is not installed (Debian package `haproxy`; .ci/run installs it).
            .spawn()
            .unwrap();
        Self {
            child,
            front,
            stats,
        }
    }

    /// Waits until HAProxy's health checks see both nodes up.
    pub async fn wait_up(&self) {
        for name in ["node-a", "node-b"] {
            eventually(
                Duration::from_secs(10),
                "HAProxy sees the node up",
                || async { self.status_of(name).await.as_deref() == Some("UP") },
            )
            .await;
        }
    }

    /// HAProxy's view of server `name` of the nodes' backend (`UP`, `DOWN`, `MAINT` ...).
    pub async fn status_of(&self, name: &str) -> Option<String> {
        let (_, csv) = http_get(format!("http://{}/stats;csv", self.stats), None).await?;
        csv.lines().find_map(|l| {
            let mut cols = l.split(',');
            (cols.next() == Some("switch_nodes") && cols.next() == Some(name))
                .then(|| l.split(',').nth(17).unwrap_or("").to_owned())
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Relays every connection made to `listen` to `to`, from now on (a link that comes up later).
pub async fn tcp_relay(listen: SocketAddr, to: SocketAddr) {
    let l = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
}
