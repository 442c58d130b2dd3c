//! The client against a scripted in-process server on 127.0.0.1:0. Every test is bounded by
//! [`bounded`] and synchronises on what the server observed, never on sleeps.

mod server;

use std::{collections::HashSet, future::Future, time::Duration};

use client::{BatchOutcome, Client, ClientConfig, ClientError, ErrorCode, TrackerConfig};
use server::{GOOD_KEY, Received, Reply, ServerConfig, TENANT, TestServer};
use tokio::time::Instant;
use uuid::Uuid;
use wire::Event;

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), test).await.expect("test finished within 10 s")
}

fn config(server: &TestServer) -> ClientConfig {
    let mut config = ClientConfig::new(server.address.to_string(), GOOD_KEY);
    config.reconnect_backoff_initial = Duration::from_millis(20);
    config.reconnect_backoff_max = Duration::from_millis(200);
    config.ack_timeout = Duration::from_secs(5);
    config.retry_deadline = Duration::from_secs(8);
    config
}

fn event(user_id: &str) -> Event {
    Event::new(user_id, "llm_service", "openai", "completion")
}

fn events(count: usize) -> Vec<Event> {
    (0..count).map(|index| event(&format!("user-{index}"))).collect()
}

fn ids(events: &[Event]) -> Vec<Uuid> {
    events.iter().map(Event::id).collect()
}

async fn connect(server: &TestServer) -> Client {
    Client::connect(config(server)).await.expect("client connects")
}

#[tokio::test]
async fn handshake_reports_the_grant_and_a_batch_is_stored() {
    bounded(async {
        let server = TestServer::start(ServerConfig::new(|_| Reply::Ack)).await;
        let client = connect(&server).await;
        let welcome = client.welcome();
        assert_eq!(welcome.tenant_id, TENANT);
        assert_eq!(welcome.credits, 8);
        let outcome = client.send(events(3)).await.expect("batch acknowledged");
        assert_eq!(outcome, BatchOutcome { stored: 3, duplicate: 0, rejected: Vec::new() });
        client.close().await;
        assert!(matches!(client.send(events(1)).await, Err(ClientError::Closed)));
    })
    .await;
}

