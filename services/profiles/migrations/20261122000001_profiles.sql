-- Profiles' own schema (SPEC 4.1). Personal data lives only here.

CREATE TABLE customers (
    customer_id        UUID PRIMARY KEY,
    kind               SMALLINT    NOT NULL,
    name               TEXT        NOT NULL,
    phone              TEXT,                 -- E.164 (PRF-2)
    email              TEXT,                 -- lower-cased (PRF-2)
    birth_year         SMALLINT,
    birth_month        SMALLINT,
    birth_day          SMALLINT,
    gender             SMALLINT    NOT NULL DEFAULT 0,
    region             TEXT        NOT NULL DEFAULT '',
    timezone           TEXT        NOT NULL DEFAULT '',
    preferred_channel  SMALLINT    NOT NULL DEFAULT 0,
    registered_at      TIMESTAMPTZ NOT NULL,
    address            BYTEA,                -- encoded Address
    tags               TEXT[]      NOT NULL DEFAULT '{}',
    attributes         BYTEA       NOT NULL DEFAULT '',  -- encoded map<string, AttributeValue>
    organization       BYTEA,                             -- encoded Organization
    tier               SMALLINT    NOT NULL DEFAULT 0,
    merged_into        UUID REFERENCES customers (customer_id),  -- set: this id is an alias (PRF-3)
    erased_at          TIMESTAMPTZ,                               -- PRF-8
    version            BIGINT      NOT NULL DEFAULT 1,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- One live customer per phone and per e-mail (identity resolution, PRF-3).
CREATE UNIQUE INDEX customers_phone_live ON customers (phone) WHERE merged_into IS NULL AND phone IS NOT NULL;
CREATE UNIQUE INDEX customers_email_live ON customers (email) WHERE merged_into IS NULL AND email IS NOT NULL;
CREATE INDEX customers_created ON customers (created_at, customer_id) WHERE merged_into IS NULL;
CREATE INDEX customers_region ON customers (region) WHERE merged_into IS NULL;
CREATE INDEX customers_tags ON customers USING GIN (tags);
CREATE INDEX customers_name_prefix ON customers (lower(name) text_pattern_ops);
CREATE INDEX customers_phone_prefix ON customers (phone text_pattern_ops);
CREATE INDEX customers_email_prefix ON customers (email text_pattern_ops);

CREATE TABLE external_ids (
    source       TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    customer_id  UUID NOT NULL REFERENCES customers (customer_id),
    PRIMARY KEY (source, external_id)
);
CREATE INDEX external_ids_customer ON external_ids (customer_id);

CREATE TABLE transactions (
    transaction_id  TEXT PRIMARY KEY,     -- idempotent by id (PRF-4)
    customer_id     UUID        NOT NULL REFERENCES customers (customer_id),
    kind            SMALLINT    NOT NULL,
    amount_minor    BIGINT      NOT NULL,
    currency        CHAR(3)     NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    product_id      TEXT        NOT NULL DEFAULT '',
    category        TEXT        NOT NULL DEFAULT '',
    channel         SMALLINT    NOT NULL DEFAULT 0,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX transactions_customer_time ON transactions (customer_id, occurred_at DESC);

CREATE TABLE interactions (
    interaction_id  TEXT PRIMARY KEY,
    customer_id     UUID        NOT NULL REFERENCES customers (customer_id),
    kind            SMALLINT    NOT NULL,
    channel         SMALLINT    NOT NULL DEFAULT 0,
    direction       SMALLINT    NOT NULL DEFAULT 1,
    occurred_at     TIMESTAMPTZ NOT NULL,
    note            TEXT        NOT NULL DEFAULT '',
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX interactions_customer_time ON interactions (customer_id, occurred_at DESC);

-- Current consent per channel and purpose, and its full history (PRF-7).
CREATE TABLE consents (
    customer_id  UUID        NOT NULL REFERENCES customers (customer_id),
    channel      SMALLINT    NOT NULL,
    purpose      SMALLINT    NOT NULL,
    granted      BOOLEAN     NOT NULL,
    source       TEXT        NOT NULL DEFAULT '',
    updated_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    PRIMARY KEY (customer_id, channel, purpose)
);
CREATE TABLE consent_history (
    id           BIGSERIAL PRIMARY KEY,
    customer_id  UUID        NOT NULL REFERENCES customers (customer_id),
    channel      SMALLINT    NOT NULL,
    purpose      SMALLINT    NOT NULL,
    granted      BOOLEAN     NOT NULL,
    source       TEXT        NOT NULL DEFAULT '',
    changed_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    changed_by   TEXT        NOT NULL
);
CREATE INDEX consent_history_customer ON consent_history (customer_id, id DESC);

-- Entries of other services shown on the timeline (PRF-5), from their events.
CREATE TABLE timeline_external (
    source_service  TEXT        NOT NULL,
    source_id       TEXT        NOT NULL,
    customer_id     UUID        NOT NULL,
    kind            SMALLINT    NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    channel         SMALLINT    NOT NULL DEFAULT 0,
    summary         TEXT        NOT NULL,
    amount_minor    BIGINT,
    currency        CHAR(3),
    PRIMARY KEY (source_service, source_id)
);
CREATE INDEX timeline_external_customer ON timeline_external (customer_id, occurred_at DESC);

-- Append-only audit of unmasked reads (SEC-1): updates and deletes are refused.
CREATE TABLE access_audit (
    id           BIGSERIAL PRIMARY KEY,
    subject      TEXT        NOT NULL,
    access_time  TIMESTAMPTZ NOT NULL DEFAULT now(),
    customer_id  UUID        NOT NULL,
    method       TEXT        NOT NULL,
    purpose      TEXT        NOT NULL,
    trace_id     TEXT        NOT NULL DEFAULT ''
);
CREATE INDEX access_audit_customer ON access_audit (customer_id, id DESC);
CREATE FUNCTION access_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'access_audit is append-only';
END $$;
CREATE TRIGGER access_audit_no_change BEFORE UPDATE OR DELETE ON access_audit
    FOR EACH ROW EXECUTE FUNCTION access_audit_append_only();

-- Erasure requests and per-service confirmations (PRF-8).
CREATE TABLE erasures (
    customer_id   UUID PRIMARY KEY,
    requested_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    requested_by  TEXT        NOT NULL,
    reason        TEXT        NOT NULL
);
CREATE TABLE erasure_confirmations (
    customer_id   UUID        NOT NULL REFERENCES erasures (customer_id),
    service       TEXT        NOT NULL,
    confirmed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, service)
);
