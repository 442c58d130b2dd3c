//! What the edge knows about each tenant, in memory: settings, service registry, price book, rate
//! limiter and month-to-date usage. Loaded on first use, refreshed every `ttl` (so changes made
//! through another edge apply within it) and at once when this edge changes them.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use pricing::{PriceBook, PriceRule};
use rust_decimal::Decimal;
use sink::{Store, StoreError, StoredPriceRule, TenantSettings};
use uuid::Uuid;

use crate::registry::Registry;

/// A tenant as ingest sees it.
#[derive(Debug)]
pub struct TenantContext {
    pub tenant_id: Uuid,
    pub settings: TenantSettings,
    pub registry: Registry,
    pub prices: PriceBook,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// Events and cost of the tenant's month so far: from the rollups at load, plus what this
    /// edge queued since.
    month_events: AtomicI64,
    month_cost: Mutex<Decimal>,
}

/// Why events of a tenant are held back before they reach the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admit { over_quota: bool },
    RateLimited { retry_after_ms: u32 },
    QuotaExceeded { message: String },
}

impl TenantContext {
    /// Applies the rate limit and the monthly quotas to `events` about to be queued.
    pub fn admit(&self, events: u32) -> Admission {
        if let Some(limiter) = &self.limiter
            && events > 0
        {
            let burst =
                self.settings.rate_limit_burst.or(self.settings.rate_limit_per_second).unwrap_or(1).max(1);
            // A request larger than the burst is charged the whole burst.
            let charge = NonZeroU32::new(events.min(burst)).unwrap_or(NonZeroU32::MIN);
            match limiter.check_n(charge) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    let retry_after_ms = wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
                    return Admission::RateLimited { retry_after_ms };
                }
                Err(_) => return Admission::RateLimited { retry_after_ms: 1000 },
            }
        }
        let over_quota = self.quota_exceeded();
        match over_quota {
            Some(message) if self.settings.quota_policy == "reject" => Admission::QuotaExceeded { message },
            Some(_) => Admission::Admit { over_quota: true },
            None => Admission::Admit { over_quota: false },
        }
    }

    fn quota_exceeded(&self) -> Option<String> {
        let events = self.month_events.load(Ordering::Relaxed);
        if let Some(quota) = self.settings.monthly_event_quota
            && events >= quota
        {
            return Some(format!("the monthly event quota of {quota} is used up"));
        }
        if let Some(quota) = self.settings.monthly_cost_quota {
            let cost = *self.month_cost.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if cost >= quota {
                return Some(format!("the monthly cost quota of {quota} is used up"));
            }
        }
        None
    }

    /// Counts events queued for this tenant towards its quotas.
    pub fn record(&self, events: i64, cost: Decimal) {
        self.month_events.fetch_add(events, Ordering::Relaxed);
        if !cost.is_zero() {
            *self.month_cost.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) += cost;
        }
    }
}

/// Loads and caches tenant contexts.
#[derive(Debug)]
pub struct Tenants {
    store: Arc<dyn Store>,
    contexts: moka::sync::Cache<Uuid, Arc<TenantContext>>,
    /// Limiters outlive context refreshes, so a refresh never resets a tenant's bucket.
    limiters: Mutex<HashMap<Uuid, ShapedLimiter>>,
    catalog: Vec<PriceRule>,
}

/// A limiter and the (rate, burst) it was built for.
type ShapedLimiter = ((u32, u32), Arc<DefaultDirectRateLimiter>);

/// Tenants kept in memory at most.
const TENANTS_CACHED_MAX: u64 = 100_000;

impl Tenants {
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Tenants {
        let contexts =
            moka::sync::Cache::builder().max_capacity(TENANTS_CACHED_MAX).time_to_live(ttl).build();
        Tenants { store, contexts, limiters: Mutex::new(HashMap::new()), catalog: pricing::catalog_rules() }
    }

    /// The tenant's context, loading it if needed.
    pub async fn get(&self, tenant_id: Uuid) -> Result<Arc<TenantContext>, StoreError> {
        if let Some(context) = self.contexts.get(&tenant_id) {
            return Ok(context);
        }
        let context = Arc::new(self.load(tenant_id).await?);
        self.contexts.insert(tenant_id, context.clone());
        Ok(context)
    }

    /// Forgets a tenant's context after a change, so the next request loads it anew.
    pub fn invalidate(&self, tenant_id: Uuid) {
        self.contexts.invalidate(&tenant_id);
    }

    /// The catalog rules every tenant starts from.
    pub fn catalog(&self) -> &[PriceRule] {
        &self.catalog
    }

    async fn load(&self, tenant_id: Uuid) -> Result<TenantContext, StoreError> {
        let settings = self
            .store
            .tenant_settings(tenant_id)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("no tenant with id {tenant_id}")))?;
        let services = self.store.list_services(tenant_id).await?;
        let registry =
            Registry::with_custom(&services).requiring_registration(settings.require_registered_services);
        let stored = self.store.list_price_rules(tenant_id).await?;
        let prices = price_book(&self.catalog, &stored)?;
        let (events, cost) = self.store.month_usage(tenant_id).await?;
        let limiter = self.limiter(tenant_id, &settings);
        Ok(TenantContext {
            tenant_id,
            settings,
            registry,
            prices,
            limiter,
            month_events: AtomicI64::new(events),
            month_cost: Mutex::new(cost),
        })
    }

    fn limiter(&self, tenant_id: Uuid, settings: &TenantSettings) -> Option<Arc<DefaultDirectRateLimiter>> {
        let mut limiters = self.limiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(per_second) = settings.rate_limit_per_second.and_then(NonZeroU32::new) else {
            limiters.remove(&tenant_id);
            return None;
        };
        let burst = settings.rate_limit_burst.and_then(NonZeroU32::new).unwrap_or(per_second);
        let shape = (per_second.get(), burst.get());
        if let Some((existing, limiter)) = limiters.get(&tenant_id)
            && *existing == shape
        {
            return Some(limiter.clone());
        }
        let limiter = Arc::new(RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)));
        limiters.insert(tenant_id, (shape, limiter.clone()));
        Some(limiter)
    }
}

/// The tenant's price book: the catalog, then the tenant's own rules (which win at equal
/// specificity); see [`pricing::tenant_price_book`], which the query service's billing summary
/// uses too. Rules retired before they started are left out.
pub fn price_book(catalog: &[PriceRule], stored: &[StoredPriceRule]) -> Result<PriceBook, StoreError> {
    pricing::tenant_price_book(catalog, stored.iter().map(as_stored_rule))
        .map_err(|error| StoreError::Internal(format!("stored price rules are inconsistent: {error}")))
}

fn as_stored_rule(stored: &StoredPriceRule) -> pricing::StoredRule<'_> {
    pricing::StoredRule {
        id: stored.id,
        definition: &stored.definition,
        effective_from_us: stored.effective_from_us,
        effective_until_us: stored.effective_until_us,
        retired: stored.retired,
    }
}