#[tokio::test]
async fn a_bad_key_is_refused_with_unauthorized() {
    bounded(async {
        let server = TestServer::start(ServerConfig::new(|_| Reply::Ack)).await;
        let mut config = config(&server);
        config.api_key = "tk_test_wrong".to_owned();
        match Client::connect(config).await {
            Err(ClientError::Handshake { code, .. }) => assert_eq!(code, ErrorCode::Unauthorized),
            other => panic!("expected a handshake refusal, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn the_credit_limit_is_never_exceeded() {
    bounded(async {
        let mut server_config = ServerConfig::new(|_| Reply::AckAfter(Duration::from_millis(30)));
        server_config.credits = 2;
        let server = TestServer::start(server_config).await;
        let client = connect(&server).await;
        let mut pending = Vec::new();
        for _ in 0..10 {
            pending.push(client.submit(events(3)).await.expect("queued"));
        }
        let mut stored = 0;
        for batch in pending {
            stored += batch.await.expect("acknowledged").stored;
        }
        assert_eq!(stored, 30);
        // Exactly 2: never more than the credits, and the client does pipeline up to them.
        assert_eq!(server.state(|state| state.max_outstanding), 2);
    })
    .await;
}

#[tokio::test]
async fn a_dropped_connection_is_resent_without_loss_or_double_counting() {
    bounded(async {
        // The first batch received is stored but its ack is lost with the connection.
        let script = |received: &Received| {
            if received.index == 0 { Reply::StoreAndDrop } else { Reply::Ack }
        };
        let server = TestServer::start(ServerConfig::new(script)).await;
        let client = connect(&server).await;
        let batches: Vec<Vec<Event>> = (0..3).map(|_| events(5)).collect();
        let sent: HashSet<Uuid> = batches.iter().flat_map(|batch| ids(batch)).collect();
        let mut pending = Vec::new();
        for batch in batches {
            pending.push(client.submit(batch).await.expect("queued"));
        }
        let mut total = BatchOutcome::default();
        for batch in pending {
            let outcome = batch.await.expect("acknowledged after the reconnect");
            total.stored += outcome.stored;
            total.duplicate += outcome.duplicate;
        }
        assert_eq!(server.state(|state| state.connections), 2);
        assert_eq!(server.state(|state| state.stored.clone()), sent);
        assert!(server.state(|state| state.acked.values().all(|&count| count == 1)), "each event acked once");
        assert_eq!(server.state(|state| state.acked.len()), 15);
        // The lost batch comes back as duplicates: every event accounted for exactly once.
        assert_eq!((total.stored, total.duplicate), (10, 5));
    })
    .await;
}

#[tokio::test]
async fn busy_is_honoured_before_resending() {
    bounded(async {
        let script = |received: &Received| {
            if received.attempt == 0 { Reply::Busy { retry_after_ms: 100 } } else { Reply::Ack }
        };
        let server = TestServer::start(ServerConfig::new(script)).await;
        let client = connect(&server).await;
        let outcome = client.send(events(4)).await.expect("acknowledged after busy");
        assert_eq!(outcome.stored, 4);
        let times: Vec<Instant> =
            server.state(|state| state.received.iter().map(|received| received.at).collect());
        assert_eq!(times.len(), 2, "one busy answer, one resend");
        let waited = times[1] - times[0];
        assert!(waited >= Duration::from_millis(100), "resent after {waited:?}, before retry_after_ms");
        assert_eq!(server.state(|state| state.connections), 1, "busy does not break the connection");
    })
    .await;
}

#[tokio::test]
async fn goodbye_drains_the_connection_and_later_batches_use_a_new_one() {
    bounded(async {
        // Only the first batch gets the goodbye: a batch wrongly sent on the draining connection
        // would be acknowledged there and counted in `events_after_goodbye`.
        let script = |received: &Received| {
            if received.index == 0 {
                Reply::Goodbye { reconnect_after_ms: 100, ack_delay: Duration::from_millis(200) }
            } else {
                Reply::Ack
            }
        };
        let server = TestServer::start(ServerConfig::new(script)).await;
        let client = connect(&server).await;
        let first = client.submit(events(2)).await.expect("queued");
        server.wait_until(|state| state.goodbye_seen).await;
        // The client has read the goodbye; this batch must wait for the next connection.
        let second = client.submit(events(3)).await.expect("queued");
        assert_eq!(first.await.expect("in-flight batch answered while draining").stored, 2);
        assert_eq!(second.await.expect("acknowledged on the new connection").stored, 3);
        server.state(|state| {
            assert_eq!(state.events_after_goodbye, 0, "nothing new was sent on the draining connection");
            assert_eq!(state.connections, 2);
            let connections: Vec<usize> = state.received.iter().map(|received| received.connection).collect();
            assert_eq!(connections, [1, 2]);
            let goodbye_at = state.goodbye_sent_at.expect("goodbye sent");
            let waited = state.accepted_at[1] - goodbye_at;
            assert!(waited >= Duration::from_millis(100), "reconnected {waited:?} after goodbye");
        });
    })
    .await;
}

#[tokio::test]
async fn per_event_rejections_reach_the_caller() {
    bounded(async {
        let server = TestServer::start(ServerConfig::new(|_| Reply::Ack)).await;
        let client = connect(&server).await;
        let batch = vec![event("user-0"), event("bad-1"), event("user-2"), event("bad-3"), event("user-4")];
        let outcome = client.send(batch).await.expect("acknowledged");
        assert_eq!(outcome.stored, 3);
        let rejected: Vec<(u32, ErrorCode)> = outcome.rejected.iter().map(|r| (r.index, r.code)).collect();
        assert_eq!(rejected, [(1, ErrorCode::InvalidEvent), (3, ErrorCode::InvalidEvent)]);
        assert!(outcome.rejected[0].message.contains("user_id"));
    })
    .await;
}

#[tokio::test]
async fn large_submissions_are_split_and_merged_with_indices_remapped() {
    bounded(async {
        let mut server_config = ServerConfig::new(|_| Reply::Ack);
        server_config.max_events_per_batch = 4;
        let server = TestServer::start(server_config).await;
        let client = connect(&server).await;
        let mut batch = events(10);
        batch[5] = event("bad-5");
        batch[9] = event("bad-9");
        let outcome = client.send(batch).await.expect("acknowledged");
        assert_eq!(outcome.stored, 8);
        let indices: Vec<u32> = outcome.rejected.iter().map(|rejection| rejection.index).collect();
        assert_eq!(indices, [5, 9]);
        let sizes: Vec<usize> =
            server.state(|state| state.received.iter().map(|r| r.event_ids.len()).collect());
        assert_eq!(sizes, [4, 4, 2]);
    })
    .await;
}

#[tokio::test]
async fn a_permanent_batch_error_is_a_rejection() {
    bounded(async {
        let script = |_: &Received| Reply::Error { code: ErrorCode::TooLarge, fatal: false };
        let server = TestServer::start(ServerConfig::new(script)).await;
        let client = connect(&server).await;
        match client.send(events(2)).await {
            Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::TooLarge),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(server.state(|state| state.received.len()), 1, "a permanent error is not retried");
    })
    .await;
}

#[tokio::test]
async fn the_retry_deadline_gives_up_and_names_the_unacknowledged_events() {
    bounded(async {
        let script = |_: &Received| Reply::Error { code: ErrorCode::Unavailable, fatal: false };
        let server = TestServer::start(ServerConfig::new(script)).await;
        let mut config = config(&server);
        config.retry_deadline = Duration::from_millis(500);
        let client = Client::connect(config).await.expect("client connects");
        let batch = events(3);
        let sent = ids(&batch);
        let started = Instant::now();
        match client.send(batch).await {
            Err(ClientError::Unacknowledged { event_ids, last_error }) => {
                assert_eq!(event_ids, sent);
                assert_eq!(last_error.code(), Some(ErrorCode::Unavailable));
            }
            other => panic!("expected unacknowledged events, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(500), "gave up before the deadline");
        assert!(server.state(|state| state.received.len()) >= 2, "retryable errors are retried");
    })
    .await;
}

#[tokio::test]
async fn an_ack_timeout_reconnects_and_resends() {
    bounded(async {
        let script = |received: &Received| if received.connection == 1 { Reply::Silent } else { Reply::Ack };
        let server = TestServer::start(ServerConfig::new(script)).await;
        let mut config = config(&server);
        config.ack_timeout = Duration::from_millis(200);
        let client = Client::connect(config).await.expect("client connects");
        let batch = events(2);
        let sent = ids(&batch);
        assert_eq!(client.send(batch).await.expect("acknowledged on the second connection").stored, 2);
        server.state(|state| {
            assert_eq!(state.connections, 2);
            let resent: Vec<&Received> = state.received.iter().filter(|r| r.connection == 2).collect();
            assert_eq!(resent.len(), 1);
            assert_eq!(resent[0].event_ids, sent, "the same events are resent");
            assert_eq!(resent[0].sequence, state.received[0].sequence, "with the same sequence");
        });
    })
    .await;
}

#[tokio::test]
async fn tracker_flush_and_close_deliver_everything() {
    bounded(async {
        let server = TestServer::start(ServerConfig::new(|_| Reply::Ack)).await;
        let client = connect(&server).await;
        let tracker_config = TrackerConfig {
            batch_size: 3,
            flush_interval: Duration::from_secs(60),
            ..TrackerConfig::default()
        };
        let tracker = client.tracker(tracker_config);
        let mut tracked = events(9);
        tracked.push(event("bad-tracked"));
        let bad_id = tracked[9].id();
        let mut sent: HashSet<Uuid> = tracked.iter().map(Event::id).collect();
        sent.remove(&bad_id);
        for event in tracked {
            tracker.track(event).await.expect("tracked");
        }
        let report = tracker.flush().await.expect("everything answered");
        assert_eq!((report.stored, report.duplicate, report.rejected, report.unacknowledged), (9, 0, 1, 0));
        assert_eq!(report.rejections[0].event_id, bad_id);
        assert_eq!(server.state(|state| state.stored.clone()), sent);
        assert_eq!(tracker.unsettled_events(), 0);

        let last = events(2);
        for event in last.clone() {
            tracker.track(event).await.expect("tracked");
        }
        let report = tracker.close().await.expect("everything answered");
        assert_eq!(report.stored, 2, "close flushes what is buffered");
        assert!(server.state(|state| last.iter().all(|event| state.stored.contains(&event.id()))));
    })
    .await;
}

#[tokio::test]
async fn tracker_flushes_on_its_interval() {
    bounded(async {
        let server = TestServer::start(ServerConfig::new(|_| Reply::Ack)).await;
        let client = connect(&server).await;
        let tracker_config = TrackerConfig {
            batch_size: 100,
            flush_interval: Duration::from_millis(50),
            ..TrackerConfig::default()
        };
        let tracker = client.tracker(tracker_config);
        let tracked = event("user-interval");
        let id = tracked.id();
        tracker.track(tracked).await.expect("tracked");
        // No flush call: the interval alone sends the batch.
        server.wait_until(|state| state.stored.contains(&id)).await;
        let report = tracker.close().await.expect("everything answered");
        assert_eq!(report.stored, 1);
    })
    .await;
}

#[tokio::test]
async fn tracker_reports_unacknowledged_events_on_flush() {
    bounded(async {
        let script = |_: &Received| Reply::Error { code: ErrorCode::Unavailable, fatal: false };
        let server = TestServer::start(ServerConfig::new(script)).await;
        let mut config = config(&server);
        config.retry_deadline = Duration::from_millis(300);
        let client = Client::connect(config).await.expect("client connects");
        let tracker = client.tracker(TrackerConfig { batch_size: 2, ..TrackerConfig::default() });
        let tracked = events(3);
        let sent = ids(&tracked);
        for event in tracked {
            tracker.track(event).await.expect("tracked");
        }
        let error = tracker.close().await.expect_err("nothing can be stored");
        assert_eq!(error.report.unacknowledged, 3);
        match error.error {
            ClientError::Unacknowledged { event_ids, .. } => {
                let (lost, sent): (HashSet<Uuid>, HashSet<Uuid>) =
                    (event_ids.into_iter().collect(), sent.into_iter().collect());
                assert_eq!(lost, sent);
            }
            other => panic!("expected unacknowledged events, got {other:?}"),
        }
    })
    .await;
}
