//! The price book: a tenant's rules indexed for fast matching, and per-event pricing.

use std::cmp::Reverse;
use std::collections::HashMap;

use rust_decimal::Decimal;
use uuid::Uuid;
use wire::{Event, QuantityKind};

use crate::error::{EventPriceError, PricingError};
use crate::rule::{PriceRule, RuleSource};
use crate::unit::{Unit, UnitRef};
use crate::{COST_DECIMAL_PLACES, EVENT_COST_MAX, RULES_MAX, quantity_decimal};

/// A tenant's rules (its own and the catalog's), validated and indexed by service type, unit and
/// model. Built once and shared; pricing only reads it.
#[derive(Debug, Clone)]
pub struct PriceBook {
    rules: Vec<PriceRule>,
    by_id: HashMap<Uuid, u32>,
    services: HashMap<String, ServiceRules>,
    /// What [`PriceBook::lenient`] left out or decided; empty for a book built by
    /// [`PriceBook::new`].
    problems: Vec<PricingError>,
}

/// What one event costs and which rules priced it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventPrice {
    /// Sum of the per-event parts; `None` iff no unit of the event matched any rule.
    pub cost: Option<Decimal>,
    /// Every winning rule, one per matched unit, per-event and period rules alike.
    pub rule_ids: Vec<Uuid>,
    /// Per-event rules and their part of `cost`, each rounded to [`COST_DECIMAL_PLACES`]; the
    /// parts add up to `cost` exactly.
    pub rule_costs: Vec<(Uuid, Decimal)>,
    /// Period rules (graduated, volume) and the units of this event they will bill per period.
    pub period_units: Vec<(Uuid, Decimal)>,
}

/// The rules of one service type, by unit.
#[derive(Debug, Clone, Default)]
struct ServiceRules {
    well_known: [UnitRules; QuantityKind::ALL.len()],
    events: UnitRules,
    custom: HashMap<String, UnitRules>,
}

/// The rules of one service type and unit, each list in order of precedence: the first rule
/// that matches an event wins.
#[derive(Debug, Clone, Default)]
struct UnitRules {
    /// Rules naming a model, by model. Any of them beats every rule in `any_model`.
    by_model: HashMap<String, Vec<u32>>,
    any_model: Vec<u32>,
}

/// The event fields a rule is matched on.
#[derive(Debug, Clone, Copy)]
struct Subject<'a> {
    provider: &'a str,
    model: Option<&'a str>,
    event_type: &'a str,
    timestamp_us: i64,
}

impl PriceBook {
    /// Validates every rule and indexes them. Refuses more than [`RULES_MAX`] rules, duplicate ids
    /// and rules that tie: same service type, unit, provider, model, event type, source and
    /// `effective_from_us`, so they would match the same events and neither could win.
    pub fn new(rules: Vec<PriceRule>) -> Result<PriceBook, PricingError> {
        if rules.len() > RULES_MAX {
            return Err(PricingError::TooManyRules { count: rules.len(), max: RULES_MAX });
        }
        let mut ids = std::collections::HashSet::with_capacity(rules.len());
        for rule in &rules {
            rule.validate()?;
            if !ids.insert(rule.id) {
                return Err(PricingError::DuplicateRuleId { rule_id: rule.id });
            }
        }
        let mut problems = Vec::new();
        let book = PriceBook::index(rules, Ties::Refuse, &mut problems)?;
        Ok(book)
    }

    /// A book that is always usable, for rules already stored: an invalid rule, a repeated id or
    /// rules past [`RULES_MAX`] are left out, and of rules that tie the one with the greater id
    /// wins (ids are UUIDv7, so the newer rule). Everything left out or decided so is in
    /// [`PriceBook::problems`], for the tenant's admin to see and repair. The edge and the query
    /// service both build books this way, so they price alike even then.
    pub fn lenient(rules: Vec<PriceRule>) -> PriceBook {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(rules.len());
        let mut kept = Vec::with_capacity(rules.len().min(RULES_MAX));
        for rule in rules {
            if kept.len() == RULES_MAX {
                problems.push(PricingError::TooManyRules { count: kept.len() + 1, max: RULES_MAX });
                break;
            }
            if let Err(error) = rule.validate() {
                problems.push(error);
            } else if !seen.insert(rule.id) {
                problems.push(PricingError::DuplicateRuleId { rule_id: rule.id });
            } else {
                kept.push(rule);
            }
        }
        match PriceBook::index(kept, Ties::NewerWins, &mut problems) {
            Ok(book) => book,
            // Unreachable: only `Ties::Refuse` fails.
            Err(error) => PriceBook {
                rules: Vec::new(),
                by_id: HashMap::new(),
                services: HashMap::new(),
                problems: vec![error],
            },
        }
    }

