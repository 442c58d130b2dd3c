//! The binary protocol listener: one task per connection, a semaphore permit per connection,
//! batches pipelined up to the negotiated credits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use sink::{Scope, WhenFull};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wire::{
    Ack, AckMode, ErrorCode, ErrorMessage, Frame, Goodbye, Kind, Message, Pong, Rejection, Welcome,
    WireCodec, WireError,
};

use crate::EdgeState;
use crate::auth::Caller;
use crate::ingest::{EventStatus, IngestError};

/// How long a client has to send `Hello` after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections idle (no frame, nothing in flight) this long are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Delay suggested in `Goodbye` before reconnecting.
const RECONNECT_AFTER_MS: u32 = 1000;

static NEXT_CONNECTION: AtomicUsize = AtomicUsize::new(0);

/// Accepts connections until `shutdown`, at most `max_connections` at once (further clients wait
/// in the listen backlog).
pub async fn serve(
    listener: TcpListener,
    state: Arc<EdgeState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(state.config.wire_connections_max));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tracker.spawn(async move {
            metrics::gauge!("tally_wire_connections_open").increment(1.0);
            let stream: Box<dyn Io> = match &state.config.tls {
                None => Box::new(stream),
                Some(tls) => match tls.accept(stream, HANDSHAKE_TIMEOUT).await {
                    Ok(stream) => Box::new(stream),
                    Err(error) => {
                        tracing::debug!(%peer, %error, "tls handshake failed");
                        metrics::gauge!("tally_wire_connections_open").decrement(1.0);
                        return;
                    }
                },
            };
            if let Err(error) = Connection::new(stream, state, shutdown).run().await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            metrics::gauge!("tally_wire_connections_open").decrement(1.0);
            drop(permit);
        });
    }
}

/// A connection's byte stream: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

struct Connection {
    framed: Framed<Box<dyn Io>, WireCodec>,
    state: Arc<EdgeState>,
    shutdown: CancellationToken,
    shard_hint: usize,
    /// The key the connection authenticated with, checked again on every batch so that a
    /// revoked key or a disabled tenant stops an open connection too.
    api_key: String,
}

type Answer = (u64, Result<Vec<EventStatus>, IngestError>);

impl Connection {
    fn new(stream: Box<dyn Io>, state: Arc<EdgeState>, shutdown: CancellationToken) -> Connection {
        let shard_hint = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        Connection {
            framed: Framed::new(stream, WireCodec::new()),
            state,
            shutdown,
            shard_hint,
            api_key: String::new(),
        }
    }

    /// Sends one message within `wire_write_timeout`: a client that does not read its answers
    /// is dropped, not buffered for (the framed writer holds at most one message beyond what
    /// the socket took).
    async fn send(&mut self, message: Message) -> Result<(), WireError> {
        let timeout = self.state.config.wire_write_timeout;
        match tokio::time::timeout(timeout, self.framed.send(message)).await {
            Ok(result) => result,
            Err(_) => {
                metrics::counter!("tally_wire_write_timeouts_total").increment(1);
                Err(WireError::Io("the client did not read its answers in time".into()))
            }
        }
    }

