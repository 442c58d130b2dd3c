//! Feeds arbitrary bytes, where they parse as JSON, to `event_from_json` and `tenant_of` the way
//! `POST /api/v1/events` does, and checks the invariants of `check::check_event`.
//!
//! Start from the seeds and the dictionary next to this crate:
//! `cargo +nightly fuzz run event_json corpus/event_json seeds/event_json -- -dict=json.dict`.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod check;

fuzz_target!(|data: &[u8]| {
    thread_local!(static REGISTRY: edge::registry::Registry = check::registry());
    let Ok(value) = edge::json::body_value(data) else { return };
    REGISTRY.with(|registry| check::check_event(value, registry));
});
