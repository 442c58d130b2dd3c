//! The control plane's tables on SQLite: tenants and their settings, keys, custom services, price
//! rules, month-to-date usage for quotas, and the re-rate audit. Reads use the read pool; every
//! write goes through the one writer.

use rust_decimal::Decimal;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::values::{self, now_us, optional_decimal, parse_json, parse_strings, strings_json};
use super::{SqliteStore, classify, is_unique_violation};
use crate::store::{
    ApiKey, ApiKeyInfo, NewApiKey, RerateRun, Scope, ServiceRecord, StoreError, StoredPriceRule, Tenant,
    TenantSettings,
};

fn scopes(text: &str) -> Result<Vec<Scope>, StoreError> {
    Ok(parse_strings(text)?.iter().filter_map(|scope| Scope::parse(scope)).collect())
}

fn tenant_of_row(row: &SqliteRow) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        id: row.try_get(0).map_err(classify)?,
        name: row.try_get(1).map_err(classify)?,
        disabled: row.try_get::<Option<i64>, _>(2).map_err(classify)?.is_some(),
    })
}

impl SqliteStore {
    pub(crate) async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id, k.tenant_id, t.name, t.disabled_at IS NOT NULL, k.scopes, k.label, k.expires_at,
                    k.revoked_at IS NOT NULL
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = ?1",
        )
        .bind(&key_hash[..])
        .fetch_optional(&self.readers)
        .await
        .map_err(classify)?;
        let Some(row) = row else { return Ok(None) };
        let get = |index: usize| row.try_get::<bool, _>(index).map_err(classify);
        Ok(Some(ApiKey {
            id: row.try_get(0).map_err(classify)?,
            tenant_id: row.try_get(1).map_err(classify)?,
            tenant_name: row.try_get(2).map_err(classify)?,
            tenant_disabled: get(3)?,
            scopes: scopes(&row.try_get::<String, _>(4).map_err(classify)?)?,
            label: row.try_get(5).map_err(classify)?,
            expires_at_us: row.try_get(6).map_err(classify)?,
            revoked: get(7)?,
        }))
    }

    pub(crate) async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let id = Uuid::now_v7();
        let result = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?1, ?2, ?3)")
            .bind(id)
            .bind(name)
            .bind(now_us())
            .execute(&self.writer)
            .await;
        match result {
            Ok(_) => Ok(Tenant { id, name: name.to_owned(), disabled: false }),
            Err(error) if is_unique_violation(&error) => {
                Err(StoreError::invalid(format!("a tenant named {name:?} exists already")).with_source(error))
            }
            Err(error) => Err(classify(error)),
        }
    }

    pub(crate) async fn find_tenant(&self, name_or_id: &str) -> Result<Option<Tenant>, StoreError> {
        // A UUID names a tenant by id only, anything else by name only: names never parse as UUIDs.
        let id = Uuid::parse_str(name_or_id).ok();
        let row = sqlx::query(
            "SELECT id, name, disabled_at FROM tenants WHERE (?2 IS NULL AND name = ?1) OR id = ?2",
        )
        .bind(name_or_id)
        .bind(id)
        .fetch_optional(&self.readers)
        .await
        .map_err(classify)?;
        row.as_ref().map(tenant_of_row).transpose()
    }

    pub(crate) async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey, StoreError> {
        let id = Uuid::now_v7();
        let scope_names: Vec<&str> = key.scopes.iter().map(|scope| scope.as_str()).collect();
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let tenant = sqlx::query("SELECT name, disabled_at FROM tenants WHERE id = ?1")
            .bind(key.tenant_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?
            .ok_or_else(|| StoreError::invalid(format!("no tenant with id {}", key.tenant_id)))?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, scopes, label, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(id)
        .bind(key.tenant_id)
        .bind(&key.key_hash[..])
        .bind(&key.prefix)
        .bind(strings_json(&scope_names))
        .bind(&key.label)
        .bind(now_us())
        .bind(key.expires_at_us)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(ApiKey {
            id,
            tenant_id: key.tenant_id,
            tenant_name: tenant.try_get(0).map_err(classify)?,
            tenant_disabled: tenant.try_get::<Option<i64>, _>(1).map_err(classify)?.is_some(),
            scopes: key.scopes.clone(),
            label: key.label.clone(),
            expires_at_us: key.expires_at_us,
            revoked: false,
        })
    }

    pub(crate) async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query("SELECT id, name, disabled_at FROM tenants ORDER BY name")
            .fetch_all(&self.readers)
            .await
            .map_err(classify)?;
        rows.iter().map(tenant_of_row).collect()
    }

    pub(crate) async fn set_tenant_disabled(
        &self,
        tenant_id: Uuid,
        disabled: bool,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE tenants SET disabled_at = CASE WHEN ?2 THEN coalesce(disabled_at, ?3) END WHERE id = ?1",
        )
        .bind(tenant_id)
        .bind(disabled)
        .bind(now_us())
        .execute(&self.writer)
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
             FROM tenants WHERE id = ?1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.readers)
        .await
        .map_err(classify)?;
        let Some(row) = row else { return Ok(None) };
        let unsigned = |index: usize| -> Result<Option<u32>, StoreError> {
            let value: Option<i64> = row.try_get(index).map_err(classify)?;
            Ok(value.map(|value| value.clamp(0, i64::from(u32::MAX)) as u32))
        };
        let cost_quota: Option<String> = row.try_get(4).map_err(classify)?;
        Ok(Some(TenantSettings {
            time_zone: row.try_get(0).map_err(classify)?,
            rate_limit_per_second: unsigned(1)?,
            rate_limit_burst: unsigned(2)?,
            monthly_event_quota: row.try_get(3).map_err(classify)?,
            monthly_cost_quota: optional_decimal(cost_quota.as_deref())?,
            quota_policy: row.try_get(5).map_err(classify)?,
            late_window_seconds: unsigned(6)?.unwrap_or_default(),
            future_window_seconds: unsigned(7)?.unwrap_or_default(),
            require_registered_services: row.try_get(8).map_err(classify)?,
        }))
    }

    pub(crate) async fn update_tenant_settings(
        &self,
        tenant_id: Uuid,
        settings: &TenantSettings,
    ) -> Result<(), StoreError> {
        if !values::is_time_zone_name(&settings.time_zone) {
            return Err(StoreError::invalid(format!(
                "time_zone: {:?} is not an IANA time zone",
                settings.time_zone
            )));
        }
        let result = sqlx::query(
            "UPDATE tenants SET time_zone = ?2, rate_limit_per_second = ?3, rate_limit_burst = ?4,
                    monthly_event_quota = ?5, monthly_cost_quota = ?6, quota_policy = ?7,
                    late_window_seconds = ?8, future_window_seconds = ?9,
                    require_registered_services = ?10
             WHERE id = ?1",
        )
        .bind(tenant_id)
        .bind(&settings.time_zone)
        .bind(settings.rate_limit_per_second.map(i64::from))
        .bind(settings.rate_limit_burst.map(i64::from))
        .bind(settings.monthly_event_quota)
        .bind(settings.monthly_cost_quota.map(|quota| quota.to_string()))
        .bind(&settings.quota_policy)
        .bind(i64::from(settings.late_window_seconds))
        .bind(i64::from(settings.future_window_seconds))
        .bind(settings.require_registered_services)
        .execute(&self.writer)
        .await
        .map_err(|error| match &error {
            sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::CheckViolation => {
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
            "SELECT id, prefix, scopes, label, created_at, expires_at, revoked_at IS NOT NULL
             FROM api_keys WHERE tenant_id = ?1 ORDER BY created_at DESC, id DESC",
        )
        .bind(tenant_id)
        .fetch_all(&self.readers)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| {
                Ok(ApiKeyInfo {
                    id: row.try_get(0).map_err(classify)?,
                    prefix: row.try_get(1).map_err(classify)?,
                    scopes: scopes(&row.try_get::<String, _>(2).map_err(classify)?)?,
                    label: row.try_get(3).map_err(classify)?,
                    created_at_us: row.try_get(4).map_err(classify)?,
                    expires_at_us: row.try_get(5).map_err(classify)?,
                    revoked: row.try_get(6).map_err(classify)?,
                })
            })
            .collect()
    }

    pub(crate) async fn revoke_api_key(&self, tenant_id: Uuid, key_id: Uuid) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?3) WHERE tenant_id = ?1 AND id = ?2",
        )
        .bind(tenant_id)
        .bind(key_id)
        .bind(now_us())
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(result.rows_affected() == 1)
    }

    pub(crate) async fn list_services(&self, tenant_id: Uuid) -> Result<Vec<ServiceRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT service_type, service_name, description, providers, required_fields, optional_fields,
                    billing_config
             FROM services WHERE tenant_id = ?1 ORDER BY service_type",
        )
        .bind(tenant_id)
        .fetch_all(&self.readers)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| {
                let text = |index: usize| row.try_get::<String, _>(index).map_err(classify);
                let billing: Option<String> = row.try_get(6).map_err(classify)?;
                Ok(ServiceRecord {
                    service_type: text(0)?,
                    service_name: text(1)?,
                    description: row.try_get(2).map_err(classify)?,
                    providers: parse_strings(&text(3)?)?,
                    required_fields: parse_json(&text(4)?)?,
                    optional_fields: parse_json(&text(5)?)?,
                    billing_config: billing.as_deref().map(parse_json).transpose()?,
                })
            })
            .collect()
    }

    pub(crate) async fn put_service(
        &self,
        tenant_id: Uuid,
        service: &ServiceRecord,
    ) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let existed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM services WHERE tenant_id = ?1 AND service_type = ?2)",
        )
        .bind(tenant_id)
        .bind(&service.service_type)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        sqlx::query(
            "INSERT INTO services (tenant_id, service_type, service_name, description, providers, required_fields,
                                   optional_fields, billing_config, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
             ON CONFLICT (tenant_id, service_type) DO UPDATE SET
               service_name = excluded.service_name, description = excluded.description,
               providers = excluded.providers, required_fields = excluded.required_fields,
               optional_fields = excluded.optional_fields, billing_config = excluded.billing_config,
               updated_at = excluded.updated_at",
        )
        .bind(tenant_id)
        .bind(&service.service_type)
        .bind(&service.service_name)
        .bind(&service.description)
        .bind(strings_json(&service.providers))
        .bind(values::json(&service.required_fields))
        .bind(values::json(&service.optional_fields))
        .bind(service.billing_config.as_ref().map(values::json))
        .bind(now_us())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(!existed)
    }

    pub(crate) async fn delete_service(
        &self,
        tenant_id: Uuid,
        service_type: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM services WHERE tenant_id = ?1 AND service_type = ?2")
            .bind(tenant_id)
            .bind(service_type)
            .execute(&self.writer)
            .await
            .map_err(classify)?;
        Ok(result.rows_affected() == 1)
    }

    pub(crate) async fn list_price_rules(&self, tenant_id: Uuid) -> Result<Vec<StoredPriceRule>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, definition, effective_from, effective_until, retired_at IS NOT NULL
             FROM price_rules WHERE tenant_id = ?1 ORDER BY effective_from, id",
        )
        .bind(tenant_id)
        .fetch_all(&self.readers)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| {
                Ok(StoredPriceRule {
                    id: row.try_get(0).map_err(classify)?,
                    tenant_id,
                    definition: parse_json(&row.try_get::<String, _>(1).map_err(classify)?)?,
                    effective_from_us: row.try_get(2).map_err(classify)?,
                    effective_until_us: row.try_get(3).map_err(classify)?,
                    retired: row.try_get(4).map_err(classify)?,
                })
            })
            .collect()
    }

    pub(crate) async fn insert_price_rule(&self, rule: &StoredPriceRule) -> Result<(), StoreError> {
        insert_rule(rule).execute(&self.writer).await.map_err(classify)?;
        Ok(())
    }

    pub(crate) async fn retire_price_rule(
        &self,
        tenant_id: Uuid,
        rule_id: Uuid,
        at_us: i64,
    ) -> Result<bool, StoreError> {
        let result = retire_rule(tenant_id, rule_id, at_us).execute(&self.writer).await.map_err(classify)?;
        Ok(result.rows_affected() == 1)
    }

    /// Retires and inserts price rules in one transaction.
    pub(crate) async fn change_price_rules(
        &self,
        tenant_id: Uuid,
        retire: &[(Uuid, i64)],
        insert: &[StoredPriceRule],
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await.map_err(classify)?;
        for (rule_id, at_us) in retire {
            retire_rule(tenant_id, *rule_id, *at_us).execute(&mut *tx).await.map_err(classify)?;
        }
        for rule in insert {
            insert_rule(rule).execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    /// Events and cost since the start of the current UTC month (see the module docs: SQLite has
    /// no time zone database). Costs are summed in Rust, exactly.
    pub(crate) async fn month_usage(&self, tenant_id: Uuid) -> Result<(i64, Decimal), StoreError> {
        let month_start_us = values::utc_month_start_us(now_us());
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT event_count, cost FROM usage_rollup_hourly WHERE tenant_id = ?1 AND hour >= ?2",
        )
        .bind(tenant_id)
        .bind(month_start_us)
        .fetch_all(&self.readers)
        .await
        .map_err(classify)?;
        let mut events = 0i64;
        let mut cost = Decimal::ZERO;
        for (count, row_cost) in rows {
            events = events.saturating_add(count);
            // Held inside the decimal range, as on PostgreSQL: that much is over every quota.
            cost = cost.checked_add(values::decimal(&row_cost)?).unwrap_or(Decimal::MAX);
        }
        Ok((events, cost))
    }

    pub(crate) async fn record_rerate(&self, run: &RerateRun) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO rerate_runs (id, tenant_id, range_start, range_end, started_at, finished_at,
                                      events_scanned, events_changed, cost_before, cost_after, requested_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(run.id)
        .bind(run.tenant_id)
        .bind(run.start_us)
        .bind(run.end_us)
        .bind(run.started_at_us)
        .bind(now_us())
        .bind(run.events_scanned)
        .bind(run.events_changed)
        .bind(run.cost_before.to_string())
        .bind(run.cost_after.to_string())
        .bind(run.requested_by)
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(())
    }
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

fn insert_rule(rule: &StoredPriceRule) -> SqliteQuery<'static> {
    sqlx::query(
        "INSERT INTO price_rules (id, tenant_id, definition, effective_from, effective_until, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(rule.id)
    .bind(rule.tenant_id)
    .bind(values::json(&rule.definition))
    .bind(rule.effective_from_us)
    .bind(rule.effective_until_us)
    .bind(now_us())
}

fn retire_rule(tenant_id: Uuid, rule_id: Uuid, at_us: i64) -> SqliteQuery<'static> {
    sqlx::query(
        "UPDATE price_rules SET retired_at = coalesce(retired_at, ?4),
                effective_until = CASE WHEN ?3 <= effective_from THEN NULL
                                       ELSE min(coalesce(effective_until, ?3), ?3) END
         WHERE tenant_id = ?1 AND id = ?2",
    )
    .bind(tenant_id)
    .bind(rule_id)
    .bind(at_us)
    .bind(now_us())
}
