-- REL-7: a running operation is its runner's only while the runner
-- heartbeats; another replica takes over one whose runner stopped.
ALTER TABLE recompute_operations ADD COLUMN heartbeat_at TIMESTAMPTZ;
ALTER TABLE recompute_operations ADD COLUMN attempts INT NOT NULL DEFAULT 0;
CREATE INDEX recompute_operations_running ON recompute_operations (heartbeat_at) WHERE state = 2;
