//! TLS on both sides, with certificates made for the test (rcgen): a terminal listener that
//! requires client certificates, and an acquirer link to a TLS acquirer simulator.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use cardswitch::config::Config;
use cardswitch::server::Switch;
use cardswitch::tls::{ClientTls, ServerTls};
use cardswitch_codec::sample;
use cardswitch_simulators::AcquirerConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::net::TcpStream;

mod common;

use common::{SwitchConfig, Terminal};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "cardswitch-tls-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "cardswitch test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issue = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        issue(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        issue(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, "terminal");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "/")
}

/// The response code of the switch's reply to the sample request over `stream`; `None` when
/// nothing comes back.
async fn exchange<S>(stream: S) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let reply = Terminal::over(stream)
        .try_exchange(&sample::auth_request())
        .await?;
    Some(reply.response_code().unwrap().to_string())
}

#[tokio::test]
async fn tls_listener_with_client_certificates_and_tls_link() {
    let pki = Pki::new();
    let server_tls = ServerTls {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: None,
    };
    let acq = common::start_acquirer(AcquirerConfig {
        tls: Some(server_tls.acceptor().unwrap().0),
        ..common::acquirer_config()
    })
    .await;
    let ca = toml_path(&pki.path("ca.pem"));
    let text = SwitchConfig::new("sqlite::memory:", acq.local_addr())
        .listener("name", "pos-tls")
        .listener_toml(&format!(
            "tls = {{ cert = \"{cert}\", key = \"{key}\", client_ca = \"{ca}\" }}",
            cert = toml_path(&pki.path("server.pem")),
            key = toml_path(&pki.path("server.key")),
        ))
        .endpoint_toml(&format!("tls = {{ ca = \"{ca}\" }}"))
        .text();
    let sw = Switch::start(Config::from_toml(&text, Vec::new()).unwrap())
        .await
        .unwrap();
    assert!(
        sw.wait_ready(Duration::from_secs(5)).await,
        "the TLS link signs on"
    );
    let addr = sw.listener_addrs()[0];

    // A terminal with a certificate from the CA: approved, over TLS both ways.
    let with_cert = ClientTls {
        ca: pki.path("ca.pem"),
        server_name: Some("localhost".into()),
        cert: Some(pki.path("terminal.pem")),
        key: Some(pki.path("terminal.key")),
    }
    .connector()
    .unwrap();
    let name = with_cert.server_name.clone().unwrap();
    let stream = with_cert
        .connector
        .connect(name, TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    assert_eq!(exchange(stream).await.as_deref(), Some("00"));
    assert_eq!(acq.ledger().len(), 1);

    // Without a client certificate the switch refuses the terminal.
    let without = ClientTls {
        ca: pki.path("ca.pem"),
        server_name: Some("localhost".into()),
        cert: None,
        key: None,
    }
    .connector()
    .unwrap();
    let name = without.server_name.clone().unwrap();
    let refused = match without
        .connector
        .connect(name, TcpStream::connect(addr).await.unwrap())
        .await
    {
        Err(_) => true,
        Ok(stream) => exchange(stream).await.is_none(),
    };
    assert!(refused, "a terminal without a certificate got an answer");

    // Plain TCP to the TLS listener gets nothing either.
    assert_eq!(
        exchange(TcpStream::connect(addr).await.unwrap()).await,
        None
    );
    assert_eq!(acq.ledger().len(), 1);

    // A link that does not trust the acquirer's certificate never becomes ready.
    let other = Pki::new();
    let untrusting = text.replace(
        &toml_path(&pki.path("ca.pem")),
        &toml_path(&other.path("ca.pem")),
    );
    let sw2 = Switch::start(Config::from_toml(&untrusting, Vec::new()).unwrap())
        .await
        .unwrap();
    assert!(!sw2.wait_ready(Duration::from_millis(800)).await);
    sw2.shutdown().await;
    sw.shutdown().await;
    acq.stop().await;
}
