-- The feedback service's own schema (SPEC 4.4). No other service reads it.

-- FBK-1/FBK-2: every item taken in, with its automatic classification.
CREATE TABLE feedback (
    feedback_id           UUID PRIMARY KEY,
    -- The live customer (follows merges); `submitted_customer_id` is what the
    -- client sent, so an unmerge can move the item back.
    customer_id           UUID        NOT NULL,
    submitted_customer_id UUID        NOT NULL,
    customer_verified     BOOLEAN     NOT NULL,
    channel               SMALLINT    NOT NULL,
    text                  TEXT        NOT NULL,
    rating                SMALLINT,
    language              TEXT        NOT NULL,
    category              SMALLINT    NOT NULL,
    confidence            DOUBLE PRECISION NOT NULL,
    urgent                BOOLEAN     NOT NULL,
    sentiment             DOUBLE PRECISION NOT NULL,
    topic                 TEXT        NOT NULL,
    evidence              JSONB       NOT NULL,
    -- FBK-2: a person's re-classification, kept beside the automatic one.
    manual_category       SMALLINT,
    reclassified_by       TEXT,
    reclassified_at       TIMESTAMPTZ,
    ticket_id             UUID,
    created_at            TIMESTAMPTZ NOT NULL,
    -- PRF-8: text removed when the customer was erased.
    erased_at             TIMESTAMPTZ
);
CREATE INDEX feedback_by_customer ON feedback (customer_id, created_at DESC, feedback_id DESC);
CREATE INDEX feedback_by_time ON feedback (created_at DESC, feedback_id DESC);
CREATE INDEX feedback_unverified ON feedback (created_at) WHERE NOT customer_verified;

-- FBK-3: department queues with their escalation contacts.
CREATE TABLE queues (
    queue       TEXT PRIMARY KEY,
    department  TEXT NOT NULL,
    supervisor  TEXT NOT NULL,
    head        TEXT NOT NULL
);
INSERT INTO queues (queue, department, supervisor, head) VALUES
    ('customer-care', 'Customer care', 'care-supervisor', 'care-head'),
    ('product',       'Product',       'product-supervisor', 'product-head'),
    ('support',       'Customer support', 'support-supervisor', 'support-head');

