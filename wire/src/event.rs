//! The usage event: what one customer used, when, of which service, and how much.
//!
//! Do not reorder fields of any archived type in this file; bump [`crate::PROTOCOL_VERSION`].

use rkyv::{Archive, Deserialize, Serialize, with::Niche};

use crate::limits::*;

/// One unit of usage. The tenant is never part of an event: it comes from the connection's key.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Event {
    /// Client-generated UUID (v7 recommended) in RFC 9562 byte order; the deduplication key
    /// together with the tenant and `timestamp_us`. Never nil.
    pub event_id: [u8; 16],
    /// When the usage happened: microseconds since the Unix epoch, UTC.
    pub timestamp_us: i64,
    /// The tenant's own customer or end user who used the service.
    pub user_id: String,
    /// The registered service type, e.g. `llm_service`.
    pub service_type: String,
    /// Who provided the service, e.g. `openai`.
    pub service_provider: String,
    /// What happened, e.g. `completion`.
    pub event_type: String,
    /// Model or other pricing dimension, e.g. `gpt-4o`.
    pub model: Option<String>,
    /// Whether the call succeeded.
    pub status: Status,
    /// How long the call took, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Well-known quantities; each kind at most once.
    pub quantities: Vec<Quantity>,
    /// Rarely used fields, absent (four bytes) in the common case.
    #[rkyv(with = Niche)]
    pub extra: Option<Box<Extra>>,
}

/// Fields most events do not carry, kept out of line so a typical event stays small.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct Extra {
    /// The service's own error code, allowed only when `status` is `Error`.
    pub error_code: Option<String>,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
    /// Quantities with names of the tenant's choosing, e.g. `images`.
    pub custom_quantities: Vec<CustomQuantity>,
    /// Free-form string metadata; keys unique.
    pub metadata: Vec<MetadataEntry>,
    pub tags: Vec<String>,
}

/// Outcome of the metered call.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum Status {
    #[default]
    Success = 0,
    Error = 1,
}

/// A quantity with a name known to every Tally component.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Quantity {
    pub kind: QuantityKind,
    /// Finite, 0 to [`QUANTITY_VALUE_MAX`].
    pub value: f64,
}

/// The well-known quantity names. Do not reorder; new kinds need a protocol version.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum QuantityKind {
    InputTokens = 0,
    OutputTokens = 1,
    CachedInputTokens = 2,
    ReasoningTokens = 3,
    Pages = 4,
    Characters = 5,
    Requests = 6,
    Bytes = 7,
    DurationMs = 8,
}

/// A quantity whose name is not one of [`QuantityKind`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct CustomQuantity {
    pub name: String,
    pub value: f64,
}

/// One metadata key and its value.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MetadataEntry {
    pub key: String,
    pub value: String,
}

impl QuantityKind {
    /// Every kind, in wire order.
    pub const ALL: [QuantityKind; 9] = [
        QuantityKind::InputTokens,
        QuantityKind::OutputTokens,
        QuantityKind::CachedInputTokens,
        QuantityKind::ReasoningTokens,
        QuantityKind::Pages,
        QuantityKind::Characters,
        QuantityKind::Requests,
        QuantityKind::Bytes,
        QuantityKind::DurationMs,
    ];

    /// The name used in JSON, storage and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantityKind::InputTokens => "input_tokens",
            QuantityKind::OutputTokens => "output_tokens",
            QuantityKind::CachedInputTokens => "cached_input_tokens",
            QuantityKind::ReasoningTokens => "reasoning_tokens",
            QuantityKind::Pages => "pages",
            QuantityKind::Characters => "characters",
            QuantityKind::Requests => "requests",
            QuantityKind::Bytes => "bytes",
            QuantityKind::DurationMs => "duration_ms",
        }
    }

    /// The kind with this name, if it is well known.
    pub fn from_name(name: &str) -> Option<QuantityKind> {
        QuantityKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    #[inline]
    fn bit(self) -> u16 {
        1 << (self as u8)
    }
}

