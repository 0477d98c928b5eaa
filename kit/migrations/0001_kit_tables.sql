-- Tables the shared kit keeps in every service's own schema (SPEC 2, 3).

-- Transactional outbox: events written in the same transaction as the change,
-- published to the service's Redis stream by the relay.
CREATE TABLE kit_outbox (
    id            BIGSERIAL PRIMARY KEY,
    event_id      UUID        NOT NULL UNIQUE,
    event_type    TEXT        NOT NULL,
    aggregate_id  TEXT        NOT NULL,
    envelope      BYTEA       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ
);
CREATE INDEX kit_outbox_unpublished ON kit_outbox (id) WHERE published_at IS NULL;
CREATE INDEX kit_outbox_published_at ON kit_outbox (published_at) WHERE published_at IS NOT NULL;

-- Inbox of each consumer: an event id recorded here was applied exactly once.
CREATE TABLE kit_inbox (
    consumer      TEXT        NOT NULL,
    event_id      UUID        NOT NULL,
    processed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Events a consumer could not apply for good (undecodable, rejected by the handler).
CREATE TABLE kit_dead_events (
    consumer      TEXT        NOT NULL,
    stream        TEXT        NOT NULL,
    stream_id     TEXT        NOT NULL,
    event_id      TEXT        NOT NULL,
    event_type    TEXT        NOT NULL,
    envelope      BYTEA,
    error         TEXT        NOT NULL,
    failed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, stream, stream_id)
);

-- Idempotent mutations: the first result of each (method, request_id).
CREATE TABLE kit_idempotency (
    scope         TEXT        NOT NULL,
    request_id    TEXT        NOT NULL,
    fingerprint   BYTEA       NOT NULL,
    response      BYTEA       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, request_id)
);
CREATE INDEX kit_idempotency_created_at ON kit_idempotency (created_at);
