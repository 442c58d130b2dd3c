//! Local calendar periods in a tenant's time zone, computed in Rust for the embedded backend
//! ([`crate::sqlite`]) with the IANA time zone database compiled into the binary (`jiff`'s
//! bundled copy, so an answer does not depend on the machine's `/usr/share/zoneinfo`).
//!
//! The rules are PostgreSQL's, so that both backends bound a period at the same instant:
//! - A local time that does not exist (skipped when clocks go forward) or exists twice
//!   (repeated when they go back) means the later of its candidate instants, as PostgreSQL's
//!   `DetermineTimeZoneOffset` resolves them.
//! - `date_trunc('hour', t, zone)` keeps `t`'s own offset: in a +05:30 zone hours start at :30
//!   UTC. Days, weeks (from Monday) and months truncate the local date and resolve its midnight.
//! - A period ends where its local start plus one period (one hour in real time for hours)
//!   resolves to, so DST days last 23 or 25 hours.
//! - The periods of a range are PostgreSQL's `generate_series` over local timestamps: from the
//!   period holding the start, one local step at a time while the local time is not after the
//!   end's, keeping those that begin before the end.
//!
//! Times are microseconds since the Unix epoch, as the embedded schema stores them. PostgreSQL
//! reads its own copy of the database (usually the system's): a zone whose rules changed
//! recently may differ between the two until both copies carry the change.

use std::collections::HashMap;

use jiff::civil::{DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ToSpan};
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::backend::BackendError;
use crate::question::Period;

/// Microseconds in an hour: the grain of the rollups.
pub const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// Periods of one kind in one time zone.
#[derive(Debug, Clone)]
pub struct Calendar {
    zone: TimeZone,
    period: Period,
    /// Periods already resolved, by the truncated local time (days, weeks and months).
    known: HashMap<DateTime, (i64, i64)>,
}

impl Calendar {
    /// Periods in the IANA zone `time_zone`; an unknown name is [`BackendError::Unsupported`].
    pub fn new(time_zone: &str, period: Period) -> Result<Calendar, BackendError> {
        Ok(Calendar { zone: zone(time_zone)?, period, known: HashMap::new() })
    }

    /// The period holding `at_us`, as `[start, end)`: `date_trunc(unit, at, zone)` and its end.
    pub fn period_of(&mut self, at_us: i64) -> Result<(i64, i64), BackendError> {
        if self.period == Period::Hour {
            let start = self.start_of(at_us)?;
            return Ok((start, self.end_of(start)?));
        }
        let local = self.truncated_local(at_us)?;
        if let Some(known) = self.known.get(&local) {
            return Ok(*known);
        }
        let start = self.resolve(local)?;
        let bounds = (start, self.end_of(start)?);
        self.known.insert(local, bounds);
        Ok(bounds)
    }

    /// The periods overlapping `[start_us, end_us)`, in order.
    pub fn periods(&self, start_us: i64, end_us: i64) -> Result<Vec<(i64, i64)>, BackendError> {
        self.series(start_us, end_us)?
            .into_iter()
            .filter(|start| *start < end_us)
            .map(|start| Ok((start, self.end_of(start)?)))
            .collect()
    }

    /// The UTC hours inside `[whole_start_us, whole_end_us)` that a period boundary of the range
    /// `[start_us, end_us)` cuts, in order: a rollup row of such an hour would straddle two
    /// periods, so it is read from raw events (as [`crate::pg`] does). None in a zone whose
    /// offsets are whole hours.
    pub fn straddled_hours(
        &self,
        (start_us, end_us): (i64, i64),
        (whole_start_us, whole_end_us): (i64, i64),
    ) -> Result<Vec<i64>, BackendError> {
        if whole_start_us >= whole_end_us {
            return Ok(Vec::new());
        }
        let mut hours: Vec<i64> = self
            .series(start_us, end_us)?
            .into_iter()
            .filter(|b| *b > whole_start_us && *b < whole_end_us && b.rem_euclid(MICROS_PER_HOUR) != 0)
            .map(|b| b - b.rem_euclid(MICROS_PER_HOUR))
            .collect();
        hours.dedup();
        Ok(hours)
    }

    /// `date_trunc(unit, at, zone)`.
    fn start_of(&self, at_us: i64) -> Result<i64, BackendError> {
        if self.period == Period::Hour {
            // The hour keeps the instant's own offset (PostgreSQL does not re-resolve it).
            let offset_us = i64::from(self.zone.to_offset(timestamp(at_us)?).seconds()) * 1_000_000;
            return Ok(at_us - (at_us + offset_us).rem_euclid(MICROS_PER_HOUR));
        }
        self.resolve(self.truncated_local(at_us)?)
    }

    /// The local midnight that begins the day, week or month holding `at_us`.
    fn truncated_local(&self, at_us: i64) -> Result<DateTime, BackendError> {
        let date = self.zone.to_datetime(timestamp(at_us)?).date();
        let first = match self.period {
            Period::Hour | Period::Day => date,
            Period::Week => date
                .checked_sub(i64::from(date.weekday().to_monday_zero_offset()).days())
                .map_err(|_| out_of_range(at_us))?,
            Period::Month => date.first_of_month(),
        };
        Ok(first.to_datetime(Time::midnight()))
    }

