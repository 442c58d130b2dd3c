//! `GET /api/v1/usage`: raw events, newest first, streamed from the database into the response
//! as JSON or CSV, with offset or keyset (cursor) pagination.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use rust_decimal::Decimal;
use time::{OffsetDateTime, PrimitiveDateTime};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::params::{self, Format, RangeInput, RangeParams, TenantParams, UsageParams};
use super::schema::{BillingInfo, ErrorBody, MetricValue, UsageEvent, UsageList};
use super::tenant::Scoped;
use crate::QueryState;
use crate::auth::Caller;
use crate::backend::{
    AggregateQuery, BackendError, Edges, EventRecord, EventStatus, Filter, ListQuery, Measures,
    QUANTITY_NAMES, Scope,
};
use crate::cache::ResponseCache;
use crate::error::ApiError;
use crate::question::InvalidValue;
use crate::stats::{self, Quantity};

/// Bytes collected before a chunk of the body is sent.
const CHUNK_BYTES: usize = 32 * 1024;

/// Raw usage events with filters, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/usage",
    tag = "usage",
    params(UsageParams),
    responses(
        (status = 200, body = UsageList, description = "JSON, or CSV with `format=csv` / `Accept: text/csv` \
            (then `X-Total-Count` carries the total)"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "`overflow`: the range's sums exceed an exact decimal")
    )
)]
pub async fn list_usage(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Scoped { caller, scope, filter, params }: Scoped<UsageParams>,
) -> Result<Response, ApiError> {
    let csv = wants_csv(&params, &headers);
    let (limit, offset, include_billing) = (params.limit.0, params.offset.0, params.include_billing.0);
    let (status, cursor, metadata) = (params.status, params.cursor, params.metadata);
    if cursor.is_some() && offset > 0 {
        return Err(ApiError::parameter("cursor", "cannot be combined with offset"));
    }
    let later_page = cursor.is_some();
    let query = ListQuery {
        scope: scope.clone(),
        filter,
        status,
        after: cursor.map(|cursor| (cursor.occurred_at, cursor.event_id)),
        offset,
        // One more than a page tells whether another page follows.
        limit: if csv { limit } else { limit + 1 },
        metadata,
    };
    // Counted here, never read from the client; later pages may reuse the first page's count
    // for the cache's time to live. The rollups hold no metadata: such a filter is counted on
    // the raw events.
    let total_count = match &query.metadata {
        Some(_) => state.backend.count_events(&query).await?,
        None => count(&state, &caller, &scope, &query.filter, status, later_page).await?,
    };
    let receiver = state.backend.list_events(query);
    let page = Page { limit, offset, total_count, include_billing, scope };
    let (content_type, body) = if csv {
        ("text/csv; charset=utf-8", Body::from_stream(csv_stream(receiver, page.include_billing)))
    } else {
        ("application/json", Body::from_stream(json_stream(receiver, page)))
    };
    let mut response = (StatusCode::OK, body).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response_headers.insert("x-total-count", HeaderValue::from(total_count));
    Ok(response)
}

/// A metadata key and the value it must have.
pub type MetadataFilter = (String, String);

impl TenantParams for UsageParams {
    fn tenant_id(&self) -> Option<&str> {
        self.tenant_id.as_deref()
    }

    /// The listing's parameters, and its one optional metadata filter `metadata.<key>=<value>`
    /// (e.g. `metadata.model_version=v2.1`, a non-numeric metric), which a struct cannot name.
    fn from_uri(uri: &Uri) -> Result<UsageParams, ApiError> {
        let query = uri.query().unwrap_or_default();
        let (metadata, rest): (Vec<&str>, Vec<&str>) =
            query.split('&').filter(|pair| !pair.is_empty()).partition(|pair| pair.starts_with("metadata."));
        let mut params: UsageParams = params::from_query(&rest.join("&"))?;
        params.metadata = metadata_filter(&metadata)?;
        Ok(params)
    }
}

impl RangeParams for UsageParams {
    /// Exact: a listing counts and lists raw events to the microsecond.
    fn range(&self) -> RangeInput {
        RangeInput { start: self.start_date, end: self.end_date, edges: Edges::Exact }
    }

