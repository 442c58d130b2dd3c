//! The `Store` contract checked directly, on PostgreSQL and on SQLite alike: outcomes and dedup
//! within and across batches (and across SQLite's statement chunks), exact rollups of fractional
//! quantities, tenants, keys and settings, services and price rules, re-rating, and retention.

use std::str::FromStr;

use std::time::Duration;

use anyhow::{Result, ensure};
use rust_decimal::Decimal;
use sink::pg::{PgOptions, PgStore};
use sink::sqlite::SqliteStore;
use sink::{
    EventRow, NewApiKey, Outcome, Repriced, RerateRequest, RerateRun, Retention, Scope, ServiceRecord, Store,
    StoreError, StoredPriceRule, TenantSettings,
};
use uuid::Uuid;

use crate::support::{Backend, TestEdge, both_backends, llm_event};

both_backends!(
    outcomes_follow_dedup_within_and_across_batches,
    an_unreachable_database_is_unavailable_and_keeps_the_cause,
    rollups_are_exact_sums_of_fractional_quantities,
    tenants_keys_and_settings_round_trip,
    services_and_price_rules_round_trip,
    rerate_moves_event_and_rollup_costs_page_by_page,
    retention_deletes_old_events_and_rollups,
);

fn decimal(text: &str) -> Decimal {
    Decimal::from_str(text).expect("a decimal")
}

fn row(tenant: Uuid, event: &wire::Event) -> EventRow {
    EventRow::new(tenant, event.clone(), None)
}

const HOUR_US: i64 = 3_600_000_000;

/// A storage error says what was being done and keeps the error that stopped it as its
/// `source`, typed, so that a caller (or a log) can tell a refused connection from a timeout.
async fn an_unreachable_database_is_unavailable_and_keeps_the_cause(backend: Backend) -> Result<()> {
    let error = match backend {
        Backend::Postgres => {
            // A port nobody listens on: bound, then closed.
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let url = format!("postgres://tally@127.0.0.1:{port}/tally");
            let options = PgOptions { acquire_timeout: Duration::from_millis(500), ..PgOptions::default() };
            let store = Store::from(PgStore::connect_lazy(&url, &options)?);
            let event = llm_event("u", 1.0, 1.0).at(edge::auth::now_us());
            let error = store.commit(&[row(Uuid::now_v7(), &event)]).await.expect_err("nothing listens");
            ensure!(error.to_string().starts_with("storage unavailable: commit a batch: "), "{error}");
            let cause =
                std::error::Error::source(&error).and_then(|source| source.downcast_ref::<sqlx::Error>());
            ensure!(cause.is_some(), "the cause is the sqlx error: {error:?}");
            store.ping().await.expect_err("nothing listens")
        }
        Backend::Sqlite => {
            // A database "inside" a regular file: its directory cannot be created.
            let file = tests::fresh_sqlite()?;
            std::fs::write(file.path(), b"")?;
            let error = SqliteStore::open(file.path().join("tally.db")).await.expect_err("not a directory");
            let cause =
                std::error::Error::source(&error).and_then(|source| source.downcast_ref::<std::io::Error>());
            ensure!(cause.is_some(), "the cause is the io error: {error:?}");
            error
        }
    };
    ensure!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    ensure!(error.is_retryable() && error.code() == wire::ErrorCode::Unavailable);
    let copy = error.clone();
    ensure!(std::error::Error::source(&copy).is_some(), "a clone sent to another submitter keeps it too");
    Ok(())
}

