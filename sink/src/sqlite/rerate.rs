//! Re-rating on SQLite: a keyset-ordered batch of a tenant's events is re-priced in Rust, and the
//! changed rows and the cost and unpriced count of their rollup rows move in one transaction.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Connection, Row};
use uuid::Uuid;
use wire::{CustomQuantity, Event, Quantity, QuantityKind, Status};

use super::values::{self, optional_decimal, parse_quantities, parse_uuids};
use super::{SqliteStore, classify};
use crate::rollup::hour_start_us;
use crate::store::{Repriced, RerateBatch, RerateRequest, StoreError};

const SELECT_COLUMNS: &str = "occurred_at, event_id, user_id, service_type, service_provider, event_type, model, \
     status, latency_us, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, pages, characters, \
     requests, bytes, duration_ms, custom_quantities, cost, price_rule_ids";

impl SqliteStore {
    pub(crate) async fn rerate_batch(
        &self,
        request: &RerateRequest,
        after: Option<(i64, Uuid)>,
        reprice: &(dyn Fn(&wire::Event) -> Repriced + Send + Sync),
    ) -> Result<RerateBatch, StoreError> {
        let mut writer = self.writer.acquire().await.map_err(classify)?;
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let keyset = if after.is_some() { "AND (occurred_at, event_id) > (?5, ?6)" } else { "" };
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SELECT_COLUMNS} FROM usage_events WHERE tenant_id = ?1 AND occurred_at >= ?2 \
             AND occurred_at < ?3 {keyset} ORDER BY occurred_at, event_id LIMIT ?4"
        )))
        .bind(request.tenant_id)
        .bind(request.start_us)
        .bind(request.end_us)
        .bind(i64::from(request.batch_events));
        if let Some((at_us, event_id)) = after {
            query = query.bind(at_us).bind(event_id);
        }
        let rows = query.fetch_all(&mut *tx).await.map_err(classify)?;
        let mut batch = RerateBatch::default();
        let mut changes = Changes::default();
        for row in &rows {
            let event = event_of_row(row)?;
            let before: Option<String> = row.try_get("cost").map_err(classify)?;
            let before = optional_decimal(before.as_deref())?;
            let rules: Option<String> = row.try_get("price_rule_ids").map_err(classify)?;
            let before_rules = parse_uuids(rules.as_deref())?;
            let after = reprice(&event);
            batch.scanned += 1;
            batch.cost_before = crate::store::add_money(batch.cost_before, before.unwrap_or_default())?;
            batch.cost_after = crate::store::add_money(batch.cost_after, after.cost.unwrap_or_default())?;
            batch.last = Some((event.timestamp_us, event.id()));
            if before != after.cost || before_rules != after.rule_ids {
                batch.changed += 1;
                changes.add(request.tenant_id, &event, before, after);
            }
        }
        let result = match changes.apply(&mut tx).await {
            Ok(()) => tx.commit().await.map_err(classify),
            Err(error) => Err(error),
        };
        // Rollup costs changed outside ingest: cached totals are stale. Cleared while the writer
        // is still held, so no batch adds to them.
        self.rollup_cache.clear();
        result?;
        if rows.len() < request.batch_events as usize {
            batch.last = None;
        }
        Ok(batch)
    }
}

