-- SEG-6: named segments, materialised membership and its history.
CREATE TABLE segments (
    segment_id    UUID PRIMARY KEY,
    display_name  TEXT        NOT NULL,
    description   TEXT        NOT NULL DEFAULT '',
    rule          BYTEA       NOT NULL,   -- encoded RuleNode
    version       BIGINT      NOT NULL DEFAULT 1,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    refreshed_at  TIMESTAMPTZ,
    deleted_at    TIMESTAMPTZ
);
CREATE UNIQUE INDEX segments_name ON segments (lower(display_name)) WHERE deleted_at IS NULL;

CREATE TABLE segment_members (
    segment_id   UUID        NOT NULL REFERENCES segments (segment_id),
    customer_id  UUID        NOT NULL,
    joined_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (segment_id, customer_id)
);
CREATE INDEX segment_members_customer ON segment_members (customer_id);

CREATE TABLE segment_history (
    id           BIGSERIAL PRIMARY KEY,
    segment_id   UUID        NOT NULL,
    customer_id  UUID        NOT NULL,
    joined       BOOLEAN     NOT NULL,
    changed_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX segment_history_customer ON segment_history (customer_id, id);
