//! Durable ingest end to end, on PostgreSQL and on SQLite: binary protocol and HTTP, dedup,
//! rollups, tenant isolation, bad input, and no ack for a failed commit.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use axum::http::StatusCode;
use serde_json::json;
use sqlx::Connection;
use wire::{ErrorCode, Message, QuantityKind};

use crate::support::{
    Backend, RawConnection, TestEdge, assert_rollups_match_raw, both_backends, llm_event, stored_count,
};

both_backends!(
    binary_ingest_stores_exact_values,
    http_accepts_flat_and_nested_shapes,
    resent_batch_is_stored_once_and_acked_as_duplicates,
    rollups_equal_raw_sums_after_concurrent_mixed_batches,
    a_key_of_one_tenant_cannot_write_as_another,
    bad_events_are_rejected_alone_with_specific_errors,
    protocol_errors_are_specific,
);

fn ack(message: Message) -> wire::Ack {
    match message {
        Message::Ack(ack) => ack,
        other => panic!("expected an ack, got {other:?}"),
    }
}

async fn binary_ingest_stores_exact_values(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    assert_eq!(connection.welcome.tenant_id, edge.tenant.id.to_string());
    let event = llm_event("user-1", 1200.0, 350.0)
        .with_model("in-house-7b")
        .with_quantity(QuantityKind::CachedInputTokens, 0.25)
        .with_custom_quantity("images", 3.0)
        .with_metadata("region", "eu \"west\"")
        .with_tag("beta")
        .with_session_id("s-1");
    let answer = ack(connection.round_trip(1, vec![event.clone()]).await?);
    assert_eq!((answer.sequence, answer.stored, answer.duplicate, answer.rejected.len()), (1, 1, 0, 0));

    let events = edge.events().await?;
    let row = events.iter().find(|row| row.event_id == event.id()).context("the event is stored")?;
    assert_eq!(row.tenant_id, edge.tenant.id);
    assert_eq!(row.user_id, "user-1");
    assert_eq!(row.service_type, "llm_service");
    assert_eq!(row.model.as_deref(), Some("in-house-7b"));
    assert_eq!(row.quantity("input_tokens").as_deref(), Some("1200"));
    assert_eq!(row.quantity("cached_input_tokens").as_deref(), Some("0.25"));
    let images: BTreeMap<String, rust_decimal::Decimal> = [("images".to_owned(), 3.into())].into();
    assert_eq!(row.custom_quantities, Some(images));
    assert_eq!(row.latency_us, Some(120_500));
    assert_eq!(row.metadata, Some(json!({"region": "eu \"west\""})));
    assert_eq!(row.session_id.as_deref(), Some("s-1"));
    assert_eq!(row.tags, Some(vec!["beta".to_owned()]));
    assert_eq!(row.cost, None, "no price rule for this model: stored unpriced, never as 0");
    assert_eq!(row.occurred_at_us, event.timestamp_us);
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

async fn http_accepts_flat_and_nested_shapes(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let flat = json!({"tenant_id": "acme", "user_id": "u-flat", "service_type": "llm_service",
        "service_provider": "openai", "model": "gpt-4", "input_tokens": 150, "output_tokens": 75,
        "latency_ms": 2500});
    let (status, body) = edge.http("POST", "/api/v1/events", Some(&edge.key), flat).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["status"], "stored");
    let nested = json!({"tenant_id": edge.tenant.id.to_string(), "user_id": "u-nested",
        "service_type": "llm_service", "service_provider": "openai", "event_type": "completion",
        "metadata": {"model": "gpt-4", "temperature": 0.7},
        "metrics": {"input_tokens": 150, "output_tokens": 75, "latency_ms": 2500}});
    let (status, body) =
        edge.http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": [nested]})).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["processed_count"], 1);
    assert_eq!(body["results"][0]["status"], "stored");

    let rows = edge.events().await?;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(
            (
                row.model.as_deref(),
                row.quantity("input_tokens"),
                row.quantity("output_tokens"),
                row.latency_us
            ),
            (Some("gpt-4"), Some("150".into()), Some("75".into()), Some(2_500_000))
        );
    }
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

