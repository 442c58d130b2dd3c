//! TLS for Tally's listeners (rustls, with ring), from a PEM certificate chain and private key.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// Why TLS could not be set up, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read the TLS certificate chain {path}: {detail}")]
    Certificate { path: String, detail: String },
    #[error("failed to read the TLS private key {path}: {detail}")]
    Key { path: String, detail: String },
    #[error("the TLS certificate and key do not make a server configuration: {0}")]
    Config(String),
    #[error("tls handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("tls handshake failed: {0}")]
    Handshake(std::io::Error),
}

/// A server-side TLS configuration, cheap to clone.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Tls")
    }
}

impl Tls {
    /// From a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert).and_then(|certs| certs.collect::<Result<_, _>>()).map_err(
                |error| TlsError::Certificate { path: cert.display().to_string(), detail: error.to_string() },
            )?;
        if chain.is_empty() {
            let path = cert.display().to_string();
            return Err(TlsError::Certificate { path, detail: "no certificate in the file".into() });
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|error| TlsError::Key { path: key.display().to_string(), detail: error.to_string() })?;
        Self::from_der(chain, key)
    }

    /// From DER certificates and key (tests make them in memory).
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Tls, TlsError> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|error| TlsError::Config(error.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    /// The server side of a handshake on an accepted connection, within `deadline`.
    pub async fn accept(
        &self,
        stream: TcpStream,
        deadline: Duration,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        match tokio::time::timeout(deadline, self.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(TlsError::Handshake(error)),
            Err(_) => Err(TlsError::HandshakeTimeout(deadline)),
        }
    }
}

/// The TLS flags every binary takes: both or neither.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first): serve every listener over TLS. Needs --tls-key.
    #[arg(long, env = "TALLY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the certificate. Needs --tls-cert.
    #[arg(long, env = "TALLY_TLS_KEY", requires = "tls_cert", hide_env_values = true)]
    pub tls_key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The configuration the flags name, if any.
    pub fn load(&self) -> Result<Option<Tls>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Tls::from_pem_files(cert, key).map(Some),
            _ => Ok(None),
        }
    }
}
