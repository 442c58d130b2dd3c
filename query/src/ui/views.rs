//! The summary views: Overview, Breakdown, Reliability and Billing. Each asks the JSON API for
//! the chosen range and renders its answer; see the module docs of [`super`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::html::{self, Bar, Line, card, cell, esc, exact, millis, percent};
use super::json::Json;
use super::range::{self, Chosen};
use super::{UiError, Viewer, page_html};
use crate::QueryState;

type Page = Result<Response, UiError>;

/// What every view starts with: the viewer and the chosen range.
pub(crate) async fn prepare(
    state: &QueryState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<(Viewer, Chosen), UiError> {
    let viewer = Viewer::of(state, headers).await?;
    let chosen = range::resolve(state, &viewer.caller, params).await?;
    Ok((viewer, chosen))
}

/// The page around a view's body: header, navigation, title and range selector.
pub(crate) fn view(
    viewer: &Viewer,
    chosen: &Chosen,
    path: &str,
    title: &str,
    keep: &str,
    body: &str,
) -> Html<String> {
    let main = format!("<main><h1>{}</h1>{}{body}</main>", esc(title), range::selector(chosen, path, keep));
    page_html(title, Some((&viewer.caller, path, &chosen.query())), &main)
}

fn time_of(value: &Json) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value.text(), &Rfc3339).ok()
}

fn period_label(chosen: &Chosen, row: &Json) -> String {
    match (time_of(row.get("period_start")), time_of(row.get("period_end"))) {
        (Some(start), Some(end)) => chosen.label(start, end),
        _ => String::new(),
    }
}

/// Events, cost and active users per period; the month's bill and its projection.
pub(crate) async fn overview(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    let (viewer, chosen) = prepare(&state, &headers, &params).await?;
    let usage =
        format!("/api/v1/usage/aggregate?group_by=none&period={}&{}", chosen.period.sql_unit(), chosen.api());
    let (usage, bill) =
        tokio::try_join!(viewer.api(&state, &usage), viewer.api(&state, "/api/v1/billing/summary"))?;
    let totals = usage.get("total_aggregates");
    let mut body = range::shown(&usage);
    let unpriced = totals.get("unpriced_event_count").integer().unwrap_or(0);
    if unpriced > 0 {
        let _ = write!(
            body,
            "<p class=\"warning\" role=\"status\" data-testid=\"unpriced-callout\"><strong>{unpriced}</strong> events in this range have no price: they are not in the cost shown. Add a price rule for them.</p>"
        );
    }
    let projection = bill.get("projection");
    let projected =
        if projection.is_null() { "month complete".to_owned() } else { exact(projection.get("total_cost")) };
    let _ = write!(
        body,
        "<section class=\"cards\">{}{}{}{}{}{}</section>",
        card("Events", "overview-events", esc(totals.get("event_count").text()).as_str(), ""),
        card("Cost", "overview-cost", &exact(totals.get("total_cost")), "priced events only"),
        card("Active users", "overview-users", esc(totals.get("unique_users").text()).as_str(), ""),
        card("Unpriced events", "overview-unpriced", &unpriced.to_string(), ""),
        card(
            &format!("Bill {} to date", bill.get("month").text()),
            "overview-month-to-date",
            &exact(bill.get("total_cost")),
            &format!("{} unpriced events this month", esc(bill.get("unpriced_event_count").text()))
        ),
        card("Projected to month end", "overview-projection", &projected, "linear projection"),
    );
    let rows = usage.get("aggregates").items();
    let by_start: BTreeMap<OffsetDateTime, &Json> =
        rows.iter().filter_map(|row| Some((time_of(row.get("period_start"))?, row))).collect();
    // Every period of the range, so that days without events show as empty, not missing.
    let periods = range::periods(&state, &viewer.caller, &usage, chosen.period).await;
    let zero = Json::Number("0".into());
    let bars = |name: &str, money: bool| -> Vec<Bar> {
        periods
            .iter()
            .map(|(start, end)| {
                let value = by_start.get(start).map_or(&zero, |row| row.get(name));
                Bar {
                    label: chosen.label(*start, *end),
                    value_text: if money { exact(value) } else { value.text().to_owned() },
                    value: html::draw(value.decimal()),
                }
            })
            .collect()
    };
    let unit = if chosen.period == crate::question::Period::Hour { "hour" } else { "day" };
    let _ = write!(
        body,
        "<section class=\"charts\"><figure><figcaption>Events per {unit}</figcaption>{}</figure>\
         <figure><figcaption>Cost per {unit}</figcaption>{}</figure>\
         <figure><figcaption>Active users per {unit}</figcaption>{}</figure></section>",
        html::bar_chart(&format!("Events per {unit}"), &bars("event_count", false)),
        html::bar_chart(&format!("Cost per {unit}"), &bars("total_cost", true)),
        html::bar_chart(&format!("Active users per {unit}"), &bars("unique_users", false)),
    );
    let mut table = String::new();
    for (index, row) in rows.iter().enumerate() {
        let totals = row;
        let _ = write!(
            table,
            "<tr><th scope=\"row\"><time datetime=\"{}\">{}</time></th>{}{}{}{}</tr>",
            esc(row.get("period_start").text()),
            esc(&period_label(&chosen, row)),
            cell(&format!("period-{index}-events"), &esc(totals.get("event_count").text())),
            cell(&format!("period-{index}-cost"), &exact(totals.get("total_cost"))),
            cell(&format!("period-{index}-users"), &esc(totals.get("unique_users").text())),
            cell(&format!("period-{index}-unpriced"), &esc(totals.get("unpriced_event_count").text())),
        );
    }
    let _ = write!(
        body,
        "<section><h2>Per {unit}</h2><div class=\"scroll\"><table><thead><tr><th scope=\"col\">{unit}</th><th scope=\"col\">Events</th><th scope=\"col\">Cost</th><th scope=\"col\">Active users</th><th scope=\"col\">Unpriced</th></tr></thead><tbody>{table}</tbody></table></div></section>"
    );
    Ok(view(&viewer, &chosen, "/ui/", "Overview", "", &body).into_response())
}