impl ArchivedQuantityKind {
    /// The owned kind of an archived one.
    #[inline]
    pub fn to_native(self) -> QuantityKind {
        match self {
            ArchivedQuantityKind::InputTokens => QuantityKind::InputTokens,
            ArchivedQuantityKind::OutputTokens => QuantityKind::OutputTokens,
            ArchivedQuantityKind::CachedInputTokens => QuantityKind::CachedInputTokens,
            ArchivedQuantityKind::ReasoningTokens => QuantityKind::ReasoningTokens,
            ArchivedQuantityKind::Pages => QuantityKind::Pages,
            ArchivedQuantityKind::Characters => QuantityKind::Characters,
            ArchivedQuantityKind::Requests => QuantityKind::Requests,
            ArchivedQuantityKind::Bytes => QuantityKind::Bytes,
            ArchivedQuantityKind::DurationMs => QuantityKind::DurationMs,
        }
    }
}

impl Event {
    /// A successful event now, with a fresh UUIDv7.
    pub fn new(
        user_id: impl Into<String>,
        service_type: impl Into<String>,
        service_provider: impl Into<String>,
        event_type: impl Into<String>,
    ) -> Event {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_micros() as i64);
        Event {
            event_id: *uuid::Uuid::now_v7().as_bytes(),
            timestamp_us: now_us,
            user_id: user_id.into(),
            service_type: service_type.into(),
            service_provider: service_provider.into(),
            event_type: event_type.into(),
            model: None,
            status: Status::Success,
            latency_ms: None,
            quantities: Vec::new(),
            extra: None,
        }
    }

    pub fn with_id(mut self, event_id: uuid::Uuid) -> Event {
        self.event_id = *event_id.as_bytes();
        self
    }

    pub fn at(mut self, timestamp_us: i64) -> Event {
        self.timestamp_us = timestamp_us;
        self
    }

    pub fn with_model(mut self, model: impl Into<String>) -> Event {
        self.model = Some(model.into());
        self
    }

    pub fn with_latency_ms(mut self, latency_ms: f64) -> Event {
        self.latency_ms = Some(latency_ms);
        self
    }

    pub fn with_quantity(mut self, kind: QuantityKind, value: f64) -> Event {
        self.quantities.push(Quantity { kind, value });
        self
    }

    pub fn with_custom_quantity(mut self, name: impl Into<String>, value: f64) -> Event {
        let name = name.into();
        self.extra_mut().custom_quantities.push(CustomQuantity { name, value });
        self
    }

    pub fn with_error(mut self, error_code: Option<String>) -> Event {
        self.status = Status::Error;
        self.extra_mut().error_code = error_code;
        self
    }

    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Event {
        let entry = MetadataEntry { key: key.into(), value: value.into() };
        self.extra_mut().metadata.push(entry);
        self
    }

    pub fn with_tag(mut self, tag: impl Into<String>) -> Event {
        self.extra_mut().tags.push(tag.into());
        self
    }

    pub fn with_session_id(mut self, session_id: impl Into<String>) -> Event {
        self.extra_mut().session_id = Some(session_id.into());
        self
    }

    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Event {
        self.extra_mut().request_id = Some(request_id.into());
        self
    }

    /// The event id as a UUID.
    pub fn id(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.event_id)
    }

    /// The value of a well-known quantity, if present.
    pub fn quantity(&self, kind: QuantityKind) -> Option<f64> {
        self.quantities.iter().find(|quantity| quantity.kind == kind).map(|quantity| quantity.value)
    }

    /// The rarely used fields, created empty on first use.
    pub fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// Checks every rule of the protocol that one event must satisfy.
    pub fn validate(&self) -> Result<(), EventError> {
        validate(self)
    }
}

/// Why one event was refused: the field and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct EventError {
    /// The field, with an index where it is in a list, e.g. `metadata[2].key`.
    pub field: String,
    pub reason: String,
}