    fn filter(&self) -> Filter {
        let text = |value: &Option<params::FilterValue>| value.as_ref().map(|value| value.0.clone());
        Filter {
            service_type: text(&self.service_type),
            service_provider: text(&self.service_provider),
            user_id: text(&self.user_id),
            model: self.model.as_ref().map(|model| model.0.clone()),
            event_type: text(&self.event_type),
        }
    }
}

/// The `metadata.<key>=<value>` pairs of a query string: none, or one filter.
fn metadata_filter(metadata: &[&str]) -> Result<Option<MetadataFilter>, ApiError> {
    let parse = |pairs: &[&str]| -> Result<Uri, ApiError> {
        format!("/?{}", pairs.join("&"))
            .parse()
            .map_err(|_| ApiError::parameter("query", "is not a valid query string"))
    };
    let filter = match metadata {
        [] => None,
        [_] => {
            let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parse(metadata)?)
                .map_err(|_| ApiError::parameter("metadata", "expected metadata.<key>=<value>"))?;
            let (name, value) = pairs.into_iter().next().unwrap_or_default();
            let key = name.strip_prefix("metadata.").unwrap_or_default().to_owned();
            let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
            if key.is_empty() || key.len() > 64 || !key.chars().all(valid) {
                return Err(ApiError::parameter(&name, "the key must be 1 to 64 of A-Z a-z 0-9 _ . -"));
            }
            if value.contains('\0') {
                return Err(ApiError::parameter(&name, "must not contain a NUL byte"));
            }
            Some((key, value))
        }
        _ => return Err(ApiError::parameter("metadata", "one metadata.<key>=<value> filter at most")),
    };
    Ok(filter)
}

fn wants_csv(params: &UsageParams, headers: &HeaderMap) -> bool {
    match params.format {
        Some(format) => format == Format::Csv,
        None => headers
            .get(header::ACCEPT)
            .and_then(|accept| accept.to_str().ok())
            .is_some_and(|accept| accept.contains("text/csv")),
    }
}

/// Events matching the filters, counted from the rollups (exact; see `pg`). With `reuse`
/// (pages after the first), a count made within the cache's time to live is reused; the first
/// page always counts afresh and stores its count for the pages after it.
async fn count(
    state: &QueryState,
    caller: &Caller,
    scope: &Scope,
    filter: &Filter,
    status: Option<EventStatus>,
    reuse: bool,
) -> Result<i64, ApiError> {
    let query = AggregateQuery {
        scope: scope.clone(),
        filter: filter.clone(),
        period: None,
        grouping_sets: vec![vec![]],
        measures: Measures::default(),
        top: None,
    };
    let key = ResponseCache::key(caller.tenant_id, "usage_count", &(&caller.time_zone, &query, status));
    if reuse
        && let Some(cached) = state.cache.get(&key).await
        && let Ok(count) = serde_json::from_slice::<i64>(&cached.body)
    {
        return Ok(count);
    }
    let computed_at_us = super::now_us();
    let rows = state.backend.aggregate(&query).await?;
    let stats = rows.first().map(|row| row.stats.clone()).unwrap_or_default();
    let count = match status {
        None => stats.event_count,
        Some(EventStatus::Error) => stats.error_count,
        Some(EventStatus::Success) => stats.event_count.saturating_sub(stats.error_count),
    };
    state.cache.put(&key, computed_at_us, count.to_string().as_bytes()).await;
    Ok(count)
}

/// Where the next page starts: the last event of this page. It carries nothing but a position:
/// the total is the server's own count ([`count`]), whatever a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub occurred_at: OffsetDateTime,
    pub event_id: Uuid,
}

impl FromStr for Cursor {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Cursor, InvalidValue> {
        Cursor::decode(text).map_err(|_| InvalidValue("is not a cursor this API returned".into()))
    }
}

