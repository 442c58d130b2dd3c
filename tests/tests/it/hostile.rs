//! What a hostile tenant admin (or a careless client) sends or configures fails only that
//! tenant's own requests: overflowing money, events outside the partitions, rows the database
//! refuses, broken price books, ambiguous names, revoked keys on open connections.

use std::time::Duration;

use anyhow::Result;
use axum::http::StatusCode;
use serde_json::{Value, json};
use sink::Scope;
use wire::Message;

use crate::support::{Backend, OPERATOR_KEY, RawConnection, TestEdge, both_backends, create_key};

both_backends!(
    overflowing_costs_are_refused_alone_and_absurd_rules_never_stored,
    tenant_windows_stay_inside_what_storage_covers,
    a_service_put_replaces_its_own_rules_and_a_broken_book_never_fails_ingest,
    tenant_names_are_never_ids_and_lookups_are_unambiguous,
    control_characters_are_refused_with_400,
    revocation_reaches_open_binary_connections,
);

/// 2^53: the largest quantity the protocol accepts.
const QUANTITY_MAX: f64 = 9_007_199_254_740_992.0;

fn llm(user: &str, input: f64) -> Value {
    json!({"user_id": user, "service_type": "llm_service", "service_provider": "openai", "model": "gpt-4o",
        "input_tokens": input, "output_tokens": 1})
}

/// The largest per-unit rule a tenant may set on its own LLM input tokens.
fn absurd_rule() -> Value {
    json!({"service_type": "llm_service", "service_provider": "openai", "model": "gpt-4o",
        "unit": "input_tokens", "method": "per_unit", "rate": "1000000"})
}

async fn post(edge: &TestEdge, path: &str, key: &str, body: Value) -> Result<(StatusCode, Value)> {
    edge.http("POST", path, Some(key), body).await
}

async fn ready(edge: &TestEdge) -> Result<StatusCode> {
    Ok(edge.http("GET", "/ready", None, Value::Null).await?.0)
}

async fn overflowing_costs_are_refused_alone_and_absurd_rules_never_stored(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    // The probe's rules: packages of 1e-8 and of 1e-28 units would overflow (or price at $0).
    for size in ["0.00000001", "0.0000000000000000000000000001"] {
        let rule = json!({"service_type": "llm_service", "unit": "input_tokens", "method": "package",
            "size": size, "price": "1000000"});
        let (status, body) = post(&edge, "/api/v1/admin/prices", &admin, rule).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "size {size}: {body}");
        assert!(body["detail"].as_str().unwrap_or_default().contains("package size"), "{body}");
    }
    let (status, body) = post(&edge, "/api/v1/admin/prices", &admin, absurd_rule()).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Two events each costing 2^53 × 1e6 in one batch, and a good one: the two are refused
    // alone, naming the cost; the good one is stored; nothing panics.
    let batch = json!({"events": [llm("u1", QUANTITY_MAX), llm("u2", 3.0), llm("u3", QUANTITY_MAX)]});
    let (status, body) = post(&edge, "/api/v1/events/batch", &edge.key, batch).await?;
    assert!(status.is_success(), "{status}: {body}");
    let results = body["results"].as_array().cloned().unwrap_or_default();
    let statuses: Vec<&str> =
        results.iter().map(|result| result["status"].as_str().unwrap_or_default()).collect();
    assert_eq!(statuses, ["rejected", "stored", "rejected"], "{body}");
    assert!(results[0]["error"].to_string().contains("cost"), "{body}");
    // Over the binary protocol too, and the connection goes on.
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    let huge = crate::support::llm_event("u4", QUANTITY_MAX, 1.0);
    let fine = crate::support::llm_event("u5", 2.0, 1.0);
    let Message::Ack(ack) = connection.round_trip(1, vec![huge, fine.clone()]).await? else {
        anyhow::bail!("expected an ack");
    };
    assert_eq!((ack.stored, ack.rejected.len()), (1, 1), "{ack:?}");
    assert!(ack.rejected[0].message.contains("cost"), "{ack:?}");
    let Message::Ack(again) = connection.round_trip(2, vec![fine]).await? else {
        anyhow::bail!("expected an ack");
    };
    assert_eq!(again.duplicate, 1);
    // Another tenant is untouched, and every worker is up.
    let (other, other_key) = edge.other_tenant("bystander").await?;
    let (status, _) = post(&edge, "/api/v1/events", &other_key, llm("b", 10.0)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready(&edge).await?, StatusCode::OK);
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 2);
    assert_eq!(edge.stored_count(other.id).await?, 1);
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

