-- SEG-7 freshness without a hot row: each consumer connection advances its
-- own slot (its backend pid modulo 8), so two consumers applying batches at
-- once do not wait on each other; the newest event is the newest slot.
--
-- Expand only: replicas of the previous release still upsert
-- `ON CONFLICT (singleton)` while the rollout runs, so `singleton` stays,
-- nullable and unique (their row becomes slot 0). Drop it in a later release.
ALTER TABLE freshness DROP CONSTRAINT freshness_pkey;
ALTER TABLE freshness ALTER COLUMN singleton DROP NOT NULL;
ALTER TABLE freshness ALTER COLUMN singleton DROP DEFAULT;
CREATE UNIQUE INDEX freshness_singleton ON freshness (singleton);
ALTER TABLE freshness ADD COLUMN slot SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE freshness ADD PRIMARY KEY (slot);
