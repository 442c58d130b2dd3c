//! The control plane: tenants, keys, services, price rules and settings, which the admin API
//! writes and the edge's caches read (key look-ups, tenant contexts with their month usage);
//! re-rate jobs; and retention. None of it runs per event: a request on the hot path reads
//! these through caches refreshed in the background.

use rust_decimal::Decimal;
use uuid::Uuid;

use super::{
    ApiKey, ApiKeyInfo, NewApiKey, Repriced, RerateBatch, RerateRecord, RerateRequest, RerateRun,
    RerateStart, RerateStatus, Retention, ServiceRecord, Store, StoreError, StoredPriceRule, Tenant,
    TenantSettings,
};

impl Store {
    /// The API key with this SHA-256 hash, if one exists (revoked and expired ones included:
    /// the caller decides).
    pub async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        match self {
            Store::Postgres(store) => store.find_api_key(key_hash).await,
            Store::Sqlite(store) => store.find_api_key(key_hash).await,
        }
        .map_err(|error| error.doing("look up an api key"))
    }

    /// Creates a tenant; its name must be new.
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        match self {
            Store::Postgres(store) => store.create_tenant(name).await,
            Store::Sqlite(store) => store.create_tenant(name).await,
        }
        .map_err(|error| error.doing("create a tenant"))
    }

    /// The tenant with this name or id.
    pub async fn find_tenant(&self, name_or_id: &str) -> Result<Option<Tenant>, StoreError> {
        match self {
            Store::Postgres(store) => store.find_tenant(name_or_id).await,
            Store::Sqlite(store) => store.find_tenant(name_or_id).await,
        }
        .map_err(|error| error.doing("find a tenant"))
    }

    /// Every tenant.
    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        match self {
            Store::Postgres(store) => store.list_tenants().await,
            Store::Sqlite(store) => store.list_tenants().await,
        }
        .map_err(|error| error.doing("list tenants"))
    }

    /// Disables or enables a tenant; false when there is no such tenant.
    pub async fn set_tenant_disabled(&self, tenant_id: Uuid, disabled: bool) -> Result<bool, StoreError> {
        match self {
            Store::Postgres(store) => store.set_tenant_disabled(tenant_id, disabled).await,
            Store::Sqlite(store) => store.set_tenant_disabled(tenant_id, disabled).await,
        }
        .map_err(|error| error.doing("disable or enable a tenant"))
    }

    /// A tenant's settings; `None` when there is no such tenant.
    pub async fn tenant_settings(&self, tenant_id: Uuid) -> Result<Option<TenantSettings>, StoreError> {
        match self {
            Store::Postgres(store) => store.tenant_settings(tenant_id).await,
            Store::Sqlite(store) => store.tenant_settings(tenant_id).await,
        }
        .map_err(|error| error.doing("read a tenant's settings"))
    }

    /// Replaces a tenant's settings.
    pub async fn update_tenant_settings(
        &self,
        tenant_id: Uuid,
        settings: &TenantSettings,
    ) -> Result<(), StoreError> {
        match self {
            Store::Postgres(store) => store.update_tenant_settings(tenant_id, settings).await,
            Store::Sqlite(store) => store.update_tenant_settings(tenant_id, settings).await,
        }
        .map_err(|error| error.doing("update a tenant's settings"))
    }

    /// Events stored and their cost in the tenant's current month (in its time zone; UTC on
    /// SQLite), from the rollups. Read by the tenant cache for quotas, off the hot path.
    pub async fn month_usage(&self, tenant_id: Uuid) -> Result<(i64, Decimal), StoreError> {
        match self {
            Store::Postgres(store) => store.month_usage(tenant_id).await,
            Store::Sqlite(store) => store.month_usage(tenant_id).await,
        }
        .map_err(|error| error.doing("read a tenant's month usage"))
    }

    /// Stores a new key's hash. The plaintext key never reaches storage.
    pub async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey, StoreError> {
        match self {
            Store::Postgres(store) => store.create_api_key(key).await,
            Store::Sqlite(store) => store.create_api_key(key).await,
        }
        .map_err(|error| error.doing("create an api key"))
    }

    /// A tenant's keys, newest first (never the keys themselves).
    pub async fn list_api_keys(&self, tenant_id: Uuid) -> Result<Vec<ApiKeyInfo>, StoreError> {
        match self {
            Store::Postgres(store) => store.list_api_keys(tenant_id).await,
            Store::Sqlite(store) => store.list_api_keys(tenant_id).await,
        }
        .map_err(|error| error.doing("list api keys"))
    }

    /// Revokes a key of a tenant; false when the tenant has no such key.
    pub async fn revoke_api_key(&self, tenant_id: Uuid, key_id: Uuid) -> Result<bool, StoreError> {
        match self {
            Store::Postgres(store) => store.revoke_api_key(tenant_id, key_id).await,
            Store::Sqlite(store) => store.revoke_api_key(tenant_id, key_id).await,
        }
        .map_err(|error| error.doing("revoke an api key"))
    }

    /// A tenant's custom service types.
    pub async fn list_services(&self, tenant_id: Uuid) -> Result<Vec<ServiceRecord>, StoreError> {
        match self {
            Store::Postgres(store) => store.list_services(tenant_id).await,
            Store::Sqlite(store) => store.list_services(tenant_id).await,
        }
        .map_err(|error| error.doing("list services"))
    }

    /// Creates or replaces a custom service type; true when it was created.
    pub async fn put_service(&self, tenant_id: Uuid, service: &ServiceRecord) -> Result<bool, StoreError> {
        match self {
            Store::Postgres(store) => store.put_service(tenant_id, service).await,
            Store::Sqlite(store) => store.put_service(tenant_id, service).await,
        }
        .map_err(|error| error.doing("store a service"))
    }

    /// Deletes a custom service type; false when there was none.
    pub async fn delete_service(&self, tenant_id: Uuid, service_type: &str) -> Result<bool, StoreError> {
        match self {
            Store::Postgres(store) => store.delete_service(tenant_id, service_type).await,
            Store::Sqlite(store) => store.delete_service(tenant_id, service_type).await,
        }
        .map_err(|error| error.doing("delete a service"))
    }

    /// A tenant's price rules, retired versions included.
    pub async fn list_price_rules(&self, tenant_id: Uuid) -> Result<Vec<StoredPriceRule>, StoreError> {
        match self {
            Store::Postgres(store) => store.list_price_rules(tenant_id).await,
            Store::Sqlite(store) => store.list_price_rules(tenant_id).await,
        }
        .map_err(|error| error.doing("list price rules"))
    }

    /// Stores a new price rule version.
    pub async fn insert_price_rule(&self, rule: &StoredPriceRule) -> Result<(), StoreError> {
        match self {
            Store::Postgres(store) => store.insert_price_rule(rule).await,
            Store::Sqlite(store) => store.insert_price_rule(rule).await,
        }
        .map_err(|error| error.doing("insert a price rule"))
    }

    /// Ends a rule version at `at_us` and marks it retired (kept for history). A rule retired at or
    /// before its start never applies. False when there is no such rule.
    pub async fn retire_price_rule(
        &self,
        tenant_id: Uuid,
        rule_id: Uuid,
        at_us: i64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Postgres(store) => store.retire_price_rule(tenant_id, rule_id, at_us).await,
            Store::Sqlite(store) => store.retire_price_rule(tenant_id, rule_id, at_us).await,
        }
        .map_err(|error| error.doing("retire a price rule"))
    }

    /// Retires rule versions (each at its time, as [`Store::retire_price_rule`]) and inserts new
    /// ones, all in one transaction: a tenant's price book changes whole or not at all.
    pub async fn change_price_rules(
        &self,
        tenant_id: Uuid,
        retire: &[(Uuid, i64)],
        insert: &[StoredPriceRule],
    ) -> Result<(), StoreError> {
        match self {
            Store::Postgres(store) => store.change_price_rules(tenant_id, retire, insert).await,
            Store::Sqlite(store) => store.change_price_rules(tenant_id, retire, insert).await,
        }
        .map_err(|error| error.doing("change price rules"))
    }

    /// Writes a re-rate's audit row before it starts, with status running, unless another
    /// re-rate of the tenant is running: then nothing is written and that run's id is returned.
    /// A running row not updated since `stale_before_us` was left by a stopped process: it is
    /// marked interrupted and does not block the new run.
    pub async fn start_rerate(
        &self,
        run: &RerateRun,
        stale_before_us: i64,
    ) -> Result<RerateStart, StoreError> {
        match self {
            Store::Postgres(store) => store.start_rerate(run, stale_before_us).await,
            Store::Sqlite(store) => store.start_rerate(run, stale_before_us).await,
        }
        .map_err(|error| error.doing("start a re-rate"))
    }

    /// Re-prices up to `limit` events of a tenant in `[start_us, end_us)` after `after` (a
    /// keyset position), in one transaction that also moves the rollups by the cost difference.
    pub async fn rerate_batch(
        &self,
        request: &RerateRequest,
        after: Option<(i64, Uuid)>,
        reprice: &(dyn Fn(&wire::Event) -> Repriced + Send + Sync),
    ) -> Result<RerateBatch, StoreError> {
        match self {
            Store::Postgres(store) => store.rerate_batch(request, after, reprice).await,
            Store::Sqlite(store) => store.rerate_batch(request, after, reprice).await,
        }
        .map_err(|error| error.doing("re-rate a batch"))
    }

    /// Writes a running re-rate's progress (its figures so far), or its end when `status` is not
    /// running, with a public `error` message for a failed or interrupted run.
    pub async fn update_rerate(
        &self,
        run: &RerateRun,
        status: RerateStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Postgres(store) => store.update_rerate(run, status, error).await,
            Store::Sqlite(store) => store.update_rerate(run, status, error).await,
        }
        .map_err(|error| error.doing("update a re-rate"))
    }

    /// Records a finished re-rate.
    pub async fn record_rerate(&self, run: &RerateRun) -> Result<(), StoreError> {
        match self {
            Store::Postgres(store) => store.record_rerate(run).await,
            Store::Sqlite(store) => store.record_rerate(run).await,
        }
        .map_err(|error| error.doing("record a re-rate"))
    }

    /// One of the tenant's re-rates; `None` when the tenant has no run with this id.
    pub async fn find_rerate(&self, tenant_id: Uuid, id: Uuid) -> Result<Option<RerateRecord>, StoreError> {
        match self {
            Store::Postgres(store) => store.find_rerate(tenant_id, id).await,
            Store::Sqlite(store) => store.find_rerate(tenant_id, id).await,
        }
        .map_err(|error| error.doing("find a re-rate"))
    }

    /// The tenant's latest re-rates, newest first, at most `limit`.
    pub async fn list_rerates(&self, tenant_id: Uuid, limit: u32) -> Result<Vec<RerateRecord>, StoreError> {
        match self {
            Store::Postgres(store) => store.list_rerates(tenant_id, limit).await,
            Store::Sqlite(store) => store.list_rerates(tenant_id, limit).await,
        }
        .map_err(|error| error.doing("list re-rates"))
    }

    /// Creates time partitions ahead (PostgreSQL) and drops raw events (and rollups, if a
    /// retention is set) past retention. Safe to run from several processes at once. Commits
    /// need its partitions, yet it is no part of the event path: it runs on a timer, days ahead
    /// of need, never per batch.
    pub async fn maintain(&self, retention: &Retention) -> Result<(), StoreError> {
        match self {
            Store::Postgres(store) => store.maintain(retention).await,
            Store::Sqlite(store) => store.maintain(retention).await,
        }
        .map_err(|error| error.doing("maintain partitions and retention"))
    }
}