async fn resent_batch_is_stored_once_and_acked_as_duplicates(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let events: Vec<_> =
        (0..50).map(|i| llm_event(&format!("user-{}", i % 7), 10.0 + f64::from(i), 5.0)).collect();
    let mut first = RawConnection::open(&edge, &edge.key).await?;
    let answer = ack(first.round_trip(1, events.clone()).await?);
    assert_eq!((answer.stored, answer.duplicate), (50, 0));
    // The same batch again on a new connection, as a client does after losing an ack, plus new
    // events and a repeat inside the batch itself.
    let mut mixed = events[..20].to_vec();
    mixed.extend((0..10).map(|i| llm_event("late", f64::from(i) + 1.0, 1.0)));
    mixed.push(mixed[25].clone());
    let mut second = RawConnection::open(&edge, &edge.key).await?;
    let answer = ack(second.round_trip(7, mixed).await?);
    assert_eq!((answer.sequence, answer.stored, answer.duplicate, answer.rejected.len()), (7, 10, 21, 0));

    let (status, body) = edge
        .http(
            "POST",
            "/api/v1/events/batch",
            Some(&edge.key),
            json!({"events": [
            {"event_id": events[0].id().to_string(), "timestamp": rfc3339(events[0].timestamp_us),
             "user_id": "user-0", "service_type": "llm_service", "service_provider": "openai",
             "model": "gpt-4o", "input_tokens": 10, "output_tokens": 5, "latency_ms": 120.5}]}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["duplicate_count"], 1);
    assert_eq!(body["results"][0]["status"], "duplicate");

    assert_eq!(edge.stored_count(edge.tenant.id).await?, 60);
    let rollup_events: i64 = edge.rollups().await?.values().map(|rollup| rollup.event_count).sum();
    assert_eq!(rollup_events, 60);
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

fn rfc3339(timestamp_us: i64) -> String {
    let at =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(timestamp_us) * 1000).expect("valid time");
    at.format(&time::format_description::well_known::Rfc3339).expect("formats")
}

async fn rollups_equal_raw_sums_after_concurrent_mixed_batches(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let mut tasks = Vec::new();
    for connection_index in 0..4u64 {
        let mut connection = RawConnection::open(&edge, &edge.key).await?;
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for batch_index in 0..10u64 {
                let mut events: Vec<_> = (0..100)
                    .map(|i| {
                        let event =
                            llm_event(&format!("user-{}", i % 13), f64::from(i) + 0.5, f64::from(i % 3))
                                .at(wire_now_us() - i64::from(i) * 60_000_000);
                        if i % 10 == 0 { event.with_error(Some("rate_limit".into())) } else { event }
                    })
                    .collect();
                // Every other batch repeats events of the previous one.
                if batch_index % 2 == 1 {
                    events.extend(sent.iter().rev().take(30).cloned());
                }
                let answer =
                    ack(connection.round_trip(connection_index * 100 + batch_index, events.clone()).await?);
                assert_eq!(answer.stored + answer.duplicate, events.len() as u32);
                sent.extend(events);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 4000);
    let compared = edge.assert_rollups_match_raw().await?;
    assert!(compared > 13, "rollups spread over users and hours: {compared}");
    Ok(())
}

fn wire_now_us() -> i64 {
    edge::auth::now_us()
}

async fn a_key_of_one_tenant_cannot_write_as_another(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let (other, other_key) = edge.other_tenant("globex").await?;
    let event = json!({"tenant_id": "acme", "user_id": "u", "service_type": "custom",
        "service_provider": "p", "event_type": "e"});
    let (status, body) = edge.http("POST", "/api/v1/events", Some(&other_key), event.clone()).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = edge
        .http(
            "POST",
            "/api/v1/events/batch",
            Some(&other_key),
            json!({"events": [
        {"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e"}, event]}),
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "one foreign tenant_id refuses the whole batch");
    // Over the binary protocol the tenant comes from the key alone.
    let mut connection = RawConnection::open(&edge, &other_key).await?;
    assert_eq!(connection.welcome.tenant_id, other.id.to_string());
    ack(connection.round_trip(1, vec![llm_event("u", 1.0, 1.0)]).await?);
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 0);
    assert_eq!(edge.stored_count(other.id).await?, 1);

    let (status, body) = edge.http("POST", "/api/v1/events", None, event.clone()).await?;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("authentication_required")));
    let (status, body) = edge.http("POST", "/api/v1/events", Some("tly_nope"), event).await?;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_api_key")));
    match RawConnection::try_open(&edge, "tly_nope").await? {
        Err(Message::Error(error)) => assert_eq!((error.code, error.fatal), (ErrorCode::Unauthorized, true)),
        Err(other) => panic!("unexpected answer {other:?}"),
        Ok(_) => panic!("a wrong key was welcomed"),
    }
    Ok(())
}

