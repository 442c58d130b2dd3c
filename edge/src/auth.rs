//! API keys: parsing them from requests, checking them against storage through a short-lived
//! in-memory cache, so that authentication costs nothing on the hot path.

use std::sync::Arc;
use std::time::Duration;

use sink::{ApiKey, Scope, Store, StoreError};
use uuid::Uuid;

/// Who is calling, once the key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant_id: Uuid,
    pub tenant_name: String,
    pub key_id: Uuid,
    pub scopes: Vec<Scope>,
}

/// Why a caller was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send the API key in X-API-Key or Authorization")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("this API key lacks the {0} scope")]
    MissingScope(&'static str),
    #[error("the tenant of this API key is disabled")]
    TenantDisabled,
    #[error("cannot check the API key: {0}")]
    Unavailable(StoreError),
}

impl AuthError {
    pub fn code(&self) -> wire::ErrorCode {
        match self {
            AuthError::Missing | AuthError::Invalid => wire::ErrorCode::Unauthorized,
            AuthError::MissingScope(_) | AuthError::TenantDisabled => wire::ErrorCode::Forbidden,
            AuthError::Unavailable(_) => wire::ErrorCode::Unavailable,
        }
    }
}

/// Checks API keys. Look-ups, hits and misses alike, are cached for `ttl`, so a revoked key
/// stops working within `ttl` and unknown keys cannot hammer the database.
#[derive(Debug, Clone)]
pub struct Authenticator {
    store: Arc<Store>,
    cache: moka::sync::Cache<[u8; 32], Option<Arc<ApiKey>>>,
}

/// Cached keys at most; beyond it the least used are evicted.
const KEY_CACHE_ENTRIES_MAX: u64 = 100_000;

impl Authenticator {
    pub fn new(store: Arc<Store>, ttl: Duration) -> Authenticator {
        let cache =
            moka::sync::Cache::builder().max_capacity(KEY_CACHE_ENTRIES_MAX).time_to_live(ttl).build();
        Authenticator { store, cache }
    }

    /// Forgets every cached key, so a revocation through this edge applies at once (other edges
    /// apply it within the TTL).
    pub fn forget_all(&self) {
        self.cache.invalidate_all();
    }

    /// Forgets one key (after its revocation), so the revocation applies at once on this edge,
    /// open binary connections included (they check their key on every batch).
    pub fn forget_key(&self, key_id: Uuid) {
        self.forget_where(|key| key.id == key_id);
    }

    /// Forgets a tenant's keys (after the tenant was disabled or enabled).
    pub fn forget_tenant(&self, tenant_id: Uuid) {
        self.forget_where(|key| key.tenant_id == tenant_id);
    }

    fn forget_where(&self, matches: impl Fn(&ApiKey) -> bool) {
        let stale: Vec<[u8; 32]> = self
            .cache
            .iter()
            .filter(|(_, record)| record.as_deref().is_some_and(&matches))
            .map(|(hash, _)| *hash)
            .collect();
        for hash in stale {
            self.cache.invalidate(&hash);
        }
    }

    /// Checks `key` and that it carries `scope`.
    pub async fn authenticate(&self, key: Option<&str>, scope: Scope) -> Result<Caller, AuthError> {
        let key = key.map(str::trim).filter(|key| !key.is_empty()).ok_or(AuthError::Missing)?;
        let hash = sink::hash_api_key(key);
        let record = match self.cache.get(&hash) {
            Some(record) => {
                metrics::counter!("tally_key_cache_total", "component" => "edge", "result" => "hit")
                    .increment(1);
                record
            }
            None => {
                metrics::counter!("tally_key_cache_total", "component" => "edge", "result" => "miss")
                    .increment(1);
                let record =
                    self.store.find_api_key(&hash).await.map_err(AuthError::Unavailable)?.map(Arc::new);
                self.cache.insert(hash, record.clone());
                record
            }
        };
        let record = record.ok_or(AuthError::Invalid)?;
        let now_us = now_us();
        if record.revoked || record.expires_at_us.is_some_and(|expires| expires <= now_us) {
            return Err(AuthError::Invalid);
        }
        if record.tenant_disabled {
            return Err(AuthError::TenantDisabled);
        }
        if !record.scopes.contains(&scope) {
            return Err(AuthError::MissingScope(scope.as_str()));
        }
        Ok(Caller {
            tenant_id: record.tenant_id,
            tenant_name: record.tenant_name.clone(),
            key_id: record.id,
            scopes: record.scopes.clone(),
        })
    }
}

/// A new random API key: `tly_` and 64 hex digits holding 244 random bits from the OS generator.
pub fn generate_api_key() -> String {
    let mut key = String::with_capacity(68);
    key.push_str("tly_");
    for part in [Uuid::new_v4(), Uuid::new_v4()] {
        for byte in part.as_bytes() {
            key.push_str(&format!("{byte:02x}"));
        }
    }
    key
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_long_random_and_prefixed() {
        let (a, b) = (super::generate_api_key(), super::generate_api_key());
        assert!(a.starts_with("tly_") && a.len() == 68);
        assert_ne!(a, b);
    }
}
