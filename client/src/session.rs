//! One connection: TCP connect, then `Hello` -> `Welcome`, then the negotiated limits.

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use wire::{
    Hello, Message, PROTOCOL_VERSION, Welcome, WireCodec, WireError,
    limits::{BATCH_EVENTS_CEILING, CREDITS_CEILING, FRAME_PAYLOAD_BYTES_CEILING},
};

use crate::{ClientConfig, ClientError};

/// An open connection past its handshake.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) framed: Framed<TcpStream, WireCodec>,
    pub(crate) welcome: Welcome,
    /// Set by `Goodbye`: send nothing new, reconnect this long after the last answer.
    pub(crate) draining: Option<Duration>,
}

/// What the server granted, capped by the protocol's ceilings and the client's own limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) credits: usize,
    pub(crate) batch_events_max: u32,
    pub(crate) frame_payload_bytes_max: u32,
}

impl Limits {
    pub(crate) fn new(welcome: &Welcome, config: &ClientConfig) -> Limits {
        Limits {
            credits: welcome.credits.min(CREDITS_CEILING) as usize,
            batch_events_max: welcome
                .max_events_per_batch
                .min(BATCH_EVENTS_CEILING)
                .min(config.max_batch_events),
            frame_payload_bytes_max: welcome.max_frame_bytes.min(FRAME_PAYLOAD_BYTES_CEILING),
        }
    }
}

/// Opens a connection and completes the handshake, each step under its own timeout.
pub(crate) async fn open(config: Arc<ClientConfig>) -> Result<Session, ClientError> {
    let connect = TcpStream::connect(config.address.as_str());
    let stream = tokio::time::timeout(config.connect_timeout, connect)
        .await
        .map_err(|_| ClientError::Timeout { operation: "connect", after: config.connect_timeout })?
        .map_err(|error| ClientError::Connect { address: config.address.clone(), error: Arc::new(error) })?;
    // Batches are written whole; waiting to coalesce them only adds latency.
    stream.set_nodelay(true)?;
    let mut framed = Framed::new(stream, WireCodec::new());
    let welcome = tokio::time::timeout(config.handshake_timeout, handshake(&mut framed, &config))
        .await
        .map_err(|_| ClientError::Timeout { operation: "handshake", after: config.handshake_timeout })??;
    let limits = Limits::new(&welcome, &config);
    framed.codec_mut().set_limits(limits.frame_payload_bytes_max, limits.frame_payload_bytes_max);
    Ok(Session { framed, welcome, draining: None })
}

async fn handshake(
    framed: &mut Framed<TcpStream, WireCodec>,
    config: &ClientConfig,
) -> Result<Welcome, ClientError> {
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        api_key: config.api_key.clone(),
        client_name: config.client_name.clone(),
        ack_mode: config.ack_mode,
    });
    framed.send(hello).await?;
    let frame = framed.next().await.ok_or_else(ClientError::connection_closed)??;
    let welcome = match frame.message()? {
        Message::Welcome(welcome) => welcome,
        Message::Error(error) => {
            return Err(ClientError::Handshake { code: error.code, message: error.message });
        }
        other => {
            let got = other.kind().as_str();
            return Err(WireError::UnexpectedKind { expected: "welcome", got }.into());
        }
    };
    check_welcome(&welcome, config)?;
    Ok(welcome)
}

/// A `Welcome` that grants nothing, or a weaker ack mode than asked, is refused: sending under
/// it would either stall forever or promise less than the caller configured.
fn check_welcome(welcome: &Welcome, config: &ClientConfig) -> Result<(), WireError> {
    let invalid = |detail: String| Err(WireError::InvalidPayload { kind: "welcome", detail });
    if welcome.credits == 0 || welcome.max_events_per_batch == 0 || welcome.max_frame_bytes == 0 {
        return invalid(format!(
            "the server granted no capacity: {} credits, {} events per batch, {} frame bytes",
            welcome.credits, welcome.max_events_per_batch, welcome.max_frame_bytes
        ));
    }
    if welcome.ack_mode != config.ack_mode {
        return invalid(format!(
            "ack mode {:?} was asked, the server granted {:?}",
            config.ack_mode, welcome.ack_mode
        ));
    }
    Ok(())
}