async fn bad_events_are_rejected_alone_with_specific_errors(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let good = || llm_event("u", 5.0, 5.0);
    let mut no_model = good();
    no_model.model = None;
    let batch = vec![
        good(),
        good().with_quantity(QuantityKind::Pages, f64::NAN),
        no_model,
        wire::Event::new("u", "telepathy", "p", "e"),
        good().at(wire_now_us() - 40 * 86_400_000_000),
        good().at(wire_now_us() + 3_600_000_000),
        wire::Event::new("x".repeat(300), "custom", "p", "e"),
        good().with_metadata("k", "v").with_metadata("k", "w"),
        good(),
    ];
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    let answer = ack(connection.round_trip(3, batch).await?);
    assert_eq!(answer.stored, 3);
    let rejected: Vec<(u32, ErrorCode, String)> =
        answer.rejected.into_iter().map(|r| (r.index, r.code, r.message)).collect();
    let expect = [
        (1, "pages: must be a finite number"),
        (2, "model: is required for service type llm_service"),
        (4, "timestamp: is older than the late-event window of 35 days"),
        (5, "timestamp: is more than 300 s in the future"),
        (6, "user_id: must be 1 to 255 bytes, got 300"),
        (7, "metadata[1].key: k appears more than once"),
    ];
    assert_eq!(rejected.len(), expect.len(), "{rejected:?}");
    for ((index, code, message), (want_index, want_prefix)) in rejected.iter().zip(expect) {
        assert_eq!((*index, *code), (want_index, ErrorCode::InvalidEvent));
        assert!(
            message.starts_with(want_prefix),
            "event {index}: {message:?} should start with {want_prefix:?}"
        );
    }

    // HTTP: per-event errors with the field named, good events stored, and a status that says so.
    let (status, body) = edge
        .http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": [
            {"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e", "metrics": {"gpu_seconds": 2.5}},
            {"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e", "input_token": 3},
            {"user_id": "u", "service_type": "document_processor", "service_provider": "p", "pages_processed": 2},
            "not an object"]}))
        .await?;
    assert_eq!(status, StatusCode::OK, "a partly rejected batch is a 200 that lists the failures: {body}");
    assert_eq!((body["processed_count"].as_i64(), body["failed_count"].as_i64()), (Some(1), Some(3)));
    assert_eq!(body["success"], false);
    assert!(
        body["failed_events"][0]["error"].as_str().unwrap_or("").starts_with("input_token: is not a field")
    );
    assert_eq!(body["failed_events"][0]["event_data"]["input_token"], 3);
    assert!(
        body["failed_events"][1]["error"].as_str().unwrap_or("").starts_with("document_type: is required")
    );
    let (status, body) = edge
        .http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": [{"user_id": ""}]}))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a batch where every event failed is not a 200: {body}");
    let (status, _) =
        edge.http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": []})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let many: Vec<_> = (0..1001).map(|_| json!({})).collect();
    let (status, body) =
        edge.http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": many})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["detail"].as_str().unwrap_or("").contains("batch limit of 1000"), "{body}");

    // The binary batch stored 3 (an unregistered service type is a custom event), HTTP 1.
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 4);
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

async fn protocol_errors_are_specific(backend: Backend) -> Result<()> {
    use futures_util::SinkExt;
    let edge = TestEdge::on(backend).await?;
    // Too many events for the negotiated batch size: refused as a batch, connection stays up.
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    let max = connection.welcome.max_events_per_batch as usize;
    let too_many = vec![llm_event("u", 1.0, 1.0); max + 1];
    match connection.round_trip(9, too_many).await? {
        Message::Error(error) => {
            assert_eq!((error.code, error.fatal, error.sequence), (ErrorCode::TooLarge, false, Some(9)))
        }
        other => panic!("expected an error, got {other:?}"),
    }
    ack(connection.round_trip(10, vec![llm_event("u", 1.0, 1.0)]).await?);
    // A garbage payload: fatal bad frame.
    let mut garbage = bytes::BytesMut::new();
    garbage.extend_from_slice(&wire::MAGIC);
    garbage.extend_from_slice(&[wire::PROTOCOL_VERSION, 3, 0, 0, 0, 0]);
    garbage.extend_from_slice(&5u32.to_le_bytes());
    garbage.extend_from_slice(b"hello");
    connection.framed.send(wire::EncodedFrame(garbage.freeze())).await?;
    match connection.next().await? {
        Message::Error(error) => assert_eq!((error.code, error.fatal), (ErrorCode::BadFrame, true)),
        other => panic!("expected a fatal error, got {other:?}"),
    }
    // A frame of another protocol version.
    let mut other_version = RawConnection::open(&edge, &edge.key).await?;
    let mut frame = bytes::BytesMut::new();
    frame.extend_from_slice(&wire::MAGIC);
    frame.extend_from_slice(&[9, 3, 0, 0, 0, 0]);
    frame.extend_from_slice(&0u32.to_le_bytes());
    other_version.framed.send(wire::EncodedFrame(frame.freeze())).await?;
    match other_version.next().await? {
        Message::Error(error) => assert_eq!(error.code, ErrorCode::UnsupportedVersion),
        other => panic!("expected unsupported version, got {other:?}"),
    }
    Ok(())
}

