-- OUT-4 lifecycle triggers: each trigger occurrence sends at most one message
-- (dedupe_key, e.g. "birthday:<customer>:2026"), whatever replicas race.
ALTER TABLE messages ADD COLUMN dedupe_key TEXT;
CREATE UNIQUE INDEX messages_dedupe ON messages (dedupe_key) WHERE dedupe_key IS NOT NULL;
-- "6 months silent": the newest purchase or inbound interaction.
ALTER TABLE customers ADD COLUMN last_activity_at TIMESTAMPTZ;
