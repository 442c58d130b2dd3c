//! The background task that owns the connection: it takes submitted batches within the server's
//! credits, sends them, matches answers to batches, resends what got no final answer, and
//! reconnects.
//!
//! Every batch the task holds is in [`BTreeMap`] `batches` by sequence, in one of two states:
//! `Waiting` (to be sent once `not_before` has passed and a credit is free) or `InFlight` (written
//! on the current connection, answer pending). The task takes a new submission only while it
//! holds fewer batches than the server's credits, so it never has more than `credits` batches in
//! flight and its memory is bounded by `credits` plus the submission queue.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt, future::BoxFuture};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use wire::{Ack, Busy, EncodedFrame, ErrorMessage, Frame, Goodbye, Message, Pong, Welcome, WireError};

use crate::{
    BatchOutcome, ClientConfig, ClientError,
    config::backoff,
    session::{self, Limits, Session},
};

/// A batch handed from [`Client::submit`](crate::Client::submit) to the task, already encoded.
#[derive(Debug)]
pub(crate) struct Submission {
    pub(crate) sequence: u64,
    pub(crate) frame: EncodedFrame,
    pub(crate) event_ids: Arc<[uuid::Uuid]>,
    pub(crate) submitted_at: Instant,
    pub(crate) reply: oneshot::Sender<Result<BatchOutcome, ClientError>>,
}

pub(crate) struct Driver {
    config: Arc<ClientConfig>,
    submissions: mpsc::Receiver<Submission>,
    welcome: watch::Sender<Welcome>,
    close: CancellationToken,
    closing: bool,
    submissions_done: bool,
    credits: usize,
    batches: BTreeMap<u64, Batch>,
    link: Link,
    /// Consecutive connection failures, reset by the first `Ack` on a connection.
    reconnect_attempts: u32,
}

#[derive(Debug)]
struct Batch {
    frame: EncodedFrame,
    event_ids: Arc<[uuid::Uuid]>,
    deadline: Instant,
    state: BatchState,
    /// Retryable errors so far, for the resend backoff.
    retries: u32,
    last_error: Option<ClientError>,
    /// `None` once the caller was told the batch is given up on; the batch then only holds its
    /// credit until the server answers it or the connection ends.
    reply: Option<oneshot::Sender<Result<BatchOutcome, ClientError>>>,
}

#[derive(Debug, Clone, Copy)]
enum BatchState {
    Waiting { not_before: Instant },
    InFlight { sent_at: Instant },
}

enum Link {
    Up(Box<Session>),
    Connecting(BoxFuture<'static, Result<Session, ClientError>>),
    Down {
        reconnect_at: Instant,
    },
    /// The server refused the key or version: nothing will ever be sent again.
    Failed(ClientError),
}

enum LinkEvent {
    Frame(Option<Result<Frame, WireError>>),
    Connected(Result<Session, ClientError>),
}

impl Driver {
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        session: Session,
        submissions: mpsc::Receiver<Submission>,
        welcome: watch::Sender<Welcome>,
        close: CancellationToken,
    ) -> Driver {
        let credits = Limits::new(&session.welcome, &config).credits;
        Driver {
            config,
            submissions,
            welcome,
            close,
            closing: false,
            submissions_done: false,
            credits,
            batches: BTreeMap::new(),
            link: Link::Up(Box::new(session)),
            reconnect_attempts: 0,
        }
    }

    /// Runs until every client handle is dropped (or `close` is called) and every batch taken
    /// has its final answer or was given up on.
    pub(crate) async fn run(mut self, finished: CancellationToken) {
        let _finished = finished.drop_guard();
        loop {
            let now = Instant::now();
            self.expire(now);
            self.check_ack_timeouts(now);
            self.start_connecting(now);
            self.write_ready(now).await;
            self.finish_drain(now);
            if self.submissions_done && self.batches.is_empty() {
                tracing::debug!("client finished, closing the connection");
                return;
            }
            let wake = self.next_wake(now);
            tokio::select! {
                () = self.close.cancelled(), if !self.closing => {
                    // Refuse new submissions, still drain the ones already queued.
                    self.closing = true;
                    self.submissions.close();
                }
                event = link_event(&mut self.link) => self.on_link_event(event).await,
                submission = self.submissions.recv(), if self.can_take() => self.on_submission(submission),
                () = sleep_until(wake) => {}
            }
        }
    }

