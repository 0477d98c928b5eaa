-- SEG-7 freshness without a hot row: each consumer connection advances its
-- own slot (its backend pid modulo 8), so two consumers applying batches at
-- once do not wait on each other; the newest event is the newest slot.
ALTER TABLE freshness DROP COLUMN singleton;
ALTER TABLE freshness ADD COLUMN slot SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE freshness ADD PRIMARY KEY (slot);
