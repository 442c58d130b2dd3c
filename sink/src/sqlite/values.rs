//! How values without an SQLite type are stored: exact decimals as text, `{"name": number}`
//! objects, latency histograms and lists as JSON text, times as microseconds, and the calendar
//! arithmetic the store needs without a time zone database.

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::rollup::LATENCY_BUCKETS;
use crate::store::StoreError;

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Microseconds since the Unix epoch, now.
pub(super) fn now_us() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

/// A stored decimal. Text that is not one means the file was edited by hand or is corrupt.
pub(super) fn decimal(text: &str) -> Result<Decimal, StoreError> {
    Decimal::from_str(text).map_err(|error| {
        StoreError::internal(format!("stored value {text:?} is not a decimal")).with_source(error)
    })
}

pub(super) fn optional_decimal(text: Option<&str>) -> Result<Option<Decimal>, StoreError> {
    text.map(decimal).transpose()
}

/// `{"name":value,...}` as written by `pg::write_quantities_json`, back into exact decimals.
/// Reads only that shape (names are `[a-z0-9_]`, values plain decimal numbers): it is ours, so
/// anything else is a corrupt row, reported rather than guessed at.
pub(super) fn parse_quantities(text: &str) -> Result<BTreeMap<String, Decimal>, StoreError> {
    let corrupt =
        || StoreError::internal(format!("stored quantities {text:?} are not a {{name: number}} object"));
    let inner = text.trim().strip_prefix('{').and_then(|rest| rest.strip_suffix('}')).ok_or_else(corrupt)?;
    let mut quantities = BTreeMap::new();
    for entry in inner.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        let (name, value) = entry.split_once(':').ok_or_else(corrupt)?;
        let name =
            name.trim().strip_prefix('"').and_then(|rest| rest.strip_suffix('"')).ok_or_else(corrupt)?;
        let value = Decimal::from_str(value.trim())
            .or_else(|_| Decimal::from_scientific(value.trim()))
            .map_err(|_| corrupt())?;
        quantities.insert(name.to_owned(), value);
    }
    Ok(quantities)
}

/// The JSON text of a `{"name": number}` object with exact decimal numbers.
pub(super) fn quantities_json<'a>(quantities: impl IntoIterator<Item = (&'a String, &'a Decimal)>) -> String {
    let mut json = Vec::new();
    crate::pg::write_quantities_json(quantities, &mut json);
    // Names are validated `[a-z0-9_]` and decimals print ASCII: the bytes are UTF-8.
    String::from_utf8(json).unwrap_or_default()
}

/// A latency histogram as a JSON array of `LATENCY_BUCKETS` counts. Written for every rollup
/// row a batch touches, so through serde_json's integer formatting rather than `fmt`.
pub(super) fn buckets_json(buckets: &[i64; LATENCY_BUCKETS]) -> String {
    serde_json::to_string(buckets.as_slice()).unwrap_or_default()
}

pub(super) fn parse_buckets(text: &str) -> Result<[i64; LATENCY_BUCKETS], StoreError> {
    let corrupt =
        || StoreError::internal(format!("stored histogram {text:?} is not {LATENCY_BUCKETS} counts"));
    let inner = text.trim().strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).ok_or_else(corrupt)?;
    let mut buckets = [0i64; LATENCY_BUCKETS];
    let mut count = 0;
    for (slot, value) in buckets.iter_mut().zip(inner.split(',')) {
        *slot = value.trim().parse().map_err(|_| corrupt())?;
        count += 1;
    }
    if count != LATENCY_BUCKETS || inner.split(',').count() != LATENCY_BUCKETS {
        return Err(corrupt());
    }
    Ok(buckets)
}

/// A JSON array of strings (tags, scopes, providers).
pub(super) fn strings_json(items: &[impl AsRef<str>]) -> String {
    let items: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    serde_json::to_string(&items).unwrap_or_else(|_| "[]".into())
}

pub(super) fn parse_strings(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|error| {
        StoreError::internal(format!("stored list {text:?} is not an array of strings")).with_source(error)
    })
}

/// Price rule ids as a JSON array of hyphenated UUIDs; `None` for none, as on PostgreSQL.
pub(super) fn uuids_json(ids: &[Uuid]) -> Option<String> {
    if ids.is_empty() {
        return None;
    }
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    Some(strings_json(&ids))
}

