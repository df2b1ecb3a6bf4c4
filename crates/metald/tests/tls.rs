//! Mutual TLS on the TCP listener, with certificates made by the test (rcgen): a caller without
//! a certificate, or with one from another CA, gets nothing; a tenant's certificate is scoped to
//! its customers by its SPIFFE ID; certificates are reloaded on SIGHUP.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use metald_api::v1 as pb;
use metald_api::v1::vm_service_client::VmServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A CA: its certificate (PEM and DER) and what signs with it.
struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().clone(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate signed by `ca`: (cert PEM, key PEM, cert DER, key DER).
fn leaf(
    ca: &Ca,
    cn: &str,
    dns: &[&str],
    uri: Option<&str>,
) -> (
    String,
    String,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(dns.iter().map(|s| (*s).to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    if let Some(u) = uri {
        p.subject_alt_names
            .push(SanType::URI(u.try_into().unwrap()));
    }
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone(), key_der)
}

/// A gRPC client over TLS to `addr`, trusting `server_ca`, presenting `client` if any.
async fn client(
    addr: &str,
    server_ca: &Ca,
    client: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<VmServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let addr = addr.to_string();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(VmServiceClient::new(ch))
}

/// The certificate the server at `addr` presents, as DER.
async fn server_cert(
    addr: &str,
    server_ca: &Ca,
    me: (CertificateDer<'static>, PrivateKeyDer<'static>),
) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![me.0], me.1)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const ACME: &str = "spiffe://example.org/tenant/acme";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_identifies_callers_by_their_certificates() {
    let dir = std::env::temp_dir().join(format!("mdt-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca1, ca2) = (ca("metald test ca"), ca("another ca"));
    let (server_pem, server_key, server_der, _) = leaf(&ca1, "metald", &["localhost"], None);
    write(&dir, "server.pem", &server_pem);
    write(&dir, "server.key", &server_key);
    write(&dir, "ca.pem", &ca1.pem);
    let toml = format!(
        "[auth.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_ca = \"{d}/ca.pem\"\n\
         [[auth.callers]]\nidentity = \"{ACME}\"\nrole = \"tenant\"\ncustomers = [\"acme\"]\n\
         [[auth.callers]]\nidentity = \"ops-admin\"\nrole = \"admin\"\n",
        d = dir.display()
    );
    let d = Daemon::start_with_toml_args(&toml, vec!["--listen".into(), "tcp:127.0.0.1:0".into()])
        .await;
    let line = d
        .wait_log_since(0, Duration::from_secs(5), |l| l.contains("metald ready"))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["local_addr"].as_str().unwrap().to_string();

    // No client certificate: nothing is served.
    let refused = match client(&addr, &ca1, None).await {
        Err(_) => true,
        Ok(mut c) => c.list_vms(pb::ListVmsRequest::default()).await.is_err(),
    };
    assert!(refused, "a caller without a certificate was served");
    // A certificate from another CA: nothing either.
    let (_, _, other_der, other_key) = leaf(&ca2, "intruder", &[], Some(ACME));
    let refused = match client(&addr, &ca1, Some((other_der, other_key))).await {
        Err(_) => true,
        Ok(mut c) => c.list_vms(pb::ListVmsRequest::default()).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");

    // The tenant's certificate: its SPIFFE ID makes it acme's tenant.
    let (_, _, acme_der, acme_key) = leaf(&ca1, "acme-control-plane", &[], Some(ACME));
    let mut acme = client(&addr, &ca1, Some((acme_der.clone(), acme_key.clone_key())))
        .await
        .unwrap();
    acme.list_vms(pb::ListVmsRequest::default()).await.unwrap();
    let mut req = guest_request("t1");
    req.customer_id = "globex".into();
    let e = acme.create_vm(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = acme.reconcile(pb::ReconcileRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A certificate from the right CA that no rule names: unauthenticated. Without a URI SAN
    // its CN is its identity.
    let (_, _, nobody_der, nobody_key) = leaf(&ca1, "nobody", &[], None);
    let mut nobody = client(&addr, &ca1, Some((nobody_der, nobody_key)))
        .await
        .unwrap();
    let e = nobody
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let (_, _, admin_der, admin_key) = leaf(&ca1, "ops-admin", &[], None);
    let mut admin = client(&addr, &ca1, Some((admin_der, admin_key)))
        .await
        .unwrap();
    admin.reconcile(pb::ReconcileRequest {}).await.unwrap();

    // SIGHUP reloads the files: new connections get the new certificate.
    assert_eq!(
        server_cert(&addr, &ca1, (acme_der.clone(), acme_key.clone_key())).await,
        server_der.to_vec()
    );
    let (new_pem, new_key, new_der, _) = leaf(&ca1, "metald-renewed", &["localhost"], None);
    write(&dir, "server.pem", &new_pem);
    write(&dir, "server.key", &new_key);
    let mark = d.log_mark();
    d.signal(libc::SIGHUP);
    assert!(
        d.wait_log_since(mark, Duration::from_secs(5), |l| l
            .contains("tls certificates reloaded"))
            .await
            .is_some()
    );
    assert_eq!(
        server_cert(&addr, &ca1, (acme_der.clone(), acme_key.clone_key())).await,
        new_der.to_vec()
    );
    // A reload that fails keeps what is in use.
    write(&dir, "server.key", "not a key");
    let mark = d.log_mark();
    d.signal(libc::SIGHUP);
    assert!(
        d.wait_log_since(mark, Duration::from_secs(5), |l| l
            .contains("tls reload failed"))
            .await
            .is_some()
    );
    assert_eq!(
        server_cert(&addr, &ca1, (acme_der, acme_key)).await,
        new_der.to_vec()
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_tls_file_that_cannot_be_loaded_stops_metald() {
    let dir = std::env::temp_dir().join(format!("mdt-tlsbad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = write(
        &dir,
        "metald.toml",
        &format!(
            "[auth.tls]\ncert = \"{d}/missing.pem\"\nkey = \"{d}/missing.key\"\nclient_ca = \"{d}/ca.pem\"\n",
            d = dir.display()
        ),
    );
    let said = metald_refuses_to_start(&[
        "--config",
        &cfg.display().to_string(),
        "--listen",
        "tcp:127.0.0.1:0",
    ])
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(said.contains("auth.tls.cert"), "{said}");
}
