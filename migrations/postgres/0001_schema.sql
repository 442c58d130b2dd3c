-- Tally's PostgreSQL schema. Every index here is used by a stated query pattern; an index costs
-- ingest throughput, so none is speculative.

CREATE TABLE tenants (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

-- Keys are stored as SHA-256 hashes; `key_hash` is the look-up on every cache miss.
CREATE TABLE api_keys (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    key_hash bytea NOT NULL UNIQUE,
    prefix text NOT NULL,
    scopes text[] NOT NULL,
    label text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz
);
-- Listing a tenant's keys.
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Whether this database keeps raw events in a TimescaleDB hypertable (when the extension can be
-- loaded) or in native daily range partitions (everywhere else). Decided once, here.
CREATE FUNCTION tally_timescaledb_available() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') LIKE '%timescaledb%'
$$;

DO $$
DECLARE
    columns text := $columns$
        tenant_id uuid NOT NULL,
        event_id uuid NOT NULL,
        occurred_at timestamptz NOT NULL,
        user_id text NOT NULL,
        service_type text NOT NULL,
        service_provider text NOT NULL,
        event_type text NOT NULL,
        model text,
        status smallint NOT NULL,            -- 0 success, 1 error
        error_code text,
        latency_us bigint,
        input_tokens numeric,
        output_tokens numeric,
        cached_input_tokens numeric,
        reasoning_tokens numeric,
        pages numeric,
        characters numeric,
        requests numeric,
        bytes numeric,
        duration_ms numeric,
        custom_quantities jsonb,             -- {"name": number}
        cost numeric,                        -- NULL: no price rule matched (unpriced)
        metadata jsonb,
        tags text[],
        session_id text,
        request_id text,
        ingested_at timestamptz NOT NULL DEFAULT now()
    $columns$;
BEGIN
    IF tally_timescaledb_available() THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXECUTE format('CREATE TABLE usage_events (%s)', columns);
        EXECUTE $sql$SELECT create_hypertable('usage_events', 'occurred_at',
                                              chunk_time_interval => interval '1 day')$sql$;
    ELSE
        EXECUTE format('CREATE TABLE usage_events (%s) PARTITION BY RANGE (occurred_at)', columns);
    END IF;
END
$$;

-- The only index on raw events. It enforces deduplication on (tenant, event id, timestamp) and,
-- led by tenant and time, serves every per-tenant time-range listing; a separate
-- (tenant_id, occurred_at) index would cost ingest for nothing.
CREATE UNIQUE INDEX usage_events_dedup ON usage_events (tenant_id, occurred_at, event_id);

-- Hourly rollups, grown in the same transaction as the raw insert by exactly the inserted rows.
-- The primary key, led by tenant and hour, serves every aggregate query.
CREATE TABLE usage_rollup_hourly (
    tenant_id uuid NOT NULL,
    hour timestamptz NOT NULL,
    service_type text NOT NULL,
    service_provider text NOT NULL,
    model text NOT NULL,                     -- '' when events have no model
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
    cost numeric NOT NULL,                   -- sum over priced events
    unpriced_count bigint NOT NULL,
    latency_count bigint NOT NULL,
    latency_sum_us bigint NOT NULL,
    latency_max_us bigint NOT NULL,
    latency_buckets bigint[] NOT NULL,       -- 46 log-scale buckets, see sink::rollup
    PRIMARY KEY (tenant_id, hour, service_type, service_provider, model, user_id, event_type)
);

-- Element-wise sum of two latency histograms.
CREATE FUNCTION tally_add_buckets(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
    FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i)
$$;

-- Key-wise sum of two {"name": number} objects.
CREATE FUNCTION tally_add_quantities(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(k, coalesce((a ->> k)::numeric, 0) + coalesce((b ->> k)::numeric, 0)), '{}')
    FROM (SELECT jsonb_object_keys(a) UNION SELECT jsonb_object_keys(b)) AS keys(k)
$$;

-- Creates the daily partitions from `first_day` to `last_day` (UTC) that do not exist yet.
-- Serialised by an advisory lock, so several edges may run it at once.
CREATE FUNCTION tally_ensure_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    partition text;
    created integer := 0;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN 0; -- hypertable chunks are created on demand
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('tally_partitions'));
    FOR day IN SELECT generate_series(first_day, last_day, interval '1 day')::date LOOP
        partition := format('usage_events_p%s', to_char(day, 'YYYYMMDD'));
        IF to_regclass(partition) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                           partition, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

-- Drops raw events of the days before `cutoff` (UTC), a whole partition or chunk at a time.
CREATE FUNCTION tally_drop_events_before(cutoff date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    partition record;
    dropped integer := 0;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE 'SELECT count(*) FROM drop_chunks(''usage_events'', older_than => $1)'
            INTO dropped USING cutoff::timestamp AT TIME ZONE 'UTC';
        RETURN dropped;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('tally_partitions'));
    FOR partition IN
        SELECT child.relname AS name
        FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        WHERE pg_inherits.inhparent = 'usage_events'::regclass
          AND child.relname ~ '^usage_events_p[0-9]{8}$'
          AND to_date(substr(child.relname, 15), 'YYYYMMDD') < cutoff
    LOOP
        EXECUTE format('DROP TABLE %I', partition.name);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;
