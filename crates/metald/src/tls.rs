//! Mutual TLS for the API's TCP listener. metald's certificate and key, and the CA that signs
//! its callers' certificates, come from files, loaded at start (a file that cannot be loaded
//! stops metald: it never falls back to plaintext) and again on SIGHUP (a reload that fails
//! keeps the files in use and says why). A caller must present a certificate from that CA; its
//! identity is the certificate's first URI SAN (a SPIFFE ID such as
//! `spiffe://example.org/tenant/acme`), or its subject's CN when it has none, and `[auth]`
//! rules map that identity to a role.
//!
//! Handshakes run in a task per connection, bounded in time, so that a client that connects
//! and says nothing holds up nobody else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// The `[auth.tls]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// metald's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificates that sign callers' certificates (PEM).
    pub client_ca: PathBuf,
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The loaded TLS settings, replaced whole by a reload.
#[derive(Debug)]
pub struct Tls {
    cfg: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(cfg: &TlsConfig) -> Result<Tls, String> {
        Ok(Tls {
            cfg: cfg.clone(),
            current: RwLock::new(Arc::new(server_config(cfg)?)),
        })
    }

    /// Loads the files again (SIGHUP). On error the settings in use stay.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = Arc::new(server_config(&self.cfg)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let cfg = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(cfg)
    }
}

fn server_config(cfg: &TlsConfig) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("auth.tls.cert {}: {e}", cfg.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "auth.tls.cert {}: no certificate in it",
            cfg.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| format!("auth.tls.key {}: {e}", cfg.key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&cfg.client_ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("auth.tls.client_ca {}: {e}", cfg.client_ca.display()))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| format!("auth.tls.client_ca {}: {e}", cfg.client_ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "auth.tls.client_ca {}: no CA certificate in it",
            cfg.client_ca.display()
        ));
    }
    // Every caller must present a certificate this CA signed: none, or another CA's, ends the
    // handshake.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("auth.tls.client_ca {}: {e}", cfg.client_ca.display()))?;
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("auth.tls.cert/key: {e}"))?;
    // gRPC is HTTP/2.
    sc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(sc)
}

/// A verified certificate's identity: its first URI SAN, else its subject's CN.
pub fn cert_identity(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return Some((*uri).to_string());
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Who is at the other end of a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    /// Its address.
    pub addr: Option<SocketAddr>,
    /// Its certificate's identity (see [`cert_identity`]).
    pub identity: Option<String>,
}

/// An accepted, verified TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The verified TLS connections `listener` accepts, each handshake in a task of its own.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of fds, say: the next accept may work; do not spin on it.
                        warn!(error = %e, "accepting a TCP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                // The server is gone: stop accepting.
                () = tx.closed() => return,
            };
            let (tx, acceptor) = (tx.clone(), tls.acceptor());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| cert_identity(c));
                        debug!(peer = %addr, identity = ?identity, "tls connection");
                        let conn = TlsConn {
                            inner: stream,
                            peer: TlsPeer {
                                addr: Some(addr),
                                identity,
                            },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        info!(peer = %addr, error = %e, "tls handshake refused");
                    }
                    Err(_) => info!(peer = %addr, "tls handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