    /// The end of the period that starts at `start_us`.
    fn end_of(&self, start_us: i64) -> Result<i64, BackendError> {
        if self.period == Period::Hour {
            return start_us.checked_add(MICROS_PER_HOUR).ok_or_else(|| out_of_range(start_us));
        }
        let local = self.zone.to_datetime(timestamp(start_us)?);
        let next = local.checked_add(self.step()).map_err(|_| out_of_range(start_us))?;
        self.resolve(next)
    }

    /// Period starts from the one holding `start_us` while the (local) time is not after
    /// `end_us`'s: PostgreSQL's `generate_series`, before it keeps those before the end.
    fn series(&self, start_us: i64, end_us: i64) -> Result<Vec<i64>, BackendError> {
        let first = self.start_of(start_us)?;
        let mut starts = Vec::new();
        if self.period == Period::Hour {
            let mut at = first;
            while at <= end_us {
                starts.push(at);
                at += MICROS_PER_HOUR;
            }
            return Ok(starts);
        }
        let end = self.zone.to_datetime(timestamp(end_us)?);
        let mut local = self.zone.to_datetime(timestamp(first)?);
        while local <= end {
            starts.push(self.resolve(local)?);
            // Past the last representable date nothing can be before the end.
            let Ok(next) = local.checked_add(self.step()) else { break };
            local = next;
        }
        Ok(starts)
    }

    fn step(&self) -> Span {
        match self.period {
            Period::Hour => 1.hour(),
            Period::Day => 1.day(),
            Period::Week => 1.week(),
            Period::Month => 1.month(),
        }
    }

    fn resolve(&self, local: DateTime) -> Result<i64, BackendError> {
        resolve(&self.zone, local)
    }
}

/// Wall-clock times in `time_zone` as instants (`timestamp AT TIME ZONE zone`).
pub fn resolve_local_times(
    time_zone: &str,
    times: &[PrimitiveDateTime],
) -> Result<Vec<OffsetDateTime>, BackendError> {
    let zone = zone(time_zone)?;
    times
        .iter()
        .map(|time| {
            let local = DateTime::new(
                i16::try_from(time.year()).map_err(|_| local_out_of_range(time))?,
                time.month() as i8,
                time.day() as i8,
                time.hour() as i8,
                time.minute() as i8,
                time.second() as i8,
                time.nanosecond() as i32,
            )
            .map_err(|_| local_out_of_range(time))?;
            let at = resolve_timestamp(&zone, local)?;
            OffsetDateTime::from_unix_timestamp_nanos(at.as_nanosecond())
                .map_err(|_| local_out_of_range(time))
        })
        .collect()
}

/// `at` as the wall clock in `zone` showed it: with the zone's offset at that instant, so that
/// times on both sides of a DST change read as the clocks did. Instants the types cannot hold
/// in the zone keep their own offset.
pub fn local_time(zone: &TimeZone, at: OffsetDateTime) -> OffsetDateTime {
    let Ok(instant) = Timestamp::from_second(at.unix_timestamp()) else { return at };
    let seconds = zone.to_offset(instant).seconds();
    match time::UtcOffset::from_whole_seconds(seconds) {
        Ok(offset) => at.checked_to_offset(offset).unwrap_or(at),
        Err(_) => at,
    }
}

/// The zone named `time_zone` in the bundled database.
pub fn zone(time_zone: &str) -> Result<TimeZone, BackendError> {
    if time_zone == "UTC" {
        return Ok(TimeZone::UTC);
    }
    jiff::tz::db()
        .get(time_zone)
        .map_err(|_| BackendError::Unsupported(format!("unknown time zone {time_zone:?}")))
}

/// A local time as an instant in microseconds; see [`resolve_timestamp`].
fn resolve(zone: &TimeZone, local: DateTime) -> Result<i64, BackendError> {
    Ok(resolve_timestamp(zone, local)?.as_microsecond())
}

/// A local time as an instant; skipped and repeated times take the later instant.
fn resolve_timestamp(zone: &TimeZone, local: DateTime) -> Result<Timestamp, BackendError> {
    zone.to_ambiguous_timestamp(local)
        .later()
        .map_err(|_| BackendError::Internal(format!("local time {local} is out of range")))
}

fn timestamp(at_us: i64) -> Result<Timestamp, BackendError> {
    Timestamp::from_microsecond(at_us).map_err(|_| out_of_range(at_us))
}

fn out_of_range(at_us: i64) -> BackendError {
    BackendError::Internal(format!("time {at_us} is out of range"))
}

