//! Feeds arbitrary bytes to the batch body parser of `POST /api/v1/events/batch`, then each event
//! it returns to `tenant_of` and `event_from_json`, as the handler does after authentication.
//!
//! Input: one byte for the batch limit (1 to 16, so the limit is reached), then the body.

#![no_main]

use edge::json::{BodyError, batch_events, body_value};
use libfuzzer_sys::fuzz_target;
use wire::ErrorCode;

mod check;

fuzz_target!(|data: &[u8]| {
    thread_local!(static REGISTRY: edge::registry::Registry = check::registry());
    let Some((&limit, body)) = data.split_first() else { return };
    let events_max = usize::from(limit % 16) + 1;
    match batch_events(body, events_max) {
        Ok(events) => {
            assert!((1..=events_max).contains(&events.len()));
            REGISTRY.with(|registry| {
                for event in events {
                    check::check_event(event, registry);
                }
            });
        }
        Err(error) => {
            let code = error.code();
            assert!(matches!(code, ErrorCode::BadFrame | ErrorCode::InvalidEvent), "{error}");
            // The body is refused as JSON exactly when it is not JSON.
            assert_eq!(matches!(error, BodyError::Json(_)), body_value(body).is_err(), "{error}");
            if let BodyError::TooManyEvents { events, max } = error {
                assert!(events > max && max == events_max);
            }
        }
    }
});
