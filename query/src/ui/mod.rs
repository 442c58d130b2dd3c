//! The usage dashboard at `/ui/`: server-rendered HTML, charts as inline SVG, one embedded
//! stylesheet, no script.
//!
//! # Shape
//! - Sign-in takes an API key with the `query` scope and keeps it server-side in a [`Sessions`]
//!   entry; the browser holds only a random session id in an `HttpOnly; SameSite=Strict;
//!   Path=/ui` cookie. The key never appears in a URL or a page.
//! - Every figure comes from the JSON API: a view asks the same endpoints a client would, in
//!   process (`api::data_router`), with the session's key, and renders the answer. Numbers keep
//!   the API's exact digits ([`json::Json`]); floats are used only to draw.
//! - Every page is sent with a strict Content-Security-Policy ([`CONTENT_SECURITY_POLICY`]).
//!
//! # Architecture Invariant
//! The dashboard computes no figure of its own: no sum, no rate, no bill. What it shows for a
//! range is what the API answers for that range.

mod events;
mod html;
pub mod json;
mod range;
mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Form, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use tower::ServiceExt;

use crate::QueryState;
use crate::auth::Caller;
use crate::error::ApiError;
use html::esc;
use json::Json;

/// Sent with every page: nothing but this origin's stylesheet, inline SVG and `data:` images;
/// no script, no frames, forms only to this origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Sessions held at most; beyond it the least used are evicted (their users sign in again).
pub const SESSIONS_MAX: u64 = 10_000;
/// A session ends this long after sign-in, whatever its use.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A session ends after this long without a request.
pub const SESSION_IDLE: Duration = Duration::from_secs(3600);
const _: () = assert!(SESSION_IDLE.as_secs() <= SESSION_LIFETIME.as_secs());

/// The cookie holding the session id.
const COOKIE: &str = "tally_session";
/// Answers of the API read at most (a listing page of 100 events is far smaller).
const API_BODY_BYTES_MAX: usize = 16 << 20;
const STYLESHEET: &str = include_str!("app.css");

/// Signed-in sessions: random id to the API key, bounded in number and expiring.
#[derive(Debug, Clone)]
pub struct Sessions {
    keys: moka::sync::Cache<String, Arc<str>>,
}

impl Default for Sessions {
    fn default() -> Self {
        let keys = moka::sync::Cache::builder()
            .max_capacity(SESSIONS_MAX)
            .time_to_live(SESSION_LIFETIME)
            .time_to_idle(SESSION_IDLE)
            .build();
        Sessions { keys }
    }
}

impl Sessions {
    /// A new session for `key`; returns its id: 244 random bits from the OS (two v4 UUIDs).
    fn open(&self, key: &str) -> String {
        let id = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        self.keys.insert(id.clone(), Arc::from(key));
        id
    }

    fn key(&self, id: &str) -> Option<Arc<str>> {
        self.keys.get(id)
    }

    fn close(&self, id: &str) {
        self.keys.invalidate(id);
    }
}

/// The dashboard's routes, and `/` redirecting to it.
pub fn routes(state: Arc<QueryState>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(views::overview))
        .route("/ui/breakdown", get(views::breakdown))
        .route("/ui/reliability", get(views::reliability))
        .route("/ui/billing", get(views::billing))
        .route("/ui/events", get(events::list))
        .route("/ui/events.csv", get(events::csv))
        .route("/ui/events/{event_id}", get(events::detail))
        .route("/ui/sign-in", get(sign_in_page).post(sign_in))
        .route("/ui/sign-out", axum::routing::post(sign_out))
        .route("/ui/app.css", get(stylesheet))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// The signed-in caller of a page: the session's key, checked again on every request (a
/// revoked key or a disabled tenant ends the session within the key cache's time to live).
#[derive(Debug)]
pub(crate) struct Viewer {
    key: Arc<str>,
    pub caller: Caller,
}