CREATE TABLE tickets (
    ticket_id          UUID PRIMARY KEY,
    feedback_id        UUID        NOT NULL REFERENCES feedback (feedback_id),
    customer_id        UUID        NOT NULL,
    category           SMALLINT    NOT NULL,
    urgent             BOOLEAN     NOT NULL,
    queue              TEXT        NOT NULL REFERENCES queues (queue),
    assignee           TEXT        NOT NULL DEFAULT '',
    state              SMALLINT    NOT NULL,
    topic              TEXT        NOT NULL,
    -- FBK-4: the earlier ticket of the same customer and topic.
    repeat_of          UUID REFERENCES tickets (ticket_id),
    escalation_level   SMALLINT    NOT NULL DEFAULT 0,
    next_escalation_at TIMESTAMPTZ,
    resolutions        INT         NOT NULL DEFAULT 0,
    -- The earliest deadline of its running clocks (ListTickets order); NULL if none runs.
    next_deadline_at   TIMESTAMPTZ,
    version            BIGINT      NOT NULL DEFAULT 1,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX tickets_by_customer_topic ON tickets (customer_id, topic, created_at DESC);
CREATE INDEX tickets_by_queue ON tickets (queue, state);
CREATE INDEX tickets_by_deadline ON tickets ((COALESCE(next_deadline_at, '9999-12-31Z'::timestamptz)), ticket_id);
CREATE INDEX tickets_escalation_due ON tickets (next_escalation_at) WHERE next_escalation_at IS NOT NULL;

-- FBK-3: the SLA clocks of each ticket (see domain::sla).
CREATE TABLE sla_clocks (
    ticket_id        UUID        NOT NULL REFERENCES tickets (ticket_id),
    kind             TEXT        NOT NULL CHECK (kind IN ('first_response', 'resolution')),
    target_s         BIGINT      NOT NULL,
    business_hours   BOOLEAN     NOT NULL,
    elapsed_closed_s BIGINT      NOT NULL DEFAULT 0,
    running_since    TIMESTAMPTZ,
    paused           BOOLEAN     NOT NULL DEFAULT false,
    met_at           TIMESTAMPTZ,
    -- When a running clock reaches its target; NULL while paused or stopped.
    deadline_at      TIMESTAMPTZ,
    -- Set once, by whoever finds the breach first (watcher or a late response).
    breached_at      TIMESTAMPTZ,
    PRIMARY KEY (ticket_id, kind)
);
CREATE INDEX sla_clocks_due ON sla_clocks (deadline_at) WHERE breached_at IS NULL AND deadline_at IS NOT NULL;

CREATE TABLE ticket_history (
    id          BIGSERIAL PRIMARY KEY,
    ticket_id   UUID        NOT NULL REFERENCES tickets (ticket_id),
    at          TIMESTAMPTZ NOT NULL,
    actor       TEXT        NOT NULL,
    action      TEXT        NOT NULL,
    from_state  SMALLINT,
    to_state    SMALLINT,
    note        TEXT        NOT NULL DEFAULT ''
);
CREATE INDEX ticket_history_by_ticket ON ticket_history (ticket_id, id);

-- FBK-5.
CREATE TABLE survey_responses (
    survey_response_id    UUID PRIMARY KEY,
    customer_id           UUID        NOT NULL,
    submitted_customer_id UUID        NOT NULL,
    kind                  SMALLINT    NOT NULL,
    score                 SMALLINT    NOT NULL,
    ticket_id             UUID REFERENCES tickets (ticket_id),
    campaign_id           TEXT        NOT NULL DEFAULT '',
    comment               TEXT        NOT NULL DEFAULT '',
    feedback_id           UUID REFERENCES feedback (feedback_id),
    created_at            TIMESTAMPTZ NOT NULL
);
CREATE INDEX survey_responses_by_customer ON survey_responses (customer_id, created_at DESC);

-- FBK-6: plan-do-check-act actions linked to tickets.
CREATE TABLE improvement_actions (
    action_id        UUID PRIMARY KEY,
    title            TEXT        NOT NULL,
    owner_department TEXT        NOT NULL,
    deadline         TIMESTAMPTZ NOT NULL,
    success_measure  TEXT        NOT NULL,
    status           SMALLINT    NOT NULL,
    version          BIGINT      NOT NULL DEFAULT 1,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX improvement_actions_by_deadline ON improvement_actions (status, deadline, action_id);
CREATE TABLE action_tickets (
    action_id  UUID NOT NULL REFERENCES improvement_actions (action_id),
    ticket_id  UUID NOT NULL REFERENCES tickets (ticket_id),
    PRIMARY KEY (action_id, ticket_id)
);

-- FBK-3 closed loop: calls to outreach (acknowledgement on intake, resolution
-- check on resolve) written in the same transaction as the change and made
-- until they succeed, so an outage of outreach loses none. Each carries the
-- trace context of the request that caused it.
CREATE TABLE loop_calls (
    call_id         UUID PRIMARY KEY,
    kind            TEXT        NOT NULL CHECK (kind IN ('acknowledge', 'resolution_check')),
    feedback_id     UUID        NOT NULL REFERENCES feedback (feedback_id),
    ticket_id       UUID,
    request_id      TEXT        NOT NULL UNIQUE,
    traceparent     TEXT        NOT NULL DEFAULT '',
    tracestate      TEXT        NOT NULL DEFAULT '',
    attempts        INT         NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    done_at         TIMESTAMPTZ,
    outcome         TEXT        NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX loop_calls_due ON loop_calls (next_attempt_at) WHERE done_at IS NULL;
