//! The row the sink stores: an event with its tenant, exact quantities and cost.

use rust_decimal::Decimal;
use uuid::Uuid;
use wire::{Event, QuantityKind, Status};

/// Decimal places kept of a quantity. Finer digits are rounded half to even at ingest, so that
/// raw rows and rollups hold the very same exact decimals.
pub const QUANTITY_DECIMAL_PLACES: u32 = pricing::QUANTITY_DECIMAL_PLACES;

/// Number of well-known quantity kinds, the columns of the events and rollup tables.
pub const QUANTITY_KINDS: usize = QuantityKind::ALL.len();

/// One event, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub tenant_id: Uuid,
    pub event: Event,
    /// Well-known quantities as exact decimals, indexed by `QuantityKind as usize`.
    pub quantities: [Option<Decimal>; QUANTITY_KINDS],
    /// Custom quantities as exact decimals, in the event's order.
    pub custom_quantities: Vec<(String, Decimal)>,
    /// Latency rounded to whole microseconds.
    pub latency_us: Option<i64>,
    /// Price of this event alone; `None` when no rule priced it (stored as NULL, never as 0).
    pub cost: Option<Decimal>,
    /// The price rule versions that priced it, one per priced unit.
    pub price_rule_ids: Vec<Uuid>,
    /// Bit flags, see [`FLAG_OVER_QUOTA`].
    pub flags: i16,
}

/// Flag: stored while the tenant was over a monthly quota whose policy is `flag`.
pub const FLAG_OVER_QUOTA: i16 = 1;

impl EventRow {
    /// Converts a validated event. Quantities become exact decimals here, once.
    pub fn new(tenant_id: Uuid, mut event: Event, cost: Option<Decimal>) -> EventRow {
        let mut quantities = [None; QUANTITY_KINDS];
        for quantity in &event.quantities {
            quantities[quantity.kind as usize] = Some(quantity_decimal(quantity.value));
        }
        let custom_quantities = match event.extra.as_mut() {
            Some(extra) => std::mem::take(&mut extra.custom_quantities)
                .into_iter()
                .map(|quantity| (quantity.name, quantity_decimal(quantity.value)))
                .collect(),
            None => Vec::new(),
        };
        let latency_us = event.latency_ms.map(|latency_ms| (latency_ms * 1000.0).round() as i64);
        EventRow {
            tenant_id,
            event,
            quantities,
            custom_quantities,
            latency_us,
            cost,
            price_rule_ids: Vec::new(),
            flags: 0,
        }
    }

    pub fn is_error(&self) -> bool {
        self.event.status == Status::Error
    }

    /// The deduplication key: tenant, event id, timestamp.
    pub fn dedup_key(&self) -> (Uuid, [u8; 16], i64) {
        (self.tenant_id, self.event.event_id, self.event.timestamp_us)
    }

    /// Rough in-memory size, for batch byte limits.
    pub fn approximate_bytes(&self) -> usize {
        let event = &self.event;
        let text = event.user_id.len()
            + event.service_type.len()
            + event.service_provider.len()
            + event.event_type.len()
            + event.model.as_ref().map_or(0, String::len);
        let extra = event.extra.as_ref().map_or(0, |extra| {
            extra.metadata.iter().map(|entry| entry.key.len() + entry.value.len() + 48).sum::<usize>()
                + extra.tags.iter().map(|tag| tag.len() + 24).sum::<usize>()
                + 128
        });
        std::mem::size_of::<EventRow>() + text + extra + self.custom_quantities.len() * 48
    }
}

/// What became of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Newly stored, counted in the rollups.
    Stored,
    /// The same tenant, event id and timestamp were stored before; nothing changed.
    Duplicate,
    /// Spilled to the overflow (storage was unavailable or the queue full); it will be stored,
    /// or found a duplicate, when the overflow drains.
    Spilled,
    /// The database refused this row alone (it was isolated from the rest of its batch, which
    /// was stored); nothing of it was stored.
    Rejected,
}

/// The exact decimal for a quantity that passed validation; the pricing crate owns the rule so
/// that prices and stored quantities can never disagree.
pub use pricing::quantity_decimal;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_become_exact_decimals() {
        assert_eq!(quantity_decimal(150.0).to_string(), "150");
        assert_eq!(quantity_decimal(0.1).to_string(), "0.1");
        assert_eq!(quantity_decimal(0.25).to_string(), "0.25");
        assert_eq!(quantity_decimal(1.0000004).to_string(), "1");
        assert_eq!(quantity_decimal(9_007_199_254_740_992.0).to_string(), "9007199254740992");
    }
}
