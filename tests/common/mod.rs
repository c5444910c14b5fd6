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

/// The acquirer simulator on a free port: `iso87-ascii`, default rules, these keys.
pub async fn acquirer(security: Option<AcquirerSecurity>) -> Acquirer {
    Acquirer::start(AcquirerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dialect: Dialect::builtin("iso87-ascii").unwrap(),
        framing: Framing::default(),
        rules: Rules::default_rules(),
        tls: None,
        security,
    })
    .await
    .unwrap()
}

/// A terminal connection speaking `iso87-ascii` with 2-byte lengths.
pub struct Terminal {
    pub framed: Framed<TcpStream, FrameCodec>,
    pub dialect: Dialect,
}

impl Terminal {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            framed: Framed::new(
                TcpStream::connect(addr).await.unwrap(),
                FrameCodec::new(Framing::default()),
            ),
            dialect: Dialect::builtin("iso87-ascii").unwrap(),
        }
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
}

impl SwitchConfig {
    /// The minimal configuration: journal `journal_url`, endpoint `acq` with one link to `link`.
    pub fn new(journal_url: &str, link: impl std::fmt::Display) -> Self {
        let doc = toml::from_str(&format!(
            r#"
[journal]
url = "{journal_url}"
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
        Self { doc }
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

    /// The admin side on a free port with this token.
    pub fn admin(self, token: &str) -> Self {
        self.set("admin", "address", "127.0.0.1:0")
            .set("admin", "token", token)
    }

    /// Sets `key` of the endpoint, or of its sub-section with `sub` (`settlement`, `saf` ...).
    pub fn endpoint(mut self, sub: Option<&str>, key: &str, value: impl Into<toml::Value>) -> Self {
        let e = self.doc["endpoints"].as_array_mut().unwrap()[0]
            .as_table_mut()
            .unwrap();
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

    /// Sets `key` of the listener.
    pub fn listener(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.doc["listeners"].as_array_mut().unwrap()[0]
            .as_table_mut()
            .unwrap()
            .insert(key.to_owned(), value.into());
        self
    }

    /// Routes one more card range to the endpoint.
    pub fn route(mut self, prefix: &str) -> Self {
        let mut r = toml::Table::new();
        r.insert("prefix".into(), prefix.into());
        r.insert("endpoint".into(), "acq".into());
        self.doc["routes"]
            .as_array_mut()
            .unwrap()
            .push(toml::Value::Table(r));
        self
    }

    /// The configuration as TOML.
    pub fn text(&self) -> String {
        toml::to_string(&self.doc).unwrap()
    }

    /// Starts the switch and waits until its link is ready.
    pub async fn start(&self) -> cardswitch::server::Switch {
        let config = cardswitch::config::Config::from_toml(&self.text(), Vec::new()).unwrap();
        let sw = cardswitch::server::Switch::start(config).await.unwrap();
        assert!(sw.wait_ready(Duration::from_secs(5)).await);
        sw
    }
}