fn local_out_of_range(time: &PrimitiveDateTime) -> BackendError {
    BackendError::Internal(format!("local time {time} is out of range"))
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn us(at: OffsetDateTime) -> i64 {
        (at.unix_timestamp_nanos() / 1000) as i64
    }

    fn period_of(zone: &str, period: Period, at: OffsetDateTime) -> (i64, i64) {
        Calendar::new(zone, period).expect("zone").period_of(us(at)).expect("period")
    }

    #[test]
    fn dst_days_last_23_and_25_hours() {
        // Berlin: clocks go forward on 2024-03-31 at 02:00 and back on 2024-10-27 at 03:00.
        let spring = period_of("Europe/Berlin", Period::Day, datetime!(2024-03-31 12:00 UTC));
        assert_eq!(spring, (us(datetime!(2024-03-30 23:00 UTC)), us(datetime!(2024-03-31 22:00 UTC))));
        let autumn = period_of("Europe/Berlin", Period::Day, datetime!(2024-10-27 12:00 UTC));
        assert_eq!(autumn, (us(datetime!(2024-10-26 22:00 UTC)), us(datetime!(2024-10-27 23:00 UTC))));
        // A week holding a DST change lasts 7 days less an hour; a month from local midnight.
        let week = period_of("America/New_York", Period::Week, datetime!(2024-03-10 12:00 UTC));
        assert_eq!(week, (us(datetime!(2024-03-04 5:00 UTC)), us(datetime!(2024-03-11 4:00 UTC))));
        let month = period_of("America/New_York", Period::Month, datetime!(2024-11-15 12:00 UTC));
        assert_eq!(month, (us(datetime!(2024-11-01 4:00 UTC)), us(datetime!(2024-12-01 5:00 UTC))));
    }

    #[test]
    fn non_whole_hour_zones_start_days_and_hours_inside_utc_hours() {
        let day = period_of("Asia/Kolkata", Period::Day, datetime!(2024-03-10 18:29 UTC));
        assert_eq!(day, (us(datetime!(2024-03-09 18:30 UTC)), us(datetime!(2024-03-10 18:30 UTC))));
        let hour = period_of("Asia/Kolkata", Period::Hour, datetime!(2024-03-10 18:29 UTC));
        assert_eq!(hour, (us(datetime!(2024-03-10 17:30 UTC)), us(datetime!(2024-03-10 18:30 UTC))));
        // St. John's: -03:30 in winter, -02:30 from 2024-03-10 02:00 local.
        let day = period_of("America/St_Johns", Period::Day, datetime!(2024-03-10 12:00 UTC));
        assert_eq!(day, (us(datetime!(2024-03-10 3:30 UTC)), us(datetime!(2024-03-11 2:30 UTC))));

        let calendar = Calendar::new("Asia/Kolkata", Period::Day).expect("zone");
        let range = (us(datetime!(2024-03-08 10:15 UTC)), us(datetime!(2024-03-10 20:00 UTC)));
        let whole = (us(datetime!(2024-03-08 11:00 UTC)), us(datetime!(2024-03-10 20:00 UTC)));
        assert_eq!(
            calendar.straddled_hours(range, whole).expect("hours"),
            [
                datetime!(2024-03-08 18:00 UTC),
                datetime!(2024-03-09 18:00 UTC),
                datetime!(2024-03-10 18:00 UTC)
            ]
            .map(us)
        );
        let berlin = Calendar::new("Europe/Berlin", Period::Day).expect("zone");
        assert_eq!(berlin.straddled_hours(range, whole).expect("hours"), Vec::<i64>::new());
    }

    #[test]
    fn periods_step_in_local_time() {
        let calendar = Calendar::new("Europe/Berlin", Period::Day).expect("zone");
        let periods = calendar
            .periods(us(datetime!(2024-03-30 12:00 UTC)), us(datetime!(2024-04-01 12:00 UTC)))
            .expect("periods");
        let expected = [
            (datetime!(2024-03-29 23:00 UTC), datetime!(2024-03-30 23:00 UTC)),
            (datetime!(2024-03-30 23:00 UTC), datetime!(2024-03-31 22:00 UTC)),
            (datetime!(2024-03-31 22:00 UTC), datetime!(2024-04-01 22:00 UTC)),
        ];
        assert_eq!(periods, expected.map(|(a, b)| (us(a), us(b))));
        // The end is exclusive.
        let periods = calendar
            .periods(us(datetime!(2024-03-30 12:00 UTC)), us(datetime!(2024-03-31 22:00 UTC)))
            .expect("periods");
        assert_eq!(periods.len(), 2);
        let utc = Calendar::new("UTC", Period::Hour).expect("zone");
        let hours = utc.periods(us(datetime!(2024-03-30 12:30 UTC)), us(datetime!(2024-03-30 15:00 UTC)));
        assert_eq!(hours.expect("hours").len(), 3);
    }

    #[test]
    fn skipped_and_repeated_local_times_take_the_later_instant() {
        let times =
            [datetime!(2024-03-10 2:30), datetime!(2024-11-03 1:30), datetime!(2024-07-01 12:00:00.5)];
        let resolved = resolve_local_times("America/New_York", &times).expect("resolved");
        assert_eq!(
            resolved,
            vec![
                datetime!(2024-03-10 7:30 UTC),
                datetime!(2024-11-03 6:30 UTC),
                datetime!(2024-07-01 16:00:00.5 UTC)
            ]
        );
        assert!(matches!(
            resolve_local_times("Mars/Olympus_Mons", &times),
            Err(BackendError::Unsupported(_))
        ));
    }
}
