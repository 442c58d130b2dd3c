//! The service registry: which service types a tenant may send and what each requires. Today it
//! holds the built-in types; per-tenant custom types plug in behind [`Registry::check`].

use wire::{Event, EventError, QuantityKind};

/// A field an event of some type must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    Model,
    Quantity(QuantityKind),
    Metadata(&'static str),
}

/// A registered service type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceType {
    pub name: &'static str,
    pub default_event_type: Option<&'static str>,
    pub required: &'static [Required],
}

/// The built-in types, as the older system defined them.
pub const BUILT_IN: &[ServiceType] = &[
    ServiceType {
        name: "llm_service",
        default_event_type: Some("completion"),
        required: &[
            Required::Model,
            Required::Quantity(QuantityKind::InputTokens),
            Required::Quantity(QuantityKind::OutputTokens),
        ],
    },
    ServiceType {
        name: "document_processor",
        default_event_type: Some("processing"),
        required: &[
            Required::Metadata("document_type"),
            Required::Metadata("processing_type"),
            Required::Quantity(QuantityKind::Pages),
        ],
    },
    ServiceType {
        name: "api_service",
        default_event_type: Some("request"),
        required: &[Required::Metadata("endpoint"), Required::Metadata("method")],
    },
    ServiceType { name: "custom", default_event_type: None, required: &[] },
];

/// The service types one tenant may use.
#[derive(Debug, Clone, Default)]
pub struct Registry {}

impl Registry {
    pub fn built_in() -> Registry {
        Registry {}
    }

    /// The type of this name, if registered.
    pub fn get(&self, name: &str) -> Option<&'static ServiceType> {
        BUILT_IN.iter().find(|service| service.name == name)
    }

    /// Checks an event against its service type: the type must be registered and every required
    /// field present.
    pub fn check(&self, event: &Event) -> Result<(), EventError> {
        let service = self.get(&event.service_type).ok_or_else(|| {
            let known: Vec<&str> = BUILT_IN.iter().map(|service| service.name).collect();
            EventError::new(
                "service_type",
                format!("unknown service type {:?}; registered: {}", event.service_type, known.join(", ")),
            )
        })?;
        for required in service.required {
            let present = match required {
                Required::Model => event.model.is_some(),
                Required::Quantity(kind) => event.quantity(*kind).is_some(),
                Required::Metadata(key) => event
                    .extra
                    .as_ref()
                    .is_some_and(|extra| extra.metadata.iter().any(|entry| entry.key == *key)),
            };
            if !present {
                let field = match required {
                    Required::Model => "model",
                    Required::Quantity(kind) => kind.as_str(),
                    Required::Metadata(key) => key,
                };
                return Err(EventError::new(field, format!("is required for service type {}", service.name)));
            }
        }
        Ok(())
    }
}
