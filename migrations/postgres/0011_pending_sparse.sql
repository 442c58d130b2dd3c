-- Pending rollup rows carry NULL for a sum that is zero.
--
-- A commit writes about one per-user pending row per event, and most of their 16 sums are zero
-- (an event carries one to three quantities, few are errors, many have no latency). Parsing,
-- storing and summing those zeros was a fifth of the pending rows' cost: copying the rows of a
-- 300,000-event fold window with NULL for zero took 15% less time and grouping them 15-30% less.
-- The sink writes NULL for a zero sum (and for an all-zero latency histogram); the fold reads
-- NULL as zero, and the `_live` views below show readers zeros, as before.
ALTER TABLE usage_rollup_pending
    ALTER COLUMN error_count DROP NOT NULL,
    ALTER COLUMN input_tokens DROP NOT NULL,
    ALTER COLUMN output_tokens DROP NOT NULL,
    ALTER COLUMN cached_input_tokens DROP NOT NULL,
    ALTER COLUMN reasoning_tokens DROP NOT NULL,
    ALTER COLUMN pages DROP NOT NULL,
    ALTER COLUMN characters DROP NOT NULL,
    ALTER COLUMN requests DROP NOT NULL,
    ALTER COLUMN bytes DROP NOT NULL,
    ALTER COLUMN duration_ms DROP NOT NULL,
    ALTER COLUMN custom_quantities DROP NOT NULL,
    ALTER COLUMN cost DROP NOT NULL,
    ALTER COLUMN unpriced_count DROP NOT NULL,
    ALTER COLUMN latency_count DROP NOT NULL,
    ALTER COLUMN latency_sum_us DROP NOT NULL,
    ALTER COLUMN latency_max_us DROP NOT NULL;

ALTER TABLE usage_rollup_service_pending
    ALTER COLUMN error_count DROP NOT NULL,
    ALTER COLUMN input_tokens DROP NOT NULL,
    ALTER COLUMN output_tokens DROP NOT NULL,
    ALTER COLUMN cached_input_tokens DROP NOT NULL,
    ALTER COLUMN reasoning_tokens DROP NOT NULL,
    ALTER COLUMN pages DROP NOT NULL,
    ALTER COLUMN characters DROP NOT NULL,
    ALTER COLUMN requests DROP NOT NULL,
    ALTER COLUMN bytes DROP NOT NULL,
    ALTER COLUMN duration_ms DROP NOT NULL,
    ALTER COLUMN custom_quantities DROP NOT NULL,
    ALTER COLUMN cost DROP NOT NULL,
    ALTER COLUMN unpriced_count DROP NOT NULL,
    ALTER COLUMN latency_count DROP NOT NULL,
    ALTER COLUMN latency_sum_us DROP NOT NULL,
    ALTER COLUMN latency_max_us DROP NOT NULL,
    ALTER COLUMN latency_buckets DROP NOT NULL;

CREATE OR REPLACE VIEW usage_rollup_hourly_live AS
    SELECT tenant_id, hour, service_type, service_provider, model, user_id, event_type, event_count,
           error_count, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, pages, characters,
           requests, bytes, duration_ms, custom_quantities, cost, unpriced_count, latency_count,
           latency_sum_us, latency_max_us
    FROM usage_rollup_hourly
    UNION ALL
    SELECT tenant_id, hour, service_type, service_provider, model, user_id, event_type, event_count,
           coalesce(error_count, 0), coalesce(input_tokens, 0), coalesce(output_tokens, 0),
           coalesce(cached_input_tokens, 0), coalesce(reasoning_tokens, 0), coalesce(pages, 0),
           coalesce(characters, 0), coalesce(requests, 0), coalesce(bytes, 0), coalesce(duration_ms, 0),
           coalesce(custom_quantities, '{}'::jsonb), coalesce(cost, 0), coalesce(unpriced_count, 0),
           coalesce(latency_count, 0), coalesce(latency_sum_us, 0), coalesce(latency_max_us, 0)
    FROM usage_rollup_pending;

CREATE OR REPLACE VIEW usage_rollup_service_hourly_live AS
    SELECT tenant_id, hour, service_type, service_provider, model, event_type, event_count, error_count,
           input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, pages, characters, requests,
           bytes, duration_ms, custom_quantities, cost, unpriced_count, latency_count, latency_sum_us,
           latency_max_us, latency_buckets
    FROM usage_rollup_service_hourly
    UNION ALL
    SELECT tenant_id, hour, service_type, service_provider, model, event_type, event_count,
           coalesce(error_count, 0), coalesce(input_tokens, 0), coalesce(output_tokens, 0),
           coalesce(cached_input_tokens, 0), coalesce(reasoning_tokens, 0), coalesce(pages, 0),
           coalesce(characters, 0), coalesce(requests, 0), coalesce(bytes, 0), coalesce(duration_ms, 0),
           coalesce(custom_quantities, '{}'::jsonb), coalesce(cost, 0), coalesce(unpriced_count, 0),
           coalesce(latency_count, 0), coalesce(latency_sum_us, 0), coalesce(latency_max_us, 0),
           coalesce(latency_buckets, array_fill(0::bigint, ARRAY[46]))
    FROM usage_rollup_service_pending;
