//! Who asks, and for what: extractors that authenticate a request, read its typed parameters,
//! check its `tenant_id` and resolve its time range, once, before a handler runs.
//!
//! The order of the checks: the API key first (401/403 before anything about the request is
//! answered), then the parameters (400 naming the first bad one), then `tenant_id` (403), then
//! the time range (400 naming `start_date` or `end_date`).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use time::OffsetDateTime;

use super::params::{RangeInput, RangeParams, TenantParams, TimeInput};
use super::{hour_ceil, hour_floor};
use crate::QueryState;
use crate::auth::Caller;
use crate::backend::{Edges, Filter, Scope};
use crate::error::ApiError;

/// An authenticated request for the caller's tenant, with its parameters.
#[derive(Debug)]
pub struct Tenant<P> {
    pub caller: Caller,
    pub params: P,
}

/// An authenticated request over a time range of the caller's tenant: the range resolved in the
/// tenant's time zone, and the equality filters of its parameters.
#[derive(Debug)]
pub struct Scoped<P> {
    pub caller: Caller,
    pub scope: Scope,
    pub filter: Filter,
    pub params: P,
}

impl<P: TenantParams + Send> FromRequestParts<Arc<QueryState>> for Tenant<P> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<QueryState>) -> Result<Self, ApiError> {
        let caller = state.auth.authenticate(&parts.headers).await?;
        let params = P::from_uri(&parts.uri)?;
        caller.check_tenant(params.tenant_id())?;
        Ok(Tenant { caller, params })
    }
}

impl<P: RangeParams + Send> FromRequestParts<Arc<QueryState>> for Scoped<P> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<QueryState>) -> Result<Self, ApiError> {
        let Tenant { caller, params } = Tenant::<P>::from_request_parts(parts, state).await?;
        let scope = scope(state, &caller, params.range()).await?;
        Ok(Scoped { filter: params.filter(), caller, scope, params })
    }
}

/// The time range of a request: defaults end now (rounded up to the minute, so repeated
/// requests share cache entries) and start `default_range_days` earlier; times without an
/// offset are read in the tenant's time zone; the range must be non-empty and within
/// `max_range_days`.
async fn scope(state: &QueryState, caller: &Caller, range: RangeInput) -> Result<Scope, ApiError> {
    let RangeInput { start, end, edges } = range;
    let local: Vec<_> = [start, end]
        .iter()
        .flatten()
        .filter_map(|time| match time {
            TimeInput::Local(local) => Some(*local),
            TimeInput::Instant(_) => None,
        })
        .collect();
    let mut resolved = if local.is_empty() {
        Vec::new()
    } else {
        state.backend.resolve_local_times(&caller.time_zone, &local).await?
    }
    .into_iter();
    let mut instant = |time: TimeInput| match time {
        TimeInput::Instant(instant) => Some(instant),
        TimeInput::Local(_) => resolved.next(),
    };
    let start = start.and_then(&mut instant);
    let end = end.and_then(&mut instant).unwrap_or_else(now_rounded_up);
    let default_days = i64::from(state.config.default_range_days);
    let start = start.unwrap_or(end - time::Duration::days(default_days));
    if start >= end {
        return Err(ApiError::parameter("start_date", "must be before end_date"));
    }
    let max_days = i64::from(state.config.max_range_days);
    if end - start > time::Duration::days(max_days) {
        return Err(ApiError::parameter(
            "start_date",
            format!("the range exceeds the maximum of {max_days} days; narrow start_date..end_date"),
        ));
    }
    let mut scope = Scope::exact(caller.tenant_id, start, end, &caller.time_zone);
    if edges == Edges::Hour {
        scope.edges = Edges::Hour;
        scope.start = hour_floor(start);
        scope.end = hour_ceil(end).ok_or_else(|| {
            ApiError::parameter("end_date", "is too late to round up to a whole hour; pass edges=exact")
        })?;
    }
    Ok(scope)
}

/// Now, rounded up to the next whole minute.
fn now_rounded_up() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let seconds = now.unix_timestamp();
    let rounded = (seconds.div_euclid(60) + 1) * 60;
    OffsetDateTime::from_unix_timestamp(rounded).unwrap_or(now)
}
