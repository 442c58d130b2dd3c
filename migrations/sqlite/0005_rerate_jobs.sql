-- Re-rating runs as a background job: its audit row is written before it starts (status
-- 'running'), its progress after each batch (updated_at, microseconds, is the heartbeat), and its
-- end. Rows written before this migration were recorded at the end of a finished run.
ALTER TABLE rerate_runs
    ADD COLUMN status TEXT NOT NULL DEFAULT 'finished'
        CHECK (status IN ('running', 'finished', 'failed', 'interrupted'));
ALTER TABLE rerate_runs ADD COLUMN error TEXT;   -- a public message when failed or interrupted
ALTER TABLE rerate_runs ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
-- At most one running re-rate per tenant.
CREATE UNIQUE INDEX rerate_runs_one_running ON rerate_runs (tenant_id) WHERE status = 'running';