/// PostgreSQL only: the server is stopped mid-run. The SQLite analogue is the next test.
#[tokio::test(flavor = "multi_thread")]
async fn no_ack_for_a_batch_whose_commit_failed() -> Result<()> {
    let server = tests::dedicated_postgres().await?;
    let edge = TestEdge::start_on(&server, edge::EdgeConfig::default()).await?;
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    ack(connection.round_trip(1, vec![llm_event("before", 1.0, 1.0)]).await?);
    server.stop().await?;
    let events: Vec<_> = (0..20).map(|i| llm_event("during", f64::from(i) + 1.0, 1.0)).collect();
    match connection.round_trip(2, events.clone()).await? {
        Message::Error(error) => {
            assert_eq!((error.code, error.fatal, error.sequence), (ErrorCode::Unavailable, false, Some(2)));
            assert!(error.code.is_retryable());
        }
        other => panic!("a failed commit must not be acked: {other:?}"),
    }
    server.start().await?;
    // The client resends the same events; they land exactly once.
    let answer = loop {
        match connection.round_trip(3, events.clone()).await? {
            Message::Ack(ack) => break ack,
            Message::Error(error) if error.code.is_retryable() => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    };
    assert_eq!(answer.stored + answer.duplicate, 20);
    let mut db = edge.connect_db().await?;
    assert_eq!(stored_count(&mut db, edge.tenant.id).await?, 21);
    assert_rollups_match_raw(&mut db).await?;
    Ok(())
}

/// SQLite's way for a commit to fail: another process (a backup, an `sqlite3` shell inside a
/// transaction) holds the write lock for longer than the store's `busy_timeout`. The batch is
/// answered with a retryable error and nothing of it is stored; the resend lands exactly once.
/// Deleting the file or making it read-only mid-run would not be comparable: open connections
/// go on writing to the unlinked or already-open file, so there is nothing to observe.
#[tokio::test(flavor = "multi_thread")]
async fn no_ack_while_another_process_holds_the_sqlite_write_lock() -> Result<()> {
    let options = sink::sqlite::SqliteOptions {
        busy_timeout: std::time::Duration::from_millis(300),
        ..sink::sqlite::SqliteOptions::default()
    };
    let edge = TestEdge::launch_sqlite(options, edge::EdgeConfig::default()).await?;
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    ack(connection.round_trip(1, vec![llm_event("before", 1.0, 1.0)]).await?);
    let mut other_process = edge.connect_sqlite().await?;
    sqlx::query("BEGIN IMMEDIATE").execute(&mut other_process).await?;
    let events: Vec<_> = (0..20).map(|i| llm_event("during", f64::from(i) + 1.0, 1.0)).collect();
    match connection.round_trip(2, events.clone()).await? {
        Message::Error(error) => {
            assert_eq!((error.code, error.fatal, error.sequence), (ErrorCode::Unavailable, false, Some(2)));
            assert!(error.code.is_retryable());
        }
        other => panic!("a failed commit must not be acked: {other:?}"),
    }
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 1, "nothing of the failed batch is stored");
    sqlx::query("ROLLBACK").execute(&mut other_process).await?;
    other_process.close().await?;
    let answer = ack(connection.round_trip(3, events).await?);
    assert_eq!((answer.stored, answer.duplicate), (20, 0));
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 21);
    edge.assert_rollups_match_raw().await?;
    Ok(())
}
