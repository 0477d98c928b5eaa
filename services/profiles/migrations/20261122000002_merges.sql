-- PRF-3: every merge is recorded (who, why, which fields won) with what it
-- moved, so it can be undone.
CREATE TABLE merges (
    merge_id            UUID PRIMARY KEY,
    survivor_id         UUID        NOT NULL REFERENCES customers (customer_id),
    loser_id            UUID        NOT NULL REFERENCES customers (customer_id),
    reason              TEXT        NOT NULL,
    merged_by           TEXT        NOT NULL,
    merged_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    fields_from_loser   TEXT[]      NOT NULL,
    survivor_before     BYTEA       NOT NULL,   -- encoded Customer as it was
    survivor_after      BYTEA       NOT NULL,   -- encoded Customer right after the merge
    moved_transactions  TEXT[]      NOT NULL,
    moved_interactions  TEXT[]      NOT NULL,
    moved_external_ids  TEXT[]      NOT NULL,   -- source || E'\x1f' || external_id
    moved_timeline      TEXT[]      NOT NULL,   -- source_service || E'\x1f' || source_id
    consent_before      BYTEA       NOT NULL,   -- encoded ConsentState of the survivor before
    undone_at           TIMESTAMPTZ,
    undone_by           TEXT,
    undo_reason         TEXT
);
CREATE INDEX merges_loser ON merges (loser_id) WHERE undone_at IS NULL;
CREATE INDEX merges_survivor ON merges (survivor_id);