pub(super) fn parse_uuids(text: Option<&str>) -> Result<Vec<Uuid>, StoreError> {
    let Some(text) = text else { return Ok(Vec::new()) };
    parse_strings(text)?
        .iter()
        .map(|id| {
            Uuid::parse_str(id).map_err(|error| {
                StoreError::internal(format!("stored rule id {id:?} is not a uuid")).with_source(error)
            })
        })
        .collect()
}

/// Metadata as a JSON object of strings (keys are unique: validation refuses repeats).
pub(super) fn metadata_json(metadata: &[wire::MetadataEntry]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|entry| (entry.key.clone(), serde_json::Value::String(entry.value.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

pub(super) fn json(value: &serde_json::Value) -> String {
    value.to_string()
}

pub(super) fn parse_json(text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::internal("stored JSON is invalid").with_source(error))
}

/// The start of the UTC month holding `timestamp_us`.
pub(super) fn utc_month_start_us(timestamp_us: i64) -> i64 {
    let (year, month, _) = civil_from_days(timestamp_us.div_euclid(MICROS_PER_DAY));
    days_from_civil(year, month, 1) * MICROS_PER_DAY
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Whether a time zone name has the shape of an IANA name: `UTC`, or `Area/Location` with an
/// optional third part (`America/Argentina/Buenos_Aires`, `Etc/GMT+5`). Without a time zone
/// database this is all the SQLite store can check; the name is kept for the query service.
pub(super) fn is_time_zone_name(name: &str) -> bool {
    if name == "UTC" {
        return true;
    }
    let parts: Vec<&str> = name.split('/').collect();
    let part_ok = |part: &&str| {
        !part.is_empty()
            && part.len() <= 64
            && part.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'+'))
    };
    (2..=3).contains(&parts.len())
        && parts.iter().all(part_ok)
        && parts[0].as_bytes()[0].is_ascii_uppercase()
        && parts[0].bytes().all(|byte| byte.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_round_trip_exactly() {
        let mut quantities = BTreeMap::new();
        quantities.insert("images".to_owned(), Decimal::from_str("3").expect("decimal"));
        quantities.insert("gpu_seconds".to_owned(), Decimal::from_str("0.000001").expect("decimal"));
        let text = quantities_json(&quantities);
        assert_eq!(text, r#"{"gpu_seconds":0.000001,"images":3}"#);
        assert_eq!(parse_quantities(&text).expect("parses"), quantities);
        assert_eq!(parse_quantities("{}").expect("parses"), BTreeMap::new());
        assert_eq!(parse_quantities(r#"{"a": 1.5, "b": 2}"#).expect("parses").len(), 2);
        assert!(parse_quantities("[1]").is_err());
        assert!(parse_quantities(r#"{"a": "x"}"#).is_err());
    }

    #[test]
    fn buckets_round_trip_and_refuse_wrong_lengths() {
        let mut buckets = [0i64; LATENCY_BUCKETS];
        buckets[0] = 3;
        buckets[LATENCY_BUCKETS - 1] = 9_000_000_000;
        assert_eq!(parse_buckets(&buckets_json(&buckets)).expect("parses"), buckets);
        assert!(parse_buckets("[1,2,3]").is_err());
        let too_many = format!("[{}]", vec!["0"; LATENCY_BUCKETS + 1].join(","));
        assert!(parse_buckets(&too_many).is_err());
    }

    #[test]
    fn month_starts_are_utc_calendar_months() {
        // 2024-02-29T23:59:59.999999Z and 2024-03-01T00:00:00Z.
        let leap_day_end = 1_709_251_199_999_999;
        assert_eq!(utc_month_start_us(leap_day_end), 1_706_745_600_000_000); // 2024-02-01
        assert_eq!(utc_month_start_us(leap_day_end + 1), leap_day_end + 1);
        assert_eq!(utc_month_start_us(0), 0);
        assert_eq!(utc_month_start_us(-1), -2_678_400_000_000); // 1969-12-01
        for days in [-800_000i64, -1, 0, 59, 10_957, 19_782, 2_932_896] {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(days_from_civil(year, month, day), days, "{year}-{month}-{day}");
        }
    }

    #[test]
    fn time_zone_names_need_the_iana_shape() {
        for good in ["UTC", "Europe/Berlin", "Asia/Kolkata", "America/Argentina/Buenos_Aires", "Etc/GMT+5"] {
            assert!(is_time_zone_name(good), "{good}");
        }
        for bad in ["", "utc", "Mars/Olympus Mons", "Europe/", "/Berlin", "europe/berlin", "A/B/C/D", "Moon"]
        {
            assert!(!is_time_zone_name(bad), "{bad}");
        }
    }
}