/// Why a page cannot be shown.
#[derive(Debug)]
pub(crate) enum UiError {
    /// No session (or it ended): go to the sign-in page.
    SignIn,
    /// The API refused or failed: its status and detail.
    Api(StatusCode, String),
    /// A parameter of the page itself.
    BadRequest(String),
}

impl From<ApiError> for UiError {
    fn from(error: ApiError) -> UiError {
        match error {
            ApiError::AuthenticationRequired | ApiError::InvalidApiKey => UiError::SignIn,
            other => {
                let status = other.status();
                let detail = match other {
                    ApiError::Internal(_) => "internal error".to_owned(),
                    ApiError::Unavailable(_) => "storage is unavailable; retry later".to_owned(),
                    other => other.to_string(),
                };
                UiError::Api(status, detail)
            }
        }
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, detail) = match self {
            UiError::SignIn => return Redirect::to("/ui/sign-in").into_response(),
            UiError::Api(status, detail) => (status, detail),
            UiError::BadRequest(detail) => (StatusCode::BAD_REQUEST, detail),
        };
        let body = format!(
            "<main class=\"narrow\"><h1>Cannot show this page</h1><p class=\"error\" role=\"alert\" data-testid=\"error\">{}</p><p><a href=\"/ui/\">Back to the overview</a></p></main>",
            esc(&detail)
        );
        (status, page_html("Error", None, &body)).into_response()
    }
}

impl Viewer {
    /// The viewer of a request, from its session cookie.
    pub(crate) async fn of(state: &QueryState, headers: &HeaderMap) -> Result<Viewer, UiError> {
        let id = session_id(headers).ok_or(UiError::SignIn)?;
        let key = state.ui_sessions.key(&id).ok_or(UiError::SignIn)?;
        let mut key_headers = HeaderMap::new();
        key_headers.insert("x-api-key", HeaderValue::from_str(&key).map_err(|_| UiError::SignIn)?);
        match state.auth.authenticate(&key_headers).await {
            Ok(caller) => Ok(Viewer { key, caller }),
            Err(error) => {
                state.ui_sessions.close(&id);
                Err(error.into())
            }
        }
    }

    /// Asks the JSON API `path_and_query` with this viewer's key, in process.
    pub(crate) async fn api(&self, state: &Arc<QueryState>, path_and_query: &str) -> Result<Json, UiError> {
        let response = self.api_response(state, path_and_query).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), API_BODY_BYTES_MAX)
            .await
            .map_err(|_| UiError::Api(StatusCode::BAD_GATEWAY, "the answer was too large".into()))?;
        let text = String::from_utf8_lossy(&bytes);
        let json = Json::parse(&text)
            .map_err(|_| UiError::Api(StatusCode::BAD_GATEWAY, "the API answered no JSON".into()))?;
        if status.is_success() {
            Ok(json)
        } else if status == StatusCode::UNAUTHORIZED {
            Err(UiError::SignIn)
        } else {
            Err(UiError::Api(status, json.get("detail").text().to_owned()))
        }
    }

    /// The API's raw response (for the CSV export, streamed through).
    pub(crate) async fn api_response(
        &self,
        state: &Arc<QueryState>,
        path_and_query: &str,
    ) -> Result<Response, UiError> {
        let request = axum::http::Request::get(path_and_query)
            .header("x-api-key", &*self.key)
            .body(Body::empty())
            .map_err(|_| UiError::BadRequest("invalid request".into()))?;
        let response = crate::api::data_router(state.clone())
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {});
        Ok(response)
    }
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|value| value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The navigation: label and path.
const VIEWS: [(&str, &str); 5] = [
    ("Overview", "/ui/"),
    ("Breakdown", "/ui/breakdown"),
    ("Reliability", "/ui/reliability"),
    ("Events", "/ui/events"),
    ("Billing", "/ui/billing"),
];