impl Cursor {
    /// `c2` and 48 hex digits: time (µs since the epoch), event id.
    pub fn encode(&self) -> String {
        let at_us =
            i64::try_from(self.occurred_at.unix_timestamp_nanos().div_euclid(1000)).unwrap_or(i64::MAX);
        let mut text = String::with_capacity(50);
        text.push_str("c2");
        for byte in at_us.to_be_bytes().iter().chain(self.event_id.as_bytes()) {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// A `c2` cursor, or a `c1` one (of earlier versions, whose trailing total is ignored). The
    /// time must lie within the range date parameters may name.
    pub fn decode(text: &str) -> Result<Cursor, ApiError> {
        let invalid = || ApiError::parameter("cursor", "is not a cursor this API returned");
        let hex = match (text.get(..2), text.get(2..)) {
            (Some("c2"), Some(hex)) if hex.len() == 48 => hex,
            (Some("c1"), Some(hex)) if hex.len() == 64 => hex.get(..48).ok_or_else(invalid)?,
            _ => return Err(invalid()),
        };
        let mut bytes = [0u8; 24];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2).ok_or_else(invalid)?, 16)
                .map_err(|_| invalid())?;
        }
        let (at, id) = bytes.split_at(8);
        let at_us = i64::from_be_bytes(at.try_into().map_err(|_| invalid())?);
        let occurred_at =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_us) * 1000).map_err(|_| invalid())?;
        let wall_clock = PrimitiveDateTime::new(occurred_at.date(), occurred_at.time());
        if !(params::TIME_MIN..=params::TIME_MAX).contains(&wall_clock) {
            return Err(invalid());
        }
        let event_id = Uuid::from_slice(id).map_err(|_| invalid())?;
        Ok(Cursor { occurred_at, event_id })
    }
}

struct Page {
    limit: u32,
    offset: u64,
    total_count: i64,
    include_billing: bool,
    scope: Scope,
}

/// An event in the listing's JSON shape.
pub fn event_json(record: EventRecord, include_billing: bool) -> UsageEvent {
    let mut metrics: BTreeMap<String, Quantity> = BTreeMap::new();
    for (name, value) in QUANTITY_NAMES.iter().zip(record.quantities) {
        if let Some(value) = value {
            metrics.insert((*name).to_owned(), Quantity(value));
        }
    }
    if let Some(custom) = record.custom_quantities.as_deref() {
        let parsed: BTreeMap<String, Decimal> = serde_json::from_str::<
            BTreeMap<String, Box<serde_json::value::RawValue>>,
        >(custom)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, value)| {
            let text = value.get();
            Some((name, Decimal::from_str_exact(text).or_else(|_| Decimal::from_scientific(text)).ok()?))
        })
        .collect();
        for (name, value) in parsed {
            metrics.entry(name).or_insert(Quantity(value));
        }
    }
    if let Some(latency_us) = record.latency_us {
        metrics.insert("latency_ms".into(), Quantity(Decimal::new(latency_us, 3)));
    }
    let mut metrics: BTreeMap<String, MetricValue> =
        metrics.into_iter().map(|(name, value)| (name, MetricValue::Exact(value))).collect();
    let mut metadata = record.metadata.unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    if let serde_json::Value::Object(entries) = &mut metadata {
        let (sent, model_in_metadata) = caller_view(entries);
        for (name, value) in sent {
            metrics.insert(name, MetricValue::Sent(value));
        }
        if model_in_metadata && let Some(model) = &record.model {
            entries.insert("model".into(), serde_json::Value::String(model.clone()));
        }
    }
    let total_cost = record.cost.map(stats::money_number);
    UsageEvent {
        event_id: record.event_id,
        timestamp: record.occurred_at,
        user_id: record.user_id,
        service_type: record.service_type,
        service_provider: record.service_provider,
        event_type: record.event_type,
        model: record.model,
        status: match record.status {
            EventStatus::Success => "success",
            EventStatus::Error => "error",
        },
        error_code: record.error_code,
        metrics,
        billing_info: include_billing.then(|| BillingInfo { total_cost, priced: total_cost.is_some() }),
        total_cost,
        tags: record.tags,
        metadata,
        session_id: record.session_id,
        request_id: record.request_id,
    }
}

/// The reserved metadata entry in which the edge keeps what the caller sent where Tally's own
/// form differs (`edge::json::CALLER_KEY`, documented there): `"m"`, metric names as sent (with
/// the value, or `null` for "the metadata entry of that name"), and `"j"`, metadata keys whose
/// value is JSON text of a non-string value.
const CALLER_KEY: &str = "$caller";