async fn tenant_windows_stay_inside_what_storage_covers(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let (status, mut settings) =
        edge.http("GET", "/api/v1/admin/settings", Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    // 400 days back, or a week ahead, would accept events that have no partition.
    for (field, seconds) in [("late_window_seconds", 400 * 86_400), ("future_window_seconds", 7 * 86_400)] {
        let mut wide = settings.clone();
        wide[field] = json!(seconds);
        let (status, body) = edge.http("PUT", "/api/v1/admin/settings", Some(&admin), wide).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {body}");
        assert!(body["detail"].as_str().unwrap_or_default().starts_with(field), "{body}");
    }
    settings["late_window_seconds"] = json!(30 * 86_400);
    let (status, body) = edge.http("PUT", "/api/v1/admin/settings", Some(&admin), settings).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A 100-day-old event next to a good one: that event alone is refused, by the window.
    let old = edge::auth::now_us() - 100 * 86_400_000_000;
    let mut stale = llm("old", 1.0);
    stale["timestamp"] = json!(format_rfc3339(old));
    let batch = json!({"events": [stale, llm("new", 1.0)]});
    let (status, body) = post(&edge, "/api/v1/events/batch", &edge.key, batch).await?;
    assert!(status.is_success(), "{status}: {body}");
    assert_eq!(body["results"][0]["status"], "rejected", "{body}");
    assert!(body["results"][0]["error"].to_string().contains("timestamp"), "{body}");
    assert_eq!(body["results"][1]["status"], "stored", "{body}");
    Ok(())
}

fn format_rfc3339(unix_us: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_us) * 1000)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_default()
}

