//! Re-rating helpers: an event rebuilt from its row for pricing, and the row and rollup changes
//! of one batch, written with two statements.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;
use wire::{CustomQuantity, Event, Quantity, QuantityKind, Status};

use super::classify;
use crate::rollup::hour_start_us;
use crate::store::{Repriced, StoreError};

/// The fields pricing reads, rebuilt from a stored row.
pub(super) fn event_of_row(row: &PgRow) -> Event {
    let event_id: Uuid = row.get("event_id");
    let mut event = Event::new(
        row.get::<String, _>("user_id"),
        row.get::<String, _>("service_type"),
        row.get::<String, _>("service_provider"),
        row.get::<String, _>("event_type"),
    )
    .with_id(event_id)
    .at(row.get("at_us"));
    event.model = row.get("model");
    if row.get::<i16, _>("status") == 1 {
        event.status = Status::Error;
    }
    event.latency_ms = row.get::<Option<i64>, _>("latency_us").map(|us| us as f64 / 1000.0);
    for kind in QuantityKind::ALL {
        if let Some(value) = row.get::<Option<Decimal>, _>(kind.as_str()) {
            event.quantities.push(Quantity { kind, value: decimal_to_f64(value) });
        }
    }
    if let Some(serde_json::Value::Object(custom)) =
        row.get::<Option<serde_json::Value>, _>("custom_quantities")
    {
        for (name, value) in custom {
            let value = value.as_f64().unwrap_or_default();
            event.extra_mut().custom_quantities.push(CustomQuantity { name, value });
        }
    }
    event
}

fn decimal_to_f64(value: Decimal) -> f64 {
    value.to_string().parse().unwrap_or_default()
}

type RollupKey = (Uuid, i64, String, String, String, String, String);

/// Row updates and rollup deltas of one batch.
#[derive(Debug, Default)]
pub(super) struct Changes {
    event_ids: Vec<Uuid>,
    at_us: Vec<i64>,
    costs: Vec<Option<Decimal>>,
    rule_ids: Vec<String>,
    costs_before: Vec<Option<Decimal>>,
    rule_ids_before: Vec<String>,
    rollups: BTreeMap<RollupKey, (Decimal, i64)>,
}

/// Price rule ids as a PostgreSQL array literal.
fn array_literal(ids: &[Uuid]) -> String {
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    format!("{{{}}}", ids.join(","))
}

impl Changes {
    /// A row whose cost or rules change: `before` is its cost and rules as read.
    pub(super) fn add(
        &mut self,
        tenant_id: Uuid,
        event: &Event,
        (before, before_rules): (Option<Decimal>, &[Uuid]),
        after: &Repriced,
    ) {
        self.event_ids.push(event.id());
        self.at_us.push(event.timestamp_us);
        self.costs.push(after.cost);
        self.rule_ids.push(array_literal(&after.rule_ids));
        self.costs_before.push(before);
        self.rule_ids_before.push(array_literal(before_rules));
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
    }

