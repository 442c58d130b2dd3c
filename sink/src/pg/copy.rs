//! PostgreSQL's binary `COPY` format, written straight from in-memory rows: no text formatting of
//! values, one reused buffer per batch.

use crate::rollup::{RollupDelta, RollupKey};
use crate::row::EventRow;
use rust_decimal::Decimal;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;
/// OID of `text`, the element type of `tags`.
const TEXT_OID: i32 = 25;
const INT8_OID: i32 = 20;
/// OID of `uuid`, the element type of `price_rule_ids`.
const UUID_OID: i32 = 2950;

/// The columns of `usage_events` that `COPY` writes, in [`encode_event`]'s order.
pub fn event_columns() -> String {
    let quantities: Vec<&str> = wire::QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect();
    format!(
        "tenant_id, event_id, occurred_at, user_id, service_type, service_provider, event_type, model, \
         status, error_code, latency_us, {}, custom_quantities, cost, metadata, tags, session_id, request_id, price_rule_ids, flags",
        quantities.join(", ")
    )
}

const EVENT_FIELDS: i16 = 19 + wire::QuantityKind::ALL.len() as i16;

/// A binary `COPY` stream being written.
#[derive(Debug, Default)]
pub struct CopyBuffer {
    bytes: Vec<u8>,
}

impl CopyBuffer {
    /// Clears the buffer (keeping its memory) and writes the stream header.
    pub fn start(&mut self) {
        self.bytes.clear();
        self.bytes.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        self.bytes.extend_from_slice(&0i32.to_be_bytes()); // flags
        self.bytes.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    }

    /// Writes the trailer; the buffer is then a complete stream.
    pub fn finish(&mut self) -> &[u8] {
        self.bytes.extend_from_slice(&(-1i16).to_be_bytes());
        &self.bytes
    }

    fn row(&mut self, fields: i16) {
        self.bytes.extend_from_slice(&fields.to_be_bytes());
    }

    fn len_prefix(&mut self, len: usize) {
        self.bytes.extend_from_slice(&(len as i32).to_be_bytes());
    }