impl EventError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> EventError {
        EventError { field: field.into(), reason: reason.into() }
    }
}

/// Read access to an event, owned or archived, so both are validated by one function.
pub trait EventFields {
    fn event_id(&self) -> [u8; 16];
    fn timestamp_us(&self) -> i64;
    fn user_id(&self) -> &str;
    fn service_type(&self) -> &str;
    fn service_provider(&self) -> &str;
    fn event_type(&self) -> &str;
    fn model(&self) -> Option<&str>;
    fn is_error(&self) -> bool;
    fn latency_ms(&self) -> Option<f64>;
    fn quantities(&self) -> impl Iterator<Item = (QuantityKind, f64)>;
    fn error_code(&self) -> Option<&str>;
    fn session_id(&self) -> Option<&str>;
    fn request_id(&self) -> Option<&str>;
    fn custom_quantities(&self) -> impl Iterator<Item = (&str, f64)>;
    fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &str)>;
    fn tags(&self) -> impl ExactSizeIterator<Item = &str>;
    fn custom_quantity_count(&self) -> usize;
}

impl EventFields for Event {
    #[inline]
    fn event_id(&self) -> [u8; 16] {
        self.event_id
    }
    #[inline]
    fn timestamp_us(&self) -> i64 {
        self.timestamp_us
    }
    #[inline]
    fn user_id(&self) -> &str {
        &self.user_id
    }
    #[inline]
    fn service_type(&self) -> &str {
        &self.service_type
    }
    #[inline]
    fn service_provider(&self) -> &str {
        &self.service_provider
    }
    #[inline]
    fn event_type(&self) -> &str {
        &self.event_type
    }
    #[inline]
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    #[inline]
    fn is_error(&self) -> bool {
        self.status == Status::Error
    }
    #[inline]
    fn latency_ms(&self) -> Option<f64> {
        self.latency_ms
    }
    #[inline]
    fn quantities(&self) -> impl Iterator<Item = (QuantityKind, f64)> {
        self.quantities.iter().map(|quantity| (quantity.kind, quantity.value))
    }
    #[inline]
    fn error_code(&self) -> Option<&str> {
        self.extra.as_ref()?.error_code.as_deref()
    }
    #[inline]
    fn session_id(&self) -> Option<&str> {
        self.extra.as_ref()?.session_id.as_deref()
    }
    #[inline]
    fn request_id(&self) -> Option<&str> {
        self.extra.as_ref()?.request_id.as_deref()
    }
    #[inline]
    fn custom_quantities(&self) -> impl Iterator<Item = (&str, f64)> {
        let list = self.extra.as_ref().map_or(&[][..], |extra| &extra.custom_quantities[..]);
        list.iter().map(|quantity| (quantity.name.as_str(), quantity.value))
    }
    #[inline]
    fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        let list = self.extra.as_ref().map_or(&[][..], |extra| &extra.metadata[..]);
        list.iter().map(|entry| (entry.key.as_str(), entry.value.as_str()))
    }
    #[inline]
    fn tags(&self) -> impl ExactSizeIterator<Item = &str> {
        let list = self.extra.as_ref().map_or(&[][..], |extra| &extra.tags[..]);
        list.iter().map(String::as_str)
    }
    #[inline]
    fn custom_quantity_count(&self) -> usize {
        self.extra.as_ref().map_or(0, |extra| extra.custom_quantities.len())
    }
}

impl ArchivedEvent {
    #[inline]
    fn extra(&self) -> Option<&ArchivedExtra> {
        self.extra.as_ref().map(|extra| extra.get())
    }
}