    /// Updates the rows and appends the rollup corrections, in the caller's transaction. On a
    /// TimescaleDB hypertable the rows were read without a lock (`timescale::rerate_row_lock`),
    /// so each is updated only if it still has the cost and rules read; if any has changed since
    /// (another re-rate of the tenant, which the one-running-run index should prevent), nothing
    /// of the batch may commit: a conflict.
    pub(super) async fn apply(self, conn: &mut PgConnection) -> Result<(), StoreError> {
        let (Some(first_us), Some(last_us)) = (self.at_us.iter().min(), self.at_us.iter().max()) else {
            return Ok(());
        };
        let tenant_id = self.rollups.keys().next().map(|key| key.0).unwrap_or_default();
        // The constant time range (and a custom plan for it, `persistent(false)`) lets TimescaleDB
        // decompress only the compressed batches of this range, not all of the tenant's. The rule
        // arrays are cast from text inside a subquery kept apart by `OFFSET 0`: the cast is STABLE, and
        // Citus refuses a STABLE function applied to a column of an UPDATE, also once PostgreSQL
        // has pulled a plain subquery up into the UPDATE.
        let updated = sqlx::query(
            "UPDATE usage_events e SET cost = c.cost, price_rule_ids = c.rules
             FROM (SELECT u.event_id, u.at_us, u.cost, nullif(u.rules, '{}')::uuid[] AS rules, u.cost_before,
                          u.rules_before::uuid[] AS rules_before
                   FROM unnest($2::uuid[], $3::bigint[], $4::numeric[], $5::text[], $6::numeric[], $7::text[])
                        AS u(event_id, at_us, cost, rules, cost_before, rules_before)
                   OFFSET 0) AS c
             WHERE e.tenant_id = $1 AND e.event_id = c.event_id AND e.occurred_at = tally_timestamptz(c.at_us)
               AND e.occurred_at >= tally_timestamptz($8) AND e.occurred_at <= tally_timestamptz($9)
               AND e.cost IS NOT DISTINCT FROM c.cost_before
               AND coalesce(e.price_rule_ids, '{}') = c.rules_before",
        )
        .persistent(false)
        .bind(tenant_id)
        .bind(&self.event_ids)
        .bind(&self.at_us)
        .bind(&self.costs)
        .bind(&self.rule_ids)
        .bind(&self.costs_before)
        .bind(&self.rule_ids_before)
        .bind(first_us)
        .bind(last_us)
        .execute(&mut *conn)
        .await
        .map_err(classify)?
        .rows_affected();
        if updated != self.event_ids.len() as u64 {
            return Err(StoreError::conflict("events being re-rated changed meanwhile"));
        }
        // The same corrections without the user, for the user-less rollups.
        let mut services: BTreeMap<RollupKey, (Decimal, i64)> = BTreeMap::new();
        for ((tenant, hour_us, service_type, provider, model, _, event_type), (cost, unpriced)) in
            &self.rollups
        {
            let key = (
                *tenant,
                *hour_us,
                service_type.clone(),
                provider.clone(),
                model.clone(),
                String::new(),
                event_type.clone(),
            );
            let sum = services.entry(key).or_default();
            sum.0 += cost;
            sum.1 += unpriced;
        }
        append_corrections(conn, tenant_id, self.rollups, true).await.map_err(classify)?;
        append_corrections(conn, tenant_id, services, false).await.map_err(classify)
    }
}

/// Appends cost and unpriced-count corrections to a pending table, one row per rollup key with
/// every other sum zero: per user to `usage_rollup_pending`, or (`per_user` false, the user ids
/// ignored) to `usage_rollup_service_pending`. The materializer folds them like the rows of a
/// commit, and readers see them at once.
async fn append_corrections(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    deltas: BTreeMap<RollupKey, (Decimal, i64)>,
    per_user: bool,
) -> Result<(), sqlx::Error> {
    let mut hours_us = Vec::new();
    let mut texts: [Vec<String>; 5] = Default::default();
    let (mut cost_deltas, mut unpriced_deltas) = (Vec::new(), Vec::new());
    for ((_, hour_us, service_type, provider, model, user_id, event_type), (cost, unpriced)) in deltas {
        hours_us.push(hour_us);
        for (column, value) in texts.iter_mut().zip([service_type, provider, model, user_id, event_type]) {
            column.push(value);
        }
        cost_deltas.push(cost);
        unpriced_deltas.push(unpriced);
    }
    let [service_types, providers, models, user_ids, event_types] = texts;
    let zero_quantities = vec!["0"; QuantityKind::ALL.len()].join(", ");
    let (table, user, user_value, buckets, zero_buckets) = match per_user {
        true => ("usage_rollup_pending", "user_id, ", "d.user_id, ", "", String::new()),
        false => (
            "usage_rollup_service_pending",
            "",
            "",
            ", latency_buckets",
            format!(", array_fill(0::bigint, ARRAY[{}])", crate::rollup::LATENCY_BUCKETS),
        ),
    };
    let statement = format!(
        "INSERT INTO {table} (tenant_id, hour, service_type, service_provider, model, {user}\
           event_type, event_count, error_count, {quantities}, custom_quantities, cost, unpriced_count, \
           latency_count, latency_sum_us, latency_max_us{buckets}) \
         SELECT $1, tally_timestamptz(d.hour_us), d.service_type, d.service_provider, d.model, {user_value}\
           d.event_type, 0, 0, {zero_quantities}, '{{}}'::jsonb, d.cost, d.unpriced, 0, 0, 0{zero_buckets} \
         FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::numeric[], \
                     $9::bigint[]) AS d(hour_us, service_type, service_provider, model, user_id, event_type, \
                                        cost, unpriced)",
        quantities = QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect::<Vec<_>>().join(", "),
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(tenant_id)
        .bind(hours_us)
        .bind(service_types)
        .bind(providers)
        .bind(models)
        .bind(user_ids)
        .bind(event_types)
        .bind(cost_deltas)
        .bind(unpriced_deltas)
        .execute(conn)
        .await?;
    Ok(())
}
