-- Per-user rollups by UTC day, for the questions that count or rank users.
--
-- Counting distinct users, or ranking them, must read per-user rows: over 30 days a busy tenant
-- has about one per-user hourly row per 2.4 events (264k for the busiest tenant of
-- `tally-query-bench --events 10000000`), and the index-only scan of their keys alone took 93 ms.
-- A user active in many hours of a day has one row per day and dimensions here. Readers answer
-- the whole UTC days of a range that lie inside one period bucket from this table plus the
-- pending rows of those days (`usage_rollup_pending_sums`), and the other hours from the hourly
-- view, so answers stay exact (query::pg).
--
-- Invariant, at every instant and in every snapshot: for every key and UTC day,
--   usage_rollup_user_daily == the sum of usage_rollup_hourly's rows of that day.
-- The fold grows both from the same moved pending rows in one statement (sink::pg::fold_sql);
-- re-rating reaches it through the pending rows; retention drops whole UTC days of both.
CREATE TABLE usage_rollup_user_daily (
    tenant_id uuid NOT NULL,
    day date NOT NULL,                       -- the UTC day of the hours summed
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
    PRIMARY KEY (tenant_id, day, service_type, service_provider, model, user_id, event_type)
);

-- Rollups folded before this table existed (pending rows reach it when they are folded). The
-- lock makes a fold running meanwhile wait, so none commits between this copy and the table.
LOCK TABLE usage_rollup_hourly IN SHARE MODE;
INSERT INTO usage_rollup_user_daily
SELECT tenant_id, (hour AT TIME ZONE 'UTC')::date, service_type, service_provider, model, user_id, event_type,
       sum(event_count), sum(error_count), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens),
       sum(reasoning_tokens), sum(pages), sum(characters), sum(requests), sum(bytes), sum(duration_ms),
       tally_sum_quantities(custom_quantities), sum(cost), sum(unpriced_count), sum(latency_count),
       sum(latency_sum_us), max(latency_max_us)
FROM usage_rollup_hourly
GROUP BY 1, 2, 3, 4, 5, 6, 7;

-- The per-user pending rows as readers of the daily table's days see them: zero sums are NULL in
-- the table (migration 0011) and zeros here, as in `usage_rollup_hourly_live`.
CREATE VIEW usage_rollup_pending_sums AS
    SELECT tenant_id, hour, service_type, service_provider, model, user_id, event_type, event_count,
           coalesce(error_count, 0) AS error_count, coalesce(input_tokens, 0) AS input_tokens,
           coalesce(output_tokens, 0) AS output_tokens, coalesce(cached_input_tokens, 0) AS cached_input_tokens,
           coalesce(reasoning_tokens, 0) AS reasoning_tokens, coalesce(pages, 0) AS pages,
           coalesce(characters, 0) AS characters, coalesce(requests, 0) AS requests, coalesce(bytes, 0) AS bytes,
           coalesce(duration_ms, 0) AS duration_ms, coalesce(custom_quantities, '{}'::jsonb) AS custom_quantities,
           coalesce(cost, 0) AS cost, coalesce(unpriced_count, 0) AS unpriced_count,
           coalesce(latency_count, 0) AS latency_count, coalesce(latency_sum_us, 0) AS latency_sum_us,
           coalesce(latency_max_us, 0) AS latency_max_us
    FROM usage_rollup_pending;