/// A whole page: head, header with navigation (when signed in) and `main`.
pub(crate) fn page_html(
    title: &str,
    nav: Option<(&Caller, &str, &str)>,
    main: &str,
) -> axum::response::Html<String> {
    let header = match nav {
        Some((caller, current, range_query)) => {
            let links: String = VIEWS
                .iter()
                .map(|(label, path)| {
                    let aria = if *path == current { " aria-current=\"page\"" } else { "" };
                    format!("<li><a href=\"{path}?{}\"{aria}>{label}</a></li>", esc(range_query))
                })
                .collect();
            format!(
                "<header><a class=\"brand\" href=\"/ui/\">Tally</a><nav aria-label=\"Views\"><ul>{links}</ul></nav>\
                 <div class=\"who\"><span data-testid=\"tenant\">{}</span> <span class=\"tz\">({})</span>\
                 <form method=\"post\" action=\"/ui/sign-out\"><button type=\"submit\">Sign out</button></form></div></header>",
                esc(&caller.tenant_name),
                esc(&caller.time_zone)
            )
        }
        None => "<header><span class=\"brand\">Tally</span></header>".to_owned(),
    };
    axum::response::Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Tally</title><link rel=\"icon\" href=\"data:,\"><link rel=\"stylesheet\" href=\"/ui/app.css\">\
         </head><body>{header}{main}</body></html>",
        esc(title)
    ))
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    let headers =
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=300")];
    (headers, STYLESHEET).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct SignInForm {
    api_key: String,
}

async fn sign_in_page(State(state): State<Arc<QueryState>>, headers: HeaderMap) -> Response {
    if Viewer::of(&state, &headers).await.is_ok() {
        return Redirect::to("/ui/").into_response();
    }
    sign_in_form(StatusCode::OK, None)
}

fn sign_in_form(status: StatusCode, error: Option<&str>) -> Response {
    let error = error
        .map(|text| {
            format!("<p class=\"error\" role=\"alert\" data-testid=\"sign-in-error\">{}</p>", esc(text))
        })
        .unwrap_or_default();
    let main = format!(
        "<main class=\"narrow\"><h1>Sign in</h1><p>Use an API key with the <code>query</code> scope. \
         The dashboard shows that key's tenant only.</p>{error}\
         <form method=\"post\" action=\"/ui/sign-in\" class=\"sign-in\">\
         <label for=\"api_key\">API key</label>\
         <input id=\"api_key\" name=\"api_key\" type=\"password\" autocomplete=\"off\" required autofocus>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form></main>"
    );
    (status, page_html("Sign in", None, &main)).into_response()
}

async fn sign_in(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    form: Form<SignInForm>,
) -> Response {
    if !same_origin(&headers) {
        return sign_in_form(StatusCode::FORBIDDEN, Some("This form must be sent from this site."));
    }
    let key = form.api_key.trim();
    let mut key_headers = HeaderMap::new();
    let Ok(value) = HeaderValue::from_str(key) else {
        return sign_in_form(StatusCode::OK, Some("That API key is not valid."));
    };
    key_headers.insert("x-api-key", value);
    match state.auth.authenticate(&key_headers).await {
        Ok(_) => {
            let id = state.ui_sessions.open(key);
            let cookie = format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}{}",
                SESSION_LIFETIME.as_secs(),
                secure_attribute(&state, &headers)
            );
            let mut response = Redirect::to("/ui/").into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        // A refused key answers the form again, with the reason, as a page (200): the browser
        // shows it as the form's answer and logs no failed load.
        Err(ApiError::AuthenticationRequired | ApiError::InvalidApiKey) => sign_in_form(
            StatusCode::OK,
            Some("That API key is not valid: it is unknown, revoked or expired."),
        ),
        Err(ApiError::Forbidden(detail)) => {
            sign_in_form(StatusCode::OK, Some(&format!("Refused: {detail}.")))
        }
        Err(other) => sign_in_form(other.status(), Some("Signing in failed; retry later.")),
    }
}

