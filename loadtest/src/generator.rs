//! The event generator: a seeded mix of the older system's traffic (LLM calls, document processing,
//! API requests, custom events), deliberate resends and deliberately invalid events.
//!
//! Everything random comes from one `SmallRng` per stream, seeded from the run's seed and the
//! stream's number, so a run's plan (which events are resends or invalid, the mix, the values) is
//! the same every time; only timestamps follow the clock.

use std::collections::VecDeque;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use wire::{Event, QuantityKind};

/// The share of each kind of traffic, in parts (they need not add up to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub llm: u32,
    pub document: u32,
    pub api: u32,
    pub custom: u32,
}

impl Default for Mix {
    /// Roughly the older system's traffic: half LLM calls, a quarter API requests.
    fn default() -> Self {
        Mix { llm: 50, document: 15, api: 25, custom: 10 }
    }
}

impl Mix {
    /// Parses `llm=50,document=15,api=25,custom=10`; kinds not named get 0.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut mix = Mix { llm: 0, document: 0, api: 0, custom: 0 };
        for part in text.split(',').map(str::trim).filter(|part| !part.is_empty()) {
            let (name, parts) = part.split_once('=').ok_or_else(|| format!("{part:?} is not kind=parts"))?;
            let parts: u32 = parts.trim().parse().map_err(|_| format!("{parts:?} is not a whole number"))?;
            let slot = match name.trim() {
                "llm" => &mut mix.llm,
                "document" => &mut mix.document,
                "api" => &mut mix.api,
                "custom" => &mut mix.custom,
                other => return Err(format!("unknown kind {other:?}: use llm, document, api, custom")),
            };
            *slot = parts;
        }
        if mix.total() == 0 {
            return Err("the mix is empty: give at least one kind a share".to_owned());
        }
        Ok(mix)
    }

    fn total(&self) -> u32 {
        self.llm + self.document + self.api + self.custom
    }

    fn pick(&self, roll: u32) -> Kind {
        let mut roll = roll % self.total();
        for (kind, parts) in [(Kind::Llm, self.llm), (Kind::Document, self.document), (Kind::Api, self.api)] {
            if roll < parts {
                return kind;
            }
            roll -= parts;
        }
        Kind::Custom
    }
}

/// Settings shared by every stream of a run.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub seed: u64,
    /// Distinct `user_id`s per tenant.
    pub users: u32,
    /// Distinct LLM models.
    pub models: u32,
    /// Share of events that repeat an earlier event of the same stream (same id and timestamp).
    pub resend_fraction: f64,
    /// Share of events that break a rule and must be rejected.
    pub invalid_fraction: f64,
    pub mix: Mix,
    /// Events are dated up to this long before now.
    pub event_age_max_us: i64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 1,
            users: 1000,
            models: 4,
            resend_fraction: 0.0,
            invalid_fraction: 0.0,
            mix: Mix::default(),
            event_age_max_us: 60_000_000,
        }
    }
}

/// Which traffic an event imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Llm,
    Document,
    Api,
    Custom,
}

/// What the server must do with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plan {
    /// New: stored once.
    Fresh,
    /// A copy of an earlier event of this stream: a duplicate, never stored twice.
    Resend,
    /// Breaks a rule: rejected, never stored.
    Invalid,
}

/// Events to send together, with what is expected of each.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub plans: Vec<Plan>,
    pub kinds: Vec<Kind>,
}

/// LLM models and their providers; beyond this list, `model-N` of `selfhosted`.
const MODELS: &[(&str, &str)] = &[
    ("gpt-4o", "openai"),
    ("claude-3-5-sonnet", "anthropic"),
    ("gpt-4o-mini", "openai"),
    ("gemini-1.5-pro", "google"),
    ("claude-3-haiku", "anthropic"),
    ("llama-3.1-70b", "meta"),
    ("mistral-large", "mistral"),
    ("o1-mini", "openai"),
];
const DOCUMENT_PROVIDERS: &[&str] = &["textract", "docai", "azure_form"];
const DOCUMENT_TYPES: &[&str] = &["invoice", "receipt", "contract", "id_card", "bank_statement"];
const PROCESSING_TYPES: &[&str] = &["ocr", "extraction", "classification"];
const API_PROVIDERS: &[&str] = &["internal", "stripe", "twilio"];
const ENDPOINTS: &[&str] = &["/v1/search", "/v1/users", "/v1/orders", "/v1/payments", "/v1/reports"];
const METHODS: &[&str] = &["GET", "GET", "GET", "POST", "PUT", "DELETE"];
const API_ERRORS: &[(&str, &str)] =
    &[("500", "internal_error"), ("503", "unavailable"), ("429", "rate_limited")];