    async fn run(mut self) -> Result<(), WireError> {
        let Some((caller, ack_mode)) = self.handshake().await? else {
            return Ok(());
        };
        let credits = self.state.config.wire_credits as usize;
        let mut in_flight = FuturesUnordered::new();
        let mut draining = false;
        loop {
            let may_read = !draining && in_flight.len() < credits;
            tokio::select! {
                frame = self.framed.next(), if may_read => match frame {
                    None => break,
                    Some(Err(error)) => return self.fatal(error).await,
                    Some(Ok(frame)) => {
                        if let Some(pending) = self.handle(frame, &caller, ack_mode).await? {
                            in_flight.push(pending);
                        }
                    }
                },
                Some((sequence, result)) = in_flight.next() => {
                    self.send(answer(sequence, result)).await?;
                }
                () = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    let goodbye = Goodbye { reason: "server is shutting down".into(), reconnect_after_ms: RECONNECT_AFTER_MS };
                    self.send(Message::Goodbye(goodbye)).await?;
                }
                () = tokio::time::sleep(IDLE_TIMEOUT), if in_flight.is_empty() && !draining => break,
            }
            if draining && in_flight.is_empty() {
                break;
            }
        }
        // Answer what is still in flight when the client closed its side.
        while let Some((sequence, result)) = in_flight.next().await {
            if self.send(answer(sequence, result)).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Reads `Hello`, authenticates, answers `Welcome`. `None` when the client was refused.
    async fn handshake(&mut self) -> Result<Option<(Caller, AckMode)>, WireError> {
        let frame = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.framed.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(Err(error))) => return self.fatal(error).await.map(|()| None),
            Ok(Some(Ok(frame))) => frame,
        };
        let hello = match frame.message() {
            Ok(Message::Hello(hello)) => hello,
            Ok(other) => {
                let error = WireError::UnexpectedKind { expected: "hello", got: other.kind().as_str() };
                return self.fatal(error).await.map(|()| None);
            }
            Err(error) => return self.fatal(error).await.map(|()| None),
        };
        if let Err(error) = Message::Hello(hello.clone()).check_limits(0) {
            return self.fatal(error).await.map(|()| None);
        }
        if hello.protocol_version != wire::PROTOCOL_VERSION {
            return self.fatal(WireError::UnsupportedVersion(hello.protocol_version)).await.map(|()| None);
        }
        let caller = match self.state.auth.authenticate(Some(&hello.api_key), Scope::Ingest).await {
            Ok(caller) => caller,
            Err(error) => {
                metrics::counter!("tally_auth_failures_total", "transport" => "wire").increment(1);
                let message = ErrorMessage {
                    code: error.code(),
                    message: error.to_string(),
                    fatal: true,
                    sequence: None,
                };
                let _ = self.send(Message::Error(message)).await;
                return Ok(None);
            }
        };
        let state = self.state.clone();
        let config = &state.config;
        let welcome = Welcome {
            tenant_id: caller.tenant_id.to_string(),
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            max_frame_bytes: config.wire_frame_bytes_max,
            max_events_per_batch: config.wire_batch_events_max,
            credits: config.wire_credits,
            ack_mode: hello.ack_mode,
        };
        self.send(Message::Welcome(welcome)).await?;
        self.framed.codec_mut().set_limits(config.wire_frame_bytes_max, config.wire_frame_bytes_max);
        self.api_key = hello.api_key.clone();
        Ok(Some((caller, hello.ack_mode)))
    }

    /// Handles one frame after the handshake. An `Events` frame becomes a pending answer.
    async fn handle(
        &mut self,
        frame: Frame,
        caller: &Caller,
        ack_mode: AckMode,
    ) -> Result<Option<impl Future<Output = Answer> + use<>>, WireError> {
        match frame.kind {
            Kind::Events => {}
            Kind::Ping => {
                if let Ok(Message::Ping(ping)) = frame.message() {
                    self.send(Message::Pong(Pong { nonce: ping.nonce })).await?;
                }
                return Ok(None);
            }
            Kind::Pong => return Ok(None),
            other => {
                let error = WireError::UnexpectedKind { expected: "events", got: other.as_str() };
                self.fatal(error).await?;
                return Err(WireError::Io("closed after a protocol error".into()));
            }
        }
        let started = std::time::Instant::now();
        let batch = match wire::access_events(&frame.payload, u32::MAX) {
            Ok(batch) => batch,
            Err(error) => {
                self.fatal(error).await?;
                return Err(WireError::Io("closed after a bad payload".into()));
            }
        };
        let sequence = batch.sequence.to_native();
        let max = self.state.config.wire_batch_events_max;
        if batch.events.len() > max as usize {
            let error = WireError::TooManyEvents { count: batch.events.len(), max };
            let message = ErrorMessage {
                code: error.code(),
                message: error.to_string(),
                fatal: false,
                sequence: Some(sequence),
            };
            self.send(Message::Error(message)).await?;
            return Ok(None);
        }
        // Storage being unreachable is no reason to drop a connection that authenticated: only a
        // key that is now invalid (revoked, expired, tenant disabled) ends it.
        if let Err(error) = self.state.auth.authenticate(Some(&self.api_key), Scope::Ingest).await
            && !matches!(error, crate::auth::AuthError::Unavailable(_))
        {
            metrics::counter!("tally_auth_failures_total", "transport" => "wire").increment(1);
            let message = ErrorMessage {
                code: error.code(),
                message: error.to_string(),
                fatal: true,
                sequence: Some(sequence),
            };
            let _ = self.send(Message::Error(message)).await;
            return Err(WireError::Io("closed: the API key is no longer valid".into()));
        }
        let (context, over_quota) = match self.state.ingestor.admit(caller, batch.events.len()).await {
            Ok(admitted) => admitted,
            Err(error) => {
                self.send(answer(sequence, Err(error))).await?;
                return Ok(None);
            }
        };
        let events = batch.events.iter().map(|archived| {
            wire::validate(archived)?;
            rkyv::deserialize::<wire::Event, rancor::Error>(archived)
                .map_err(|error| wire::EventError::new("event", error.to_string()))
        });
        let prepared = self.state.ingestor.prepare(&context, over_quota, events);
        metrics::counter!("tally_events_received_total", "protocol" => "wire")
            .increment(prepared.len() as u64);
        let ingestor = self.state.ingestor.clone();
        let shard_hint = self.shard_hint;
        Ok(Some(async move {
            let result = ingestor.submit(prepared, ack_mode, WhenFull::Block, shard_hint).await;
            if result.is_ok() {
                crate::series::record_ack("wire", ack_mode, started);
            }
            (sequence, result)
        }))
    }

    /// Sends a fatal error; the caller then closes the connection.
    async fn fatal(&mut self, error: WireError) -> Result<(), WireError> {
        metrics::counter!("tally_wire_protocol_errors_total", "code" => error.code().as_str()).increment(1);
        let message =
            ErrorMessage { code: error.code(), message: error.to_string(), fatal: true, sequence: None };
        let _ = self.send(Message::Error(message)).await;
        Ok(())
    }
}

