-- Segmentation's read model of profiles' facts (SPEC 2: no service reads
-- another's tables; this is built only from profiles' events).

CREATE TABLE customers (
    customer_id        UUID PRIMARY KEY,
    kind               SMALLINT    NOT NULL DEFAULT 0,
    region             TEXT        NOT NULL DEFAULT '',
    timezone           TEXT        NOT NULL DEFAULT '',
    tags               TEXT[]      NOT NULL DEFAULT '{}',
    attributes         BYTEA       NOT NULL DEFAULT '',   -- encoded map<string, AttributeValue>
    preferred_channel  SMALLINT    NOT NULL DEFAULT 0,
    registered_at      TIMESTAMPTZ,
    birth_month        SMALLINT,
    birth_day          SMALLINT,
    merged_into        UUID,                               -- an alias of that customer (PRF-3)
    erased_at          TIMESTAMPTZ,                        -- PRF-8
    profile_as_of      TIMESTAMPTZ                         -- time of the profile event last applied
);
CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE transactions (
    transaction_id  TEXT PRIMARY KEY,
    customer_id     UUID        NOT NULL,
    kind            SMALLINT    NOT NULL,
    amount_minor    BIGINT      NOT NULL,
    currency        CHAR(3)     NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    category        TEXT        NOT NULL DEFAULT ''
);
CREATE INDEX transactions_customer ON transactions (customer_id, occurred_at);

CREATE TABLE interactions (
    interaction_id  TEXT PRIMARY KEY,
    customer_id     UUID        NOT NULL,
    kind            SMALLINT    NOT NULL,
    channel         SMALLINT    NOT NULL,
    direction       SMALLINT    NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX interactions_customer ON interactions (customer_id, occurred_at);

CREATE TABLE consents (
    customer_id  UUID     NOT NULL,
    channel      SMALLINT NOT NULL,
    purpose      SMALLINT NOT NULL,
    granted      BOOLEAN  NOT NULL,
    expires_at   TIMESTAMPTZ,
    PRIMARY KEY (customer_id, channel, purpose)
);

-- SEG-7: every answer says how fresh it is (the newest event reflected).
CREATE TABLE freshness (
    singleton        BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    newest_event_at  TIMESTAMPTZ NOT NULL
);
