//! The service registry: which service types a tenant may send and what each requires. Built-in
//! types exist for every tenant; a tenant registers its own through `/api/v1/services`.
//!
//! A type that is neither built in nor registered is taken as a custom event (the older system's
//! custom path: common fields, quantities under `metrics`), unless the tenant's setting
//! `require_registered_services` is on; then it is refused and the error lists the known types.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use wire::{Event, EventError, QuantityKind};

/// A field an event of a built-in type must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    Model,
    Quantity(QuantityKind),
    Metadata(&'static str),
}

/// A built-in service type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltIn {
    pub name: &'static str,
    pub description: &'static str,
    pub default_event_type: Option<&'static str>,
    pub required: &'static [Required],
}

/// The built-in types, as the older system defined them.
pub const BUILT_IN: &[BuiltIn] = &[
    BuiltIn {
        name: "llm_service",
        description: "Language model calls, metered in tokens",
        default_event_type: Some("completion"),
        required: &[
            Required::Model,
            Required::Quantity(QuantityKind::InputTokens),
            Required::Quantity(QuantityKind::OutputTokens),
        ],
    },
    BuiltIn {
        name: "document_processor",
        description: "Document processing, metered in pages",
        default_event_type: Some("processing"),
        required: &[
            Required::Metadata("document_type"),
            Required::Metadata("processing_type"),
            Required::Quantity(QuantityKind::Pages),
        ],
    },
    BuiltIn {
        name: "api_service",
        description: "API requests",
        default_event_type: Some("request"),
        required: &[Required::Metadata("endpoint"), Required::Metadata("method")],
    },
    BuiltIn {
        name: "custom",
        description: "Anything else; quantities under metrics",
        default_event_type: None,
        required: &[],
    },
];

/// What kind of value a custom type's field must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// A quantity: well-known or custom.
    Number,
    /// Metadata text (or, for `model`, the model).
    String,
    /// Either.
    #[default]
    Any,
}

/// A field of a custom type, written either as `"name"` or `{"name": ..., "kind": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldSpec {
    Name(String),
    Typed {
        name: String,
        #[serde(default, alias = "type")]
        kind: FieldKind,
    },
}

impl FieldSpec {
    pub fn name(&self) -> &str {
        match self {
            FieldSpec::Name(name) | FieldSpec::Typed { name, .. } => name,
        }
    }

    pub fn kind(&self) -> FieldKind {
        match self {
            FieldSpec::Name(_) => FieldKind::Any,
            FieldSpec::Typed { kind, .. } => *kind,
        }
    }
}

/// A tenant's custom type as ingest checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomService {
    pub providers: Vec<String>,
    pub required: Vec<FieldSpec>,
}

/// The service types one tenant may use.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    custom: HashMap<String, CustomService>,
    require_registered: bool,
}

impl Registry {
    /// Only the built-in types.
    pub fn built_in() -> Registry {
        Registry::default()
    }

    /// The built-in types and a tenant's own. Stored fields that do not parse are ignored (the
    /// API validates them on the way in).
    pub fn with_custom(services: &[sink::ServiceRecord]) -> Registry {
        let custom = services
            .iter()
            .map(|service| {
                let required = serde_json::from_value(service.required_fields.clone()).unwrap_or_default();
                (
                    service.service_type.clone(),
                    CustomService { providers: service.providers.clone(), required },
                )
            })
            .collect();
        Registry { custom, require_registered: false }
    }

    /// With the tenant's `require_registered_services` setting: when on, unregistered types are
    /// refused instead of taken as custom events.
    pub fn requiring_registration(mut self, require_registered: bool) -> Registry {
        self.require_registered = require_registered;
        self
    }

    pub fn built_in_type(name: &str) -> Option<&'static BuiltIn> {
        BUILT_IN.iter().find(|service| service.name == name)
    }

    /// The event type an event of this service type gets when it names none.
    pub fn default_event_type(&self, service_type: &str) -> Option<&'static str> {
        Self::built_in_type(service_type).and_then(|service| service.default_event_type)
    }

    /// Checks an event against its service type: the provider allowed and every required field
    /// present with the right kind. An unregistered type is a custom event, or refused when
    /// the tenant requires registration.
    pub fn check(&self, event: &Event) -> Result<(), EventError> {
        if let Some(service) = Self::built_in_type(&event.service_type) {
            return check_built_in(service, event);
        }
        let Some(service) = self.custom.get(&event.service_type) else {
            if !self.require_registered {
                return Ok(());
            }
            let mut known: Vec<&str> = BUILT_IN.iter().map(|service| service.name).collect();
            known.extend(self.custom.keys().map(String::as_str));
            known.sort_unstable();
            return Err(EventError::new(
                "service_type",
                format!("unknown service type {:?}; registered: {}", event.service_type, known.join(", ")),
            ));
        };
        if !service.providers.is_empty() && !service.providers.contains(&event.service_provider) {
            return Err(EventError::new(
                "service_provider",
                format!(
                    "{:?} is not a provider of {}: allowed {}",
                    event.service_provider,
                    event.service_type,
                    service.providers.join(", ")
                ),
            ));
        }
        for field in &service.required {
            check_field(event, field)?;
        }
        Ok(())
    }
}

fn check_built_in(service: &BuiltIn, event: &Event) -> Result<(), EventError> {
    for required in service.required {
        let (present, field) = match required {
            Required::Model => (event.model.is_some(), "model"),
            Required::Quantity(kind) => (event.quantity(*kind).is_some(), kind.as_str()),
            Required::Metadata(key) => (metadata(event, key).is_some(), *key),
        };
        if !present {
            return Err(EventError::new(field, format!("is required for service type {}", service.name)));
        }
    }
    Ok(())
}

fn check_field(event: &Event, field: &FieldSpec) -> Result<(), EventError> {
    let name = field.name();
    let is_number = QuantityKind::from_name(name).is_some_and(|kind| event.quantity(kind).is_some())
        || event.extra.as_ref().is_some_and(|extra| extra.custom_quantities.iter().any(|q| q.name == name));
    let is_text = (name == "model" && event.model.is_some()) || metadata(event, name).is_some();
    let ok = match field.kind() {
        FieldKind::Number => is_number,
        FieldKind::String => is_text,
        FieldKind::Any => is_number || is_text,
    };
    if ok {
        return Ok(());
    }
    let reason = match field.kind() {
        FieldKind::Number if is_text => format!("must be a number for service type {}", event.service_type),
        FieldKind::String if is_number => format!("must be text for service type {}", event.service_type),
        _ => format!("is required for service type {}", event.service_type),
    };
    Err(EventError::new(name, reason))
}

fn metadata<'a>(event: &'a Event, key: &str) -> Option<&'a str> {
    let extra = event.extra.as_ref()?;
    extra.metadata.iter().find(|entry| entry.key == key).map(|entry| entry.value.as_str())
}
