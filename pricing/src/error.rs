//! Why a rule or a price book was refused.

use rust_decimal::Decimal;
use uuid::Uuid;

/// Errors building a price book or billing a period.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PricingError {
    /// One rule breaks a rule of the model; the message says which and how.
    #[error("price rule {rule_id}: {problem}")]
    InvalidRule { rule_id: Uuid, problem: RuleError },
    /// Two rules would match the same events with the same specificity, source and
    /// `effective_from`, so neither can win.
    #[error(
        "price rules {first} and {second} are ambiguous: they price the same unit of the same events \
         with the same specificity, source and effective_from"
    )]
    AmbiguousRules { first: Uuid, second: Uuid },
    /// Two rules share an id.
    #[error("price rule id {rule_id} appears more than once")]
    DuplicateRuleId { rule_id: Uuid },
    /// More rules than one book may hold.
    #[error("{count} price rules, at most {max} in one price book")]
    TooManyRules { count: usize, max: usize },
    /// Usage names a rule the price book does not hold.
    #[error("price rule {rule_id} is not in the price book")]
    UnknownRule { rule_id: Uuid },
    /// A charge or sum of the bill is past what an exact decimal holds.
    #[error("a charge of price rule {rule_id} is out of range: {source}")]
    Overflow { rule_id: Uuid, source: MoneyOverflow },
}

/// An amount of money past what an exact decimal holds (about 7.9 × 10^28). Every sum and
/// product of money is checked; none saturates or wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("amount out of range")]
pub struct MoneyOverflow;

/// Why one event cannot be priced. The event is refused alone; nothing else is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventPriceError {
    /// Its cost is above [`crate::EVENT_COST_MAX`], or a part of it out of range.
    #[error("is above the largest cost of one event ({max}) under price rule {rule_id}")]
    CostTooLarge { rule_id: Uuid, max: Decimal },
}

/// What is wrong with one rule or method.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error("{field} must not be empty")]
    EmptyField { field: &'static str },
    #[error("unit {name:?} is not a quantity name: use 1 to 64 bytes of a-z, 0-9 and _")]
    InvalidUnit { name: String },
    #[error("{field} must not be negative, got {value}")]
    NegativeAmount { field: String, value: Decimal },
    #[error("{field} is {value}, above the largest allowed {max}")]
    AmountTooLarge { field: String, value: Decimal, max: Decimal },
    #[error("package size must be above 0, got {size}")]
    PackageSizeNotPositive { size: Decimal },
    #[error("package size is {size}, it must be from {min} to {max}")]
    PackageSizeOutOfRange { size: Decimal, min: Decimal, max: Decimal },
    #[error("tiers must not be empty")]
    EmptyTiers,
    #[error("{count} tiers, at most {max}")]
    TooManyTiers { count: usize, max: usize },
    #[error("tiers[{index}].up_to is {up_to}, it must be above {previous}")]
    TiersNotIncreasing { index: usize, up_to: Decimal, previous: Decimal },
    #[error("tiers[{index}] has no up_to but only the last tier may be unbounded")]
    UnboundedTierNotLast { index: usize },
    #[error("the last tier must have no up_to (it holds every unit above the tier before), got {up_to}")]
    LastTierBounded { up_to: Decimal },
    #[error("{field} must be on a whole UTC hour (a multiple of 3600000000 microseconds), got {value_us}")]
    NotOnHour { field: &'static str, value_us: i64 },
    #[error("{field} must be from 1970-01-01 up to the year 10000, got {value_us} microseconds")]
    OutOfRange { field: &'static str, value_us: i64 },
    #[error("effective_until ({until_us}) must be after effective_from ({from_us})")]
    EmptyEffectiveRange { from_us: i64, until_us: i64 },
    #[error("{field} is not an RFC 3339 timestamp: {value:?}")]
    InvalidTimestamp { field: &'static str, value: String },
}
