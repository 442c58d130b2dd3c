-- The control plane: per-tenant service registry, price rules and their versions, re-rating audit,
-- and what pricing and quotas record on each event.

-- Custom service types of a tenant. Built-in types (llm_service, document_processor, api_service,
-- custom) are not stored: every tenant has them.
CREATE TABLE services (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    service_type text NOT NULL,
    service_name text NOT NULL,
    description text,
    providers text[] NOT NULL DEFAULT '{}',      -- empty: any provider
    required_fields jsonb NOT NULL DEFAULT '[]', -- [{"name": ..., "kind": "number"|"string"|"any"}]
    optional_fields jsonb NOT NULL DEFAULT '[]',
    billing_config jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, service_type)
);

-- Price rules. A rule is never edited in place: a change ends the old version
-- (effective_until) and inserts a new one, so the version that priced an event stays known.
CREATE TABLE price_rules (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    definition jsonb NOT NULL,                   -- pricing::PriceRuleSpec as accepted by the API
    effective_from timestamptz NOT NULL,
    effective_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz                       -- deleted through the API; kept for history
);
-- Loading a tenant's price book.
CREATE INDEX price_rules_tenant ON price_rules (tenant_id);

-- What each re-rate changed.
CREATE TABLE rerate_runs (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    range_start timestamptz NOT NULL,
    range_end timestamptz NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    events_scanned bigint NOT NULL DEFAULT 0,
    events_changed bigint NOT NULL DEFAULT 0,
    cost_before numeric NOT NULL DEFAULT 0,
    cost_after numeric NOT NULL DEFAULT 0,
    requested_by uuid                            -- the API key
);
CREATE INDEX rerate_runs_tenant ON rerate_runs (tenant_id, started_at);

-- The rule versions that priced an event (one per priced unit), and flags: bit 0 = stored while
-- the tenant was over a monthly quota with the "flag" policy.
ALTER TABLE usage_events
    ADD COLUMN price_rule_ids uuid[],
    ADD COLUMN flags smallint NOT NULL DEFAULT 0;

-- Microseconds since the Unix epoch as a timestamptz, exactly (no floating point on the way).
CREATE FUNCTION tally_timestamptz(us bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 'epoch'::timestamptz + us * interval '1 microsecond' $$;
