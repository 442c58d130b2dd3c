//! Serves Tally's HTTP APIs (the edge's ingest port, the query port) with every read bounded: a
//! deadline for a request's headers and for its body, one for the whole request, and a cap on
//! open connections. A client that trickles headers or stalls its body is dropped, never waited
//! for; past the cap, new clients wait in the listen backlog. Optionally over TLS ([`Tls`], also
//! used by the edge's binary protocol listener).

mod tls;

pub use tls::{Tls, TlsArgs, TlsError};

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The bounds of one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Longest a client may take to send a request's headers (also how long an idle keep-alive
    /// connection is kept). Default 10 s.
    pub header_read_timeout: Duration,
    /// Longest a client may take to send a request's body. Default 30 s.
    pub body_read_timeout: Duration,
    /// Longest a request may take, answer included (a durable ingest waits for its commit).
    /// Default 60 s; past it the answer is 408.
    pub request_timeout: Duration,
    /// Connections open at once; further clients wait in the listen backlog. Default 4,096.
    pub connections_max: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            connections_max: 4096,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets the open connections finish their
/// requests (the caller bounds how long it waits for this future). `name` labels the metrics.
/// With `tls`, every connection first completes a TLS handshake within the header deadline.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<Tls>,
    name: &'static str,
    shutdown: CancellationToken,
) {
    let router = router.layer((
        tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_read_timeout),
        tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ),
    ));
    let permits = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(listener = name, %error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            metrics::gauge!("tally_http_connections_open", "listener" => name).increment(1.0);
            let result = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                Some(tls) => match tls.accept(stream, limits.header_read_timeout).await {
                    Ok(stream) => {
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await
                    }
                    Err(error) => {
                        tracing::debug!(listener = name, %error, "tls handshake failed");
                        Ok(())
                    }
                },
            };
            if let Err(error) = result {
                tracing::debug!(listener = name, %error, "http connection ended with an error");
            }
            metrics::gauge!("tally_http_connections_open", "listener" => name).decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Error answers that axum and tower-http make themselves (a rejected query string or body, the
/// body limit's 413, an unknown path or method, a caught panic) carry plain text or nothing;
/// this turns them into the `{"error", "detail"}` body of every other error, with the code and
/// detail that `plain_error` gives for the status and text (each service names its own). JSON
/// answers and successes pass unchanged. Use with
/// `axum::middleware::from_fn(|request, next| serve::json_errors(request, next, plain_error))`.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    plain_error: fn(axum::http::StatusCode, String) -> (&'static str, String),
) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let (error, detail) = plain_error(status, text);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = serde_json::json!({"error": error, "detail": detail}).to_string();
    axum::response::Response::from_parts(parts, axum::body::Body::from(body))
}