    fn null(&mut self) {
        self.bytes.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn uuid(&mut self, bytes: &[u8; 16]) {
        self.len_prefix(16);
        self.bytes.extend_from_slice(bytes);
    }

    fn timestamp(&mut self, unix_us: i64) {
        self.len_prefix(8);
        self.bytes.extend_from_slice(&(unix_us - POSTGRES_EPOCH_US).to_be_bytes());
    }

    fn text(&mut self, text: &str) {
        self.len_prefix(text.len());
        self.bytes.extend_from_slice(text.as_bytes());
    }

    fn optional_text(&mut self, text: Option<&str>) {
        match text {
            Some(text) => self.text(text),
            None => self.null(),
        }
    }

    fn int2(&mut self, value: i16) {
        self.len_prefix(2);
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    fn optional_int8(&mut self, value: Option<i64>) {
        match value {
            Some(value) => {
                self.len_prefix(8);
                self.bytes.extend_from_slice(&value.to_be_bytes());
            }
            None => self.null(),
        }
    }

    fn optional_numeric(&mut self, value: Option<&Decimal>) {
        match value {
            Some(value) => encode_numeric(value, &mut self.bytes),
            None => self.null(),
        }
    }

    /// A `jsonb` field whose JSON text `write` appends.
    fn jsonb(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        self.len_prefix(0);
        self.bytes.push(1); // jsonb format version
        write(&mut self.bytes);
        let len = (self.bytes.len() - start - 4) as i32;
        self.bytes[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    fn uuid_array(&mut self, items: &[uuid::Uuid]) {
        self.len_prefix(20 + items.len() * 20);
        self.bytes.extend_from_slice(&1i32.to_be_bytes()); // dimensions
        self.bytes.extend_from_slice(&0i32.to_be_bytes()); // no NULL elements
        self.bytes.extend_from_slice(&UUID_OID.to_be_bytes());
        self.bytes.extend_from_slice(&(items.len() as i32).to_be_bytes());
        self.bytes.extend_from_slice(&1i32.to_be_bytes()); // lower bound
        for item in items {
            self.uuid(item.as_bytes());
        }
    }

    fn int8_array(&mut self, items: &[i64]) {
        self.len_prefix(20 + items.len() * 12);
        self.bytes.extend_from_slice(&1i32.to_be_bytes()); // dimensions
        self.bytes.extend_from_slice(&0i32.to_be_bytes()); // no NULL elements
        self.bytes.extend_from_slice(&INT8_OID.to_be_bytes());
        self.bytes.extend_from_slice(&(items.len() as i32).to_be_bytes());
        self.bytes.extend_from_slice(&1i32.to_be_bytes()); // lower bound
        for item in items {
            self.optional_int8(Some(*item));
        }
    }

    fn text_array(&mut self, items: &[String]) {
        let start = self.bytes.len();
        self.len_prefix(0);
        let dimensions = i32::from(!items.is_empty());
        self.bytes.extend_from_slice(&dimensions.to_be_bytes());
        self.bytes.extend_from_slice(&0i32.to_be_bytes()); // no NULL elements
        self.bytes.extend_from_slice(&TEXT_OID.to_be_bytes());
        if !items.is_empty() {
            self.bytes.extend_from_slice(&(items.len() as i32).to_be_bytes());
            self.bytes.extend_from_slice(&1i32.to_be_bytes()); // lower bound
            for item in items {
                self.text(item);
            }
        }
        let len = (self.bytes.len() - start - 4) as i32;
        self.bytes[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// The columns of a pending rollup row, in the order [`encode_pending`] writes them; with the
/// latency histogram for `usage_rollup_service_pending`, with the user for
/// `usage_rollup_pending`.
pub fn pending_columns(per_user: bool) -> String {
    let quantities: Vec<&str> = wire::QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect();
    let (user, buckets) = if per_user { ("user_id, ", "") } else { ("", ", latency_buckets") };
    format!(
        "tenant_id, hour, service_type, service_provider, model, {user}event_type, event_count, error_count, \
         {quantities}, custom_quantities, cost, unpriced_count, latency_count, latency_sum_us, latency_max_us{buckets}",
        quantities = quantities.join(", "),
    )
}

/// Appends one pending rollup row in the order of [`pending_columns`]. A sum that is zero (and a
/// histogram without latencies) is written as NULL: most of a row's sums are, and NULL costs
/// PostgreSQL nothing to parse, store or add. The fold and the `_live` views read NULL as zero.
pub fn encode_pending(buffer: &mut CopyBuffer, key: &RollupKey<'_>, delta: &RollupDelta, per_user: bool) {
    let fields = 14 + crate::row::QUANTITY_KINDS + usize::from(per_user) + usize::from(!per_user);
    buffer.row(fields as i16);
    buffer.uuid(key.tenant_id.as_bytes());
    buffer.timestamp(key.hour_us);
    buffer.text(key.service_type);
    buffer.text(key.service_provider);
    buffer.text(key.model);
    if per_user {
        buffer.text(key.user_id);
    }
    buffer.text(key.event_type);
    buffer.optional_int8(Some(delta.event_count));
    buffer.optional_int8(nonzero(delta.error_count));
    for quantity in &delta.quantities {
        buffer.optional_numeric(Some(quantity).filter(|quantity| !quantity.is_zero()));
    }
    if delta.custom_quantities.is_empty() {
        buffer.null();
    } else {
        buffer.jsonb(|out| write_quantities_json(&delta.custom_quantities, out));
    }
    buffer.optional_numeric(Some(&delta.cost).filter(|cost| !cost.is_zero()));
    buffer.optional_int8(nonzero(delta.unpriced_count));
    buffer.optional_int8(nonzero(delta.latency_count));
    buffer.optional_int8(nonzero(delta.latency_sum_us));
    buffer.optional_int8(nonzero(delta.latency_max_us));
    if !per_user {
        if delta.latency_count == 0 {
            buffer.null();
        } else {
            buffer.int8_array(&delta.latency_buckets);
        }
    }
}

fn nonzero(value: i64) -> Option<i64> {
    (value != 0).then_some(value)
}

/// Appends one event row in the order of [`event_columns`].
pub fn encode_event(buffer: &mut CopyBuffer, row: &EventRow) {
    let event = &row.event;
    let extra = event.extra.as_deref();
    buffer.row(EVENT_FIELDS);
    buffer.uuid(row.tenant_id.as_bytes());
    buffer.uuid(&event.event_id);
    buffer.timestamp(event.timestamp_us);
    buffer.text(&event.user_id);
    buffer.text(&event.service_type);
    buffer.text(&event.service_provider);
    buffer.text(&event.event_type);
    buffer.optional_text(event.model.as_deref());
    buffer.int2(event.status as i16);
    buffer.optional_text(extra.and_then(|extra| extra.error_code.as_deref()));
    buffer.optional_int8(row.latency_us);
    for quantity in &row.quantities {
        buffer.optional_numeric(quantity.as_ref());
    }
    if row.custom_quantities.is_empty() {
        buffer.null();
    } else {
        buffer.jsonb(|out| {
            write_quantities_json(row.custom_quantities.iter().map(|(name, value)| (name, value)), out)
        });
    }
    buffer.optional_numeric(row.cost.as_ref());
    match extra.filter(|extra| !extra.metadata.is_empty()) {
        Some(extra) => buffer.jsonb(|out| write_metadata_json(&extra.metadata, out)),
        None => buffer.null(),
    }
    match extra.filter(|extra| !extra.tags.is_empty()) {
        Some(extra) => buffer.text_array(&extra.tags),
        None => buffer.null(),
    }
    buffer.optional_text(extra.and_then(|extra| extra.session_id.as_deref()));
    buffer.optional_text(extra.and_then(|extra| extra.request_id.as_deref()));
    if row.price_rule_ids.is_empty() {
        buffer.null();
    } else {
        buffer.uuid_array(&row.price_rule_ids);
    }
    buffer.int2(row.flags);
}

/// `{"name":value,...}` with exact decimal numbers. Names are `[a-z0-9_]` (validated), so they
/// need no escaping.
pub fn write_quantities_json<'a>(
    quantities: impl IntoIterator<Item = (&'a String, &'a Decimal)>,
    out: &mut Vec<u8>,
) {
    use std::io::Write;
    out.push(b'{');
    for (index, (name, value)) in quantities.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        let _ = write!(out, "\"{name}\":{value}");
    }
    out.push(b'}');
}

fn write_metadata_json(metadata: &[wire::MetadataEntry], out: &mut Vec<u8>) {
    let map: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|entry| (entry.key.clone(), serde_json::Value::String(entry.value.clone())))
        .collect();
    // Writing a map of strings into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &map);
}

/// PostgreSQL `numeric` in binary: digit count, weight, sign, display scale, then base-10000
/// digits, most significant first, without leading or trailing zero digits.
pub fn encode_numeric(value: &Decimal, out: &mut Vec<u8>) {
    let scale = value.scale();
    let padding = (4 - scale % 4) % 4;
    // The mantissa is below 2^96, so multiplying by at most 1,000 cannot overflow a u128.
    let mut mantissa = value.mantissa().unsigned_abs() * 10u128.pow(padding);
    let fraction_groups = ((scale + padding) / 4) as i32;
    let mut groups = [0i16; 12];
    let mut count = 0;
    while mantissa > 0 {
        groups[count] = (mantissa % 10_000) as i16;
        mantissa /= 10_000;
        count += 1;
    }
    let lowest = groups[..count].iter().position(|group| *group != 0).unwrap_or(count);
    let digits = &groups[lowest..count];
    let weight = if digits.is_empty() { 0 } else { count as i32 - fraction_groups - 1 };
    let sign: u16 = if value.is_sign_negative() && !digits.is_empty() { 0x4000 } else { 0 };
    out.extend_from_slice(&((8 + 2 * digits.len()) as i32).to_be_bytes());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&(weight as i16).to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(scale as u16).to_be_bytes());
    for digit in digits.iter().rev() {
        out.extend_from_slice(&digit.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_numeric(&text.parse::<Decimal>().expect("decimal"), &mut out);
        out
    }

    fn expected(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((8 + 2 * digits.len()) as i32).to_be_bytes());
        out.extend_from_slice(&ndigits.to_be_bytes());
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&dscale.to_be_bytes());
        for digit in digits {
            out.extend_from_slice(&digit.to_be_bytes());
        }
        out
    }

    #[test]
    fn numeric_matches_postgres_layout() {
        assert_eq!(numeric("0"), expected(0, 0, 0, 0, &[]));
        assert_eq!(numeric("1"), expected(1, 0, 0, 0, &[1]));
        assert_eq!(numeric("10000"), expected(1, 1, 0, 0, &[1]));
        assert_eq!(numeric("12345.678"), expected(3, 1, 0, 3, &[1, 2345, 6780]));
        assert_eq!(numeric("0.000375"), expected(2, -1, 0, 6, &[3, 7500]));
        assert_eq!(numeric("-0.5"), expected(1, -1, 0x4000, 1, &[5000]));
        assert_eq!(numeric("0.00000001"), expected(1, -2, 0, 8, &[1]));
    }
}
