-- Outreach's own schema (SPEC 4.3). The read model tables are built only
-- from profiles' and segmentation's events (SPEC 2).

-- Read model: what the contact policy and the campaigns need about a customer,
-- plus the per-customer policy state. The dispatcher locks a customer's row
-- while it decides, so caps hold across replicas (OUT-5).
CREATE TABLE customers (
    customer_id        UUID PRIMARY KEY,
    timezone           TEXT        NOT NULL DEFAULT '',
    preferred_channel  SMALLINT    NOT NULL DEFAULT 0,
    tags               TEXT[]      NOT NULL DEFAULT '{}',
    birth_month        SMALLINT,
    birth_day          SMALLINT,
    registered_at      TIMESTAMPTZ,
    tier               SMALLINT    NOT NULL DEFAULT 0,
    churn_level        SMALLINT    NOT NULL DEFAULT 0,
    lifecycle_stage    SMALLINT    NOT NULL DEFAULT 0,
    spend_minor        BIGINT      NOT NULL DEFAULT 0,    -- OUT-6 points
    first_purchase_at  TIMESTAMPTZ,
    last_purchase_at   TIMESTAMPTZ,
    merged_into        UUID,
    erased_at          TIMESTAMPTZ,
    profile_as_of      TIMESTAMPTZ,
    unanswered_streak  INT         NOT NULL DEFAULT 0,    -- OUT-5 backoff
    open_complaints    INT         NOT NULL DEFAULT 0     -- OUT-5, from feedback's events
);
CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE consents (
    customer_id  UUID     NOT NULL,
    channel      SMALLINT NOT NULL,
    purpose      SMALLINT NOT NULL,
    granted      BOOLEAN  NOT NULL,
    expires_at   TIMESTAMPTZ,
    PRIMARY KEY (customer_id, channel, purpose)
);

CREATE TABLE segment_members (
    segment_id   UUID NOT NULL,
    customer_id  UUID NOT NULL,
    PRIMARY KEY (segment_id, customer_id)
);

-- OUT-1: channels and their cost.
CREATE TABLE channels (
    channel      SMALLINT PRIMARY KEY,
    cost_minor   BIGINT   NOT NULL,
    enabled      BOOLEAN  NOT NULL DEFAULT true,
    adapter      TEXT     NOT NULL DEFAULT 'log'
);

-- OUT-5: the contact policy (one row), stored as its protobuf.
CREATE TABLE contact_policy (
    singleton  BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    policy     BYTEA   NOT NULL,
    version    BIGINT  NOT NULL DEFAULT 1
);