    fn can_take(&self) -> bool {
        !self.submissions_done && (matches!(self.link, Link::Failed(_)) || self.batches.len() < self.credits)
    }

    fn on_submission(&mut self, submission: Option<Submission>) {
        let Some(submission) = submission else {
            self.submissions_done = true;
            return;
        };
        if let Link::Failed(error) = &self.link {
            let event_ids = submission.event_ids.to_vec();
            let last_error = Box::new(error.clone());
            let _ = submission.reply.send(Err(ClientError::Unacknowledged { event_ids, last_error }));
            return;
        }
        let batch = Batch {
            frame: submission.frame,
            event_ids: submission.event_ids,
            deadline: submission.submitted_at + self.config.retry_deadline,
            state: BatchState::Waiting { not_before: Instant::now() },
            retries: 0,
            last_error: None,
            reply: Some(submission.reply),
        };
        let previous = self.batches.insert(submission.sequence, batch);
        debug_assert!(previous.is_none(), "sequence {} submitted twice", submission.sequence);
    }

    /// Gives up on batches past their deadline. A given-up batch that is in flight keeps its
    /// credit until it is answered: the server still counts it.
    fn expire(&mut self, now: Instant) {
        for (sequence, batch) in &mut self.batches {
            if batch.deadline > now {
                continue;
            }
            let Some(reply) = batch.reply.take() else { continue };
            let last_error = batch.last_error.clone().unwrap_or(ClientError::Timeout {
                operation: "waiting for an answer",
                after: self.config.retry_deadline,
            });
            tracing::debug!(sequence, error = %last_error, "giving up on batch at its retry deadline");
            let event_ids = batch.event_ids.to_vec();
            let _ =
                reply.send(Err(ClientError::Unacknowledged { event_ids, last_error: Box::new(last_error) }));
        }
        self.drop_given_up();
    }

    fn check_ack_timeouts(&mut self, now: Instant) {
        let ack_timeout = self.config.ack_timeout;
        let overdue = self.batches.values().any(|batch| match batch.state {
            BatchState::InFlight { sent_at } => sent_at + ack_timeout <= now,
            BatchState::Waiting { .. } => false,
        });
        if overdue {
            self.break_link(ClientError::Timeout { operation: "ack", after: ack_timeout });
        }
    }

    fn start_connecting(&mut self, now: Instant) {
        if let Link::Down { reconnect_at } = self.link
            && reconnect_at <= now
        {
            tracing::debug!(address = %self.config.address, "reconnecting");
            self.link = Link::Connecting(Box::pin(session::open(self.config.clone())));
        }
    }