/// The fields pricing reads, rebuilt from a stored row.
fn event_of_row(row: &SqliteRow) -> Result<Event, StoreError> {
    let text = |name: &str| row.try_get::<String, _>(name).map_err(classify);
    let event_id: Uuid = row.try_get("event_id").map_err(classify)?;
    let mut event =
        Event::new(text("user_id")?, text("service_type")?, text("service_provider")?, text("event_type")?)
            .with_id(event_id)
            .at(row.try_get("occurred_at").map_err(classify)?);
    event.model = row.try_get("model").map_err(classify)?;
    if row.try_get::<i64, _>("status").map_err(classify)? == 1 {
        event.status = Status::Error;
    }
    let latency_us: Option<i64> = row.try_get("latency_us").map_err(classify)?;
    event.latency_ms = latency_us.map(|us| us as f64 / 1000.0);
    for kind in QuantityKind::ALL {
        let value: Option<String> = row.try_get(kind.as_str()).map_err(classify)?;
        if let Some(value) = optional_decimal(value.as_deref())? {
            event.quantities.push(Quantity { kind, value: decimal_to_f64(value) });
        }
    }
    let custom: Option<String> = row.try_get("custom_quantities").map_err(classify)?;
    if let Some(custom) = custom {
        for (name, value) in parse_quantities(&custom)? {
            event.extra_mut().custom_quantities.push(CustomQuantity { name, value: decimal_to_f64(value) });
        }
    }
    Ok(event)
}

fn decimal_to_f64(value: Decimal) -> f64 {
    value.to_string().parse().unwrap_or_default()
}

type RollupKey = (Uuid, i64, String, String, String, String, String);

/// A changed event: tenant, timestamp, event id, new cost and rule ids.
type ChangedRow = (Uuid, i64, Uuid, Option<Decimal>, Vec<Uuid>);

/// Row updates and rollup deltas of one batch.
#[derive(Debug, Default)]
struct Changes {
    rows: Vec<ChangedRow>,
    rollups: BTreeMap<RollupKey, (Decimal, i64)>,
}

impl Changes {
    fn add(&mut self, tenant_id: Uuid, event: &Event, before: Option<Decimal>, after: Repriced) {
        let key = (
            tenant_id,
            hour_start_us(event.timestamp_us),
            event.service_type.clone(),
            event.service_provider.clone(),
            event.model.clone().unwrap_or_default(),
            event.user_id.clone(),
            event.event_type.clone(),
        );
        let delta = self.rollups.entry(key).or_default();
        delta.0 += after.cost.unwrap_or_default() - before.unwrap_or_default();
        delta.1 += i64::from(after.cost.is_none()) - i64::from(before.is_none());
        self.rows.push((tenant_id, event.timestamp_us, event.id(), after.cost, after.rule_ids));
    }

    /// One prepared update per changed row and per touched rollup row: re-rating is an
    /// operator's batch job, not the ingest path.
    async fn apply(self, conn: &mut SqliteConnection) -> Result<(), StoreError> {
        for (tenant_id, at_us, event_id, cost, rule_ids) in &self.rows {
            sqlx::query(
                "UPDATE usage_events SET cost = ?4, price_rule_ids = ?5
                 WHERE tenant_id = ?1 AND occurred_at = ?2 AND event_id = ?3",
            )
            .bind(tenant_id)
            .bind(at_us)
            .bind(event_id)
            .bind(cost.map(|cost| cost.to_string()))
            .bind(values::uuids_json(rule_ids))
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        for ((tenant_id, hour_us, service_type, provider, model, user_id, event_type), (cost, unpriced)) in
            self.rollups
        {
            let key = "tenant_id = ?1 AND hour = ?2 AND service_type = ?3 AND service_provider = ?4 AND model = ?5 \
                       AND user_id = ?6 AND event_type = ?7";
            let stored: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT cost FROM usage_rollup_hourly WHERE {key}"
            )))
            .bind(tenant_id)
            .bind(hour_us)
            .bind(&service_type)
            .bind(&provider)
            .bind(&model)
            .bind(&user_id)
            .bind(&event_type)
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify)?;
            // A rolled-up event always has its rollup row, unless rollup retention removed it.
            let Some(stored) = stored else { continue };
            let total = values::decimal(&stored)? + cost;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE usage_rollup_hourly SET cost = ?8, unpriced_count = unpriced_count + ?9 WHERE {key}"
            )))
            .bind(tenant_id)
            .bind(hour_us)
            .bind(&service_type)
            .bind(&provider)
            .bind(&model)
            .bind(&user_id)
            .bind(&event_type)
            .bind(total.to_string())
            .bind(unpriced)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        Ok(())
    }
}
