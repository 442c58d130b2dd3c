-- Hourly rollups without the user: the same sums as usage_rollup_hourly, keyed by service, provider,
-- model and event type only. Grown in the same transaction as the raw insert (and moved by
-- re-rating) exactly like the per-user rollups, so it always equals their sum over users.
-- Aggregates that neither group by, filter on nor count users read it: for a busy tenant it has
-- about one row per (hour, service, provider, model, event type) instead of one per user too.
CREATE TABLE usage_rollup_service_hourly (
    tenant_id uuid NOT NULL,
    hour timestamptz NOT NULL,
    service_type text NOT NULL,
    service_provider text NOT NULL,
    model text NOT NULL,                     -- '' when events have no model
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
    PRIMARY KEY (tenant_id, hour, service_type, service_provider, model, event_type)
);

-- Sums of histograms and of quantity objects over rows.
CREATE AGGREGATE tally_sum_buckets(bigint[]) (SFUNC = tally_add_buckets, STYPE = bigint[]);
CREATE AGGREGATE tally_sum_quantities(jsonb) (SFUNC = tally_add_quantities, STYPE = jsonb, INITCOND = '{}');

-- Rollups stored before this table existed.
INSERT INTO usage_rollup_service_hourly
SELECT tenant_id, hour, service_type, service_provider, model, event_type,
       sum(event_count), sum(error_count), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens),
       sum(reasoning_tokens), sum(pages), sum(characters), sum(requests), sum(bytes), sum(duration_ms),
       tally_sum_quantities(custom_quantities), sum(cost), sum(unpriced_count), sum(latency_count),
       sum(latency_sum_us), max(latency_max_us), tally_sum_buckets(latency_buckets)
FROM usage_rollup_hourly
GROUP BY tenant_id, hour, service_type, service_provider, model, event_type;