    /// Writes every waiting batch that is due, oldest first, while credits last.
    async fn write_ready(&mut self, now: Instant) {
        let Link::Up(session) = &mut self.link else { return };
        if session.draining.is_some() {
            return;
        }
        let credits = self.credits;
        let mut in_flight = in_flight(&self.batches);
        let mut due = Vec::new();
        for (sequence, batch) in &mut self.batches {
            if in_flight >= credits {
                break;
            }
            if let BatchState::Waiting { not_before } = batch.state
                && not_before <= now
            {
                batch.state = BatchState::InFlight { sent_at: now };
                due.push((*sequence, batch.frame.clone()));
                in_flight += 1;
            }
        }
        if due.is_empty() {
            return;
        }
        let framed = &mut session.framed;
        let write = async {
            for (sequence, frame) in due {
                tracing::trace!(sequence, "sending batch");
                framed.feed(frame).await?;
            }
            SinkExt::<EncodedFrame>::flush(framed).await
        };
        let result: Result<Result<(), WireError>, _> =
            tokio::time::timeout(self.config.ack_timeout, write).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => self.break_link(error.into()),
            Err(_) => {
                self.break_link(ClientError::Timeout { operation: "write", after: self.config.ack_timeout })
            }
        }
    }

    /// After `Goodbye`, closes the connection once the server has answered everything it got.
    fn finish_drain(&mut self, now: Instant) {
        let Link::Up(session) = &self.link else { return };
        let Some(delay) = session.draining else { return };
        if in_flight(&self.batches) == 0 {
            tracing::info!(?delay, "server is draining, every batch answered: reconnecting after the delay");
            self.link = Link::Down { reconnect_at: now + delay };
        }
    }

    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let batch_times = self.batches.values().flat_map(|batch| {
            let deadline = batch.reply.as_ref().map(|_| batch.deadline);
            let state_time = match batch.state {
                BatchState::InFlight { sent_at } => Some(sent_at + self.config.ack_timeout),
                // A due batch waits for a credit or a connection, both of which wake the task.
                BatchState::Waiting { not_before } => Some(not_before).filter(|&time| time > now),
            };
            [deadline, state_time].into_iter().flatten()
        });
        let reconnect = match self.link {
            Link::Down { reconnect_at } => Some(reconnect_at),
            _ => None,
        };
        batch_times.chain(reconnect).min()
    }

    async fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected(Ok(session)) => {
                let limits = Limits::new(&session.welcome, &self.config);
                tracing::info!(address = %self.config.address, credits = limits.credits, "connected");
                self.credits = limits.credits;
                self.welcome.send_replace(session.welcome.clone());
                self.link = Link::Up(Box::new(session));
            }
            LinkEvent::Connected(Err(error)) if error.is_permanent_refusal() => self.fail(error),
            LinkEvent::Connected(Err(error)) => self.break_link(error),
            LinkEvent::Frame(None) => self.break_link(ClientError::connection_closed()),
            LinkEvent::Frame(Some(Err(error))) => self.break_link(error.into()),
            LinkEvent::Frame(Some(Ok(frame))) => match frame.message() {
                Ok(message) => self.on_message(message).await,
                Err(error) => self.break_link(error.into()),
            },
        }
    }

    async fn on_message(&mut self, message: Message) {
        match message {
            Message::Ack(ack) => self.on_ack(ack),
            Message::Busy(busy) => self.on_busy(busy),
            Message::Error(error) => self.on_error(error),
            Message::Ping(ping) => self.send_pong(Pong { nonce: ping.nonce }).await,
            Message::Pong(_) => {}
            Message::Goodbye(goodbye) => self.on_goodbye(goodbye),
            other @ (Message::Hello(_) | Message::Welcome(_) | Message::Events(_)) => {
                let got = other.kind().as_str();
                self.break_link(WireError::UnexpectedKind { expected: "an answer", got }.into());
            }
        }
    }

    /// The batch an answer is for; answers for batches not in flight are ignored.
    fn answered(&mut self, sequence: u64) -> Option<&mut Batch> {
        let batch = self
            .batches
            .get_mut(&sequence)
            .filter(|batch| matches!(batch.state, BatchState::InFlight { .. }));
        if batch.is_none() {
            tracing::warn!(sequence, "answer for a batch that is not in flight, ignored");
        }
        batch
    }

    fn on_ack(&mut self, ack: Ack) {
        if self.answered(ack.sequence).is_none() {
            return;
        }
        let Some(batch) = self.batches.remove(&ack.sequence) else { return };
        self.reconnect_attempts = 0;
        let answered = u64::from(ack.stored) + u64::from(ack.duplicate) + ack.rejected.len() as u64;
        if answered != batch.event_ids.len() as u64 {
            tracing::warn!(
                sequence = ack.sequence,
                answered,
                sent = batch.event_ids.len(),
                "ack does not cover the batch"
            );
        }
        if let Some(reply) = batch.reply {
            let _ = reply.send(Ok(BatchOutcome::from_ack(ack)));
        }
    }

    fn on_busy(&mut self, busy: Busy) {
        let Some(batch) = self.answered(busy.sequence) else { return };
        let delay = Duration::from_millis(busy.retry_after_ms.into());
        tracing::debug!(sequence = busy.sequence, ?delay, "server busy, holding the batch");
        batch.state = BatchState::Waiting { not_before: Instant::now() + delay };
        let message = format!("server busy, retry after {} ms", busy.retry_after_ms);
        batch.last_error = Some(ClientError::Server { code: wire::ErrorCode::Busy, message });
        self.drop_given_up();
    }

    fn on_error(&mut self, error: ErrorMessage) {
        let server_error = ClientError::Server { code: error.code, message: error.message.clone() };
        if let Some(sequence) = error.sequence
            && self.answered(sequence).is_some()
        {
            if error.code.is_retryable() {
                self.hold_for_retry(sequence, server_error.clone());
            } else if let Some(reply) = self.batches.remove(&sequence).and_then(|batch| batch.reply) {
                let rejected = ClientError::Rejected { code: error.code, message: error.message.clone() };
                let _ = reply.send(Err(rejected));
            }
            self.drop_given_up();
        }
        if error.fatal {
            self.break_link(server_error);
        } else if error.sequence.is_none() {
            tracing::warn!(code = %error.code, message = %error.message, "server reported an error");
        }
    }

    /// A retryable refusal: the batch is sent again after a backoff that grows with each one.
    fn hold_for_retry(&mut self, sequence: u64, error: ClientError) {
        let (initial, max) = (self.config.reconnect_backoff_initial, self.config.reconnect_backoff_max);
        let Some(batch) = self.batches.get_mut(&sequence) else { return };
        let delay = backoff(initial, max, batch.retries);
        tracing::debug!(sequence, %error, ?delay, "retryable error, resending later");
        batch.retries = batch.retries.saturating_add(1);
        batch.state = BatchState::Waiting { not_before: Instant::now() + delay };
        batch.last_error = Some(error);
    }

    fn on_goodbye(&mut self, goodbye: Goodbye) {
        let Link::Up(session) = &mut self.link else { return };
        let delay = Duration::from_millis(goodbye.reconnect_after_ms.into());
        tracing::info!(reason = %goodbye.reason, ?delay, "server said goodbye, draining the connection");
        session.draining = Some(delay);
    }

    async fn send_pong(&mut self, pong: Pong) {
        let Link::Up(session) = &mut self.link else { return };
        let send = session.framed.send(Message::Pong(pong));
        match tokio::time::timeout(self.config.ack_timeout, send).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => self.break_link(error.into()),
            Err(_) => {
                self.break_link(ClientError::Timeout { operation: "write", after: self.config.ack_timeout })
            }
        }
    }

    /// Batches already given up on and no longer in flight have nothing left to wait for.
    fn drop_given_up(&mut self) {
        self.batches
            .retain(|_, batch| batch.reply.is_some() || matches!(batch.state, BatchState::InFlight { .. }));
    }

    /// Closes the connection; every batch in flight is sent again on the next one.
    fn break_link(&mut self, error: ClientError) {
        let drain_delay = match &self.link {
            Link::Up(session) => session.draining,
            _ => None,
        };
        let now = Instant::now();
        for batch in self.batches.values_mut() {
            if let BatchState::InFlight { .. } = batch.state {
                batch.state = BatchState::Waiting { not_before: now };
            }
            batch.last_error = Some(error.clone());
        }
        self.drop_given_up();
        let delay = drain_delay.unwrap_or_else(|| {
            let (initial, max) = (self.config.reconnect_backoff_initial, self.config.reconnect_backoff_max);
            let delay = backoff(initial, max, self.reconnect_attempts);
            self.reconnect_attempts = self.reconnect_attempts.saturating_add(1);
            delay
        });
        tracing::warn!(%error, held_batches = self.batches.len(), ?delay, "connection lost, reconnecting");
        self.link = Link::Down { reconnect_at: now + delay };
    }

    /// The server refused us for good: every batch held or submitted from now on is given up.
    fn fail(&mut self, error: ClientError) {
        tracing::error!(%error, "server refused the client, giving up on every batch");
        for batch in std::mem::take(&mut self.batches).into_values() {
            if let Some(reply) = batch.reply {
                let event_ids = batch.event_ids.to_vec();
                let last_error = Box::new(error.clone());
                let _ = reply.send(Err(ClientError::Unacknowledged { event_ids, last_error }));
            }
        }
        self.link = Link::Failed(error);
    }
}

fn in_flight(batches: &BTreeMap<u64, Batch>) -> usize {
    batches.values().filter(|batch| matches!(batch.state, BatchState::InFlight { .. })).count()
}

/// The next thing the connection has for the task; pending forever when there is no connection.
async fn link_event(link: &mut Link) -> LinkEvent {
    match link {
        Link::Up(session) => LinkEvent::Frame(session.framed.next().await),
        Link::Connecting(connecting) => LinkEvent::Connected(connecting.await),
        Link::Down { .. } | Link::Failed(_) => std::future::pending().await,
    }
}

/// Sleeps until `wake`, or forever when there is nothing to wake for.
pub(crate) async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(wake) => tokio::time::sleep_until(wake).await,
        None => std::future::pending().await,
    }
}
