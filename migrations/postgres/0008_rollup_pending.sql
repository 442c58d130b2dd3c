-- Rollups off the commit path.
--
-- A sink commit used to upsert both rollup tables inside the transaction that inserted the
-- events: nearly every event upserted its own wide row, most of each commit's time. Now the
-- commit appends what it adds to each rollup table to its pending table (one row per rollup key
-- of the batch, the same columns), in the same transaction as the events, and a materializer
-- (sink::fold, in every edge) folds pending rows into the rollup tables in large windows and
-- deletes them in the same transaction. Re-rating appends its cost corrections there too, so
-- the materializer is the only writer of the rollup tables.
--
-- Invariant, at every instant and in every snapshot: for every key,
--   usage_rollup_hourly + usage_rollup_pending == the sums of the committed raw events, and
--   usage_rollup_service_hourly + usage_rollup_service_pending == the same sums over users.
-- Readers read the two views below, never a rollup table alone.
CREATE TABLE usage_rollup_pending (
    tenant_id uuid NOT NULL,
    hour timestamptz NOT NULL,
    service_type text NOT NULL,
    service_provider text NOT NULL,
    model text NOT NULL,
    user_id text NOT NULL,
    event_type text NOT NULL,
    event_count bigint NOT NULL,
    error_count bigint NOT NULL,
    input_tokens numeric NOT NULL,
    output_tokens numeric NOT NULL,
    cached_input_tokens numeric NOT NULL,
    reasoning_tokens numeric NOT NULL,
    pages numeric NOT NULL,
    characters numeric NOT NULL,
    requests numeric NOT NULL,
    bytes numeric NOT NULL,
    duration_ms numeric NOT NULL,
    custom_quantities jsonb NOT NULL,
    cost numeric NOT NULL,
    unpriced_count bigint NOT NULL,
    latency_count bigint NOT NULL,
    latency_sum_us bigint NOT NULL,
    latency_max_us bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);

-- The same for usage_rollup_service_hourly: one row per (hour, service, provider, model, event
-- type) of a commit, with the latency histogram.
CREATE TABLE usage_rollup_service_pending (
    tenant_id uuid NOT NULL,
    hour timestamptz NOT NULL,
    service_type text NOT NULL,
    service_provider text NOT NULL,
    model text NOT NULL,
    event_type text NOT NULL,
    event_count bigint NOT NULL,
    error_count bigint NOT NULL,
    input_tokens numeric NOT NULL,
    output_tokens numeric NOT NULL,
    cached_input_tokens numeric NOT NULL,
    reasoning_tokens numeric NOT NULL,
    pages numeric NOT NULL,
    characters numeric NOT NULL,
    requests numeric NOT NULL,
    bytes numeric NOT NULL,
    duration_ms numeric NOT NULL,
    custom_quantities jsonb NOT NULL,
    cost numeric NOT NULL,
    unpriced_count bigint NOT NULL,
    latency_count bigint NOT NULL,
    latency_sum_us bigint NOT NULL,
    latency_max_us bigint NOT NULL,
    latency_buckets bigint[] NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);

-- Both are short queues (rows live until the next fold, about a second): no index, and vacuumed
-- often so deleted rows are reused at once.
ALTER TABLE usage_rollup_pending SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 50000
);
ALTER TABLE usage_rollup_service_pending SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000
);

-- Rollups as narrow as their queries: latency percentiles are read per service and hour, never
-- per user, and keeping a 46-bucket histogram in every per-user row was most of the cost of
-- growing it (nearly every event has a per-user row of its own in its hour). Per user, the
-- latency count, sum and maximum stay.
ALTER TABLE usage_rollup_hourly DROP COLUMN latency_buckets;

-- Rollups as readers must see them: folded rows and pending rows, not grouped (sum over them).
CREATE VIEW usage_rollup_hourly_live AS
    SELECT tenant_id, hour, service_type, service_provider, model, user_id, event_type, event_count,
           error_count, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, pages, characters,
           requests, bytes, duration_ms, custom_quantities, cost, unpriced_count, latency_count,
           latency_sum_us, latency_max_us
    FROM usage_rollup_hourly
    UNION ALL
    SELECT tenant_id, hour, service_type, service_provider, model, user_id, event_type, event_count,
           error_count, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, pages, characters,
           requests, bytes, duration_ms, custom_quantities, cost, unpriced_count, latency_count,
           latency_sum_us, latency_max_us
    FROM usage_rollup_pending;

CREATE VIEW usage_rollup_service_hourly_live AS
    SELECT tenant_id, hour, service_type, service_provider, model, event_type, event_count, error_count,
           input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, pages, characters, requests,
           bytes, duration_ms, custom_quantities, cost, unpriced_count, latency_count, latency_sum_us,
           latency_max_us, latency_buckets
    FROM usage_rollup_service_hourly
    UNION ALL
    SELECT tenant_id, hour, service_type, service_provider, model, event_type, event_count, error_count,
           input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, pages, characters, requests,
           bytes, duration_ms, custom_quantities, cost, unpriced_count, latency_count, latency_sum_us,
           latency_max_us, latency_buckets
    FROM usage_rollup_service_pending;
