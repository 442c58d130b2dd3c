//! The control plane, on PostgreSQL and on SQLite: tenants and scoped keys, settings, the
//! service registry, pricing at ingest, rule versions and re-rating, rate limits and quotas.

use anyhow::Result;
use axum::http::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;
use wire::{Message, QuantityKind};

use crate::support::{Backend, OPERATOR_KEY, RawConnection, TestEdge, both_backends};

both_backends!(
    scopes_keys_and_tenants,
    per_unit_and_package_prices_are_exact_at_ingest,
    a_new_rule_version_and_a_rerate_move_events_and_rollups_together,
    the_registry_validates_custom_types_and_prices_them,
    rate_limits_answer_429_and_busy,
    quotas_reject_or_flag_once_exceeded,
);

fn decimal(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

async fn post(edge: &TestEdge, path: &str, key: &str, body: Value) -> Result<(StatusCode, Value)> {
    edge.http("POST", path, Some(key), body).await
}

fn llm(user: &str, model: &str, input: f64, output: f64) -> Value {
    json!({"user_id": user, "service_type": "llm_service", "service_provider": "openai", "model": model,
        "input_tokens": input, "output_tokens": output})
}

async fn scopes_keys_and_tenants(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    // An ingest+query key cannot administer; an admin key can.
    let (status, _) = edge.http("GET", "/api/v1/admin/keys", Some(&edge.key), Value::Null).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = edge.http("GET", "/api/v1/admin/keys", Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["keys"].as_array().map(Vec::len), Some(2));
    // Only the operator manages tenants.
    let (status, _) = post(&edge, "/api/v1/admin/tenants", &admin, json!({"name": "beta"})).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, tenant) =
        post(&edge, "/api/v1/admin/tenants", OPERATOR_KEY, json!({"name": "beta"})).await?;
    assert_eq!(status, StatusCode::CREATED, "{tenant}");
    let (status, beta_admin) = post(
        &edge,
        "/api/v1/admin/tenants/beta/keys",
        OPERATOR_KEY,
        json!({"scopes": ["admin"], "label": "root"}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{beta_admin}");
    let beta_admin = beta_admin["key"].as_str().unwrap_or_default().to_owned();
    // A key made without scopes gets ingest and query, never admin.
    let (status, ingest) = post(&edge, "/api/v1/admin/keys", &beta_admin, json!({"label": "app"})).await?;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ingest["scopes"], json!(["ingest", "query"]));
    let ingest_key = ingest["key"].as_str().unwrap_or_default().to_owned();
    let (status, _) = post(&edge, "/api/v1/admin/keys", &ingest_key, json!({})).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "an ingest key cannot make keys");
    let (status, body) = post(&edge, "/api/v1/events", &ingest_key, llm("u", "gpt-4o", 1.0, 1.0)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // An admin-only key cannot ingest.
    let (status, _) = post(&edge, "/api/v1/events", &beta_admin, llm("u", "gpt-4o", 1.0, 1.0)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Revoked keys stop working; so do keys of disabled tenants.
    let id = ingest["id"].as_str().unwrap_or_default();
    let (status, _) =
        edge.http("DELETE", &format!("/api/v1/admin/keys/{id}"), Some(&beta_admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post(&edge, "/api/v1/events", &ingest_key, llm("u", "gpt-4o", 1.0, 1.0)).await?;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_api_key")));
    let (status, _) = post(&edge, "/api/v1/admin/tenants/acme/disable", OPERATOR_KEY, json!({})).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post(&edge, "/api/v1/events", &edge.key, llm("u", "gpt-4o", 1.0, 1.0)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "a disabled tenant cannot ingest");
    Ok(())
}

async fn per_unit_and_package_prices_are_exact_at_ingest(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let input_rule = json!({"service_type": "llm_service", "service_provider": "openai", "model": "m1",
        "unit": "input_tokens", "method": "per_unit", "rate": "0.000003"});
    let output_rule = json!({"service_type": "llm_service", "model": "m1", "unit": "output_tokens",
        "method": "package", "size": "1000", "price": "0.01"});
    for rule in [input_rule, output_rule] {
        let (status, body) = post(&edge, "/api/v1/admin/prices", &admin, rule).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // 1500 × 0.000003 = 0.0045 and ceil(1000 / 1000) = 1 package: 0.0145.
    // 1 × 0.000003 and ceil(1001 / 1000) = 2 packages: 0.020003.
    // 0 input and 0 output: per-unit 0, no package: 0 (priced, not unpriced).
    // Model m2 has no rule (and no catalog entry): unpriced, cost NULL.
    let events = json!({"events": [llm("a", "m1", 1500.0, 1000.0), llm("b", "m1", 1.0, 1001.0),
        llm("c", "m1", 0.0, 0.0), llm("d", "m2", 10.0, 10.0)]});
    let (status, body) = post(&edge, "/api/v1/events/batch", &edge.key, events).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rows = edge.events().await?;
    let users: Vec<&str> = rows.iter().map(|row| row.user_id.as_str()).collect();
    assert_eq!(users, ["a", "b", "c", "d"]);
    let costs: Vec<Option<Decimal>> = rows.iter().map(|row| row.cost).collect();
    assert_eq!(costs, vec![Some(decimal("0.0145")), Some(decimal("0.020003")), Some(decimal("0")), None]);
    assert_eq!(rows[0].price_rule_ids.as_ref().map(Vec::len), Some(2), "both rule versions are recorded");
    assert_eq!(rows[3].price_rule_ids, None);
    let rollups = edge.rollups().await?;
    let cost: Decimal = rollups.values().map(|rollup| rollup.cost).sum();
    let unpriced: i64 = rollups.values().map(|rollup| rollup.unpriced_count).sum();
    assert_eq!((cost, unpriced), (decimal("0.034503"), 1));
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

/// The cost of all events, summed from raw events and from the rollups.
async fn total(edge: &TestEdge) -> Result<(Decimal, Decimal)> {
    let raw = edge.events().await?.iter().filter_map(|event| event.cost).sum();
    let rolled_up = edge.rollups().await?.values().map(|rollup| rollup.cost).sum();
    Ok((raw, rolled_up))
}

async fn a_new_rule_version_and_a_rerate_move_events_and_rollups_together(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let rule = |rate: &str| json!({"service_type": "custom", "service_provider": "p", "unit": "events", "method": "per_unit", "rate": rate});
    let (status, v1) = post(&edge, "/api/v1/admin/prices", &admin, rule("0.001")).await?;
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    let events: Vec<Value> = (0..10)
        .map(|i| json!({"user_id": format!("u{}", i % 3), "service_type": "custom", "service_provider": "p", "event_type": "job"}))
        .collect();
    let (status, _) = post(&edge, "/api/v1/events/batch", &edge.key, json!({"events": events})).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(total(&edge).await?, (decimal("0.01"), decimal("0.01")));

    let mut replacement = rule("0.002");
    replacement["replaces"] = v1["id"].clone();
    let (status, v2) = post(&edge, "/api/v1/admin/prices", &admin, replacement).await?;
    assert_eq!(status, StatusCode::CREATED, "{v2}");
    let range = crate::rerate::recent_range();
    let run = crate::rerate::rerate_and_wait(&edge, &admin, &range).await?;
    assert_eq!((run["events_scanned"].as_i64(), run["events_changed"].as_i64()), (Some(10), Some(10)));
    assert_eq!(
        (
            decimal(&run["cost_before"].to_string().replace('"', "")),
            decimal(&run["cost_after"].to_string().replace('"', ""))
        ),
        (decimal("0.01"), decimal("0.02"))
    );
    assert_eq!(total(&edge).await?, (decimal("0.02"), decimal("0.02")));
    let v2_id: Uuid = v2["id"].as_str().unwrap_or_default().parse()?;
    let events = edge.events().await?;
    let recorded = events.iter().filter(|event| event.price_rule_ids == Some(vec![v2_id])).count();
    assert_eq!(recorded, 10, "events record the version that priced them");
    // Idempotent: a second run changes nothing; both runs are audited.
    let again = crate::rerate::rerate_and_wait(&edge, &admin, &range).await?;
    assert_eq!(again["events_changed"].as_i64(), Some(0));
    assert_eq!(edge.rerate_runs().await?, vec![(10, 10), (10, 0)]);
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

async fn the_registry_validates_custom_types_and_prices_them(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let service = json!({"service_type": "ml_predictions", "service_name": "Custom ML Service",
        "providers": ["provider_a", "provider_b"],
        "required_fields": ["model_version", {"name": "predictions", "kind": "number"}],
        "billing_config": {"unit": "predictions", "calculation_method": "multiply", "rates": {"standard": 0.001}}});
    let (status, body) = post(&edge, "/api/v1/services", &edge.key, service.clone()).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "registering needs an admin key: {body}");
    let (status, body) = post(&edge, "/api/v1/services", &admin, service.clone()).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = post(&edge, "/api/v1/services", &admin, service).await?;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) =
        edge.http("PUT", "/api/v1/services/llm_service", Some(&admin), json!({"service_name": "x"})).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, listed) = edge.http("GET", "/api/v1/services", Some(&edge.key), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["services"].as_array().map(Vec::len), Some(5));

    let event = |provider: &str, extra: Value| {
        let mut event = json!({"user_id": "u", "service_type": "ml_predictions", "service_provider": provider,
            "event_type": "predict", "metadata": {"model_version": "3"}, "metrics": {"predictions": 250}});
        if let (Some(event), Some(extra)) = (event.as_object_mut(), extra.as_object()) {
            event.extend(extra.clone());
        }
        event
    };
    let batch = json!({"events": [
        event("provider_a", json!({})),
        event("provider_z", json!({})),
        event("provider_a", json!({"metrics": {}})),
        event("provider_a", json!({"metrics": {}, "metadata": {"model_version": "3", "predictions": "250"}})),
        event("provider_a", json!({"metadata": {}})),
    ]});
    let (status, body) = post(&edge, "/api/v1/events/batch", &edge.key, batch).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let errors: Vec<&str> = body["failed_events"].as_array().map_or(Vec::new(), |failed| {
        failed.iter().map(|failure| failure["error"].as_str().unwrap_or_default()).collect()
    });
    assert_eq!(errors.len(), 4, "{body}");
    assert!(
        errors[0].starts_with("service_provider: \"provider_z\" is not a provider of ml_predictions"),
        "{}",
        errors[0]
    );
    assert!(errors[1].starts_with("predictions: is required"), "{}", errors[1]);
    assert!(errors[2].starts_with("predictions: must be a number"), "{}", errors[2]);
    assert!(errors[3].starts_with("model_version: is required"), "{}", errors[3]);
    let costs: Vec<Option<Decimal>> = edge.events().await?.iter().map(|event| event.cost).collect();
    assert_eq!(costs, vec![Some(decimal("0.25"))], "250 predictions at 0.001 from the billing_config");
    Ok(())
}

async fn put_settings(edge: &TestEdge, admin: &str, changes: Value) -> Result<()> {
    let (status, mut settings) = edge.http("GET", "/api/v1/admin/settings", Some(admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK);
    if let (Some(settings), Some(changes)) = (settings.as_object_mut(), changes.as_object()) {
        settings.extend(changes.clone());
    }
    let (status, body) = edge.http("PUT", "/api/v1/admin/settings", Some(admin), settings).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    Ok(())
}

async fn rate_limits_answer_429_and_busy(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    put_settings(&edge, &admin, json!({"rate_limit_per_second": 1, "rate_limit_burst": 10})).await?;
    let ten: Vec<Value> = (0..10).map(|i| llm(&format!("u{i}"), "gpt-4o", 1.0, 1.0)).collect();
    let (status, body) = post(&edge, "/api/v1/events/batch", &edge.key, json!({"events": ten})).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&edge, "/api/v1/events", &edge.key, llm("late", "gpt-4o", 1.0, 1.0)).await?;
    assert_eq!((status, body["error"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")));
    let mut connection = RawConnection::open(&edge, &edge.key).await?;
    let event = wire::Event::new("u", "llm_service", "openai", "completion")
        .with_model("gpt-4o")
        .with_quantity(QuantityKind::InputTokens, 1.0)
        .with_quantity(QuantityKind::OutputTokens, 1.0);
    match connection.round_trip(1, vec![event]).await? {
        Message::Busy(busy) => assert!(busy.retry_after_ms > 0 && busy.sequence == 1),
        other => panic!("expected busy, got {other:?}"),
    }
    assert_eq!(edge.events().await?.len(), 10);
    Ok(())
}

async fn quotas_reject_or_flag_once_exceeded(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    put_settings(&edge, &admin, json!({"monthly_event_quota": 3, "quota_policy": "reject"})).await?;
    let three: Vec<Value> = (0..3).map(|i| llm(&format!("u{i}"), "gpt-4o", 1.0, 1.0)).collect();
    let (status, _) = post(&edge, "/api/v1/events/batch", &edge.key, json!({"events": three})).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post(&edge, "/api/v1/events", &edge.key, llm("x", "gpt-4o", 1.0, 1.0)).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body["detail"].as_str().unwrap_or_default().contains("monthly event quota of 3"), "{body}");
    put_settings(&edge, &admin, json!({"quota_policy": "flag"})).await?;
    let (status, _) = post(&edge, "/api/v1/events", &edge.key, llm("y", "gpt-4o", 1.0, 1.0)).await?;
    assert_eq!(status, StatusCode::OK);
    let flagged: Vec<(String, i64)> =
        edge.events().await?.into_iter().map(|event| (event.user_id, event.flags)).collect();
    assert_eq!(flagged, vec![("u0".into(), 0), ("u1".into(), 0), ("u2".into(), 0), ("y".into(), 1)]);
    Ok(())
}
