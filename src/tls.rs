//! TLS for terminal listeners (server certificate, optional client-certificate verification) and
//! acquirer links (CA to trust, optional client certificate), with rustls. TLS 1.2 and 1.3 only.
//! Certificates and keys are PEM files, read when the configuration is validated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// `tls = { ... }` on a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// When set, terminals must present a certificate issued by this CA (PEM).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `tls = { ... }` on an endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// CA certificates to trust (PEM).
    pub ca: PathBuf,
    /// Name to verify in the acquirer's certificate; default: the host of each link.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate chain for mutual TLS (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// A ready TLS acceptor.
#[derive(Clone)]
pub struct Acceptor(pub TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// A ready TLS connector and the name to verify (when fixed by configuration).
#[derive(Clone)]
pub struct Connector {
    /// The connector.
    pub connector: TlsConnector,
    /// The configured server name, if any.
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("{}: no PEM private key", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .with_context(|| format!("{}: unusable CA certificate", path.display()))?;
    }
    Ok(store)
}

impl ServerTls {
    /// Builds the acceptor.
    ///
    /// # Errors
    /// Unreadable or invalid PEM files, a key that does not match the certificate.
    pub fn acceptor(&self) -> Result<Acceptor> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()?,
            ),
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .context("server certificate and key")?;
        Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
    }
}

impl ClientTls {
    /// Builds the connector.
    ///
    /// # Errors
    /// Unreadable or invalid PEM files, a bad server name, a client key without certificate.
    pub fn connector(&self) -> Result<Connector> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&self.ca)?);
        let config = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs(c)?, key(k)?)
                .context("client certificate and key")?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(anyhow!("tls: cert and key go together")),
        };
        let server_name = match &self.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| anyhow!("tls.server_name {n:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(Connector {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

impl Connector {
    /// The name to verify for a link `host:port`.
    ///
    /// # Errors
    /// When the host is not a valid DNS name or IP address.
    pub fn name_for(&self, link: &str) -> Result<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = link
            .rsplit_once(':')
            .map_or(link, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|e| anyhow!("link {link}: {e}"))
    }
}
