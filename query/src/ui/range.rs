//! The range selector: last 24 hours, 7 days, 30 days, this month or custom dates, in the
//! tenant's time zone, turned into the `start_date`/`end_date` the API is asked with.

use std::collections::HashMap;

use jiff::tz::TimeZone;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};

use super::UiError;
use super::html::{esc, url};
use crate::QueryState;
use crate::auth::Caller;
use crate::backend::{Edges, Scope};
use crate::question::Period;

/// The choices, as named in the `range` parameter, and their labels.
const CHOICES: [(&str, &str); 4] =
    [("24h", "Last 24 h"), ("7d", "Last 7 days"), ("30d", "Last 30 days"), ("month", "This month")];

/// A resolved range.
#[derive(Debug, Clone)]
pub(crate) struct Chosen {
    /// `24h`, `7d`, `30d`, `month` or `custom`.
    pub name: String,
    /// Custom dates (`YYYY-MM-DD`, inclusive), as entered.
    pub from: String,
    pub to: String,
    /// What the API is asked with.
    pub start_date: String,
    pub end_date: String,
    /// The chart bucket: hours for the last 24 h, else days.
    pub period: Period,
    /// The tenant's time zone (UTC if the compiled-in database does not know it): for labels
    /// only, each time with the offset of its own instant, DST changes included.
    pub zone: TimeZone,
}

impl Chosen {
    /// The page parameters that select this range again (for links).
    pub fn query(&self) -> String {
        if self.name == "custom" {
            format!("range=custom&from={}&to={}", url(&self.from), url(&self.to))
        } else {
            format!("range={}", self.name)
        }
    }

    /// The API parameters of this range.
    pub fn api(&self) -> String {
        format!("start_date={}&end_date={}", url(&self.start_date), url(&self.end_date))
    }

    /// `at` in the tenant's local time.
    pub fn local(&self, at: OffsetDateTime) -> OffsetDateTime {
        crate::calendar::local_time(&self.zone, at)
    }

    /// A period's label: its local date (`MM-DD`), or local time for hours.
    pub fn label(&self, start: OffsetDateTime, end: OffsetDateTime) -> String {
        match self.period {
            Period::Hour => {
                let local = self.local(start);
                format!("{:02}:{:02}", local.hour(), local.minute())
            }
            _ => {
                // The middle of a day is well inside its local date whatever DST did since.
                let half: time::Duration = (end - start) / 2;
                let middle = self.local(start + half);
                format!("{:02}-{:02}", middle.month() as u8, middle.day())
            }
        }
    }
}

/// The range a page's parameters choose (default: the last 7 days).
pub(crate) async fn resolve(
    state: &QueryState,
    caller: &Caller,
    params: &HashMap<String, String>,
) -> Result<Chosen, UiError> {
    let name = params.get("range").map_or("7d", String::as_str);
    let now = now_rounded_up();
    let zone = crate::calendar::zone(&caller.time_zone).unwrap_or(TimeZone::UTC);
    let rfc3339 = |time: OffsetDateTime| time.format(&Rfc3339).unwrap_or_default();
    let mut chosen = Chosen {
        name: name.to_owned(),
        from: String::new(),
        to: String::new(),
        start_date: String::new(),
        end_date: rfc3339(now),
        period: Period::Day,
        zone,
    };
    let scope = |start: OffsetDateTime| Scope::exact(caller.tenant_id, start, now, &caller.time_zone);
    let start = match name {
        "24h" => {
            chosen.period = Period::Hour;
            now - time::Duration::hours(24)
        }
        "7d" | "30d" => {
            let days: usize = if name == "7d" { 7 } else { 30 };
            let periods = state
                .backend
                .periods(&scope(now - time::Duration::days(days as i64 + 2)), Period::Day)
                .await
                .map_err(crate::error::ApiError::from)?;
            let first = periods.len().saturating_sub(days);
            periods.get(first).map(|(start, _)| *start).unwrap_or(now - time::Duration::days(days as i64))
        }
        "month" => {
            let periods = state
                .backend
                .periods(&scope(now - time::Duration::minutes(1)), Period::Month)
                .await
                .map_err(crate::error::ApiError::from)?;
            periods.first().map(|(start, _)| *start).unwrap_or(now - time::Duration::days(30))
        }
        "custom" => {
            let from = date(params, "from")?;
            let to = date(params, "to")?;
            if to < from {
                return Err(UiError::BadRequest("the end date is before the start date".into()));
            }
            let after =
                to.next_day().ok_or_else(|| UiError::BadRequest("the end date is too late".into()))?;
            chosen.from = from.to_string();
            chosen.to = to.to_string();
            // Dates without an offset: the API reads them in the tenant's time zone.
            chosen.start_date = from.to_string();
            chosen.end_date = after.to_string();
            return Ok(chosen);
        }
        other => return Err(UiError::BadRequest(format!("unknown range {other:?}"))),
    };
    chosen.start_date = rfc3339(start);
    Ok(chosen)
}

fn date(params: &HashMap<String, String>, name: &str) -> Result<Date, UiError> {
    let text = params.get(name).map(|text| text.trim()).unwrap_or_default();
    Date::parse(text, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| UiError::BadRequest(format!("{name}: {text:?} is not a date as YYYY-MM-DD")))
}

/// Now, rounded up to the whole minute (as the API's default end), so pages share cached answers.
fn now_rounded_up() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let rounded = (now.unix_timestamp().div_euclid(60) + 1) * 60;
    OffsetDateTime::from_unix_timestamp(rounded).unwrap_or(now)
}