/// The dimensions of the Breakdown view.
const BREAKDOWN_DIMENSIONS: [(&str, &str); 4] = [
    ("service_type", "Service"),
    ("service_provider", "Provider"),
    ("model", "Model"),
    ("event_type", "Event type"),
];

/// Usage by service, provider, model and event type, with shares; the top users by cost.
pub(crate) async fn breakdown(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    let (viewer, chosen) = prepare(&state, &headers, &params).await?;
    let path = |dimension: &str| {
        format!("/api/v1/analytics/breakdown?group_by={dimension}&limit=20&{}", chosen.api())
    };
    let top = format!("/api/v1/analytics/top-users?by=total_cost&limit=10&{}", chosen.api());
    let paths = BREAKDOWN_DIMENSIONS.map(|(dimension, _)| path(dimension));
    let (service, provider, model, event_type, users) = tokio::try_join!(
        viewer.api(&state, &paths[0]),
        viewer.api(&state, &paths[1]),
        viewer.api(&state, &paths[2]),
        viewer.api(&state, &paths[3]),
        viewer.api(&state, &top),
    )?;
    let mut body = range::shown(&service);
    body.push_str("<section class=\"grid\">");
    for ((dimension, label), answer) in
        BREAKDOWN_DIMENSIONS.iter().zip([&service, &provider, &model, &event_type])
    {
        let mut rows = String::new();
        for (index, row) in answer.get("rows").items().iter().enumerate() {
            let key = row.get("key").get(dimension).text();
            let totals = row;
            let id = |what: &str| format!("breakdown-{dimension}-{index}-{what}");
            let _ = write!(
                rows,
                "<tr><th scope=\"row\" data-testid=\"{}\">{}</th>{}{}{}{}</tr>",
                id("key"),
                if key.is_empty() { "<em>none</em>".to_owned() } else { esc(key) },
                cell(&id("events"), &esc(totals.get("event_count").text())),
                cell(&id("event-share"), &percent(row.get("share_of_events"))),
                cell(&id("cost"), &exact(totals.get("total_cost"))),
                cell(&id("cost-share"), &percent(row.get("share_of_cost"))),
            );
        }
        let _ = write!(
            body,
            "<div><h2>By {}</h2><div class=\"scroll\"><table><thead><tr><th scope=\"col\">{label}</th><th scope=\"col\">Events</th><th scope=\"col\">Share</th><th scope=\"col\">Cost</th><th scope=\"col\">Share</th></tr></thead><tbody>{rows}</tbody></table></div></div>",
            label.to_lowercase()
        );
    }
    body.push_str("</section>");
    let mut rows = String::new();
    for (index, user) in users.get("users").items().iter().enumerate() {
        let id = |what: &str| format!("top-user-{index}-{what}");
        let _ = write!(
            rows,
            "<tr>{}<th scope=\"row\" data-testid=\"{}\">{}</th>{}{}{}</tr>",
            cell(&id("rank"), &esc(user.get("rank").text())),
            id("user"),
            esc(user.get("user_id").text()),
            cell(&id("cost"), &exact(user.get("total_cost"))),
            cell(&id("share"), &percent(user.get("share"))),
            cell(&id("events"), &esc(user.get("event_count").text())),
        );
    }
    let _ = write!(
        body,
        "<section><h2>Top users by cost</h2><p>{} users in this range.</p><div class=\"scroll\"><table><thead><tr><th scope=\"col\">Rank</th><th scope=\"col\">User</th><th scope=\"col\">Cost</th><th scope=\"col\">Share</th><th scope=\"col\">Events</th></tr></thead><tbody>{rows}</tbody></table></div></section>",
        esc(users.get("total_users").text())
    );
    Ok(view(&viewer, &chosen, "/ui/breakdown", "Breakdown", "", &body).into_response())
}

