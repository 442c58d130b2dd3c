//! A scriptable ingest server for the client's tests: real TCP on 127.0.0.1:0, real frames, and
//! a script that decides how each received batch is answered.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::codec::Framed;
use uuid::Uuid;
use wire::{
    Ack, Busy, ErrorCode, ErrorMessage, EventBatch, Goodbye, Message, Ping, Rejection, Welcome, WireCodec,
};

pub const GOOD_KEY: &str = "tk_test_good";
pub const TENANT: &str = "tenant-test";

/// How the server answers one received batch.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// Store (deduplicating by event id) and acknowledge; events whose `user_id` starts with
    /// `bad` are rejected.
    Ack,
    /// As `Ack`, after a delay, while the connection keeps being read.
    AckAfter(Duration),
    Busy {
        retry_after_ms: u32,
    },
    Error {
        code: ErrorCode,
        fatal: bool,
    },
    /// Store the events, then close the connection without answering: the ack is lost.
    StoreAndDrop,
    /// Never answer.
    Silent,
    /// Send `Goodbye` and a `Ping`; once the `Pong` proves the client read the `Goodbye`, wait
    /// `ack_delay`, acknowledge the batch and close.
    Goodbye {
        reconnect_after_ms: u32,
        ack_delay: Duration,
    },
}

/// One `Events` frame as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// 0 for the first batch the server received.
    pub index: usize,
    /// 1 for the first connection accepted.
    pub connection: usize,
    pub sequence: u64,
    pub event_ids: Vec<Uuid>,
    pub at: Instant,
    /// How many times this sequence was received before, on any connection.
    pub attempt: usize,
}

#[derive(Debug, Default)]
pub struct State {
    pub received: Vec<Received>,
    /// The dedup set: every event id stored.
    pub stored: HashSet<Uuid>,
    /// How many acks counted each event as stored or duplicate.
    pub acked: HashMap<Uuid, usize>,
    pub connections: usize,
    pub accepted_at: Vec<Instant>,
    /// Most batches received and not yet answered on one connection.
    pub max_outstanding: usize,
    pub goodbye_sent_at: Option<Instant>,
    /// Set when the client answered the ping sent after `Goodbye`.
    pub goodbye_seen: bool,
    /// `Events` frames received on a connection after its client had read `Goodbye`.
    pub events_after_goodbye: usize,
}

pub type Script = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

#[derive(Clone)]
pub struct ServerConfig {
    pub credits: u32,
    pub max_events_per_batch: u32,
    pub max_frame_bytes: u32,
    pub script: Script,
}

impl ServerConfig {
    pub fn new(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> ServerConfig {
        ServerConfig {
            credits: 8,
            max_events_per_batch: 1_000,
            max_frame_bytes: 4 * 1024 * 1024,
            script: Arc::new(script),
        }
    }
}

pub struct TestServer {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
    changes: watch::Receiver<u64>,
    accept: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[derive(Clone)]
struct Shared {
    config: ServerConfig,
    state: Arc<Mutex<State>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Shared {
    fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let result = change(&mut self.state.lock().expect("state lock"));
        self.changes.send_modify(|version| *version += 1);
        result
    }
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State::default()));
        let (changes_sender, changes) = watch::channel(0);
        let shared = Shared { config, state: state.clone(), changes: Arc::new(changes_sender) };
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let connection = shared.update(|state| {
                    state.connections += 1;
                    state.accepted_at.push(Instant::now());
                    state.connections
                });
                tokio::spawn(serve(socket, connection, shared.clone()));
            }
        });
        TestServer { address, state, changes, accept }
    }

    pub fn state<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&self.state.lock().expect("state lock"))
    }

    /// Waits until `condition` holds; every change of the state is checked.
    pub async fn wait_until(&self, condition: impl Fn(&State) -> bool) {
        let mut changes = self.changes.clone();
        loop {
            if self.state(&condition) {
                return;
            }
            changes.changed().await.expect("server is alive");
        }
    }
}

enum Outgoing {
    Message(Message),
    Close,
}

async fn serve(socket: TcpStream, connection: usize, shared: Shared) {
    let mut framed = Framed::new(socket, WireCodec::new());
    let Some(welcome) = handshake(&mut framed, &shared.config).await else { return };
    framed.codec_mut().set_limits(welcome.max_frame_bytes, welcome.max_frame_bytes);
    let (outgoing, mut outgoing_receiver) = mpsc::channel::<Outgoing>(256);
    let outstanding = Arc::new(AtomicUsize::new(0));
    // The batch answered after the `Goodbye` round trip, and the delay before its ack.
    let mut goodbye: Option<(EventBatch, Duration)> = None;
    let mut goodbye_seen = false;
    loop {
        tokio::select! {
            frame = framed.next() => {
                let Some(Ok(frame)) = frame else { return };
                match frame.message().expect("client frames decode") {
                    Message::Events(batch) => {
                        let received = record_received(&shared, connection, &batch, &outstanding, goodbye_seen);
                        match (shared.config.script)(&received) {
                            Reply::StoreAndDrop => {
                                shared.update(|state| state.stored.extend(batch.events.iter().map(|event| event.id())));
                                return;
                            }
                            Reply::Goodbye { reconnect_after_ms, ack_delay } => {
                                let message = Goodbye { reason: "draining".to_owned(), reconnect_after_ms };
                                shared.update(|state| state.goodbye_sent_at = Some(Instant::now()));
                                framed.send(Message::Goodbye(message)).await.expect("send goodbye");
                                framed.send(Message::Ping(Ping { nonce: GOODBYE_PING_NONCE })).await.expect("send ping");
                                goodbye = Some((batch, ack_delay));
                            }
                            reply => {
                                let answer = Answer { shared: &shared, outgoing: &outgoing, outstanding: &outstanding };
                                if let Some(message) = answer.answer(reply, batch) {
                                    framed.send(message).await.expect("send answer");
                                }
                            }
                        }
                    }
                    Message::Pong(pong) if pong.nonce == GOODBYE_PING_NONCE => {
                        let (batch, ack_delay) = goodbye.take().expect("a goodbye was sent");
                        goodbye_seen = true;
                        shared.update(|state| state.goodbye_seen = true);
                        let (shared, outgoing, outstanding) = (shared.clone(), outgoing.clone(), outstanding.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(ack_delay).await;
                            let ack = acknowledge(&shared, &batch, &outstanding);
                            let _ = outgoing.send(Outgoing::Message(ack)).await;
                            let _ = outgoing.send(Outgoing::Close).await;
                        });
                    }
                    other => panic!("unexpected message from the client: {other:?}"),
                }
            }
            Some(out) = outgoing_receiver.recv() => match out {
                Outgoing::Message(message) => {
                    if framed.send(message).await.is_err() {
                        return;
                    }
                }
                Outgoing::Close => return,
            },
        }
    }
}