-- OUT-2
CREATE TABLE templates (
    template_id   UUID PRIMARY KEY,
    display_name  TEXT        NOT NULL,
    channel       SMALLINT    NOT NULL,
    content_type  SMALLINT    NOT NULL,
    purpose       SMALLINT    NOT NULL,
    bodies        BYTEA       NOT NULL,     -- encoded Template (bodies)
    version       BIGINT      NOT NULL DEFAULT 1,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- OUT-3
CREATE TABLE campaigns (
    campaign_id   UUID PRIMARY KEY,
    spec          BYTEA       NOT NULL,     -- encoded Campaign (what the client set)
    state         SMALLINT    NOT NULL,
    spent_minor   BIGINT      NOT NULL DEFAULT 0,
    budget_minor  BIGINT,                   -- NULL: no cap
    next_run_at   TIMESTAMPTZ,              -- SCHEDULED: when to start
    launched_at   TIMESTAMPTZ,              -- audience materialised
    version       BIGINT      NOT NULL DEFAULT 1,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX campaigns_due ON campaigns (next_run_at) WHERE state IN (2, 3);

-- OUT-3: who landed where; analytics computes lift from these.
CREATE TABLE campaign_assignments (
    campaign_id  UUID        NOT NULL,
    customer_id  UUID        NOT NULL,
    grp          TEXT        NOT NULL,      -- variant name, "holdout" or "global_control"
    tier         SMALLINT    NOT NULL,
    assigned_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, customer_id)
);

-- Messages. state: 1 queued (awaiting a policy decision at due_at),
-- 2 approved (decided, awaiting the adapter), 3 sent, 4 delivered,
-- 5 suppressed, 6 dead letter.
CREATE TABLE messages (
    message_id     UUID PRIMARY KEY,
    customer_id    UUID        NOT NULL,
    channel        SMALLINT    NOT NULL,
    template_id    UUID        NOT NULL,
    campaign_id    UUID,
    variant        TEXT        NOT NULL DEFAULT '',
    trigger_name   TEXT        NOT NULL DEFAULT '',
    purpose        SMALLINT    NOT NULL,
    variables      JSONB       NOT NULL DEFAULT '{}',
    locale         TEXT        NOT NULL DEFAULT '',
    state          SMALLINT    NOT NULL,
    due_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at     TIMESTAMPTZ NOT NULL,
    attempts       INT         NOT NULL DEFAULT 0,
    lease_until    TIMESTAMPTZ,
    last_error     TEXT        NOT NULL DEFAULT '',
    cost_minor     BIGINT      NOT NULL DEFAULT 0,
    rule           TEXT        NOT NULL DEFAULT '',
    detail         TEXT        NOT NULL DEFAULT '',
    decided_at     TIMESTAMPTZ,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at        TIMESTAMPTZ
);
CREATE INDEX messages_queued ON messages (due_at) WHERE state = 1;
CREATE INDEX messages_approved ON messages (due_at) WHERE state = 2;
CREATE INDEX messages_customer ON messages (customer_id, created_at);
CREATE INDEX messages_campaign ON messages (campaign_id, created_at) WHERE campaign_id IS NOT NULL;
CREATE INDEX messages_dead ON messages (created_at) WHERE state = 6;
-- OUT-5: a campaign never contacts a customer twice, whatever races.
CREATE UNIQUE INDEX messages_one_per_campaign ON messages (campaign_id, customer_id) WHERE campaign_id IS NOT NULL;

-- OUT-5: contacts that went out; the caps count these (kept 35 days).
CREATE TABLE contacts (
    customer_id  UUID        NOT NULL,
    at           TIMESTAMPTZ NOT NULL,
    channel      SMALLINT    NOT NULL,
    message_id   UUID        NOT NULL
);
CREATE INDEX contacts_customer ON contacts (customer_id, at);

-- OUT-5: every decision with its rule ("why was this customer not contacted?").
CREATE TABLE decisions (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id    UUID        NOT NULL,
    message_id     UUID        NOT NULL,
    verdict        SMALLINT    NOT NULL,
    rule           TEXT        NOT NULL,
    detail         TEXT        NOT NULL,
    decided_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    deferred_until TIMESTAMPTZ
);
CREATE INDEX decisions_customer ON decisions (customer_id, id);

-- OUT-8
CREATE TABLE outcomes (
    message_id   UUID        NOT NULL,
    outcome      SMALLINT    NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    revenue_minor BIGINT     NOT NULL DEFAULT 0,
    attributed   BOOLEAN     NOT NULL,
    PRIMARY KEY (message_id, outcome)
);

-- OUT-7
CREATE TABLE tasks (
    task_id           UUID PRIMARY KEY,
    customer_id       UUID        NOT NULL,
    kind              SMALLINT    NOT NULL,
    owner             TEXT        NOT NULL,
    due_at            TIMESTAMPTZ NOT NULL,
    status            SMALLINT    NOT NULL,
    reason            TEXT        NOT NULL DEFAULT '',
    customer_feedback TEXT        NOT NULL DEFAULT '',
    problem           TEXT        NOT NULL DEFAULT '',
    next_action       TEXT        NOT NULL DEFAULT '',
    escalation_level  INT         NOT NULL DEFAULT 0,
    dedupe_key        TEXT UNIQUE,               -- triggers create a task once
    version           BIGINT      NOT NULL DEFAULT 1,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at      TIMESTAMPTZ
);
CREATE INDEX tasks_open_due ON tasks (due_at) WHERE status IN (1, 2, 5);
CREATE INDEX tasks_owner ON tasks (owner, due_at);
CREATE INDEX tasks_customer ON tasks (customer_id, due_at);

-- The log/sink adapter's delivery log (development adapter): the provider
-- side, keyed by the idempotency key, so a re-sent message is not logged twice.
CREATE TABLE sink_deliveries (
    idempotency_key  UUID PRIMARY KEY,
    customer_id      UUID        NOT NULL,
    channel          SMALLINT    NOT NULL,
    campaign_id      UUID,
    subject          TEXT        NOT NULL,
    body             TEXT        NOT NULL,
    received_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    calls            INT         NOT NULL DEFAULT 1
);
