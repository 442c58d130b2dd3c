-- Per-tenant settings: the time zone that bounds days, weeks and months, ingest limits, and the
-- accepted time window of events.
ALTER TABLE tenants
    ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC',
    ADD COLUMN rate_limit_per_second integer CHECK (rate_limit_per_second > 0),
    ADD COLUMN rate_limit_burst integer CHECK (rate_limit_burst > 0),
    ADD COLUMN monthly_event_quota bigint CHECK (monthly_event_quota >= 0),
    ADD COLUMN monthly_cost_quota numeric CHECK (monthly_cost_quota >= 0),
    ADD COLUMN quota_policy text NOT NULL DEFAULT 'reject' CHECK (quota_policy IN ('reject', 'flag')),
    ADD COLUMN late_window_seconds integer NOT NULL DEFAULT 3024000 CHECK (late_window_seconds >= 0),
    ADD COLUMN future_window_seconds integer NOT NULL DEFAULT 300 CHECK (future_window_seconds >= 0);