async fn outcomes_follow_dedup_within_and_across_batches(backend: Backend) -> Result<()> {
    use Outcome::{Duplicate, Stored};
    let edge = TestEdge::on(backend).await?;
    let (acme, (globex, _)) = (edge.tenant.id, edge.other_tenant("globex").await?);
    let now_us = edge::auth::now_us() - HOUR_US;
    let [a, b, c] = ["a", "b", "c"].map(|user| llm_event(user, 10.0, 1.0).at(now_us));
    // A repeat inside the batch, and the same id and time for another tenant (another key).
    let first = [row(acme, &a), row(acme, &b), row(acme, &a), row(globex.id, &a)];
    assert_eq!(edge.store.commit(&first).await?, [Stored, Stored, Duplicate, Stored]);
    // The same event id at another time is another key; stored keys come back as duplicates.
    let a_later = a.clone().at(now_us + 1);
    let second = [row(acme, &c), row(acme, &b), row(acme, &a_later), row(acme, &b), row(acme, &a)];
    assert_eq!(edge.store.commit(&second).await?, [Stored, Duplicate, Stored, Duplicate, Duplicate]);
    assert_eq!(edge.store.commit(&[]).await?, []);

    // A large batch: repeats far apart, of rows new in this batch and of rows stored before.
    let mut large: Vec<EventRow> =
        (0..1200).map(|i| row(acme, &llm_event(&format!("u{}", i % 9), 1.0, 1.0).at(now_us - i))).collect();
    large[1100] = large[5].clone();
    large[700] = row(acme, &c);
    large[3] = large[1199].clone();
    let outcomes = edge.store.commit(&large).await?;
    for (index, outcome) in outcomes.iter().enumerate() {
        let expected = if [700, 1100, 1199].contains(&index) { Duplicate } else { Stored };
        assert_eq!(*outcome, expected, "row {index}");
    }
    assert_eq!(edge.stored_count(acme).await?, 4 + 1197);
    assert_eq!(edge.stored_count(globex.id).await?, 1);
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

async fn rollups_are_exact_sums_of_fractional_quantities(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let at_us = edge::auth::now_us() - 60_000_000;
    let event = |input: f64, latency_ms: f64| {
        llm_event("u", input, 0.0)
            .at(at_us)
            .with_quantity(wire::QuantityKind::CachedInputTokens, input / 10.0)
            .with_custom_quantity("images", input)
            .with_latency_ms(latency_ms)
    };
    // In floating point 0.1 + 0.2 is 0.30000000000000004; stored sums must be exactly 0.3.
    let first = [
        EventRow::new(edge.tenant.id, event(0.1, 0.5), Some(decimal("0.000001"))),
        EventRow::new(edge.tenant.id, event(0.2, 3.0).with_error(None), None),
    ];
    edge.store.commit(&first).await?;
    // A second batch grows the same rollup row: read, added to exactly, written back.
    let second = [
        EventRow::new(edge.tenant.id, event(0.000001, 1500.0), Some(decimal("0.1"))),
        EventRow::new(edge.tenant.id, event(7.25, 2.0), Some(decimal("0.2"))),
    ];
    edge.store.commit(&second).await?;
    let rollups = edge.rollups().await?;
    assert_eq!(rollups.len(), 1);
    let rollup = rollups.values().next().expect("one row");
    assert_eq!((rollup.event_count, rollup.error_count, rollup.unpriced_count), (4, 1, 1));
    assert_eq!(rollup.quantities["input_tokens"], decimal("7.550001"));
    assert_eq!(rollup.quantities["cached_input_tokens"], decimal("0.755"));
    assert_eq!(rollup.quantities["output_tokens"], decimal("0"));
    assert_eq!(rollup.custom_quantities["images"], decimal("7.550001"));
    assert_eq!(rollup.cost, decimal("0.300001"));
    assert_eq!(
        (rollup.latency_count, rollup.latency_sum_us, rollup.latency_max_us),
        (4, 1_505_500, 1_500_000)
    );
    // PostgreSQL keeps latency histograms per service only (checked against raw events by
    // `assert_rollups_match_raw`); SQLite keeps them per user too.
    if let Some(buckets) = &rollup.latency_buckets {
        assert_eq!(buckets.len(), sink::rollup::LATENCY_BUCKETS);
        assert_eq!(buckets[0], 1, "0.5 ms is under 1 ms");
    }
    assert_eq!(edge.store.month_usage(edge.tenant.id).await?, (4, decimal("0.300001")));
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

async fn tenants_keys_and_settings_round_trip(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let store = edge.store.as_ref();
    let taken = store.create_tenant("acme").await.expect_err("names are unique");
    assert!(
        matches!(&taken, StoreError::Invalid { message, .. } if message == "a tenant named \"acme\" exists already")
    );
    let cause = std::error::Error::source(&taken).and_then(|source| source.downcast_ref::<sqlx::Error>());
    assert!(
        matches!(cause, Some(sqlx::Error::Database(_))),
        "the refusal keeps the database's error: {taken:?}"
    );
    let globex = store.create_tenant("globex").await?;
    assert_eq!(store.find_tenant("globex").await?, Some(globex.clone()));
    assert_eq!(store.find_tenant(&globex.id.to_string()).await?, Some(globex.clone()));
    assert_eq!(store.find_tenant("initech").await?, None);
    let names: Vec<String> = store.list_tenants().await?.into_iter().map(|tenant| tenant.name).collect();
    assert_eq!(names, ["acme", "globex"]);

    // Whole seconds: PostgreSQL converts through floating point.
    let expires_at_us = (edge::auth::now_us() / 1_000_000 + 86_400) * 1_000_000;
    let new_key = NewApiKey {
        tenant_id: globex.id,
        key_hash: sink::hash_api_key("tly_secret"),
        prefix: "tly_secret".into(),
        scopes: vec![Scope::Ingest, Scope::Admin],
        label: Some("ci".into()),
        expires_at_us: Some(expires_at_us),
    };
    let key = store.create_api_key(&new_key).await?;
    let found = store.find_api_key(&new_key.key_hash).await?.expect("the key");
    assert_eq!(found, key);
    assert_eq!((found.tenant_name.as_str(), found.expires_at_us), ("globex", Some(expires_at_us)));
    assert_eq!(found.scopes, [Scope::Ingest, Scope::Admin]);
    assert_eq!(store.find_api_key(&sink::hash_api_key("tly_other")).await?, None);
    let unknown =
        NewApiKey { tenant_id: Uuid::now_v7(), key_hash: sink::hash_api_key("x"), ..new_key.clone() };
    assert!(matches!(store.create_api_key(&unknown).await, Err(StoreError::Invalid { .. })));
    let newer = store.create_api_key(&NewApiKey { key_hash: sink::hash_api_key("tly_2"), ..new_key }).await?;
    let listed = store.list_api_keys(globex.id).await?;
    assert_eq!(listed.iter().map(|info| info.id).collect::<Vec<_>>(), [newer.id, key.id], "newest first");
    assert_eq!((listed[1].prefix.as_str(), listed[1].label.as_deref()), ("tly_secret", Some("ci")));
    assert!(!store.revoke_api_key(edge.tenant.id, key.id).await?, "another tenant's key");
    assert!(store.revoke_api_key(globex.id, key.id).await?);
    assert!(store.find_api_key(&sink::hash_api_key("tly_secret")).await?.expect("kept").revoked);

    assert!(store.set_tenant_disabled(globex.id, true).await?);
    assert!(store.find_tenant("globex").await?.expect("kept").disabled);
    assert!(store.find_api_key(&sink::hash_api_key("tly_2")).await?.expect("kept").tenant_disabled);
    assert!(store.set_tenant_disabled(globex.id, false).await?);
    assert!(!store.find_tenant("globex").await?.expect("kept").disabled);
    assert!(!store.set_tenant_disabled(Uuid::now_v7(), true).await?);

    assert_eq!(store.tenant_settings(globex.id).await?, Some(TenantSettings::default()));
    assert_eq!(store.tenant_settings(Uuid::now_v7()).await?, None);
    let settings = TenantSettings {
        time_zone: "Europe/Berlin".into(),
        rate_limit_per_second: Some(100),
        rate_limit_burst: Some(500),
        monthly_event_quota: Some(1_000_000),
        monthly_cost_quota: Some(decimal("12.50")),
        quota_policy: "flag".into(),
        late_window_seconds: 3600,
        future_window_seconds: 60,
        require_registered_services: true,
    };
    store.update_tenant_settings(globex.id, &settings).await?;
    assert_eq!(store.tenant_settings(globex.id).await?, Some(settings.clone()));
    for wrong in [
        TenantSettings { time_zone: "Not a zone".into(), ..settings.clone() },
        TenantSettings { rate_limit_per_second: Some(0), ..settings.clone() },
        TenantSettings { monthly_cost_quota: Some(decimal("-1")), ..settings.clone() },
        TenantSettings { quota_policy: "ignore".into(), ..settings.clone() },
    ] {
        let result = store.update_tenant_settings(globex.id, &wrong).await;
        assert!(matches!(result, Err(StoreError::Invalid { .. })), "{wrong:?}: {result:?}");
    }
    let result = store.update_tenant_settings(Uuid::now_v7(), &settings).await;
    assert!(matches!(result, Err(StoreError::Invalid { .. })), "no such tenant: {result:?}");
    assert_eq!(store.tenant_settings(globex.id).await?, Some(settings), "refused changes change nothing");
    Ok(())
}

async fn services_and_price_rules_round_trip(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let (store, tenant) = (edge.store.as_ref(), edge.tenant.id);
    let mut service = ServiceRecord {
        service_type: "ml_predictions".into(),
        service_name: "Predictions".into(),
        description: None,
        providers: vec!["a".into(), "b".into()],
        required_fields: serde_json::json!([{"name": "predictions", "kind": "number"}]),
        optional_fields: serde_json::json!([]),
        billing_config: None,
    };
    assert!(store.put_service(tenant, &service).await?, "created");
    service.description = Some("v2".into());
    service.billing_config = Some(serde_json::json!({"unit": "predictions", "rates": {"standard": 0.001}}));
    assert!(!store.put_service(tenant, &service).await?, "replaced");
    assert_eq!(store.list_services(tenant).await?, [service.clone()]);
    let (other, _) = edge.other_tenant("globex").await?;
    assert_eq!(store.list_services(other.id).await?, []);
    assert!(store.delete_service(tenant, "ml_predictions").await?);
    assert!(!store.delete_service(tenant, "ml_predictions").await?);

    let from_us = 1_700_000_000_000_000;
    let rule = |id: Uuid, effective_from_us: i64| StoredPriceRule {
        id,
        tenant_id: tenant,
        definition: serde_json::json!({"unit": "events", "method": "per_unit", "rate": "0.001"}),
        effective_from_us,
        effective_until_us: None,
        retired: false,
    };
    let (first, second) = (rule(Uuid::now_v7(), from_us), rule(Uuid::now_v7(), from_us + HOUR_US));
    store.insert_price_rule(&second).await?;
    store.insert_price_rule(&first).await?;
    assert_eq!(store.list_price_rules(tenant).await?, [first.clone(), second.clone()], "by effective_from");
    assert!(store.retire_price_rule(tenant, first.id, from_us + 10).await?);
    assert!(store.retire_price_rule(tenant, second.id, from_us).await?, "retired before its start");
    assert!(!store.retire_price_rule(other.id, first.id, from_us).await?, "another tenant's rule");
    let listed = store.list_price_rules(tenant).await?;
    assert_eq!(
        listed,
        [
            StoredPriceRule { effective_until_us: Some(from_us + 10), retired: true, ..first },
            StoredPriceRule { effective_until_us: None, retired: true, ..second },
        ]
    );
    Ok(())
}

async fn rerate_moves_event_and_rollup_costs_page_by_page(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let (store, tenant) = (edge.store.clone(), edge.tenant.id);
    let (other, _) = edge.other_tenant("globex").await?;
    let start_us = edge::auth::now_us() - 3 * HOUR_US;
    let mut rows: Vec<EventRow> = (0..25)
        .map(|i| {
            EventRow::new(
                tenant,
                llm_event(&format!("u{}", i % 4), 1.0, 1.0).at(start_us + i * 300_000_000),
                Some(decimal("0.001")),
            )
        })
        .collect();
    rows.push(EventRow::new(tenant, llm_event("u0", 1.0, 1.0).at(start_us + 1), None));
    rows.push(EventRow::new(other.id, llm_event("u0", 1.0, 1.0).at(start_us + 2), Some(decimal("5"))));
    store.commit(&rows).await?;

    let rule_id = Uuid::now_v7();
    let reprice = move |_: &wire::Event| Repriced { cost: Some(decimal("0.002")), rule_ids: vec![rule_id] };
    let request =
        RerateRequest { tenant_id: tenant, start_us, end_us: start_us + 4 * HOUR_US, batch_events: 10 };
    let (mut after, mut pages, mut total) = (None, 0, sink::RerateBatch::default());
    loop {
        let batch = store.rerate_batch(&request, after, &reprice).await?;
        pages += 1;
        (total.scanned, total.changed) = (total.scanned + batch.scanned, total.changed + batch.changed);
        (total.cost_before, total.cost_after) =
            (total.cost_before + batch.cost_before, total.cost_after + batch.cost_after);
        after = batch.last;
        if after.is_none() {
            break;
        }
    }
    assert_eq!((pages, total.scanned, total.changed), (3, 26, 26));
    assert_eq!((total.cost_before, total.cost_after), (decimal("0.025"), decimal("0.052")));
    let events = edge.events().await?;
    for event in &events {
        let expected = if event.tenant_id == tenant {
            (Some(decimal("0.002")), Some(vec![rule_id]))
        } else {
            (Some(decimal("5")), None)
        };
        assert_eq!((event.cost, event.price_rule_ids.clone()), expected, "{event:?}");
    }
    let rollups = edge.rollups().await?;
    let acme: Decimal =
        rollups.iter().filter(|(key, _)| key.0 == tenant).map(|(_, rollup)| rollup.cost).sum();
    let unpriced: i64 = rollups.values().map(|rollup| rollup.unpriced_count).sum();
    assert_eq!((acme, unpriced), (decimal("0.052"), 0));
    edge.assert_rollups_match_raw().await?;
    assert_eq!(
        store.rerate_batch(&request, None, &reprice).await?.changed,
        0,
        "a second run changes nothing"
    );

    let audit = RerateRun {
        id: Uuid::now_v7(),
        tenant_id: tenant,
        start_us: request.start_us,
        end_us: request.end_us,
        started_at_us: edge::auth::now_us(),
        events_scanned: total.scanned,
        events_changed: total.changed,
        cost_before: total.cost_before,
        cost_after: total.cost_after,
        requested_by: None,
    };
    store.record_rerate(&audit).await?;
    assert_eq!(edge.rerate_runs().await?, [(26, 26)]);
    Ok(())
}

async fn retention_deletes_old_events_and_rollups(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let now_us = edge::auth::now_us();
    // More old rows than SQLite deletes per statement, over two tenants and two old hours.
    let (other, _) = edge.other_tenant("globex").await?;
    let old: Vec<EventRow> = (0..12_000)
        .map(|i| {
            let tenant = if i % 3 == 0 { other.id } else { edge.tenant.id };
            EventRow::new(
                tenant,
                llm_event("old", 1.0, 1.0).at(now_us - 10 * 86_400_000_000 - i * 500_000),
                None,
            )
        })
        .collect();
    edge.store.commit(&old).await?;
    let recent: Vec<EventRow> =
        (0..5).map(|i| row(edge.tenant.id, &llm_event("new", 1.0, 1.0).at(now_us - HOUR_US - i))).collect();
    edge.store.commit(&recent).await?;
    assert_eq!(edge.events().await?.len(), 12_005);
    let retention =
        Retention { event_retention_days: 5, aggregate_retention_days: Some(5), ..Retention::default() };
    edge.store.maintain(&retention).await?;
    let left = edge.events().await?;
    assert!(left.iter().all(|event| event.user_id == "new") && left.len() == 5, "{} left", left.len());
    let rollups = edge.rollups().await?;
    assert!(rollups.keys().all(|key| key.5 == "new") && !rollups.is_empty());
    edge.assert_rollups_match_raw().await?;
    edge.store.maintain(&retention).await?;
    assert_eq!(edge.events().await?.len(), 5, "maintenance again deletes nothing more");
    Ok(())
}