/// Error rate and latency percentiles over time, by service.
pub(crate) async fn reliability(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    let (viewer, chosen) = prepare(&state, &headers, &params).await?;
    let over_time = format!(
        "/api/v1/usage/aggregate?group_by=service_type&period={}&{}",
        chosen.period.sql_unit(),
        chosen.api()
    );
    let by_service = format!("/api/v1/analytics/errors?group_by=service_type&{}", chosen.api());
    let (over_time, by_service) =
        tokio::try_join!(viewer.api(&state, &over_time), viewer.api(&state, &by_service))?;
    let mut body = range::shown(&over_time);
    let mut rows = String::new();
    for (index, row) in by_service.get("rows").items().iter().enumerate() {
        let totals = row;
        let id = |what: &str| format!("reliability-{index}-{what}");
        let _ = write!(
            rows,
            "<tr><th scope=\"row\" data-testid=\"{}\">{}</th>{}{}{}{}{}{}</tr>",
            id("service"),
            esc(row.get("key").get("service_type").text()),
            cell(&id("events"), &esc(totals.get("event_count").text())),
            cell(&id("errors"), &esc(totals.get("error_count").text())),
            cell(&id("error-rate"), &percent(totals.get("error_rate"))),
            cell(&id("p50"), &millis(totals.get("latency_p50_ms"))),
            cell(&id("p95"), &millis(totals.get("latency_p95_ms"))),
            cell(&id("p99"), &millis(totals.get("latency_p99_ms"))),
        );
    }
    let _ = write!(
        body,
        "<section><h2>By service</h2><div class=\"scroll\"><table><thead><tr><th scope=\"col\">Service</th><th scope=\"col\">Events</th><th scope=\"col\">Errors</th><th scope=\"col\">Error rate</th><th scope=\"col\">p50</th><th scope=\"col\">p95</th><th scope=\"col\">p99</th></tr></thead><tbody>{rows}</tbody></table></div></section>"
    );
    // Over time: one pair of charts per service, over every period of the range.
    let rows = over_time.get("aggregates").items();
    let periods = range::periods(&state, &viewer.caller, &over_time, chosen.period).await;
    let labels: Vec<String> = periods.iter().map(|(start, end)| chosen.label(*start, *end)).collect();
    let mut services: BTreeMap<&str, BTreeMap<OffsetDateTime, &Json>> = BTreeMap::new();
    for row in rows {
        if let Some(start) = time_of(row.get("period_start")) {
            services.entry(row.get("service_type").text()).or_default().insert(start, row);
        }
    }
    body.push_str("<section class=\"grid\">");
    for (service, by_period) in &services {
        let series = |name: &str, scale: f64| -> Vec<Option<f64>> {
            periods
                .iter()
                .map(|(start, _)| {
                    by_period.get(start).and_then(|totals| totals.get(name).float()).map(|v| v * scale)
                })
                .collect()
        };
        let latency = [
            ("p50", "latency_p50_ms", "l1"),
            ("p95", "latency_p95_ms", "l2"),
            ("p99", "latency_p99_ms", "l3"),
        ]
        .map(|(label, name, class)| Line {
            name: label.to_owned(),
            class,
            points: series(name, 1.0),
        });
        let errors = [Line { name: "error rate".into(), class: "l4", points: series("error_rate", 100.0) }];
        let _ = write!(
            body,
            "<div><h2>{0}</h2><figure><figcaption>Latency, ms</figcaption>{1}</figure><figure><figcaption>Error rate, %</figcaption>{2}</figure></div>",
            esc(service),
            html::line_chart(&format!("{service} latency"), "ms", &labels, &latency),
            html::line_chart(&format!("{service} error rate"), "%", &labels, &errors),
        );
    }
    body.push_str(
        "</section><p class=\"note\">Percentiles are within 19% of the true value (histogram buckets).</p>",
    );
    Ok(view(&viewer, &chosen, "/ui/reliability", "Reliability", "", &body).into_response())
}

