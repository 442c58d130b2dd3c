-- TimescaleDB: decide from the table itself, and keep the dedup index the only index.
--
-- 1. Partition maintenance and retention used to pick their branch from pg_extension. A database
--    migrated on plain PostgreSQL (native daily partitions) that later gets
--    `CREATE EXTENSION timescaledb` then failed at every start ("usage_events" is not a hypertable)
--    and stopped creating partitions. Now the branch follows what `usage_events` is: a natively
--    partitioned table (relkind 'p') gets daily partitions; anything else is a hypertable.
-- 2. `create_hypertable` in 0001 ran with its default indexes and so added
--    `usage_events_occurred_at_idx` (14 MB next to the 32 MB dedup index after 438k rows),
--    although the dedup index, led by tenant and time, is meant to be the only one. 0001 cannot
--    change (its checksum is recorded in every database), so the extra index is dropped here; on
--    plain PostgreSQL it never existed.

DROP INDEX IF EXISTS usage_events_occurred_at_idx;

-- Whether usage_events uses native range partitions (else it is a TimescaleDB hypertable).
CREATE FUNCTION tally_events_natively_partitioned() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT relkind = 'p' FROM pg_class WHERE oid = 'usage_events'::regclass
$$;

CREATE OR REPLACE FUNCTION tally_ensure_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    partition text;
    created integer := 0;
BEGIN
    IF NOT tally_events_natively_partitioned() THEN
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

CREATE OR REPLACE FUNCTION tally_drop_events_before(cutoff date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    partition record;
    dropped integer := 0;
BEGIN
    IF NOT tally_events_natively_partitioned() THEN
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