const GOODBYE_PING_NONCE: u64 = 77;

struct Answer<'a> {
    shared: &'a Shared,
    outgoing: &'a mpsc::Sender<Outgoing>,
    outstanding: &'a Arc<AtomicUsize>,
}

impl Answer<'_> {
    /// The answer to send now, if any; delayed answers go through `outgoing`.
    fn answer(&self, reply: Reply, batch: EventBatch) -> Option<Message> {
        let sequence = batch.sequence;
        match reply {
            Reply::Ack => Some(acknowledge(self.shared, &batch, self.outstanding)),
            Reply::AckAfter(delay) => {
                let (shared, outgoing, outstanding) =
                    (self.shared.clone(), self.outgoing.clone(), self.outstanding.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let ack = acknowledge(&shared, &batch, &outstanding);
                    let _ = outgoing.send(Outgoing::Message(ack)).await;
                });
                None
            }
            Reply::Busy { retry_after_ms } => {
                self.outstanding.fetch_sub(1, Ordering::SeqCst);
                Some(Message::Busy(Busy { sequence, retry_after_ms }))
            }
            Reply::Error { code, fatal } => {
                self.outstanding.fetch_sub(1, Ordering::SeqCst);
                if fatal {
                    let _ = self.outgoing.try_send(Outgoing::Close);
                }
                let message = format!("test server says {code}");
                Some(Message::Error(ErrorMessage { code, message, fatal, sequence: Some(sequence) }))
            }
            Reply::Silent => None,
            Reply::StoreAndDrop | Reply::Goodbye { .. } => unreachable!("handled by the connection loop"),
        }
    }
}

async fn handshake(framed: &mut Framed<TcpStream, WireCodec>, config: &ServerConfig) -> Option<Welcome> {
    let frame = framed.next().await?.ok()?;
    let Ok(Message::Hello(hello)) = frame.message() else { return None };
    if hello.api_key != GOOD_KEY {
        let refusal = ErrorMessage {
            code: ErrorCode::Unauthorized,
            message: "unknown api key".to_owned(),
            fatal: true,
            sequence: None,
        };
        let _ = framed.send(Message::Error(refusal)).await;
        return None;
    }
    let welcome = Welcome {
        tenant_id: TENANT.to_owned(),
        server_version: "test".to_owned(),
        max_frame_bytes: config.max_frame_bytes,
        max_events_per_batch: config.max_events_per_batch,
        credits: config.credits,
        ack_mode: hello.ack_mode,
    };
    framed.send(Message::Welcome(welcome.clone())).await.ok()?;
    Some(welcome)
}

fn record_received(
    shared: &Shared,
    connection: usize,
    batch: &EventBatch,
    outstanding: &AtomicUsize,
    after_goodbye: bool,
) -> Received {
    let now_outstanding = outstanding.fetch_add(1, Ordering::SeqCst) + 1;
    shared.update(|state| {
        let attempt = state.received.iter().filter(|received| received.sequence == batch.sequence).count();
        let received = Received {
            index: state.received.len(),
            connection,
            sequence: batch.sequence,
            event_ids: batch.events.iter().map(|event| event.id()).collect(),
            at: Instant::now(),
            attempt,
        };
        state.received.push(received.clone());
        state.max_outstanding = state.max_outstanding.max(now_outstanding);
        if after_goodbye {
            state.events_after_goodbye += 1;
        }
        received
    })
}

/// Stores the batch with deduplication and builds its ack; the batch stops being outstanding
/// before the ack is handed over, so the client can never see an answer the server still counts.
fn acknowledge(shared: &Shared, batch: &EventBatch, outstanding: &AtomicUsize) -> Message {
    outstanding.fetch_sub(1, Ordering::SeqCst);
    shared.update(|state| {
        let (mut stored, mut duplicate, mut rejected) = (0, 0, Vec::new());
        for (index, event) in batch.events.iter().enumerate() {
            if event.user_id.starts_with("bad") {
                let message = "user_id: refused by the test server".to_owned();
                rejected.push(Rejection { index: index as u32, code: ErrorCode::InvalidEvent, message });
                continue;
            }
            if state.stored.insert(event.id()) {
                stored += 1;
            } else {
                duplicate += 1;
            }
            *state.acked.entry(event.id()).or_default() += 1;
        }
        Message::Ack(Ack { sequence: batch.sequence, stored, duplicate, rejected })
    })
}