impl EventFields for ArchivedEvent {
    #[inline]
    fn event_id(&self) -> [u8; 16] {
        self.event_id
    }
    #[inline]
    fn timestamp_us(&self) -> i64 {
        self.timestamp_us.to_native()
    }
    #[inline]
    fn user_id(&self) -> &str {
        &self.user_id
    }
    #[inline]
    fn service_type(&self) -> &str {
        &self.service_type
    }
    #[inline]
    fn service_provider(&self) -> &str {
        &self.service_provider
    }
    #[inline]
    fn event_type(&self) -> &str {
        &self.event_type
    }
    #[inline]
    fn model(&self) -> Option<&str> {
        self.model.as_ref().map(|model| model.as_str())
    }
    #[inline]
    fn is_error(&self) -> bool {
        self.status == ArchivedStatus::Error
    }
    #[inline]
    fn latency_ms(&self) -> Option<f64> {
        self.latency_ms.as_ref().map(|latency| latency.to_native())
    }
    #[inline]
    fn quantities(&self) -> impl Iterator<Item = (QuantityKind, f64)> {
        self.quantities.iter().map(|quantity| (quantity.kind.to_native(), quantity.value.to_native()))
    }
    #[inline]
    fn error_code(&self) -> Option<&str> {
        self.extra()?.error_code.as_ref().map(|code| code.as_str())
    }
    #[inline]
    fn session_id(&self) -> Option<&str> {
        self.extra()?.session_id.as_ref().map(|id| id.as_str())
    }
    #[inline]
    fn request_id(&self) -> Option<&str> {
        self.extra()?.request_id.as_ref().map(|id| id.as_str())
    }
    #[inline]
    fn custom_quantities(&self) -> impl Iterator<Item = (&str, f64)> {
        let list = self.extra().map_or(&[][..], |extra| &extra.custom_quantities[..]);
        list.iter().map(|quantity| (quantity.name.as_str(), quantity.value.to_native()))
    }
    #[inline]
    fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        let list = self.extra().map_or(&[][..], |extra| &extra.metadata[..]);
        list.iter().map(|entry| (entry.key.as_str(), entry.value.as_str()))
    }
    #[inline]
    fn tags(&self) -> impl ExactSizeIterator<Item = &str> {
        let list = self.extra().map_or(&[][..], |extra| &extra.tags[..]);
        list.iter().map(|tag| tag.as_str())
    }
    #[inline]
    fn custom_quantity_count(&self) -> usize {
        self.extra().map_or(0, |extra| extra.custom_quantities.len())
    }
}

/// Checks every rule of the protocol that one event must satisfy, owned or archived.
pub fn validate(event: &impl EventFields) -> Result<(), EventError> {
    if event.event_id() == [0; 16] {
        return Err(EventError::new("event_id", "must not be the nil uuid"));
    }
    let timestamp_us = event.timestamp_us();
    if !(TIMESTAMP_US_MIN..TIMESTAMP_US_MAX).contains(&timestamp_us) {
        return Err(EventError::new("timestamp", "must be between 2000-01-01 and 2100-01-01 UTC"));
    }
    text("user_id", event.user_id(), 1, USER_ID_BYTES_MAX)?;
    name("service_type", event.service_type())?;
    name("service_provider", event.service_provider())?;
    name("event_type", event.event_type())?;
    optional_text("model", event.model())?;
    if let Some(latency_ms) = event.latency_ms()
        && !(latency_ms.is_finite() && (0.0..=f64::from(LATENCY_US_MAX) / 1000.0).contains(&latency_ms))
    {
        return Err(EventError::new("latency_ms", "must be a finite number from 0 to 3600000"));
    }
    let mut seen = 0u16;
    for (kind, value) in event.quantities() {
        if seen & kind.bit() != 0 {
            return Err(EventError::new(kind.as_str(), "appears more than once"));
        }
        seen |= kind.bit();
        quantity_value(kind.as_str(), value)?;
    }
    if event.error_code().is_some() && !event.is_error() {
        return Err(EventError::new("error_code", "is only allowed on events whose status is error"));
    }
    optional_text("error_code", event.error_code())?;
    optional_text("session_id", event.session_id())?;
    optional_text("request_id", event.request_id())?;
    validate_custom_quantities(event, seen)?;
    validate_metadata_and_tags(event)
}