    /// What [`PriceBook::lenient`] left out, and ties it decided.
    pub fn problems(&self) -> &[PricingError] {
        &self.problems
    }

    fn index(
        rules: Vec<PriceRule>,
        ties: Ties,
        problems: &mut Vec<PricingError>,
    ) -> Result<PriceBook, PricingError> {
        let mut by_id = HashMap::with_capacity(rules.len());
        for (index, rule) in rules.iter().enumerate() {
            by_id.insert(rule.id, index as u32);
        }
        let mut services: HashMap<String, ServiceRules> = HashMap::new();
        for (index, rule) in rules.iter().enumerate() {
            let service = services.entry(rule.service_type.clone()).or_default();
            let unit_rules = match &rule.unit {
                Unit::Quantity(kind) => &mut service.well_known[*kind as usize],
                Unit::Events => &mut service.events,
                Unit::Custom(name) => service.custom.entry(name.clone()).or_default(),
            };
            match &rule.model {
                Some(model) => unit_rules.by_model.entry(model.clone()).or_default().push(index as u32),
                None => unit_rules.any_model.push(index as u32),
            }
        }
        for service in services.values_mut() {
            let custom = service.custom.values_mut();
            for unit_rules in service.well_known.iter_mut().chain([&mut service.events]).chain(custom) {
                for list in unit_rules.by_model.values_mut().chain([&mut unit_rules.any_model]) {
                    order_by_precedence(&rules, list, ties, problems)?;
                }
            }
        }
        Ok(PriceBook { rules, by_id, services, problems: std::mem::take(problems) })
    }

    /// Every rule, in the order given to [`PriceBook::new`].
    pub fn rules(&self) -> &[PriceRule] {
        &self.rules
    }

    /// The rule with this id.
    pub fn rule(&self, rule_id: Uuid) -> Option<&PriceRule> {
        self.by_id.get(&rule_id).map(|&index| &self.rules[index as usize])
    }

    /// The rule that prices this unit of events with these fields at this time, if any. The query
    /// service calls it per rollup row and unit with the row's hour: rule bounds are on whole
    /// hours, so the winner at the hour's start is the winner for every event in the hour. An
    /// empty model is no model.
    pub fn winning_rule(
        &self,
        service_type: &str,
        service_provider: &str,
        model: Option<&str>,
        event_type: &str,
        unit: UnitRef<'_>,
        timestamp_us: i64,
    ) -> Option<&PriceRule> {
        let model = model.filter(|model| !model.is_empty());
        let subject = Subject { provider: service_provider, model, event_type, timestamp_us };
        let service = self.services.get(service_type)?;
        self.winner(service, unit, &subject).map(|index| &self.rules[index as usize])
    }

    /// Prices one validated event: every well-known quantity it carries, every custom quantity and
    /// `events` = 1. Allocates only for the result's lists; [`PriceBook::price_event_into`]
    /// reuses them. Fails, for this event alone, if its cost would exceed [`EVENT_COST_MAX`].
    pub fn price_event(&self, event: &Event) -> Result<EventPrice, EventPriceError> {
        let mut price = EventPrice::default();
        self.price_event_into(event, &mut price)?;
        Ok(price)
    }

    /// [`PriceBook::price_event`] into a price whose lists are cleared and reused, so pricing a
    /// stream of events allocates nothing once the lists have grown.
    pub fn price_event_into(&self, event: &Event, price: &mut EventPrice) -> Result<(), EventPriceError> {
        price.clear();
        let Some(service) = self.services.get(event.service_type.as_str()) else {
            return Ok(());
        };
        let subject = Subject {
            provider: &event.service_provider,
            model: event.model.as_deref().filter(|model| !model.is_empty()),
            event_type: &event.event_type,
            timestamp_us: event.timestamp_us,
        };
        for quantity in &event.quantities {
            let unit = UnitRef::Quantity(quantity.kind);
            if let Some(index) = self.winner(service, unit, &subject) {
                price.add(&self.rules[index as usize], quantity_decimal(quantity.value))?;
            }
        }
        if let Some(extra) = &event.extra {
            for quantity in &extra.custom_quantities {
                let unit = UnitRef::Custom(&quantity.name);
                if let Some(index) = self.winner(service, unit, &subject) {
                    price.add(&self.rules[index as usize], quantity_decimal(quantity.value))?;
                }
            }
        }
        if let Some(index) = self.winner(service, UnitRef::Events, &subject) {
            price.add(&self.rules[index as usize], Decimal::ONE)?;
        }
        Ok(())
    }