/// The selector: a link per choice and a custom-dates form; `path` is the current view,
/// `keep` other parameters of it (already URL-encoded, `&`-joined) to carry along.
pub(crate) fn selector(chosen: &Chosen, path: &str, keep: &str) -> String {
    let keep_hidden: String = keep
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                esc(&decode(name)),
                esc(&decode(value))
            )
        })
        .collect();
    let keep = if keep.is_empty() { String::new() } else { format!("&{keep}") };
    let links: String = CHOICES
        .iter()
        .map(|(name, label)| {
            let aria = if chosen.name == *name { " aria-current=\"true\"" } else { "" };
            format!("<li><a href=\"{path}?range={name}{}\"{aria}>{label}</a></li>", esc(&keep))
        })
        .collect();
    format!(
        "<div class=\"range\"><ul class=\"choices\">{links}</ul>\
         <form method=\"get\" action=\"{path}\" class=\"custom\"><input type=\"hidden\" name=\"range\" value=\"custom\">{keep_hidden}\
         <label for=\"from\">From</label><input id=\"from\" name=\"from\" type=\"date\" value=\"{}\" required>\
         <label for=\"to\">to</label><input id=\"to\" name=\"to\" type=\"date\" value=\"{}\" required>\
         <button type=\"submit\">Show</button></form></div>",
        esc(&chosen.from),
        esc(&chosen.to)
    )
}

/// Decodes `%XX` and `+` of a query value.
pub(crate) fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.map(|hex| u8::from_str_radix(hex, 16)) {
                    Some(Ok(byte)) => {
                        out.push(byte);
                        index += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every period of the range an answer covers (its `start_date` and `end_date`), in the tenant's
/// time zone, so that charts show periods without events as empty rather than leave them out;
/// none if the backend cannot tell.
pub(crate) async fn periods(
    state: &QueryState,
    caller: &Caller,
    answer: &super::json::Json,
    period: Period,
) -> Vec<(OffsetDateTime, OffsetDateTime)> {
    let time = |name: &str| OffsetDateTime::parse(answer.get(name).text(), &Rfc3339).ok();
    // The range the answer counted, and its buckets as the API made them (under hour edges an
    // hour counts in the period holding its middle).
    let (Some(start), Some(end)) = (time("effective_start"), time("effective_end")) else {
        return Vec::new();
    };
    let mut scope = Scope::exact(caller.tenant_id, start, end, &caller.time_zone);
    if answer.get("edges").text() == Edges::Hour.as_str() {
        scope.edges = Edges::Hour;
    }
    state.backend.periods(&scope.bucketed(), period).await.unwrap_or_default()
}

/// The range the API counted (its `effective_start` and `effective_end`: whole UTC hours unless
/// it answered exactly, else `start_date` and `end_date`) and time zone, shown and marked for
/// the browser test.
pub(crate) fn shown(range: &super::json::Json) -> String {
    let bound = |effective: &str, asked: &str| {
        let text = range.get(effective).text();
        esc(if text.is_empty() { range.get(asked).text() } else { text })
    };
    format!(
        "<p class=\"range-shown\">From <time data-testid=\"range-start\">{}</time> to <time data-testid=\"range-end\">{}</time> ({})</p>",
        bound("effective_start", "start_date"),
        bound("effective_end", "end_date"),
        esc(range.get("time_zone").text())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chosen(period: Period, time_zone: &str) -> Chosen {
        Chosen {
            name: "24h".into(),
            from: String::new(),
            to: String::new(),
            start_date: String::new(),
            end_date: String::new(),
            period,
            zone: crate::calendar::zone(time_zone).expect("a known zone"),
        }
    }

    #[test]
    fn hour_labels_follow_dst_changes() {
        use time::macros::datetime;
        let hour = time::Duration::HOUR;
        let berlin = chosen(Period::Hour, "Europe/Berlin");
        // Clocks went from 02:00 CET to 03:00 CEST at 01:00 UTC on 2024-03-31.
        let spring: Vec<String> = (0..4)
            .map(|index| datetime!(2024-03-30 23:00 UTC) + hour * index)
            .map(|start| berlin.label(start, start + hour))
            .collect();
        assert_eq!(spring, ["00:00", "01:00", "03:00", "04:00"]);
        // And back from 03:00 CEST to 02:00 CET at 01:00 UTC on 2024-10-27: 02:00 twice.
        let autumn: Vec<String> = (0..4)
            .map(|index| datetime!(2024-10-26 23:00 UTC) + hour * index)
            .map(|start| berlin.label(start, start + hour))
            .collect();
        assert_eq!(autumn, ["01:00", "02:00", "02:00", "03:00"]);
        // A half-hour zone, and days across a change.
        let kolkata = chosen(Period::Hour, "Asia/Kolkata");
        assert_eq!(kolkata.label(datetime!(2024-03-31 00:00 UTC), datetime!(2024-03-31 01:00 UTC)), "05:30");
        let days = chosen(Period::Day, "Europe/Berlin");
        let (start, end) = (datetime!(2024-03-30 23:00 UTC), datetime!(2024-03-31 22:00 UTC));
        assert_eq!(days.label(start, end), "03-31");
    }

    #[test]
    fn query_values_decode() {
        assert_eq!(decode("a%20b+c%2F"), "a b c/");
        assert_eq!(decode("%zz%4"), "%zz%4");
        assert_eq!(decode(&url("é & =")), "é & =");
    }
}