async fn sign_out(State(state): State<Arc<QueryState>>, headers: HeaderMap) -> Response {
    if same_origin(&headers)
        && let Some(id) = session_id(&headers)
    {
        state.ui_sessions.close(&id);
    }
    let mut response = Redirect::to("/ui/sign-in").into_response();
    let secure = secure_attribute(&state, &headers);
    let expired = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0{secure}");
    if let Ok(value) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `; Secure` when the session cookie must travel over HTTPS only: always with
/// `secure_cookies`, else when the request came over HTTPS through a proxy that says so
/// (`X-Forwarded-Proto: https`, or `proto=https` in `Forwarded`). Trusting the header cannot
/// weaken the cookie: a client that sends it falsely over plain HTTP only gets a cookie its
/// browser will not send back there.
fn secure_attribute(state: &QueryState, headers: &HeaderMap) -> &'static str {
    if state.config.secure_cookies || came_over_https(headers) { "; Secure" } else { "" }
}

fn came_over_https(headers: &HeaderMap) -> bool {
    let values = |name| headers.get_all(name).into_iter().filter_map(|value| value.to_str().ok());
    // The first proxy's word counts (the one the browser reached): the list's first entry.
    let forwarded_proto = values("x-forwarded-proto")
        .next()
        .and_then(|value| value.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    let forwarded =
        values("forwarded").next().and_then(|value| value.split(',').next()).is_some_and(|element| {
            element.split(';').any(|pair| {
                pair.split_once('=').is_some_and(|(name, value)| {
                    name.trim().eq_ignore_ascii_case("proto")
                        && value.trim().trim_matches('"').eq_ignore_ascii_case("https")
                })
            })
        });
    forwarded_proto || forwarded
}

/// A form post from this site: its `Origin`, when the browser sends one, names the `Host`. The
/// `SameSite=Strict` cookie already keeps other sites' posts from carrying a session; this also
/// refuses their sign-in posts. (The pages' `Referrer-Policy: same-origin` lets browsers send
/// the origin; `no-referrer` would make it `null`.)
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|value| value.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
    !host.is_empty() && origin_host == host
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderName;

    use super::*;

    #[test]
    fn session_ids_come_from_the_cookie_only_when_well_formed() {
        let mut headers = HeaderMap::new();
        let id = "ab".repeat(32);
        headers.insert(header::COOKIE, format!("other=1; {COOKIE}={id}").parse().expect("header"));
        assert_eq!(session_id(&headers), Some(id));
        headers.insert(header::COOKIE, format!("{COOKIE}=short").parse().expect("header"));
        assert_eq!(session_id(&headers), None);
    }

    #[test]
    fn https_is_read_from_the_proxy_headers() {
        let with = |name: &str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
            came_over_https(&headers)
        };
        assert!(!came_over_https(&HeaderMap::new()));
        assert!(with("x-forwarded-proto", "https"));
        assert!(with("x-forwarded-proto", "HTTPS, http"));
        assert!(!with("x-forwarded-proto", "http"));
        assert!(!with("x-forwarded-proto", "http, https"), "the first proxy's word counts");
        assert!(with("forwarded", "for=192.0.2.60;proto=https;by=203.0.113.43"));
        assert!(with("forwarded", "proto=\"https\""));
        assert!(!with("forwarded", "for=192.0.2.60;proto=http, proto=https"));
    }

    #[test]
    fn sessions_are_random_and_close() {
        let sessions = Sessions::default();
        let (a, b) = (sessions.open("k1"), sessions.open("k2"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(sessions.key(&a).as_deref(), Some("k1"));
        sessions.close(&a);
        assert_eq!(sessions.key(&a), None);
    }

    #[test]
    fn posts_from_other_origins_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8002".parse().expect("header"));
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "http://127.0.0.1:8002".parse().expect("header"));
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "https://evil.example".parse().expect("header"));
        assert!(!same_origin(&headers));
    }
}
