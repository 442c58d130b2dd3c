//! What the edge knows about each tenant, in memory: settings, service registry, price book, rate
//! limiter and month-to-date usage. Loaded once on first use (concurrent first requests share one
//! load), then refreshed in the background every `ttl` while requests keep using the loaded one
//! (so changes made through another edge apply within about `ttl`), and reloaded at once when
//! this edge changes them. The month-to-date usage is one counter per tenant, shared by every
//! request and carried across refreshes.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use pricing::{PriceBook, PriceRule};
use rust_decimal::Decimal;
use sink::{Store, StoreError, StoredPriceRule, TenantSettings};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::registry::Registry;

/// A tenant as ingest sees it.
#[derive(Debug)]
pub struct TenantContext {
    pub tenant_id: Uuid,
    pub settings: TenantSettings,
    pub registry: Registry,
    pub prices: PriceBook,
    /// What the price book left out or decided (see [`pricing::tenant_price_book_lenient`]).
    pub price_problems: Vec<String>,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    month: Arc<MonthUsage>,
    loaded_at: Instant,
    refreshing: AtomicBool,
}

/// Events and cost of a tenant's month so far, one per tenant: the larger of the rollups' figure
/// (which includes other edges) and this edge's own count, plus what this edge queued since.
#[derive(Debug)]
struct MonthUsage {
    /// The UTC month (year × 12 + month) the figures are for.
    month: AtomicI64,
    events: AtomicI64,
    cost: Mutex<Decimal>,
}

impl MonthUsage {
    fn new(month: i64, events: i64, cost: Decimal) -> MonthUsage {
        MonthUsage { month: AtomicI64::new(month), events: AtomicI64::new(events), cost: Mutex::new(cost) }
    }

    /// Takes a fresh figure from storage: a new month starts from it, the same month keeps the
    /// larger of both (storage lags what this edge queued; this edge misses other edges).
    fn refresh(&self, month: i64, events: i64, cost: Decimal) {
        let mut held = self.cost.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.month.swap(month, Ordering::AcqRel) == month {
            self.events.fetch_max(events, Ordering::AcqRel);
            *held = (*held).max(cost);
        } else {
            self.events.store(events, Ordering::Release);
            *held = cost;
        }
    }
}

/// The current UTC month as year × 12 + month.
fn current_month() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::from(now.year()) * 12 + i64::from(u8::from(now.month()))
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
        let events = self.month.events.load(Ordering::Relaxed);
        if let Some(quota) = self.settings.monthly_event_quota
            && events >= quota
        {
            return Some(format!("the monthly event quota of {quota} is used up"));
        }
        if let Some(quota) = self.settings.monthly_cost_quota {
            let cost = *self.month.cost.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if cost >= quota {
                return Some(format!("the monthly cost quota of {quota} is used up"));
            }
        }
        None
    }

    /// Counts events queued for this tenant towards its quotas. The cost total is checked: past
    /// the decimal range it stays at the largest decimal, which is over any quota.
    pub fn record(&self, events: i64, cost: Decimal) {
        self.month.events.fetch_add(events, Ordering::Relaxed);
        if !cost.is_zero() {
            let mut total = self.month.cost.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *total = total.checked_add(cost).unwrap_or(Decimal::MAX);
        }
    }
}

/// Loads and caches tenant contexts.
#[derive(Debug)]
pub struct Tenants {
    store: Arc<Store>,
    contexts: moka::sync::Cache<Uuid, Arc<TenantContext>>,
    /// First loads in progress: concurrent requests of one tenant wait for the same load.
    loading: Mutex<HashMap<Uuid, Arc<OnceCell<Arc<TenantContext>>>>>,
    /// Month-to-date usage per tenant, kept across refreshes.
    months: Mutex<HashMap<Uuid, Arc<MonthUsage>>>,
    /// Limiters outlive context refreshes, so a refresh never resets a tenant's bucket.
    limiters: Mutex<HashMap<Uuid, ShapedLimiter>>,
    catalog: Vec<PriceRule>,
    ttl: Duration,
}

/// A limiter and the (rate, burst) it was built for.
type ShapedLimiter = ((u32, u32), Arc<DefaultDirectRateLimiter>);

/// Tenants kept in memory at most.
const TENANTS_CACHED_MAX: u64 = 100_000;