#[inline]
fn validate_custom_quantities(event: &impl EventFields, well_known: u16) -> Result<(), EventError> {
    let total = well_known.count_ones() as usize + event.custom_quantity_count();
    if total > QUANTITIES_MAX {
        return Err(EventError::new("quantities", format!("has {total} entries, at most {QUANTITIES_MAX}")));
    }
    for (index, (name, value)) in event.custom_quantities().enumerate() {
        let field = || format!("custom_quantities[{index}]");
        if name.is_empty() || name.len() > NAME_BYTES_MAX || !is_identifier(name) {
            return Err(EventError::new(
                field(),
                format!("name must be 1 to {NAME_BYTES_MAX} bytes of a-z, 0-9 and _"),
            ));
        }
        if QuantityKind::from_name(name).is_some() {
            return Err(EventError::new(field(), format!("{name} is well known: send it as a quantity")));
        }
        if event.custom_quantities().take(index).any(|(earlier, _)| earlier == name) {
            return Err(EventError::new(field(), format!("{name} appears more than once")));
        }
        quantity_value(name, value)?;
    }
    Ok(())
}

#[inline]
fn validate_metadata_and_tags(event: &impl EventFields) -> Result<(), EventError> {
    let metadata = event.metadata();
    if metadata.len() > METADATA_ENTRIES_MAX {
        let reason = format!("has {} entries, at most {METADATA_ENTRIES_MAX}", metadata.len());
        return Err(EventError::new("metadata", reason));
    }
    for (index, (key, value)) in metadata.enumerate() {
        text(format_args!("metadata[{index}].key"), key, 1, METADATA_KEY_BYTES_MAX)?;
        text(format_args!("metadata[{index}].value"), value, 0, METADATA_VALUE_BYTES_MAX)?;
        if event.metadata().take(index).any(|(earlier, _)| earlier == key) {
            return Err(EventError::new(
                format!("metadata[{index}].key"),
                format!("{key} appears more than once"),
            ));
        }
    }
    let tags = event.tags();
    if tags.len() > TAGS_MAX {
        return Err(EventError::new("tags", format!("has {} entries, at most {TAGS_MAX}", tags.len())));
    }
    for (index, tag) in tags.enumerate() {
        text(format_args!("tags[{index}]"), tag, 1, TAG_BYTES_MAX)?;
    }
    Ok(())
}

#[inline]
fn quantity_value(field: &str, value: f64) -> Result<(), EventError> {
    if value.is_finite() && (0.0..=QUANTITY_VALUE_MAX).contains(&value) {
        return Ok(());
    }
    Err(quantity_value_error(field, value))
}

#[inline]
fn text(field: impl std::fmt::Display, value: &str, min: usize, max: usize) -> Result<(), EventError> {
    if value.len() < min || value.len() > max || has_control(value) {
        return Err(text_error(field.to_string(), value, min, max));
    }
    Ok(())
}

#[inline]
fn optional_text(field: &str, value: Option<&str>) -> Result<(), EventError> {
    value.map_or(Ok(()), |value| text(field, value, 1, IDENT_BYTES_MAX))
}

#[inline]
fn name(field: &str, value: &str) -> Result<(), EventError> {
    if value.is_empty() || value.len() > NAME_BYTES_MAX || !is_name(value) {
        return Err(name_error(field, value));
    }
    Ok(())
}

// The errors are built out of line, so the checks above stay small enough to inline into
// `validate`: it runs for every event the server receives.

#[cold]
#[inline(never)]
fn quantity_value_error(field: &str, value: f64) -> EventError {
    EventError::new(field, format!("must be a finite number from 0 to 2^53, got {value}"))
}

