-- Re-rating runs as a background job: its audit row is written before it starts (status
-- 'running'), its progress after each batch (updated_at is the heartbeat), and its end.
-- Rows written before this migration were recorded at the end of a finished run.
ALTER TABLE rerate_runs
    ADD COLUMN status text NOT NULL DEFAULT 'finished'
        CHECK (status IN ('running', 'finished', 'failed', 'interrupted')),
    ADD COLUMN error text,                       -- a public message when failed or interrupted
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
-- At most one running re-rate per tenant, across every edge process.
CREATE UNIQUE INDEX rerate_runs_one_running ON rerate_runs (tenant_id) WHERE status = 'running';