/// Restores the caller's view from the stored metadata: removes the reserved entry, gives
/// metadata values their JSON types back, and returns the metrics to list under the caller's
/// names (moving metric dimensions out of the metadata), and whether the model was sent in the
/// metadata.
fn caller_view(
    metadata: &mut serde_json::Map<String, serde_json::Value>,
) -> (Vec<(String, serde_json::Value)>, bool) {
    use serde_json::Value;
    let Some(Value::String(view)) = metadata.remove(CALLER_KEY) else { return (Vec::new(), false) };
    let Ok(Value::Object(mut view)) = serde_json::from_str::<Value>(&view) else {
        return (Vec::new(), false);
    };
    let model_in_metadata = view.get("mm") == Some(&Value::Bool(true));
    if let Some(Value::Array(keys)) = view.remove("j") {
        for key in keys.iter().filter_map(Value::as_str) {
            if let Some(entry) = metadata.get_mut(key)
                && let Some(parsed) = entry.as_str().and_then(|text| serde_json::from_str(text).ok())
            {
                *entry = parsed;
            }
        }
    }
    let Some(Value::Object(sent)) = view.remove("m") else { return (Vec::new(), model_in_metadata) };
    let sent = sent
        .into_iter()
        .filter_map(|(name, value)| {
            let stored = metadata.remove(&name);
            match value {
                Value::Null => stored.map(|stored| (name, stored)),
                value => Some((name, value)),
            }
        })
        .collect();
    (sent, model_in_metadata)
}

type Chunk = Result<Bytes, std::io::Error>;

fn stream_error(error: BackendError) -> std::io::Error {
    tracing::warn!(%error, "usage listing failed while streaming");
    std::io::Error::other("usage listing failed")
}

/// The JSON body: the header fields, the events as they arrive, then `has_more` and
/// `next_cursor`, which only the end of the page tells.
fn json_stream(
    receiver: mpsc::Receiver<Result<EventRecord, BackendError>>,
    page: Page,
) -> impl futures_util::Stream<Item = Chunk> {
    struct State {
        receiver: mpsc::Receiver<Result<EventRecord, BackendError>>,
        page: Page,
        emitted: u32,
        last: Option<(OffsetDateTime, Uuid)>,
        done: bool,
    }
    let mut head = BytesMut::new();
    let _ = serde_json::to_writer(
        (&mut head).writer(),
        &serde_json::json!({
            "total_count": page.total_count,
            "limit": page.limit,
            "offset": page.offset,
            "start_date": super::usage::format_time(page.scope.start),
            "end_date": super::usage::format_time(page.scope.end),
        }),
    );
    head.truncate(head.len() - 1); // reopen the object
    head.extend_from_slice(b",\"events\":[");
    fn finish(mut chunk: BytesMut, state: &mut State, has_more: bool) -> Bytes {
        let next_cursor = state
            .last
            .filter(|_| has_more)
            .map(|(occurred_at, event_id)| Cursor { occurred_at, event_id }.encode());
        chunk.extend_from_slice(b"],\"has_more\":");
        chunk.extend_from_slice(if has_more { b"true" } else { b"false" });
        chunk.extend_from_slice(b",\"next_cursor\":");
        match next_cursor {
            Some(cursor) => {
                chunk.put_u8(b'"');
                chunk.extend_from_slice(cursor.as_bytes());
                chunk.put_u8(b'"');
            }
            None => chunk.extend_from_slice(b"null"),
        }
        chunk.put_u8(b'}');
        state.done = true;
        chunk.freeze()
    }
    let state = State { receiver, page, emitted: 0, last: None, done: false };
    futures_util::stream::unfold((state, Some(head)), |(mut state, head)| async move {
        if state.done {
            return None;
        }
        let mut chunk = head.unwrap_or_default();
        loop {
            match state.receiver.recv().await {
                Some(Ok(record)) if state.emitted < state.page.limit => {
                    if state.emitted > 0 {
                        chunk.put_u8(b',');
                    }
                    state.last = Some((record.occurred_at, record.event_id));
                    let event = event_json(record, state.page.include_billing);
                    if let Err(error) = serde_json::to_writer((&mut chunk).writer(), &event) {
                        state.done = true;
                        return Some((Err(std::io::Error::other(error)), (state, None)));
                    }
                    state.emitted += 1;
                    if chunk.len() >= CHUNK_BYTES {
                        return Some((Ok(chunk.freeze()), (state, None)));
                    }
                }
                Some(Ok(_)) => return Some((Ok(finish(chunk, &mut state, true)), (state, None))),
                None => return Some((Ok(finish(chunk, &mut state, false)), (state, None))),
                Some(Err(error)) => {
                    state.done = true;
                    return Some((Err(stream_error(error)), (state, None)));
                }
            }
        }
    })
}