#[cold]
#[inline(never)]
fn text_error(field: String, value: &str, min: usize, max: usize) -> EventError {
    if value.len() < min || value.len() > max {
        let reason = format!("must be {min} to {max} bytes, got {}", value.len());
        return EventError::new(field, reason);
    }
    EventError::new(field, "must not contain control characters")
}

#[cold]
#[inline(never)]
fn name_error(field: &str, value: &str) -> EventError {
    // The reason goes back to the client in a `Rejection` (at most TEXT_BYTES_MAX bytes):
    // echo the value only when it is short.
    let got = match value.len() {
        len if len > NAME_BYTES_MAX => format!("{len} bytes"),
        _ => format!("{value:?}"),
    };
    let reason = format!("must be 1 to {NAME_BYTES_MAX} bytes of a-z, A-Z, 0-9, _ . : -, got {got}");
    EventError::new(field, reason)
}

/// Whether `value` holds a control character (`char::is_control`: U+0000-U+001F, U+007F-U+009F).
/// Hot: every text field of every event. The byte scan has no early exit, so it vectorises; it
/// flags every string with a C0 control, DEL or a 0xC2 lead byte (which starts U+0080-U+009F, and
/// also U+00A0-U+00BF), and only those get the exact check, by `char`. (Measured: faster here than
/// a scan by u64 words.)
#[inline]
fn has_control(value: &str) -> bool {
    let suspect =
        value.bytes().fold(false, |suspect, byte| suspect | (byte < 0x20) | (byte == 0x7f) | (byte == 0xc2));
    suspect && value.chars().any(char::is_control)
}

/// Whether every byte is one of `A-Z a-z 0-9 _ . : -`: a table lookup per byte, no branches
/// (measured faster than `all` or than range comparisons).
#[inline]
fn is_name(value: &str) -> bool {
    value.bytes().fold(true, |valid, byte| valid & NAME_BYTES[usize::from(byte)])
}

/// Whether every byte is one of `a-z 0-9 _`.
#[inline]
fn is_identifier(value: &str) -> bool {
    value.bytes().fold(true, |valid, byte| valid & IDENTIFIER_BYTES[usize::from(byte)])
}

/// Bytes allowed in a name, by value.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
        byte += 1;
    }
    table
};

/// Bytes allowed in an identifier (a custom quantity's name), by value.
const IDENTIFIER_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        byte += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_control_agrees_with_char_is_control() {
        // Every char alone, after and before other text, and in a string that takes the exact
        // path anyway (0xC2); Latin chars at every offset of a vectorised scan.
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            for text in
                [c.to_string(), format!("abcdefg{c}"), format!("ab{c}\u{e9}defghijkl"), format!("\u{a5}{c}")]
            {
                assert_eq!(has_control(&text), c.is_control(), "{c:?} in {text:?}");
            }
        }
        let latin = (0..=0x2ffu32).filter_map(char::from_u32);
        for c in latin {
            for before in 0..20 {
                let text = format!("{}{c}{}", "x".repeat(before), "\u{e9}".repeat(before % 3));
                assert_eq!(has_control(&text), c.is_control(), "{c:?} in {text:?}");
            }
        }
        assert!(!has_control("") && !has_control("user-000123") && !has_control("\u{a0}\u{bf}\u{100}"));
    }

    #[test]
    fn name_and_identifier_bytes_are_exactly_their_alphabets() {
        let name_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-";
        let identifier_alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_";
        for byte in 0..=u8::MAX {
            assert_eq!(NAME_BYTES[usize::from(byte)], name_alphabet.as_bytes().contains(&byte), "{byte}");
            assert_eq!(IDENTIFIER_BYTES[usize::from(byte)], identifier_alphabet.as_bytes().contains(&byte));
        }
        assert!(is_name(name_alphabet) && !is_name("a b") && !is_name("\u{e9}"));
        assert!(is_identifier(identifier_alphabet) && !is_identifier("Images") && !is_identifier("a-b"));
    }
}