impl Tenants {
    pub fn new(store: Arc<Store>, ttl: Duration) -> Tenants {
        let contexts = moka::sync::Cache::builder().max_capacity(TENANTS_CACHED_MAX).build();
        Tenants {
            store,
            contexts,
            loading: Mutex::new(HashMap::new()),
            months: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            catalog: pricing::catalog_rules(),
            ttl,
        }
    }

    /// The tenant's context. Only a tenant's first request (or the first after a change through
    /// this edge) waits for storage, and concurrent ones share that one load; later, a context
    /// older than the TTL is refreshed in the background while requests go on with it.
    pub async fn get(self: &Arc<Self>, tenant_id: Uuid) -> Result<Arc<TenantContext>, StoreError> {
        if let Some(context) = self.contexts.get(&tenant_id) {
            if context.loaded_at.elapsed() >= self.ttl && !context.refreshing.swap(true, Ordering::AcqRel) {
                let (tenants, stale) = (self.clone(), context.clone());
                tokio::spawn(async move {
                    match tenants.load(tenant_id).await {
                        Ok(fresh) => tenants.contexts.insert(tenant_id, Arc::new(fresh)),
                        Err(error) => {
                            tracing::warn!(%tenant_id, %error, "failed to refresh a tenant; keeping what was loaded");
                            stale.refreshing.store(false, Ordering::Release);
                        }
                    }
                });
            }
            return Ok(context);
        }
        let cell = {
            let mut loading = self.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            loading.entry(tenant_id).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| async {
                let context = Arc::new(self.load(tenant_id).await?);
                self.contexts.insert(tenant_id, context.clone());
                Ok(context)
            })
            .await
            .cloned();
        let mut loading = self.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if loading.get(&tenant_id).is_some_and(|current| Arc::ptr_eq(current, &cell)) {
            loading.remove(&tenant_id);
        }
        result
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
            .ok_or_else(|| StoreError::invalid(format!("no tenant with id {tenant_id}")))?;
        let services = self.store.list_services(tenant_id).await?;
        let registry =
            Registry::with_custom(&services).requiring_registration(settings.require_registered_services);
        let stored = self.store.list_price_rules(tenant_id).await?;
        let (prices, price_problems) = price_book(&self.catalog, &stored);
        if !price_problems.is_empty() {
            metrics::counter!("tally_tenant_price_book_problems_total")
                .increment(price_problems.len() as u64);
            tracing::warn!(%tenant_id, problems = ?price_problems, "a tenant's price rules need repair");
        }
        let month = current_month();
        let (events, cost) = self.store.month_usage(tenant_id).await?;
        let usage = {
            let mut months = self.months.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let usage =
                months.entry(tenant_id).or_insert_with(|| Arc::new(MonthUsage::new(month, events, cost)));
            usage.refresh(month, events, cost);
            usage.clone()
        };
        let limiter = self.limiter(tenant_id, &settings);
        Ok(TenantContext {
            tenant_id,
            settings,
            registry,
            prices,
            price_problems,
            limiter,
            month: usage,
            loaded_at: Instant::now(),
            refreshing: AtomicBool::new(false),
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

/// The tenant's price book as ingest, re-rating and the billing summary use it: the catalog, then
/// the tenant's own rules (which win at equal specificity), never failing; with what it left out or
/// decided ([`pricing::tenant_price_book_lenient`]).
pub fn price_book(catalog: &[PriceRule], stored: &[StoredPriceRule]) -> (PriceBook, Vec<String>) {
    pricing::tenant_price_book_lenient(catalog, stored.iter().map(as_stored_rule))
}

/// Checks a tenant's rules as they would be after a change: `Err` names a rule that cannot be
/// read or is invalid, or an ambiguity that involves one of the `changed` rules (ambiguities
/// already stored are reported elsewhere, not held against an unrelated change).
pub fn check_price_change(
    catalog: &[PriceRule],
    stored: &[StoredPriceRule],
    changed: &[Uuid],
) -> Result<(), String> {
    for rule in stored.iter().filter(|rule| changed.contains(&rule.id)) {
        as_stored_rule(rule).to_rule().map_err(|error| error.to_string())?;
    }
    let (_, problems) = pricing::tenant_price_book_lenient(catalog, stored.iter().map(as_stored_rule));
    match problems.into_iter().find(|problem| changed.iter().any(|id| problem.contains(&id.to_string()))) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
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
