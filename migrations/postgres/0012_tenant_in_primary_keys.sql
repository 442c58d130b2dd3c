-- Every per-tenant table's primary key leads with tenant_id.
--
-- `price_rules` and `rerate_runs` were keyed by their id alone. Tally always reads and writes
-- them with the tenant known (a rule is retired, a run updated or found by tenant and id), and
-- a distributed PostgreSQL (Citus, distributed by tenant_id: see `tally-edge distribute`) can
-- enforce a unique constraint only if it holds the distribution column. With (tenant_id, id)
-- both tables can live on the shard of their tenant. On a single PostgreSQL nothing changes for
-- queries: ids are UUIDv7, unique on their own, and the key now also serves "a tenant's rules".

ALTER TABLE price_rules DROP CONSTRAINT price_rules_pkey, ADD PRIMARY KEY (tenant_id, id);
-- The primary key leads with tenant_id now: it serves the loading of a tenant's price book.
DROP INDEX price_rules_tenant;

ALTER TABLE rerate_runs DROP CONSTRAINT rerate_runs_pkey, ADD PRIMARY KEY (tenant_id, id);