/// The answer to a batch: an `Ack` with per-event rejections, or an `Error` naming the batch.
fn answer(sequence: u64, result: Result<Vec<EventStatus>, IngestError>) -> Message {
    match result {
        Ok(statuses) => {
            let mut ack = Ack { sequence, stored: 0, duplicate: 0, rejected: Vec::new() };
            for (index, status) in statuses.into_iter().enumerate() {
                match status {
                    EventStatus::Stored | EventStatus::Accepted => ack.stored += 1,
                    EventStatus::Duplicate => ack.duplicate += 1,
                    EventStatus::Rejected { code, mut message } => {
                        truncate_message(&mut message);
                        ack.rejected.push(Rejection { index: index as u32, code, message })
                    }
                }
            }
            Message::Ack(ack)
        }
        Err(IngestError::Busy { retry_after_ms } | IngestError::RateLimited { retry_after_ms }) => {
            Message::Busy(wire::Busy { sequence, retry_after_ms })
        }
        Err(error) => {
            let code: ErrorCode = error.code();
            Message::Error(ErrorMessage {
                code,
                message: error.public_message(),
                fatal: false,
                sequence: Some(sequence),
            })
        }
    }
}

/// Longest rejection message in an `Ack`, so that an `Ack` of a full batch of rejections always
/// fits the frame limit (10,000 × (256 + 16) bytes < 4 MiB).
const REJECTION_MESSAGE_BYTES_MAX: usize = 256;

fn truncate_message(message: &mut String) {
    if message.len() > REJECTION_MESSAGE_BYTES_MAX {
        let mut end = REJECTION_MESSAGE_BYTES_MAX - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
}