const LLM_ERRORS: &[&str] = &["rate_limit_exceeded", "context_length_exceeded", "timeout"];
/// Custom events: event type and the custom quantity it carries.
const CUSTOM_EVENTS: &[(&str, &str)] =
    &[("image_generation", "images"), ("transcription", "audio_seconds"), ("fine_tuning", "gpu_seconds")];

/// How many earlier events a stream keeps to resend from.
const RESEND_POOL_EVENTS: usize = 1024;

/// One stream of events (one connection's), deterministic for a seed and stream number.
#[derive(Debug)]
pub struct Generator {
    rng: SmallRng,
    config: GeneratorConfig,
    users: Vec<String>,
    models: Vec<(String, String)>,
    /// Earlier valid events of this stream, resent from here.
    resend_pool: VecDeque<(Event, Kind)>,
}

impl Generator {
    /// The stream `stream` of a run; different streams draw different numbers.
    pub fn new(config: GeneratorConfig, stream: u64) -> Generator {
        let rng = SmallRng::seed_from_u64(mix_seed(config.seed, stream));
        let users = (0..config.users.max(1)).map(|index| format!("user-{index:06}")).collect();
        let models = (0..config.models.max(1) as usize)
            .map(|index| match MODELS.get(index) {
                Some((model, provider)) => ((*model).to_owned(), (*provider).to_owned()),
                None => (format!("model-{index}"), "selfhosted".to_owned()),
            })
            .collect();
        Generator { rng, config, users, models, resend_pool: VecDeque::new() }
    }

    /// The next `size` events, dated within `event_age_max_us` before `now_us`.
    pub fn batch(&mut self, size: usize, now_us: i64) -> Batch {
        let mut batch = Batch {
            events: Vec::with_capacity(size),
            plans: Vec::with_capacity(size),
            kinds: Vec::with_capacity(size),
        };
        for _ in 0..size {
            let roll: f64 = self.rng.random();
            let (event, plan, kind) = if roll < self.config.invalid_fraction {
                let (event, kind) = self.invalid(now_us);
                (event, Plan::Invalid, kind)
            } else if roll < self.config.invalid_fraction + self.config.resend_fraction
                && !self.resend_pool.is_empty()
            {
                let index = self.rng.random_range(0..self.resend_pool.len());
                let (event, kind) = self.resend_pool[index].clone();
                (event, Plan::Resend, kind)
            } else {
                let kind = self.config.mix.pick(self.rng.random());
                (self.fresh(kind, now_us), Plan::Fresh, kind)
            };
            batch.events.push(event);
            batch.plans.push(plan);
            batch.kinds.push(kind);
        }
        self.remember(&batch);
        batch
    }

    /// Keeps some of this batch's fresh events for later resends (never from the same batch, so
    /// a resend always follows its original).
    fn remember(&mut self, batch: &Batch) {
        if self.config.resend_fraction <= 0.0 {
            return;
        }
        let events = batch.events.iter().zip(&batch.kinds).zip(&batch.plans);
        let fresh = events.filter(|(_, plan)| **plan == Plan::Fresh);
        for ((event, kind), _) in fresh.step_by(4) {
            if self.resend_pool.len() == RESEND_POOL_EVENTS {
                self.resend_pool.pop_front();
            }
            self.resend_pool.push_back((event.clone(), *kind));
        }
    }

    fn fresh(&mut self, kind: Kind, now_us: i64) -> Event {
        match kind {
            Kind::Llm => self.llm(now_us),
            Kind::Document => self.document(now_us),
            Kind::Api => self.api(now_us),
            Kind::Custom => self.custom(now_us),
        }
    }

    /// A new event id (a UUIDv7 of the event's time) and timestamp, both from the seed.
    fn base(&mut self, now_us: i64, service_type: &str, provider: &str, event_type: &str) -> Event {
        let age_us = self.rng.random_range(0..self.config.event_age_max_us.max(1));
        let timestamp_us = now_us - age_us;
        let random: [u8; 10] = self.rng.random();
        let id = uuid::Builder::from_unix_timestamp_millis((timestamp_us / 1000) as u64, &random).into_uuid();
        let user = self.users[self.rng.random_range(0..self.users.len())].clone();
        Event::new(user, service_type, provider, event_type).with_id(id).at(timestamp_us)
    }

