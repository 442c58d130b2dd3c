//! The Events view: the listing with filters and cursor paging, one event's detail, and the
//! CSV export of the filtered set, all through `GET /api/v1/usage`.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::html::{cell, esc, exact, url};
use super::json::Json;
use super::range::Chosen;
use super::views::{prepare, view};
use super::{UiError, page_html};
use crate::QueryState;
use crate::api::listing::Cursor;

/// Events per page.
const PAGE_EVENTS: u32 = 50;
/// Events in one CSV export at most (the listing's own limit).
const CSV_EVENTS_MAX: u32 = 10_000;

/// The listing's filters the view offers: parameter and label.
const FILTERS: [(&str, &str); 6] = [
    ("service_type", "Service"),
    ("service_provider", "Provider"),
    ("model", "Model"),
    ("event_type", "Event type"),
    ("user_id", "User"),
    ("status", "Status"),
];

/// The filters set in `params`, URL-encoded and `&`-joined.
fn filter_query(params: &HashMap<String, String>) -> String {
    FILTERS
        .iter()
        .filter_map(|(name, _)| {
            let value = params.get(*name).map(|value| value.trim()).filter(|value| !value.is_empty())?;
            Some(format!("{name}={}", url(value)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn local_time(chosen: &Chosen, text: &str) -> String {
    match OffsetDateTime::parse(text, &Rfc3339) {
        Ok(time) => {
            let local = chosen.local(time);
            format!(
                "{}-{:02}-{:02} {:02}:{:02}:{:02}",
                local.year(),
                local.month() as u8,
                local.day(),
                local.hour(),
                local.minute(),
                local.second()
            )
        }
        Err(_) => text.to_owned(),
    }
}

/// The listing's API path: `first` parameters, the range's, then the filters (if any).
fn listing_path(first: &str, range: &str, filters: &str) -> String {
    let mut path = format!("/api/v1/usage?{first}&{range}");
    if !filters.is_empty() {
        path.push('&');
        path.push_str(filters);
    }
    path
}

/// A page of events, newest first.
pub(crate) async fn list(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let (viewer, chosen) = prepare(&state, &headers, &params).await?;
    let filters = filter_query(&params);
    let mut path = listing_path(&format!("limit={PAGE_EVENTS}"), &chosen.api(), &filters);
    if let Some(cursor) = params.get("cursor").filter(|cursor| !cursor.is_empty()) {
        path = format!("{path}&cursor={}", url(cursor));
    }
    let page = viewer.api(&state, &path).await?;
    let keep = if filters.is_empty() { chosen.query() } else { format!("{}&{filters}", chosen.query()) };
    let mut body = format!(
        "<p class=\"range-shown\">From <time data-testid=\"range-start\">{}</time> to <time data-testid=\"range-end\">{}</time></p>",
        esc(page.get("start_date").text()),
        esc(page.get("end_date").text())
    );
    body.push_str("<form method=\"get\" action=\"/ui/events\" class=\"filters\">");
    for (name, value) in chosen.query().split('&').filter_map(|pair| pair.split_once('=')) {
        let _ = write!(
            body,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(name),
            esc(&super::range::decode(value))
        );
    }
    for (name, label) in FILTERS {
        let value = params.get(name).map_or("", String::as_str);
        if name == "status" {
            let option = |option: &str, text: &str| {
                let selected = if value == option { " selected" } else { "" };
                format!("<option value=\"{option}\"{selected}>{text}</option>")
            };
            let _ = write!(
                body,
                "<label for=\"f-status\">{label}</label><select id=\"f-status\" name=\"status\">{}{}{}</select>",
                option("", "any"),
                option("success", "success"),
                option("error", "error")
            );
            continue;
        }
        let _ = write!(
            body,
            "<label for=\"f-{name}\">{label}</label><input id=\"f-{name}\" name=\"{name}\" value=\"{}\">",
            esc(value)
        );
    }
    let _ = write!(
        body,
        "<button type=\"submit\">Filter</button></form>\
         <p><span data-testid=\"events-total\">{}</span> events match. <a href=\"/ui/events.csv?{}\" data-testid=\"csv-link\" download>Export CSV</a></p>",
        esc(page.get("total_count").text()),
        esc(&keep)
    );
    let mut rows = String::new();
    for (index, event) in page.get("events").items().iter().enumerate() {
        let id = event.get("event_id").text();
        let detail =
            format!("/ui/events/{}?at={}&{}", url(id), url(event.get("timestamp").text()), chosen.query());
        let cost = event.get("total_cost");
        let _ = write!(
            rows,
            "<tr><td><a href=\"{}\" data-testid=\"event-{index}-link\">{}</a></td>{}<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}</tr>",
            esc(&detail),
            esc(&local_time(&chosen, event.get("timestamp").text())),
            cell(&format!("event-{index}-user"), &esc(event.get("user_id").text())),
            esc(event.get("service_type").text()),
            esc(event.get("service_provider").text()),
            esc(event.get("model").text()),
            esc(event.get("event_type").text()),
            esc(event.get("status").text()),
            cell(
                &format!("event-{index}-cost"),
                &if cost.is_null() { "unpriced".to_owned() } else { exact(cost) }
            ),
        );
    }
    let _ = write!(
        body,
        "<div class=\"scroll\"><table><thead><tr><th scope=\"col\">Time</th><th scope=\"col\">User</th><th scope=\"col\">Service</th><th scope=\"col\">Provider</th><th scope=\"col\">Model</th><th scope=\"col\">Type</th><th scope=\"col\">Status</th><th scope=\"col\">Cost</th></tr></thead><tbody>{rows}</tbody></table></div><nav class=\"pages\" aria-label=\"Pages\">"
    );
    if params.get("cursor").is_some_and(|cursor| !cursor.is_empty()) {
        let _ = write!(body, "<a href=\"/ui/events?{}\">First page</a> ", esc(&keep));
    }
    if let Json::String(cursor) = page.get("next_cursor") {
        let _ = write!(
            body,
            "<a href=\"/ui/events?{}&amp;cursor={}\" data-testid=\"next-page\" rel=\"next\">Next page</a>",
            esc(&keep),
            esc(&url(cursor))
        );
    }
    body.push_str("</nav>");
    Ok(view(&viewer, &chosen, "/ui/events", "Events", &filters, &body).into_response())
}

/// The filtered set as CSV, streamed from the listing.
pub(crate) async fn csv(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let (viewer, chosen) = prepare(&state, &headers, &params).await?;
    let filters = filter_query(&params);
    let path = listing_path(&format!("format=csv&limit={CSV_EVENTS_MAX}"), &chosen.api(), &filters);
    let mut response = viewer.api_response(&state, &path).await?;
    if !response.status().is_success() {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap_or_default();
        let detail =
            Json::parse(&String::from_utf8_lossy(&bytes)).map(|json| json.get("detail").text().to_owned());
        return Err(UiError::BadRequest(detail.unwrap_or_else(|_| "the export failed".into())));
    }
    response.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"tally-events.csv\""),
    );
    Ok(response)
}

/// One event, every field: found through the listing with a cursor just after it.
pub(crate) async fn detail(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Path(event_id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let (viewer, chosen) = prepare(&state, &headers, &params).await?;
    let event_id: Uuid = event_id.parse().map_err(|_| UiError::BadRequest("not an event id".into()))?;
    let at_text = params.get("at").map_or("", String::as_str);
    let at = OffsetDateTime::parse(at_text, &Rfc3339)
        .map_err(|_| UiError::BadRequest("at: not an RFC 3339 time".into()))?;
    // The listing runs newest first by (time, id) and a cursor lists what lies strictly after
    // it: a cursor at (at, id + 1) lists this event first.
    let Some(next_id) = event_id.as_u128().checked_add(1) else {
        return Err(UiError::BadRequest("not an event id".into()));
    };
    let cursor = Cursor { occurred_at: at, event_id: Uuid::from_u128(next_id) }.encode();
    let end = at + time::Duration::microseconds(1);
    let end = end.format(&Rfc3339).unwrap_or_default();
    let path = format!(
        "/api/v1/usage?limit=1&include_billing=true&start_date={}&end_date={}&cursor={cursor}",
        url(at_text),
        url(&end)
    );
    let page = viewer.api(&state, &path).await?;
    let event = page
        .get("events")
        .items()
        .first()
        .filter(|event| event.get("event_id").text() == event_id.to_string());
    let Some(event) = event else {
        return Err(UiError::Api(axum::http::StatusCode::NOT_FOUND, "no such event for this tenant".into()));
    };
    let mut fields = String::new();
    for (name, value) in event.members() {
        let shown = match value {
            Json::Object(_) | Json::Array(_) => format!("<pre>{}</pre>", esc(&pretty(value))),
            Json::Null => "—".to_owned(),
            _ if name == "total_cost" => exact(value),
            other => esc(other.text()),
        };
        let _ = write!(fields, "<dt>{}</dt><dd data-testid=\"detail-{}\">{shown}</dd>", esc(name), esc(name));
    }
    let main = format!(
        "<main><h1>Event</h1><p><a href=\"/ui/events?{}\">Back to the events</a></p><dl class=\"detail\">{fields}</dl></main>",
        esc(&chosen.query())
    );
    Ok(page_html("Event", Some((&viewer.caller, "/ui/events", &chosen.query())), &main).into_response())
}

/// JSON text, indented (numbers as the API wrote them).
fn pretty(value: &Json) -> String {
    indent(value, 0)
}

fn indent(value: &Json, depth: usize) -> String {
    let pad = "  ".repeat(depth + 1);
    let close = "  ".repeat(depth);
    match value {
        Json::Object(members) if !members.is_empty() => {
            let inner: Vec<String> = members
                .iter()
                .map(|(name, value)| {
                    format!("{pad}{}: {}", serde_json::Value::String(name.clone()), indent(value, depth + 1))
                })
                .collect();
            format!("{{\n{}\n{close}}}", inner.join(",\n"))
        }
        Json::Array(items) if !items.is_empty() => {
            let inner: Vec<String> =
                items.iter().map(|item| format!("{pad}{}", indent(item, depth + 1))).collect();
            format!("[\n{}\n{close}]", inner.join(",\n"))
        }
        other => other.to_json_text(),
    }
}
