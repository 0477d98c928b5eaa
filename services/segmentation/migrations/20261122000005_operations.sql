-- SEG-7: recomputes as long-running operations, claimed by any replica.
CREATE TABLE recompute_operations (
    operation_id  UUID PRIMARY KEY,
    scope         SMALLINT    NOT NULL,
    state         SMALLINT    NOT NULL,   -- OperationState
    progress      SMALLINT    NOT NULL DEFAULT 0,
    step          TEXT        NOT NULL DEFAULT '',
    error         TEXT        NOT NULL DEFAULT '',
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at      TIMESTAMPTZ,
    claimed_by    TEXT
);
CREATE INDEX recompute_operations_pending ON recompute_operations (created_at) WHERE state = 1;
