-- TimescaleDB, when `usage_events` is a hypertable: compressed old chunks, and retention through
-- TimescaleDB's own policies. On native daily partitions (plain PostgreSQL, or a database that got
-- the extension later) nothing here does anything.
--
-- Compression groups a chunk's rows by tenant (segmentby) and orders them by time and event id
-- (orderby). Every column of the unique dedup index is one of those, which TimescaleDB requires
-- to keep enforcing the index on compressed chunks: an insert (a late event, or a resend) into a
-- compressed chunk first decompresses the batches of its tenant whose time range holds its
-- timestamp, so the index sees any stored copy. Listings and re-rating read a tenant's time
-- range, which the per-batch tenant and min/max time metadata prune.

DO $$
BEGIN
    IF NOT tally_events_natively_partitioned() THEN
        ALTER TABLE usage_events SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'tenant_id',
            timescaledb.compress_orderby = 'occurred_at, event_id');
    END IF;
END
$$;

-- Sets the compression and retention policies of `usage_events` to these ages, replacing a
-- policy whose age differs and leaving one that matches alone (maintenance calls this every
-- hour). `compress_after_days` NULL removes the compression policy (chunks compressed already
-- stay compressed). Returns the number of policies added or removed, or NULL when `usage_events`
-- uses native partitions (then `tally_drop_events_before` does retention).
CREATE FUNCTION tally_timescaledb_policies(compress_after_days integer, retention_days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    changed integer := 0;
    compress_after interval;
    drop_after interval;
BEGIN
    IF tally_events_natively_partitioned() THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('tally_timescaledb_policies'));
    SELECT (config->>'compress_after')::interval INTO compress_after
        FROM timescaledb_information.jobs
        WHERE proc_name = 'policy_compression'
          AND format('%I.%I', hypertable_schema, hypertable_name)::regclass = 'usage_events'::regclass;
    SELECT (config->>'drop_after')::interval INTO drop_after
        FROM timescaledb_information.jobs
        WHERE proc_name = 'policy_retention'
          AND format('%I.%I', hypertable_schema, hypertable_name)::regclass = 'usage_events'::regclass;
    IF compress_after IS DISTINCT FROM make_interval(days => compress_after_days) THEN
        IF compress_after IS NOT NULL THEN
            PERFORM remove_compression_policy('usage_events');
            changed := changed + 1;
        END IF;
        IF compress_after_days IS NOT NULL THEN
            PERFORM add_compression_policy('usage_events', compress_after => make_interval(days => compress_after_days));
            changed := changed + 1;
        END IF;
    END IF;
    IF drop_after IS DISTINCT FROM make_interval(days => retention_days) THEN
        IF drop_after IS NOT NULL THEN
            PERFORM remove_retention_policy('usage_events');
            changed := changed + 1;
        END IF;
        PERFORM add_retention_policy('usage_events', drop_after => make_interval(days => retention_days));
        changed := changed + 1;
    END IF;
    RETURN changed;
END
$$;
