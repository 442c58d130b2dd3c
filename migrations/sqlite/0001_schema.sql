-- Tally's SQLite schema, the embedded backend. The same tables and column names as
-- migrations/postgres (its three migrations folded into one), so code written against one reads
-- the other; only the types differ, and every table is STRICT so a wrong type is an error:
--
--   PostgreSQL          SQLite
--   uuid                BLOB, the 16 bytes
--   timestamptz         INTEGER, microseconds since the Unix epoch (UTC)
--   numeric             TEXT, the exact decimal as rust_decimal prints it ("0.25", "1200");
--                       never REAL, and never summed in SQL: sums are made in Rust
--   jsonb, text[],      TEXT holding JSON ({"name": number}, ["a", "b"], ["<uuid>", ...])
--   uuid[]
--   bigint[] histogram  TEXT holding a JSON array of 46 integers, see sink::rollup
--
-- There are no partitions: raw events past retention are deleted in bounded chunks. Every index
-- here is used by a stated query pattern; an index costs ingest throughput.

CREATE TABLE tenants (
    id BLOB PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    disabled_at INTEGER,
    -- On SQLite the store has no time zone database: quota months follow UTC whatever this says.
    time_zone TEXT NOT NULL DEFAULT 'UTC',
    rate_limit_per_second INTEGER CHECK (rate_limit_per_second > 0),
    rate_limit_burst INTEGER CHECK (rate_limit_burst > 0),
    monthly_event_quota INTEGER CHECK (monthly_event_quota >= 0),
    -- A decimal as text: not negative is "has no leading minus sign".
    monthly_cost_quota TEXT CHECK (monthly_cost_quota NOT LIKE '-%'),
    quota_policy TEXT NOT NULL DEFAULT 'reject' CHECK (quota_policy IN ('reject', 'flag')),
    late_window_seconds INTEGER NOT NULL DEFAULT 3024000 CHECK (late_window_seconds >= 0),
    future_window_seconds INTEGER NOT NULL DEFAULT 300 CHECK (future_window_seconds >= 0)
) STRICT;

-- Keys are stored as SHA-256 hashes; `key_hash` (UNIQUE, so indexed) is the look-up on every
-- cache miss.
CREATE TABLE api_keys (
    id BLOB PRIMARY KEY NOT NULL,
    tenant_id BLOB NOT NULL REFERENCES tenants (id),
    key_hash BLOB NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    scopes TEXT NOT NULL,                    -- JSON array of scope names
    label TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
) STRICT;
-- Listing a tenant's keys.
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Raw events. The primary key is the dedup key (tenant, time, event id), and the table is
-- clustered on it (WITHOUT ROWID): one B-tree holds the rows, enforces dedup, and serves every
-- per-tenant time-range listing and the retention delete. A rowid table would need a second
-- B-tree (the unique index) and write each event twice. Nothing else is indexed.
CREATE TABLE usage_events (
    tenant_id BLOB NOT NULL,
    event_id BLOB NOT NULL,
    occurred_at INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    service_type TEXT NOT NULL,
    service_provider TEXT NOT NULL,
    event_type TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,                 -- 0 success, 1 error
    error_code TEXT,
    latency_us INTEGER,
    input_tokens TEXT,
    output_tokens TEXT,
    cached_input_tokens TEXT,
    reasoning_tokens TEXT,
    pages TEXT,
    characters TEXT,
    requests TEXT,
    bytes TEXT,
    duration_ms TEXT,
    custom_quantities TEXT,                  -- {"name": number}
    cost TEXT,                               -- NULL: no price rule matched (unpriced)
    metadata TEXT,                           -- {"key": "value"}
    tags TEXT,                               -- ["tag", ...]
    session_id TEXT,
    request_id TEXT,
    ingested_at INTEGER NOT NULL,
    price_rule_ids TEXT,                     -- ["<uuid>", ...], one per priced unit
    flags INTEGER NOT NULL DEFAULT 0,        -- bit 0: stored over a monthly quota ("flag" policy)
    PRIMARY KEY (tenant_id, occurred_at, event_id)
) STRICT, WITHOUT ROWID;

-- Hourly rollups, grown in the same transaction as the raw insert by exactly the inserted rows.
-- The primary key, led by tenant and hour, serves every aggregate query and the read-add-write
-- of the rows a batch touches.
CREATE TABLE usage_rollup_hourly (
    tenant_id BLOB NOT NULL,
    hour INTEGER NOT NULL,                   -- start of the UTC hour
    service_type TEXT NOT NULL,
    service_provider TEXT NOT NULL,
    model TEXT NOT NULL,                     -- '' when events have no model
    user_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_count INTEGER NOT NULL,
    error_count INTEGER NOT NULL,
    input_tokens TEXT NOT NULL,
    output_tokens TEXT NOT NULL,
    cached_input_tokens TEXT NOT NULL,
    reasoning_tokens TEXT NOT NULL,
    pages TEXT NOT NULL,
    characters TEXT NOT NULL,
    requests TEXT NOT NULL,
    bytes TEXT NOT NULL,
    duration_ms TEXT NOT NULL,
    custom_quantities TEXT NOT NULL,
    cost TEXT NOT NULL,                      -- sum over priced events
    unpriced_count INTEGER NOT NULL,
    latency_count INTEGER NOT NULL,
    latency_sum_us INTEGER NOT NULL,
    latency_max_us INTEGER NOT NULL,
    latency_buckets TEXT NOT NULL,           -- JSON array of 46 counts
    PRIMARY KEY (tenant_id, hour, service_type, service_provider, model, user_id, event_type)
) STRICT, WITHOUT ROWID;

-- Custom service types of a tenant. Built-in types are not stored: every tenant has them.
CREATE TABLE services (
    tenant_id BLOB NOT NULL REFERENCES tenants (id),
    service_type TEXT NOT NULL,
    service_name TEXT NOT NULL,
    description TEXT,
    providers TEXT NOT NULL DEFAULT '[]',        -- empty: any provider
    required_fields TEXT NOT NULL DEFAULT '[]',
    optional_fields TEXT NOT NULL DEFAULT '[]',
    billing_config TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, service_type)
) STRICT;

-- Price rules. A change ends the old version (effective_until) and inserts a new one.
CREATE TABLE price_rules (
    id BLOB PRIMARY KEY NOT NULL,
    tenant_id BLOB NOT NULL REFERENCES tenants (id),
    definition TEXT NOT NULL,                    -- pricing::PriceRuleSpec as JSON
    effective_from INTEGER NOT NULL,
    effective_until INTEGER,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
) STRICT;
-- Loading a tenant's price book.
CREATE INDEX price_rules_tenant ON price_rules (tenant_id);

-- What each re-rate changed.
CREATE TABLE rerate_runs (
    id BLOB PRIMARY KEY NOT NULL,
    tenant_id BLOB NOT NULL REFERENCES tenants (id),
    range_start INTEGER NOT NULL,
    range_end INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    events_scanned INTEGER NOT NULL DEFAULT 0,
    events_changed INTEGER NOT NULL DEFAULT 0,
    cost_before TEXT NOT NULL DEFAULT '0',
    cost_after TEXT NOT NULL DEFAULT '0',
    requested_by BLOB                            -- the API key
) STRICT;
-- Listing a tenant's re-rates by time.
CREATE INDEX rerate_runs_tenant ON rerate_runs (tenant_id, started_at);
