//! Every error a client can see: one closed enum, its status and body decided in one `match`.
//! Internal details are logged where the error is turned into a response, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::backend::BackendError;

/// A request that could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// No API key in `X-API-Key` or `Authorization`.
    #[error("authentication required: send the API key in X-API-Key or Authorization")]
    AuthenticationRequired,
    /// Unknown, revoked or expired key.
    #[error("invalid API key")]
    InvalidApiKey,
    /// A valid key that may not do this (scope, disabled tenant, another tenant's data).
    #[error("{0}")]
    Forbidden(String),
    /// A query parameter is unknown, malformed or out of range; the text names it.
    #[error("{0}")]
    InvalidParameter(String),
    /// A sum, product or quotient of the tenant's own numbers (costs, quantities, counts) does
    /// not fit the exact decimal or integer type; the text names what overflowed. Permanent for
    /// this request: narrowing the range or the filters may help, retrying does not.
    #[error("{0}")]
    Overflow(String),
    /// Storage is unreachable; retrying later may work.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A bug or a broken invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// `invalid_parameter` for `field`.
    pub fn parameter(field: &str, problem: impl std::fmt::Display) -> ApiError {
        ApiError::InvalidParameter(format!("{field}: {problem}"))
    }

    /// `overflow` of `what` (a field of the answer, such as `total_cost`).
    pub fn overflow(what: &str) -> ApiError {
        ApiError::Overflow(format!(
            "{what}: the result exceeds the largest exact number ({}); narrow the time range or the filters",
            rust_decimal::Decimal::MAX
        ))
    }

    /// The error code in the body: the older system's names for the auth errors.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::AuthenticationRequired => "authentication_required",
            ApiError::InvalidApiKey => "invalid_api_key",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::Overflow(_) => "overflow",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::AuthenticationRequired | ApiError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            ApiError::Overflow(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(error: BackendError) -> ApiError {
        match error {
            BackendError::Unavailable(detail) => ApiError::Unavailable(detail),
            BackendError::Internal(detail) => ApiError::Internal(detail),
            BackendError::Overflow(what) => ApiError::overflow(&what),
            BackendError::Unsupported(detail) => ApiError::InvalidParameter(format!("time_zone: {detail}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = match &self {
            ApiError::Unavailable(detail) => {
                tracing::warn!(%detail, "query failed: storage unavailable");
                "storage is unavailable; retry later".to_owned()
            }
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "query failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        metrics::counter!("tally_query_errors_total", "code" => self.code()).increment(1);
        let mut response =
            (self.status(), Json(json!({"error": self.code(), "detail": detail}))).into_response();
        if matches!(self, ApiError::Unavailable(_)) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, 1.into());
        }
        response
    }
}

/// The error code and detail of a plain answer (see `serve::json_errors`); server errors never
/// show their text.
pub fn plain_error(status: axum::http::StatusCode, text: String) -> (&'static str, String) {
    let error = match status.as_u16() {
        401 => "authentication_required",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "too_large",
        429 => "rate_limited",
        503 => "unavailable",
        _ if status.is_server_error() => "internal",
        _ => "invalid_parameter",
    };
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let detail = if status.is_server_error() || text.is_empty() { reason } else { text };
    (error, detail)
}