    /// A spread of sizes around `typical`: from about a third of it to about four times it.
    fn around(&mut self, typical: f64) -> f64 {
        (typical * self.rng.random_range(-1.0f64..1.4).exp()).round().max(1.0)
    }

    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[self.rng.random_range(0..items.len())]
    }

    fn llm(&mut self, now_us: i64) -> Event {
        let (model, provider) = self.models[self.rng.random_range(0..self.models.len())].clone();
        let event_type = if self.rng.random_bool(0.9) { "completion" } else { "embedding" };
        let input_tokens = self.around(600.0);
        let output_tokens = if event_type == "completion" { self.around(250.0) } else { 0.0 };
        let latency_ms = self.around(900.0) + f64::from(self.rng.random_range(0u32..1000)) / 1000.0;
        let mut event = self
            .base(now_us, "llm_service", &provider, event_type)
            .with_model(model)
            .with_quantity(QuantityKind::InputTokens, input_tokens)
            .with_quantity(QuantityKind::OutputTokens, output_tokens)
            .with_latency_ms(latency_ms);
        if self.rng.random_bool(0.2) {
            let cached = (input_tokens * self.rng.random_range(0.1..0.9)).round();
            event = event.with_quantity(QuantityKind::CachedInputTokens, cached);
        }
        if self.rng.random_bool(0.03) {
            let code = self.pick(LLM_ERRORS).to_owned();
            event = event.with_error(Some(code));
        }
        event
    }

    fn document(&mut self, now_us: i64) -> Event {
        let provider = self.pick(DOCUMENT_PROVIDERS);
        let document_type = self.pick(DOCUMENT_TYPES);
        let processing_type = self.pick(PROCESSING_TYPES);
        let pages = self.around(4.0);
        let bytes = (pages * self.around(90_000.0)).round();
        let latency_ms = self.around(1500.0);
        self.base(now_us, "document_processor", provider, "processing")
            .with_metadata("document_type", document_type)
            .with_metadata("processing_type", processing_type)
            .with_quantity(QuantityKind::Pages, pages)
            .with_quantity(QuantityKind::Bytes, bytes)
            .with_latency_ms(latency_ms)
    }

    fn api(&mut self, now_us: i64) -> Event {
        let provider = self.pick(API_PROVIDERS);
        let endpoint = self.pick(ENDPOINTS);
        let method = self.pick(METHODS);
        let latency_ms = self.around(40.0);
        let mut event = self
            .base(now_us, "api_service", provider, "request")
            .with_metadata("endpoint", endpoint)
            .with_metadata("method", method)
            .with_quantity(QuantityKind::Requests, 1.0)
            .with_latency_ms(latency_ms);
        if self.rng.random_bool(0.05) {
            let (status, code) = API_ERRORS[self.rng.random_range(0..API_ERRORS.len())];
            event = event.with_metadata("status_code", status).with_error(Some(code.to_owned()));
        }
        event
    }

    fn custom(&mut self, now_us: i64) -> Event {
        let (event_type, quantity) = CUSTOM_EVENTS[self.rng.random_range(0..CUSTOM_EVENTS.len())];
        let amount = self.around(3.0) + f64::from(self.rng.random_range(0u32..4)) * 0.25;
        self.base(now_us, "custom", "acme", event_type)
            .with_custom_quantity(quantity, amount)
            .with_latency_ms(self.around(2000.0))
    }

    /// An event the server must reject: a negative quantity or an LLM call without a model.
    fn invalid(&mut self, now_us: i64) -> (Event, Kind) {
        if self.rng.random_bool(0.5) {
            let mut event = self.llm(now_us);
            event.model = None;
            (event, Kind::Llm)
        } else {
            let mut event = self.document(now_us);
            event.quantities.retain(|quantity| quantity.kind != QuantityKind::Pages);
            event = event.with_quantity(QuantityKind::Pages, -self.around(3.0));
            (event, Kind::Document)
        }
    }
}

