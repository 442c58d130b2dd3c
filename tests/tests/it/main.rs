//! Tally's integration tests: one binary, with real PostgreSQL and Redis from the `tests` harness.

mod control;
mod harness_smoke;
mod ingest;
mod support;