async fn a_service_put_replaces_its_own_rules_and_a_broken_book_never_fails_ingest(
    backend: Backend,
) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let service = |rate: &str| json!({"service_name": "OCR", "billing_config": {"unit": "pages", "rates": {"standard": rate}}});
    let ocr = |user: &str| {
        json!({"user_id": user, "service_type": "ocr", "service_provider": "acme", "event_type": "page",
            "metrics": {"pages": 2}})
    };
    // The probe: the same PUT twice within the hour used to leave two rules that tie.
    for (index, rate) in ["0.5", "0.75", "1.25"].iter().enumerate() {
        let (status, body) = edge.http("PUT", "/api/v1/services/ocr", Some(&admin), service(rate)).await?;
        assert!(status.is_success(), "{status}: {body}");
        let user = format!("u{index}");
        let (status, body) = post(&edge, "/api/v1/events", &edge.key, ocr(&user)).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let events = edge.events().await?;
    let mut costs: Vec<String> =
        events.iter().filter_map(|event| event.cost.map(|cost| cost.normalize().to_string())).collect();
    costs.sort();
    assert_eq!(costs, ["1", "1.5", "2.5"], "each PUT's rate applies from then on: {events:?}");
    let (status, prices) = edge.http("GET", "/api/v1/admin/prices", Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(prices["problems"], json!([]), "{prices}");
    // A refused billing_config saves nothing, not even the service.
    let bad =
        json!({"service_name": "Bad", "billing_config": {"unit": "pages", "rates": {"standard": "-1"}}});
    let (status, body) = edge.http("PUT", "/api/v1/services/bad", Some(&admin), bad).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = edge.http("GET", "/api/v1/services/bad", Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A book made inconsistent behind the API's back (two rules that tie, stored directly) is
    // reported and repairable, and ingest never fails on it.
    let tie = |id: uuid::Uuid, rate: &str| sink::StoredPriceRule {
        id,
        tenant_id: edge.tenant.id,
        definition: json!({"service_type": "llm_service", "unit": "output_tokens", "method": "per_unit", "rate": rate}),
        effective_from_us: 0,
        effective_until_us: None,
        retired: false,
    };
    let (first, second) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    edge.store.insert_price_rule(&tie(first, "1")).await?;
    edge.store.insert_price_rule(&tie(second, "2")).await?;
    edge.edge.state.ingestor.tenants().invalidate(edge.tenant.id);
    let (status, body) = post(&edge, "/api/v1/events", &edge.key, llm("tie", 1.0)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, prices) = edge.http("GET", "/api/v1/admin/prices", Some(&admin), Value::Null).await?;
    assert!(prices["problems"].to_string().contains(&first.to_string()), "{prices}");
    // New rules that do not tie can still be added; the tie is repaired by retiring one rule.
    let (status, body) = post(&edge, "/api/v1/admin/prices", &admin, absurd_rule()).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) =
        edge.http("DELETE", &format!("/api/v1/admin/prices/{first}"), Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

async fn tenant_names_are_never_ids_and_lookups_are_unambiguous(backend: Backend) -> Result<()> {
    let (edge, _) = TestEdge::with_admin(backend).await?;
    let impostor = json!({"name": edge.tenant.id.to_string()});
    let (status, body) = post(&edge, "/api/v1/admin/tenants", OPERATOR_KEY, impostor).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // By id and by name, the same tenant.
    let by_id = format!("/api/v1/admin/tenants/{}/disable", edge.tenant.id);
    let (status, body) = post(&edge, &by_id, OPERATOR_KEY, json!({})).await?;
    assert_eq!((status, body["id"].as_str()), (StatusCode::OK, Some(edge.tenant.id.to_string().as_str())));
    let (status, body) = post(&edge, "/api/v1/admin/tenants/acme/enable", OPERATOR_KEY, json!({})).await?;
    assert_eq!((status, body["id"].as_str()), (StatusCode::OK, Some(edge.tenant.id.to_string().as_str())));
    Ok(())
}

async fn control_characters_are_refused_with_400(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let (status, body) = post(&edge, "/api/v1/admin/keys", &admin, json!({"label": "a\u{0}b"})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let service = json!({"service_name": "x\u{0}y"});
    let (status, body) = edge.http("PUT", "/api/v1/services/nul", Some(&admin), service).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, mut settings) =
        edge.http("GET", "/api/v1/admin/settings", Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    settings["time_zone"] = json!("Europe/\u{0}Paris");
    let (status, body) = edge.http("PUT", "/api/v1/admin/settings", Some(&admin), settings).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    Ok(())
}

async fn revocation_reaches_open_binary_connections(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let key = create_key(&edge.store, &edge.tenant, vec![Scope::Ingest]).await?;
    let mut connection = RawConnection::open(&edge, &key).await?;
    let event = crate::support::llm_event("u", 1.0, 1.0);
    assert!(matches!(connection.round_trip(1, vec![event.clone()]).await?, Message::Ack(_)));
    let (_, keys) = edge.http("GET", "/api/v1/admin/keys", Some(&admin), Value::Null).await?;
    let id = keys["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|listed| key.starts_with(listed["prefix"].as_str().unwrap_or("-"))))
        .and_then(|listed| listed["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let (status, _) =
        edge.http("DELETE", &format!("/api/v1/admin/keys/{id}"), Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    let other = crate::support::llm_event("u2", 1.0, 1.0);
    match connection.round_trip(2, vec![other]).await? {
        Message::Error(error) => {
            assert!(error.fatal && error.code == wire::ErrorCode::Unauthorized, "{error:?}")
        }
        other => anyhow::bail!("a revoked key still ingests: {other:?}"),
    }
    // A disabled tenant's open connection stops too.
    let mut second = RawConnection::open(&edge, &edge.key).await?;
    assert!(matches!(second.round_trip(1, vec![event]).await?, Message::Ack(_)));
    let (status, _) = post(&edge, "/api/v1/admin/tenants/acme/disable", OPERATOR_KEY, json!({})).await?;
    assert_eq!(status, StatusCode::OK);
    let late = crate::support::llm_event("u3", 1.0, 1.0);
    let answer = tokio::time::timeout(Duration::from_secs(10), second.round_trip(2, vec![late])).await??;
    assert!(matches!(answer, Message::Error(ref error) if error.fatal), "{answer:?}");
    Ok(())
}

/// Three tenants on one edge: "acme" sends every poison (events whose cost would overflow under
/// the largest rule it may set, events outside the window, rows the database refuses — a day
/// whose partition is gone, and a user its constraint forbids — a price book made ambiguous, and
/// the same service PUT over and over) while two others ingest under load over HTTP and the
/// binary protocol. The two lose nothing and see no error, `/ready` stays true (storage is up,
/// no worker dies), and the rollups equal the raw events.
#[tokio::test(flavor = "multi_thread")]
async fn one_hostile_tenant_cannot_hurt_two_others() -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(Backend::Postgres).await?;
    let (bravo, bravo_key) = edge.other_tenant("bravo").await?;
    let (charlie, charlie_key) = edge.other_tenant("charlie").await?;
    // Rows of user "poison" and of five days ago can never commit: the database refuses them.
    let five_days_ago_us = edge::auth::now_us() - 5 * 86_400_000_000;
    let day = time::OffsetDateTime::from_unix_timestamp(five_days_ago_us / 1_000_000)?.date();
    let partition = format!("usage_events_p{:04}{:02}{:02}", day.year(), u8::from(day.month()), day.day());
    let mut conn = edge.connect_db().await?;
    // The edge's first maintenance round would create the partition again.
    edge.edge.maintenance_rounds(1).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {partition}"))).execute(&mut conn).await?;
    sqlx::query("ALTER TABLE usage_events ADD CONSTRAINT test_no_poison CHECK (user_id <> 'poison')")
        .execute(&mut conn)
        .await?;
    let (status, body) = post(&edge, "/api/v1/admin/prices", &admin, absurd_rule()).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let lost_before = crate::support::events_lost(&edge);

    let run_for = Duration::from_secs(6);
    let started = tokio::time::Instant::now();
    let http_load = async {
        let (mut acked, mut round) = (0usize, 0usize);
        while started.elapsed() < run_for {
            let events: Vec<Value> = (0..50).map(|i| llm(&format!("b{round}-{i}"), 10.0)).collect();
            let (status, body) =
                post(&edge, "/api/v1/events/batch", &bravo_key, json!({"events": events})).await?;
            anyhow::ensure!(status == StatusCode::OK, "bravo got {status}: {body}");
            acked += body["stored_count"].as_u64().unwrap_or_default() as usize;
            round += 1;
        }
        anyhow::Ok(acked)
    };
    let wire_load = async {
        let mut connection = RawConnection::open(&edge, &charlie_key).await?;
        let (mut acked, mut sequence) = (0usize, 0u64);
        while started.elapsed() < run_for {
            sequence += 1;
            let events =
                (0..100).map(|i| crate::support::llm_event(&format!("c{sequence}-{i}"), 5.0, 1.0)).collect();
            match connection.round_trip(sequence, events).await? {
                Message::Ack(ack) if ack.rejected.is_empty() => acked += ack.stored as usize,
                other => anyhow::bail!("charlie got {other:?}"),
            }
        }
        anyhow::Ok(acked)
    };
    let hostile = async {
        let mut connection = RawConnection::open(&edge, &edge.key).await?;
        let mut round = 0u64;
        while started.elapsed() < run_for {
            round += 1;
            let mut stale = llm("stale", 1.0);
            stale["timestamp"] = json!(format_rfc3339(edge::auth::now_us() - 100 * 86_400_000_000));
            let mut lost_day = llm("lost-day", 1.0);
            lost_day["timestamp"] = json!(format_rfc3339(five_days_ago_us));
            let batch = json!({"events": [llm("huge", QUANTITY_MAX), stale, lost_day, llm("poison", 1.0), llm("fine", 1.0)]});
            let (status, body) = post(&edge, "/api/v1/events/batch", &edge.key, batch).await?;
            anyhow::ensure!(!status.is_server_error(), "acme got {status}: {body}");
            let statuses: Vec<&str> = body["results"]
                .as_array()
                .map(|results| {
                    results.iter().map(|result| result["status"].as_str().unwrap_or_default()).collect()
                })
                .unwrap_or_default();
            anyhow::ensure!(
                statuses == ["rejected", "rejected", "rejected", "rejected", "stored"],
                "acme: {body}"
            );
            let poison = vec![
                crate::support::llm_event("poison", 1.0, 1.0),
                crate::support::llm_event("huge", QUANTITY_MAX, 1.0),
                crate::support::llm_event("fine", 1.0, 1.0),
            ];
            match connection.round_trip(round, poison).await? {
                Message::Ack(ack) => anyhow::ensure!(ack.stored == 1 && ack.rejected.len() == 2, "{ack:?}"),
                other => anyhow::bail!("acme over the protocol got {other:?}"),
            }
            // Accepted before storage refused it: it must be counted lost, not vanish.
            let (status, body) =
                post(&edge, "/api/v1/events?ack=accepted", &edge.key, llm("poison", 1.0)).await?;
            anyhow::ensure!(status == StatusCode::ACCEPTED, "{status}: {body}");
            let service = json!({"service_name": "OCR", "billing_config": {"unit": "pages", "rates": {"standard": "0.5"}}});
            let (status, body) = edge.http("PUT", "/api/v1/services/ocr", Some(&admin), service).await?;
            anyhow::ensure!(status.is_success(), "{status}: {body}");
            let tie = sink::StoredPriceRule {
                id: uuid::Uuid::now_v7(),
                tenant_id: edge.tenant.id,
                definition: json!({"service_type": "llm_service", "unit": "output_tokens", "method": "per_unit", "rate": "1"}),
                effective_from_us: 0,
                effective_until_us: None,
                retired: false,
            };
            edge.store.insert_price_rule(&tie).await?;
            edge.edge.state.ingestor.tenants().invalidate(edge.tenant.id);
        }
        anyhow::Ok(round)
    };
    let readiness = async {
        let mut checks = 0;
        while started.elapsed() < run_for {
            anyhow::ensure!(ready(&edge).await? == StatusCode::OK, "/ready went false");
            checks += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(checks)
    };
    let (bravo_acked, charlie_acked, hostile_rounds, checks) =
        tokio::try_join!(http_load, wire_load, hostile, readiness)?;
    println!(
        "bravo {bravo_acked} acked over HTTP, charlie {charlie_acked} over the protocol, \
         acme {hostile_rounds} poison rounds, /ready true in {checks} checks"
    );
    assert!(bravo_acked > 0 && charlie_acked > 0 && hostile_rounds > 0);
    assert_eq!(edge.stored_count(bravo.id).await?, bravo_acked, "bravo lost or doubled events");
    assert_eq!(edge.stored_count(charlie.id).await?, charlie_acked, "charlie lost or doubled events");
    assert_eq!(edge.stored_count(edge.tenant.id).await?, 2 * hostile_rounds as usize);
    // Every accepted poison event is counted lost (once its batch is done), and nothing else.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lost = crate::support::events_lost(&edge) - lost_before;
        if lost >= hostile_rounds as f64 || tokio::time::Instant::now() > deadline {
            assert_eq!(lost, hostile_rounds as f64, "accepted events refused by storage, counted lost");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("ALTER TABLE usage_events DROP CONSTRAINT test_no_poison").execute(&mut conn).await?;
    crate::support::assert_rollups_match_raw(&mut conn).await?;
    Ok(())
}

/// Every network read has a deadline: a client that trickles its headers or stalls its body is
/// dropped, and past the connection cap new clients wait instead of piling up.
#[tokio::test(flavor = "multi_thread")]
async fn slow_http_clients_are_dropped_and_connections_are_capped() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = serve::HttpLimits {
        header_read_timeout: Duration::from_millis(800),
        body_read_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_secs(10),
        connections_max: 2,
    };
    let config = edge::EdgeConfig { http: limits, ..edge::EdgeConfig::default() };
    let edge = TestEdge::launch(Backend::Sqlite, config).await?;
    let addr = edge.edge.http_addr;
    // Two clients hold both connections, one trickling headers, one stalling its body.
    let mut trickler = tokio::net::TcpStream::connect(addr).await?;
    trickler.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await?;
    let mut staller = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"user",
        edge.key
    );
    staller.write_all(head.as_bytes()).await?;
    // A third client waits for a free connection, then is served.
    let started = std::time::Instant::now();
    let mut third = tokio::net::TcpStream::connect(addr).await?;
    third.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut answer)).await??;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(started.elapsed() >= Duration::from_millis(500), "served before a slot was free");
    // Both slow clients were dropped (the staller with an error answer first: its body did not
    // arrive in time).
    for (name, stream) in [("trickler", &mut trickler), ("staller", &mut staller)] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "{name} still connected");
        let text = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || text.starts_with("HTTP/1.1 408") || text.starts_with("HTTP/1.1 400"),
            "{name}: {text}"
        );
    }
    Ok(())
}

/// A binary client that never reads its answers is dropped after the write deadline instead of
/// having its answers buffered for it.
#[tokio::test(flavor = "multi_thread")]
async fn binary_clients_that_do_not_read_are_dropped() -> Result<()> {
    use futures_util::SinkExt;
    let config =
        edge::EdgeConfig { wire_write_timeout: Duration::from_millis(500), ..edge::EdgeConfig::default() };
    let edge = TestEdge::launch(Backend::Sqlite, config).await?;
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    let started = std::time::Instant::now();
    let mut pings = 0u64;
    // Pings are answered at once; unread, the answers fill both socket buffers, then the write
    // deadline passes and the edge closes the connection, which ends this loop with an error.
    let dropped = loop {
        if started.elapsed() > Duration::from_secs(60) {
            break false;
        }
        pings += 1;
        let ping = Message::Ping(wire::Ping { nonce: pings });
        if connection.framed.send(ping).await.is_err() {
            break true;
        }
    };
    println!("dropped after {pings} unread pings in {:?}", started.elapsed());
    assert!(dropped, "the edge kept a client that reads nothing for 60 s");
    Ok(())
}

/// `/ready` tells the truth about the sink workers: while they cannot commit (PostgreSQL answers
/// pings, but the events table is locked), it goes false; once they commit again, true.
#[tokio::test(flavor = "multi_thread")]
async fn ready_goes_false_while_sink_workers_cannot_commit() -> Result<()> {
    let mut config = edge::EdgeConfig::default();
    // Stalled from 4 s into the commit, given up at 8 s: a window wide enough for a busy machine.
    config.batch.commit_timeout = Duration::from_secs(8);
    let edge = TestEdge::launch(Backend::Postgres, config).await?;
    assert_eq!(ready(&edge).await?, StatusCode::OK);
    let mut locker = edge.connect_db().await?;
    sqlx::query("BEGIN").execute(&mut locker).await?;
    sqlx::query("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE").execute(&mut locker).await?;
    let blocked = tokio::spawn({
        let key = edge.key.clone();
        let state = edge.edge.state.clone();
        async move {
            let request = axum::http::Request::post("/api/v1/events")
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(llm("u", 1.0).to_string()))?;
            use tower::ServiceExt;
            let response = edge::http::router(state).oneshot(request).await?;
            anyhow::Ok(response.status())
        }
    });
    // Down within the stall limit (half the commit deadline), and while the commit hangs.
    let mut saw_not_ready = false;
    for _ in 0..75 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if ready(&edge).await? == StatusCode::SERVICE_UNAVAILABLE {
            saw_not_ready = true;
            break;
        }
    }
    assert!(saw_not_ready, "/ready stayed true while no commit could finish");
    // The request is answered with a retryable error when the commit deadline passes, never with
    // success; after the lock goes, the workers commit and /ready is true again.
    let status = blocked.await??;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    sqlx::query("ROLLBACK").execute(&mut locker).await?;
    let (status, body) = post(&edge, "/api/v1/events", &edge.key, llm("u", 1.0)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ready(&edge).await?, StatusCode::OK);
    Ok(())
}