/// SplitMix64 of the seed and stream, so neighbouring streams get unrelated generators.
fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use wire::Status;

    use super::*;

    const NOW_US: i64 = 1_800_000_000_000_000;

    fn config(resend_fraction: f64, invalid_fraction: f64) -> GeneratorConfig {
        GeneratorConfig { seed: 42, resend_fraction, invalid_fraction, ..GeneratorConfig::default() }
    }

    fn generate(config: GeneratorConfig, batches: usize, size: usize) -> Vec<Batch> {
        let mut generator = Generator::new(config, 0);
        (0..batches).map(|_| generator.batch(size, NOW_US)).collect()
    }

    fn share(count: usize, total: usize) -> f64 {
        count as f64 / total as f64
    }

    #[test]
    fn the_mix_follows_its_weights() {
        let batches = generate(config(0.0, 0.0), 100, 1000);
        let mut counts: HashMap<Kind, usize> = HashMap::new();
        for kind in batches.iter().flat_map(|batch| &batch.kinds) {
            *counts.entry(*kind).or_default() += 1;
        }
        let total = 100_000;
        for (kind, expected) in
            [(Kind::Llm, 0.50), (Kind::Document, 0.15), (Kind::Api, 0.25), (Kind::Custom, 0.10)]
        {
            let actual = share(counts.get(&kind).copied().unwrap_or(0), total);
            assert!((actual - expected).abs() < 0.01, "{kind:?}: {actual} instead of about {expected}");
        }
    }

    #[test]
    fn every_fresh_event_passes_the_rules_and_each_kind_has_its_required_fields() {
        let batches = generate(config(0.0, 0.0), 20, 500);
        for (event, kind) in batches.iter().flat_map(|batch| batch.events.iter().zip(&batch.kinds)) {
            event.validate().expect("fresh events are valid");
            let metadata = |key: &str| {
                event.extra.as_ref().is_some_and(|extra| extra.metadata.iter().any(|entry| entry.key == key))
            };
            match kind {
                Kind::Llm => {
                    assert!(event.model.is_some() && event.quantity(QuantityKind::InputTokens).is_some())
                }
                Kind::Document => assert!(
                    metadata("document_type")
                        && metadata("processing_type")
                        && event.quantity(QuantityKind::Pages).is_some()
                ),
                Kind::Api => assert!(metadata("endpoint") && metadata("method")),
                Kind::Custom => assert_eq!(event.service_type, "custom"),
            }
            assert!(event.timestamp_us <= NOW_US && event.timestamp_us > NOW_US - 60_000_000);
        }
        let errors = batches
            .iter()
            .flat_map(|batch| &batch.events)
            .filter(|event| event.status == Status::Error)
            .count();
        assert!(errors > 0, "the mix carries some error statuses");
    }

    #[test]
    fn resend_and_invalid_fractions_are_kept_and_deterministic() {
        let first = generate(config(0.05, 0.02), 50, 1000);
        let second = generate(config(0.05, 0.02), 50, 1000);
        let plans =
            |batches: &[Batch]| batches.iter().flat_map(|batch| batch.plans.clone()).collect::<Vec<_>>();
        assert_eq!(plans(&first), plans(&second), "same seed, same plan");
        let ids = |batches: &[Batch]| {
            batches.iter().flat_map(|batch| batch.events.iter().map(Event::id)).collect::<Vec<_>>()
        };
        assert_eq!(ids(&first), ids(&second), "same seed, same event ids");
        let all = plans(&first);
        let resends = all.iter().filter(|plan| **plan == Plan::Resend).count();
        let invalid = all.iter().filter(|plan| **plan == Plan::Invalid).count();
        assert!((share(resends, all.len()) - 0.05).abs() < 0.005, "resends: {resends}");
        assert!((share(invalid, all.len()) - 0.02).abs() < 0.003, "invalid: {invalid}");
        let other_seed = generate(GeneratorConfig { seed: 43, ..config(0.05, 0.02) }, 50, 1000);
        assert_ne!(plans(&first), plans(&other_seed));
    }

    #[test]
    fn resends_repeat_an_earlier_event_and_invalid_events_break_a_rule() {
        let batches = generate(config(0.05, 0.02), 30, 500);
        let mut seen: HashSet<(uuid::Uuid, i64)> = HashSet::new();
        for batch in &batches {
            for (event, plan) in batch.events.iter().zip(&batch.plans) {
                let key = (event.id(), event.timestamp_us);
                match plan {
                    Plan::Fresh => assert!(seen.insert(key), "fresh ids are new"),
                    Plan::Resend => assert!(seen.contains(&key), "a resend follows its original"),
                    Plan::Invalid => {
                        let broken = event.validate().is_err() || event.model.is_none();
                        assert!(broken, "invalid events break a rule: {event:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn mix_parses_and_refuses_nonsense() {
        assert_eq!(Mix::parse("llm=1,api=3").expect("valid"), Mix { llm: 1, document: 0, api: 3, custom: 0 });
        assert!(Mix::parse("llm=0").is_err());
        assert!(Mix::parse("video=3").is_err());
        assert!(Mix::parse("llm").is_err());
    }
}