/// The CSV columns, in order.
pub const CSV_COLUMNS: &[&str] = &[
    "event_id",
    "timestamp",
    "user_id",
    "service_type",
    "service_provider",
    "event_type",
    "model",
    "status",
    "error_code",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "pages",
    "characters",
    "requests",
    "bytes",
    "duration_ms",
    "custom_quantities",
    "total_cost",
    "tags",
    "metadata",
    "session_id",
    "request_id",
];

fn csv_stream(
    receiver: mpsc::Receiver<Result<EventRecord, BackendError>>,
    include_billing: bool,
) -> impl futures_util::Stream<Item = Chunk> {
    let _ = include_billing; // total_cost is always a column; billing adds nothing more in CSV
    let mut head = BytesMut::new();
    head.extend_from_slice(CSV_COLUMNS.join(",").as_bytes());
    head.extend_from_slice(b"\r\n");
    futures_util::stream::unfold((receiver, Some(head), false), |(mut receiver, head, done)| async move {
        if done {
            return None;
        }
        let mut chunk = head.unwrap_or_default();
        loop {
            match receiver.recv().await {
                Some(Ok(record)) => {
                    csv_row(&record, &mut chunk);
                    if chunk.len() >= CHUNK_BYTES {
                        return Some((Ok(chunk.freeze()), (receiver, None, false)));
                    }
                }
                None => return Some((Ok(chunk.freeze()), (receiver, None, true))),
                Some(Err(error)) => return Some((Err(stream_error(error)), (receiver, None, true))),
            }
        }
    })
}

