//! API keys for the query service: the key from the request, its SHA-256 looked up in
//! `api_keys` through a short-lived cache, and the `query` scope required.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use sha2::Digest;
use uuid::Uuid;

use crate::backend::{Backend, KeyRecord};
use crate::error::ApiError;

/// The scope every data endpoint requires.
pub const QUERY_SCOPE: &str = "query";

/// Cached key look-ups at most; beyond it the least used are evicted.
const KEY_CACHE_ENTRIES_MAX: u64 = 100_000;

/// Who is calling, once the key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant_id: Uuid,
    pub tenant_name: String,
    /// The tenant's IANA time zone, as of the key look-up.
    pub time_zone: String,
    pub key_id: Uuid,
}

impl Caller {
    /// A `tenant_id` parameter, where given, must name this tenant (by name or id).
    pub fn check_tenant(&self, tenant: Option<&str>) -> Result<(), ApiError> {
        match tenant {
            Some(tenant) if tenant != self.tenant_name && tenant != self.tenant_id.to_string() => {
                Err(ApiError::Forbidden(format!("tenant_id {tenant:?} is not the tenant of this API key")))
            }
            _ => Ok(()),
        }
    }
}

/// Checks keys. Look-ups, hits and misses alike, are cached for `ttl`: a revoked key, a disabled
/// tenant or a changed time zone takes effect within `ttl`, and unknown keys cannot hammer the
/// database.
#[derive(Debug, Clone)]
pub struct Authenticator {
    backend: Arc<dyn Backend>,
    cache: moka::sync::Cache<[u8; 32], Option<Arc<KeyRecord>>>,
}

impl Authenticator {
    pub fn new(backend: Arc<dyn Backend>, ttl: Duration) -> Authenticator {
        let cache =
            moka::sync::Cache::builder().max_capacity(KEY_CACHE_ENTRIES_MAX).time_to_live(ttl).build();
        Authenticator { backend, cache }
    }

    /// The caller of a request whose key must carry the `query` scope.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let key = api_key(headers).map(str::trim).filter(|key| !key.is_empty());
        let key = key.ok_or(ApiError::AuthenticationRequired)?;
        let hash: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        let record = match self.cache.get(&hash) {
            Some(record) => {
                metrics::counter!("tally_key_cache_total", "component" => "query", "result" => "hit")
                    .increment(1);
                record
            }
            None => {
                metrics::counter!("tally_key_cache_total", "component" => "query", "result" => "miss")
                    .increment(1);
                let record = self.backend.find_api_key(&hash).await?.map(Arc::new);
                self.cache.insert(hash, record.clone());
                record
            }
        };
        let record = record.ok_or(ApiError::InvalidApiKey)?;
        if record.revoked || record.expires_at_us.is_some_and(|expires| expires <= now_us()) {
            return Err(ApiError::InvalidApiKey);
        }
        if record.tenant_disabled {
            return Err(ApiError::Forbidden("the tenant of this API key is disabled".into()));
        }
        if !record.scopes.iter().any(|scope| scope == QUERY_SCOPE) {
            return Err(ApiError::Forbidden("this API key lacks the query scope".into()));
        }
        Ok(Caller {
            tenant_id: record.tenant_id,
            tenant_name: record.tenant_name.clone(),
            time_zone: record.time_zone.clone(),
            key_id: record.key_id,
        })
    }
}

/// The API key from `X-API-Key`, or `Authorization: <key>` / `Authorization: Bearer <key>`.
pub fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|value| value.to_str().ok()) {
        return Some(key);
    }
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    // The scheme is case-insensitive (RFC 9110 §11.1): `BEARER <key>` too.
    Some(match authorization.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim_start(),
        _ => authorization,
    })
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_either_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(api_key(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer tly_abc".parse().expect("header"));
        assert_eq!(api_key(&headers), Some("tly_abc"));
        headers.insert(header::AUTHORIZATION, "tly_def".parse().expect("header"));
        assert_eq!(api_key(&headers), Some("tly_def"));
        headers.insert("x-api-key", "tly_ghi".parse().expect("header"));
        assert_eq!(api_key(&headers), Some("tly_ghi"));
    }

    #[test]
    fn tenant_parameter_must_name_the_key_tenant() {
        let caller = Caller {
            tenant_id: Uuid::from_u128(7),
            tenant_name: "acme".into(),
            time_zone: "UTC".into(),
            key_id: Uuid::nil(),
        };
        assert!(caller.check_tenant(None).is_ok());
        assert!(caller.check_tenant(Some("acme")).is_ok());
        assert!(caller.check_tenant(Some(&Uuid::from_u128(7).to_string())).is_ok());
        assert!(matches!(caller.check_tenant(Some("globex")), Err(ApiError::Forbidden(_))));
    }
}