    fn winner(&self, service: &ServiceRules, unit: UnitRef<'_>, subject: &Subject<'_>) -> Option<u32> {
        let unit_rules = match unit {
            UnitRef::Quantity(kind) => &service.well_known[kind as usize],
            UnitRef::Events => &service.events,
            UnitRef::Custom(name) => service.custom.get(name)?,
        };
        let model_rules = subject.model.and_then(|model| unit_rules.by_model.get(model));
        let first_match = |list: &[u32]| {
            list.iter().copied().find(|&index| {
                let rule = &self.rules[index as usize];
                rule.matches(subject.provider, subject.model, subject.event_type, subject.timestamp_us)
            })
        };
        model_rules.and_then(|list| first_match(list)).or_else(|| first_match(&unit_rules.any_model))
    }
}

impl EventPrice {
    /// Empties the price, keeping the lists' capacity.
    pub fn clear(&mut self) {
        self.cost = None;
        self.rule_ids.clear();
        self.rule_costs.clear();
        self.period_units.clear();
    }

    /// Adds one rule's part. The running cost never passes [`EVENT_COST_MAX`], so the sum of the
    /// parts cannot overflow either.
    fn add(&mut self, rule: &PriceRule, units: Decimal) -> Result<(), EventPriceError> {
        let too_large = || EventPriceError::CostTooLarge { rule_id: rule.id, max: EVENT_COST_MAX };
        self.rule_ids.push(rule.id);
        let cost = self.cost.get_or_insert(Decimal::ZERO);
        match rule.method.event_charge(units).map_err(|_| too_large())? {
            Some(charge) => {
                let part = charge.round_dp(COST_DECIMAL_PLACES).normalize();
                let total =
                    cost.checked_add(part).filter(|total| *total <= EVENT_COST_MAX).ok_or_else(too_large)?;
                *cost = total;
                self.rule_costs.push((rule.id, part));
            }
            None => self.period_units.push((rule.id, units)),
        }
        Ok(())
    }
}

/// What to do with two rules that tie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ties {
    Refuse,
    /// The greater id first; the tie is recorded as a problem.
    NewerWins,
}

/// Sorts one list of rules (same service type, unit and model-or-not) so the winner comes first,
/// and refuses two rules that tie (or, leniently, puts the newer first). Rules that are equal in
/// precedence are ordered by provider and event type, so rules that tie are neighbours.
fn order_by_precedence(
    rules: &[PriceRule],
    list: &mut [u32],
    ties: Ties,
    problems: &mut Vec<PricingError>,
) -> Result<(), PricingError> {
    let key = |index: &u32| {
        let rule = &rules[*index as usize];
        let (_, event_type_given, provider_given) = rule.specificity();
        let source_rank = match rule.source {
            RuleSource::Tenant => 0,
            RuleSource::Catalog => 1,
        };
        let fields = (rule.model.as_deref(), rule.service_provider.as_deref(), rule.event_type.as_deref());
        (
            Reverse(event_type_given),
            Reverse(provider_given),
            source_rank,
            Reverse(rule.effective_from_us),
            fields,
        )
    };
    match ties {
        Ties::Refuse => list.sort_by_key(key),
        Ties::NewerWins => list.sort_by_key(|index| (key(index), Reverse(rules[*index as usize].id))),
    }
    for pair in list.windows(2) {
        if key(&pair[0]) == key(&pair[1]) {
            let (first, second) = (rules[pair[0] as usize].id, rules[pair[1] as usize].id);
            match ties {
                Ties::Refuse => return Err(PricingError::AmbiguousRules { first, second }),
                Ties::NewerWins => problems.push(PricingError::AmbiguousRules { first, second }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
