//! Both listeners over TLS: HTTP and the binary protocol answer through it, and a plain-TCP
//! client gets nothing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_util::codec::Framed;
use wire::{AckMode, Hello, Message, WireCodec};

use crate::support::{Backend, TestEdge};

/// A self-signed certificate for `localhost`, and a client that trusts only it.
fn certificate() -> Result<(serve::Tls, TlsConnector)> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let tls = serve::Tls::from_der(vec![cert.clone()], key)?;
    let mut roots = RootCertStore::empty();
    roots.add(cert)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((tls, TlsConnector::from(Arc::new(client))))
}

#[tokio::test(flavor = "multi_thread")]
async fn both_listeners_serve_over_tls() -> Result<()> {
    let (tls, connector) = certificate()?;
    let config = edge::EdgeConfig { tls: Some(tls), ..edge::EdgeConfig::default() };
    let edge = TestEdge::launch(Backend::Sqlite, config).await?;
    let name = ServerName::try_from("localhost")?;

    // HTTP over TLS.
    let tcp = tokio::net::TcpStream::connect(edge.edge.http_addr).await?;
    let mut stream = connector.connect(name.clone(), tcp).await.context("tls handshake (http)")?;
    stream.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The binary protocol over TLS: handshake and one stored event.
    let tcp = tokio::net::TcpStream::connect(edge.edge.wire_addr).await?;
    let stream = connector.connect(name, tcp).await.context("tls handshake (wire)")?;
    let mut framed = Framed::new(stream, WireCodec::new());
    let hello = Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        api_key: edge.key.clone(),
        client_name: "tls-test".into(),
        ack_mode: AckMode::Durable,
    };
    framed.send(Message::Hello(hello)).await?;
    let welcome = framed.next().await.context("closed")??.message()?;
    let Message::Welcome(welcome) = welcome else { anyhow::bail!("expected welcome, got {welcome:?}") };
    framed.codec_mut().set_limits(welcome.max_frame_bytes, welcome.max_frame_bytes);
    let events = vec![crate::support::llm_event("u", 1.0, 1.0)];
    framed.send(Message::Events(wire::EventBatch { sequence: 1, events })).await?;
    let ack = framed.next().await.context("closed")??.message()?;
    assert!(matches!(ack, Message::Ack(ref ack) if ack.stored == 1), "{ack:?}");

    // Plain TCP to a TLS port: the handshake fails and no answer comes.
    let mut plain = tokio::net::TcpStream::connect(edge.edge.http_addr).await?;
    plain.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await?;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "plain HTTP was served on a TLS port");
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 1);
    Ok(())
}
