//! The control plane's tables: tenants' settings, keys, custom services, price rules, usage for
//! quotas, and re-rating.

use rust_decimal::Decimal;
use sqlx::Row;
use uuid::Uuid;

use super::{PgStore, classify};
use crate::store::{
    ApiKeyInfo, Repriced, RerateBatch, RerateRequest, RerateRun, Scope, ServiceRecord, StoreError,
    StoredPriceRule, Tenant, TenantSettings,
};

impl PgStore {
    pub(crate) async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows: Vec<(Uuid, String, bool)> =
            sqlx::query_as("SELECT id, name, disabled_at IS NOT NULL FROM tenants ORDER BY name")
                .fetch_all(self.pool())
                .await
                .map_err(classify)?;
        Ok(rows.into_iter().map(|(id, name, disabled)| Tenant { id, name, disabled }).collect())
    }

    pub(crate) async fn set_tenant_disabled(
        &self,
        tenant_id: Uuid,
        disabled: bool,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE tenants SET disabled_at = CASE WHEN $2 THEN coalesce(disabled_at, tally_timestamptz($3)) END
             WHERE id = $1",
        )
        .bind(tenant_id)
        .bind(disabled)
        .bind(now_us())
        .execute(self.pool())
        .await
        .map_err(classify)?;
        Ok(result.rows_affected() == 1)
    }

    pub(crate) async fn tenant_settings(
        &self,
        tenant_id: Uuid,
    ) -> Result<Option<TenantSettings>, StoreError> {
        let row = sqlx::query(
            "SELECT time_zone, rate_limit_per_second, rate_limit_burst, monthly_event_quota, monthly_cost_quota,
                    quota_policy, late_window_seconds, future_window_seconds, require_registered_services
             FROM tenants WHERE id = $1",
        )
        .bind(tenant_id)
        .fetch_optional(self.pool())
        .await
        .map_err(classify)?;
        let Some(row) = row else { return Ok(None) };
        let unsigned = |value: Option<i32>| value.map(|value| value.max(0) as u32);
        Ok(Some(TenantSettings {
            time_zone: row.get(0),
            rate_limit_per_second: unsigned(row.get(1)),
            rate_limit_burst: unsigned(row.get(2)),
            monthly_event_quota: row.get(3),
            monthly_cost_quota: row.get(4),
            quota_policy: row.get(5),
            late_window_seconds: row.get::<i32, _>(6).max(0) as u32,
            future_window_seconds: row.get::<i32, _>(7).max(0) as u32,
            require_registered_services: row.get(8),
        }))
    }

    pub(crate) async fn update_tenant_settings(
        &self,
        tenant_id: Uuid,
        settings: &TenantSettings,
    ) -> Result<(), StoreError> {
        let valid_zone: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1)")
                .bind(&settings.time_zone)
                .fetch_one(self.pool())
                .await
                .map_err(classify)?;
        if !valid_zone {
            return Err(StoreError::invalid(format!(
                "time_zone: {:?} is not an IANA time zone",
                settings.time_zone
            )));
        }
        let result = sqlx::query(
            "UPDATE tenants SET time_zone = $2, rate_limit_per_second = $3, rate_limit_burst = $4,
                    monthly_event_quota = $5, monthly_cost_quota = $6, quota_policy = $7,
                    late_window_seconds = $8, future_window_seconds = $9,
                    require_registered_services = $10
             WHERE id = $1",
        )
        .bind(tenant_id)
        .bind(&settings.time_zone)
        .bind(settings.rate_limit_per_second.map(|value| value as i32))
        .bind(settings.rate_limit_burst.map(|value| value as i32))
        .bind(settings.monthly_event_quota)
        .bind(settings.monthly_cost_quota)
        .bind(&settings.quota_policy)
        .bind(settings.late_window_seconds as i32)
        .bind(settings.future_window_seconds as i32)
        .bind(settings.require_registered_services)
        .execute(self.pool())
        .await
        .map_err(|error| match &error {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23514") => {
                StoreError::invalid(format!("settings break a rule: {}", db.message())).with_source(error)
            }
            _ => classify(error),
        })?;
        if result.rows_affected() == 0 {
            return Err(StoreError::invalid(format!("no tenant with id {tenant_id}")));
        }
        Ok(())
    }

    pub(crate) async fn list_api_keys(&self, tenant_id: Uuid) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, prefix, scopes, label, (EXTRACT(EPOCH FROM created_at) * 1000000)::bigint,
                    (EXTRACT(EPOCH FROM expires_at) * 1000000)::bigint, revoked_at IS NOT NULL
             FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|row| ApiKeyInfo {
                id: row.get(0),
                prefix: row.get(1),
                scopes: row.get::<Vec<String>, _>(2).iter().filter_map(|scope| Scope::parse(scope)).collect(),
                label: row.get(3),
                created_at_us: row.get(4),
                expires_at_us: row.get(5),
                revoked: row.get(6),
            })
            .collect())
    }

    pub(crate) async fn revoke_api_key(&self, tenant_id: Uuid, key_id: Uuid) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, tally_timestamptz($3))
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant_id)
        .bind(key_id)
        .bind(now_us())
        .execute(self.pool())
        .await
        .map_err(classify)?;
        Ok(result.rows_affected() == 1)
    }

    pub(crate) async fn list_services(&self, tenant_id: Uuid) -> Result<Vec<ServiceRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT service_type, service_name, description, providers, required_fields, optional_fields,
                    billing_config
             FROM services WHERE tenant_id = $1 ORDER BY service_type",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|row| ServiceRecord {
                service_type: row.get(0),
                service_name: row.get(1),
                description: row.get(2),
                providers: row.get(3),
                required_fields: row.get(4),
                optional_fields: row.get(5),
                billing_config: row.get(6),
            })
            .collect())
    }

    pub(crate) async fn put_service(
        &self,
        tenant_id: Uuid,
        service: &ServiceRecord,
    ) -> Result<bool, StoreError> {
        let created: bool = sqlx::query_scalar(
            "INSERT INTO services (tenant_id, service_type, service_name, description, providers, required_fields,
                                   optional_fields, billing_config)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (tenant_id, service_type) DO UPDATE SET
               service_name = excluded.service_name, description = excluded.description,
               providers = excluded.providers, required_fields = excluded.required_fields,
               optional_fields = excluded.optional_fields, billing_config = excluded.billing_config,
               updated_at = excluded.updated_at
             RETURNING xmax = 0",
        )
        .bind(tenant_id)
        .bind(&service.service_type)
        .bind(&service.service_name)
        .bind(&service.description)
        .bind(&service.providers)
        .bind(&service.required_fields)
        .bind(&service.optional_fields)
        .bind(&service.billing_config)
        .fetch_one(self.pool())
        .await
        .map_err(classify)?;
        Ok(created)
    }

    pub(crate) async fn delete_service(
        &self,
        tenant_id: Uuid,
        service_type: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM services WHERE tenant_id = $1 AND service_type = $2")
            .bind(tenant_id)
            .bind(service_type)
            .execute(self.pool())
            .await
            .map_err(classify)?;
        Ok(result.rows_affected() == 1)
    }

    pub(crate) async fn list_price_rules(&self, tenant_id: Uuid) -> Result<Vec<StoredPriceRule>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, definition, (EXTRACT(EPOCH FROM effective_from) * 1000000)::bigint,
                    (EXTRACT(EPOCH FROM effective_until) * 1000000)::bigint, retired_at IS NOT NULL
             FROM price_rules WHERE tenant_id = $1 ORDER BY effective_from, id",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|row| StoredPriceRule {
                id: row.get(0),
                tenant_id,
                definition: row.get(1),
                effective_from_us: row.get(2),
                effective_until_us: row.get(3),
                retired: row.get(4),
            })
            .collect())
    }

    pub(crate) async fn insert_price_rule(&self, rule: &StoredPriceRule) -> Result<(), StoreError> {
        insert_rule(rule).execute(self.pool()).await.map_err(classify)?;
        Ok(())
    }

    pub(crate) async fn retire_price_rule(
        &self,
        tenant_id: Uuid,
        rule_id: Uuid,
        at_us: i64,
    ) -> Result<bool, StoreError> {
        let result = retire_rule(tenant_id, rule_id, at_us).execute(self.pool()).await.map_err(classify)?;
        Ok(result.rows_affected() == 1)
    }

    /// Retires and inserts price rules in one transaction.
    pub(crate) async fn change_price_rules(
        &self,
        tenant_id: Uuid,
        retire: &[(Uuid, i64)],
        insert: &[StoredPriceRule],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await.map_err(classify)?;
        for (rule_id, at_us) in retire {
            retire_rule(tenant_id, *rule_id, *at_us).execute(&mut *tx).await.map_err(classify)?;
        }
        for rule in insert {
            insert_rule(rule).execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    pub(crate) async fn month_usage(&self, tenant_id: Uuid) -> Result<(i64, Decimal), StoreError> {
        let (events, cost): (Option<i64>, Option<Decimal>) = sqlx::query_as(
            // Held inside what a decimal can read (a quota compares against it; anything that
            // large is over every quota), so a tenant's month can never become unreadable.
            "SELECT sum(r.event_count)::bigint, least(sum(r.cost), 79228162514264337593543950335)
             FROM usage_rollup_service_hourly_live r
             JOIN tenants t ON t.id = r.tenant_id
             WHERE r.tenant_id = $1 AND r.hour >= date_trunc('month', now(), t.time_zone)",
        )
        .bind(tenant_id)
        .fetch_one(self.pool())
        .await
        .map_err(classify)?;
        Ok((events.unwrap_or(0), cost.unwrap_or_default()))
    }

    pub(crate) async fn rerate_batch(
        &self,
        request: &RerateRequest,
        after: Option<(i64, Uuid)>,
        reprice: &(dyn Fn(&wire::Event) -> Repriced + Send + Sync),
    ) -> Result<RerateBatch, StoreError> {
        let mut tx = self.pool().begin().await.map_err(classify)?;
        let lock = super::timescale::rerate_row_lock(&mut tx).await.map_err(classify)?;
        let statement = format!(
            "SELECT (EXTRACT(EPOCH FROM occurred_at) * 1000000)::bigint AS at_us, event_id, user_id, service_type,
                    service_provider, event_type, model, status, latency_us, input_tokens, output_tokens,
                    cached_input_tokens, reasoning_tokens, pages, characters, requests, bytes, duration_ms,
                    custom_quantities, cost, coalesce(price_rule_ids, '{{}}') AS price_rule_ids
             FROM usage_events
             WHERE tenant_id = $1
               AND occurred_at >= tally_timestamptz($2) AND occurred_at < tally_timestamptz($3)
               AND ($4::bigint IS NULL OR (occurred_at, event_id) > (tally_timestamptz($4), $5))
             ORDER BY occurred_at, event_id
             LIMIT $6 {lock}",
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(request.tenant_id)
            .bind(request.start_us)
            .bind(request.end_us)
            .bind(after.map(|(at_us, _)| at_us))
            .bind(after.map(|(_, id)| id))
            .bind(i64::from(request.batch_events))
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let mut batch = RerateBatch::default();
        let mut changes = super::rerate::Changes::default();
        for row in &rows {
            let event = super::rerate::event_of_row(row);
            let before: Option<Decimal> = row.get("cost");
            let before_rules: Vec<Uuid> = row.get("price_rule_ids");
            let after = reprice(&event);
            batch.scanned += 1;
            batch.cost_before = crate::store::add_money(batch.cost_before, before.unwrap_or_default())?;
            batch.cost_after = crate::store::add_money(batch.cost_after, after.cost.unwrap_or_default())?;
            batch.last = Some((event.timestamp_us, event.id()));
            if before != after.cost || before_rules != after.rule_ids {
                batch.changed += 1;
                changes.add(request.tenant_id, &event, (before, &before_rules), &after);
            }
        }
        changes.apply(&mut tx).await?;
        tx.commit().await.map_err(classify)?;
        if rows.len() < request.batch_events as usize {
            batch.last = None;
        }
        Ok(batch)
    }

    pub(crate) async fn record_rerate(&self, run: &RerateRun) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO rerate_runs (id, tenant_id, range_start, range_end, started_at, finished_at,
                                      events_scanned, events_changed, cost_before, cost_after, requested_by)
             VALUES ($1, $2, to_timestamp($3::double precision / 1000000),
                     to_timestamp($4::double precision / 1000000), to_timestamp($5::double precision / 1000000),
                     now(), $6, $7, $8, $9, $10)",
        )
        .bind(run.id)
        .bind(run.tenant_id)
        .bind(run.start_us)
        .bind(run.end_us)
        .bind(run.started_at_us)
        .bind(run.events_scanned)
        .bind(run.events_changed)
        .bind(run.cost_before)
        .bind(run.cost_after)
        .bind(run.requested_by)
        .execute(self.pool())
        .await
        .map_err(classify)?;
        Ok(())
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn insert_rule(rule: &StoredPriceRule) -> PgQuery<'_> {
    sqlx::query(
        "INSERT INTO price_rules (id, tenant_id, definition, effective_from, effective_until)
         VALUES ($1, $2, $3, to_timestamp($4::double precision / 1000000),
                 to_timestamp($5::double precision / 1000000))",
    )
    .bind(rule.id)
    .bind(rule.tenant_id)
    .bind(&rule.definition)
    .bind(rule.effective_from_us)
    .bind(rule.effective_until_us)
}

fn retire_rule(tenant_id: Uuid, rule_id: Uuid, at_us: i64) -> PgQuery<'static> {
    sqlx::query(
        "UPDATE price_rules SET retired_at = coalesce(retired_at, tally_timestamptz($4)),
                effective_until = CASE WHEN tally_timestamptz($3) <= effective_from THEN NULL
                                       ELSE least(coalesce(effective_until, 'infinity'), tally_timestamptz($3)) END
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant_id)
    .bind(rule_id)
    .bind(at_us)
    .bind(now_us())
}

/// The time now in microseconds since the epoch, for the control plane's time stamps. Written
/// as a parameter, not as `now()`: Citus refuses a non-IMMUTABLE function inside an UPDATE's
/// COALESCE or CASE, and those columns are only tested for NULL.
pub(super) fn now_us() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_micros() as i64
}