fn csv_row(record: &EventRecord, out: &mut BytesMut) {
    let mut fields: Vec<String> = vec![
        record.event_id.to_string(),
        super::usage::format_time(record.occurred_at),
        record.user_id.clone(),
        record.service_type.clone(),
        record.service_provider.clone(),
        record.event_type.clone(),
        record.model.clone().unwrap_or_default(),
        match record.status {
            EventStatus::Success => "success".into(),
            EventStatus::Error => "error".into(),
        },
        record.error_code.clone().unwrap_or_default(),
        record.latency_us.map(|us| Decimal::new(us, 3).normalize().to_string()).unwrap_or_default(),
    ];
    for quantity in &record.quantities {
        fields.push(quantity.map(|value| value.normalize().to_string()).unwrap_or_default());
    }
    fields.push(record.custom_quantities.clone().unwrap_or_default());
    fields.push(record.cost.map(stats::money).unwrap_or_default());
    fields.push(if record.tags.is_empty() { String::new() } else { record.tags.join(";") });
    fields.push(record.metadata.as_ref().map(|value| value.to_string()).unwrap_or_default());
    fields.push(record.session_id.clone().unwrap_or_default());
    fields.push(record.request_id.clone().unwrap_or_default());
    for (index, field) in fields.iter().enumerate() {
        if index > 0 {
            out.put_u8(b',');
        }
        write_csv_field(field, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// RFC 4180 quoting (fields with a comma, quote or line break are quoted, quotes doubled), and
/// no formula injection (OWASP "CSV Injection"): a cell that starts with `=`, `+`, `-`, `@`, a
/// tab or a carriage return is written as text, with a `'` in front, and always quoted. A cell
/// that is a plain decimal number (`-12.5`, `+3`) is left alone, as OWASP allows: it is no
/// formula, and numeric columns (quantities, latency, cost) stay numbers. This applies to every
/// column alike, so a user id `-42` also stays `-42`, while `-2+3` or `=1` become `'-2+3`, `'=1`.
pub fn write_csv_field(field: &str, out: &mut BytesMut) {
    let formula = field.starts_with(['=', '+', '-', '@', '\t', '\r']) && !is_plain_number(field);
    if formula || field.contains([',', '"', '\n', '\r']) {
        out.put_u8(b'"');
        if formula {
            out.put_u8(b'\'');
        }
        out.extend_from_slice(field.replace('"', "\"\"").as_bytes());
        out.put_u8(b'"');
    } else {
        out.extend_from_slice(field.as_bytes());
    }
}

/// An optional sign, digits, and optionally a point and more digits: what a decimal's
/// `to_string` writes, and nothing a spreadsheet evaluates.
fn is_plain_number(field: &str) -> bool {
    let unsigned = field.strip_prefix(['-', '+']).unwrap_or(field);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
    !whole.is_empty()
        && !fraction.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let cursor = Cursor {
            occurred_at: OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).expect("time"),
            event_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        };
        let text = cursor.encode();
        assert_eq!(Cursor::decode(&text).expect("decodes"), cursor);
        // A cursor of earlier versions carried a total after the id: it is read, the total ignored.
        let legacy = format!("c1{}{:016x}", &text[2..], 12_345);
        assert_eq!(Cursor::decode(&legacy).expect("legacy decodes"), cursor);
        assert!(Cursor::decode("c1zz").is_err());
        assert!(Cursor::decode(&text.replace("c2", "c3")).is_err());
        assert!(Cursor::decode(&format!("c2{}", "é".repeat(24))).is_err());
        assert!(Cursor::decode(&format!("c1{}", "é".repeat(32))).is_err());
        // Times beyond what date parameters may name (here year 10000 and 1969) are refused.
        for at_us in [253_402_300_800_000_000_i64, -1] {
            let far = format!("c2{at_us:016x}{}", &text[18..]);
            assert!(Cursor::decode(&far).is_err(), "{at_us}");
        }
    }

    fn csv(field: &str) -> String {
        let mut out = BytesMut::new();
        write_csv_field(field, &mut out);
        String::from_utf8(out.to_vec()).expect("utf-8")
    }

    #[test]
    fn csv_cells_never_start_a_formula() {
        assert_eq!(csv("=cmd|' /C calc'!A0"), "\"'=cmd|' /C calc'!A0\"");
        assert_eq!(csv("+1+1"), "\"'+1+1\"");
        assert_eq!(csv("-2+3"), "\"'-2+3\"");
        assert_eq!(csv("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(csv("\tx"), "\"'\tx\"");
        assert_eq!(csv("\rx"), "\"'\rx\"");
        assert_eq!(csv("=HYPERLINK(\"http://x\",\"y\")"), "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"");
        // Numbers stay numbers, negative ones included.
        for number in ["-12.5", "+3", "0.000001", "-7", "12"] {
            assert_eq!(csv(number), number);
        }
        for not_number in ["-", "-.5", "-1.", "-1e5", "-1.2.3", "--1"] {
            assert!(csv(not_number).starts_with("\"'"), "{not_number}");
        }
        assert_eq!(csv("a=b"), "a=b");
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut out = BytesMut::new();
        write_csv_field("plain", &mut out);
        out.put_u8(b',');
        write_csv_field("say \"hi\", then\nbye", &mut out);
        assert_eq!(&out[..], b"plain,\"say \"\"hi\"\", then\nbye\"");
    }
}

/// Any text is a cursor this API wrote, which encodes back to itself, or refused by name.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn cursor_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "c[0-9]{1}[0-9a-fA-F]{0,70}",
            (any::<i64>(), any::<u128>()).prop_map(|(at, id)| format!("c2{at:016x}{id:032x}")),
            (any::<i64>(), any::<u128>(), any::<i64>())
                .prop_map(|(at, id, n)| format!("c1{at:016x}{id:032x}{n:016x}")),
        ]
    }

    proptest! {
        #[test]
        fn cursors_decode_to_a_position_in_bounds_or_are_refused(text in cursor_text()) {
            match Cursor::decode(&text) {
                Ok(cursor) => {
                    let again = Cursor::decode(&cursor.encode());
                    prop_assert_eq!(again.ok(), Some(cursor));
                    let at = PrimitiveDateTime::new(cursor.occurred_at.date(), cursor.occurred_at.time());
                    prop_assert!((params::TIME_MIN..=params::TIME_MAX).contains(&at));
                }
                Err(error) => prop_assert!(error.to_string().starts_with("cursor:"), "{error}"),
            }
        }

        #[test]
        fn csv_cells_never_start_a_formula(field in any::<String>()) {
            let mut out = BytesMut::new();
            write_csv_field(&field, &mut out);
            let cell = String::from_utf8(out.to_vec()).expect("utf-8");
            let unquoted = cell.strip_prefix('"').unwrap_or(&cell);
            let dangerous = unquoted.starts_with(['=', '+', '-', '@', '\t', '\r']);
            prop_assert!(!dangerous || is_plain_number(unquoted), "{field:?} -> {cell:?}");
        }
    }
}