/// The month's bill per price rule, with tiers, minimums and the projection.
pub(crate) async fn billing(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    let (viewer, chosen) = prepare(&state, &headers, &params).await?;
    let month = params.get("month").map(|month| month.trim()).filter(|month| !month.is_empty());
    let path = match month {
        Some(month) => format!("/api/v1/billing/summary?month={}", html::url(month)),
        None => "/api/v1/billing/summary".to_owned(),
    };
    let bill = viewer.api(&state, &path).await?;
    let mut body = format!(
        "<form method=\"get\" action=\"/ui/billing\" class=\"month\"><label for=\"month\">Month</label>\
         <input id=\"month\" name=\"month\" type=\"month\" value=\"{0}\"><button type=\"submit\">Show</button></form>\
         <p>Month <strong data-testid=\"billing-month\">{0}</strong> ({1}), {2}.</p>",
        esc(bill.get("month").text()),
        esc(bill.get("time_zone").text()),
        if bill.get("complete") == &Json::Bool(true) { "complete" } else { "to date" }
    );
    let projection = bill.get("projection");
    let _ = write!(
        body,
        "<section class=\"cards\">{}{}{}{}{}{}</section>",
        card("Total", "billing-total", &exact(bill.get("total_cost")), ""),
        card("Usage", "billing-usage", &exact(bill.get("usage_cost")), "per-event prices"),
        card("Tiered charges", "billing-tiered", &exact(bill.get("tiered_charges")), "graduated and volume"),
        card("Minimum top-ups", "billing-minimums", &exact(bill.get("minimum_top_ups")), ""),
        card(
            "Unpriced events",
            "billing-unpriced",
            &esc(bill.get("unpriced_event_count").text()),
            "not billed"
        ),
        card(
            "Projected total",
            "billing-projection",
            &if projection.is_null() { "—".to_owned() } else { exact(projection.get("total_cost")) },
            "linear to month end"
        ),
    );
    let mut rules = String::new();
    for (index, rule) in bill.get("rules").items().iter().enumerate() {
        let id = |what: &str| format!("rule-{index}-{what}");
        let scope = [
            rule.get("service_type"),
            rule.get("service_provider"),
            rule.get("model"),
            rule.get("event_type"),
        ]
        .iter()
        .filter(|part| !part.is_null())
        .map(|part| esc(part.text()))
        .collect::<Vec<_>>()
        .join(" / ");
        let minimum = rule.get("minimum_charge");
        let _ = write!(
            rules,
            "<tr><th scope=\"row\">{scope}<br><small>{} · {}</small></th><td>{}</td>{}{}{}<td class=\"num\">{}</td>{}{}</tr>",
            esc(rule.get("method").text()),
            esc(rule.get("source").text()),
            esc(rule.get("unit").text()),
            cell(&id("units"), &exact(rule.get("units"))),
            cell(&id("usage"), &exact(rule.get("usage_cost"))),
            cell(&id("tiered"), &exact(rule.get("tiered_charge"))),
            if minimum.is_null() { "—".to_owned() } else { exact(minimum) },
            cell(&id("top-up"), &exact(rule.get("minimum_top_up"))),
            cell(&id("total"), &exact(rule.get("total_cost"))),
        );
    }
    let _ = write!(
        body,
        "<section><h2>Per price rule</h2><div class=\"scroll\"><table><thead><tr><th scope=\"col\">Rule</th><th scope=\"col\">Unit</th><th scope=\"col\">Units</th><th scope=\"col\">Usage</th><th scope=\"col\">Tiered</th><th scope=\"col\">Minimum</th><th scope=\"col\">Top-up</th><th scope=\"col\">Total</th></tr></thead><tbody>{rules}</tbody></table></div></section>"
    );
    let mut services = String::new();
    for line in bill.get("by_service").items() {
        let _ = write!(
            services,
            "<tr><th scope=\"row\">{} / {} / {}</th><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(line.get("service_type").text()),
            esc(line.get("service_provider").text()),
            esc(line.get("model").text()),
            esc(line.get("event_count").text()),
            esc(line.get("unpriced_event_count").text()),
            exact(line.get("usage_cost")),
            exact(line.get("period_charges")),
            exact(line.get("total_cost")),
        );
    }
    let _ = write!(
        body,
        "<section><h2>Per service and model</h2><div class=\"scroll\"><table><thead><tr><th scope=\"col\">Service / provider / model</th><th scope=\"col\">Events</th><th scope=\"col\">Unpriced</th><th scope=\"col\">Usage</th><th scope=\"col\">Period charges</th><th scope=\"col\">Total</th></tr></thead><tbody>{services}</tbody></table></div>\
         <p class=\"note\">Shared period charges {}; cost of no per-event rule {}.</p></section>",
        exact(bill.get("shared_period_charges")),
        exact(bill.get("unattributed_cost")),
    );
    let main = format!("<main><h1>Billing</h1>{body}</main>");
    Ok(page_html("Billing", Some((&viewer.caller, "/ui/billing", &chosen.query())), &main).into_response())
}
