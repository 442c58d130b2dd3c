//! Test harness: real PostgreSQL and Redis processes on free loopback ports, started once per test binary, a fresh database per test.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let database = tests::postgres().await.fresh_database().await?;
//! let redis_url = tests::redis().await.url();
//! # let _ = (database, redis_url);
//! # Ok(())
//! # }
//! ```
//!
//! The shared servers ([`postgres`], [`redis`]) live as long as the test process; tests that stop,
//! crash or restart a server take a private one ([`dedicated_postgres`], [`dedicated_redis`])
//! that is removed when dropped. Every server runs under a supervisor that stops it and deletes
//! its temporary directory when the test process exits, even by `SIGKILL` (see `process.rs`).
//!
//! SQLite needs no server: [`fresh_sqlite`] gives a test its own database path in a private
//! temporary directory, removed when dropped.
//!
//! Everything works from any number of `#[tokio::test]` runtimes at once: nothing runtime-bound
//! (pools, tokio child handles) is kept in a static.

mod postgres;
mod process;
mod redis;
mod service;
mod sqlite;

pub use postgres::{PgServer, TestDb, dedicated_postgres, dedicated_postgres_with, postgres};
pub use redis::{RedisPersistence, RedisServer, dedicated_redis, redis};
pub use service::{HttpAnswer, Service, free_port, http, http_get, temp_dir};
pub use sqlite::{TestSqlite, fresh_sqlite};
