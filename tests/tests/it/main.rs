//! Tally's integration tests: one binary, with real PostgreSQL and Redis from the `tests` harness,
//! and most of them run on the embedded SQLite backend too (`support::both_backends!`).

mod billing;
mod citus;
mod compat;
mod control;
mod deploy;
mod faults;
mod fold;
mod harness_smoke;
mod hostile;
mod ingest;
mod inspect;
mod prometheus;
mod query;
mod query_hardening;
mod query_properties;
mod query_time_zones;
mod query_users;
mod rerate;
mod store;
mod support;
mod timescale;
mod tls;
mod ui;
