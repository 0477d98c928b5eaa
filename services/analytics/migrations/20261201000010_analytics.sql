-- The analytics service's own schema (SPEC 4.5): facts from every service's
-- events, keyed by their natural ids (a replay changes nothing), and rollups
-- maintained as events arrive (ANA-7). No other service reads it.

-- Customers with their derived facts (domain::customer::Facts).
CREATE TABLE customers (
    customer_id        UUID PRIMARY KEY,
    merged_into        UUID,
    registered_at      TIMESTAMPTZ,
    first_purchase_at  TIMESTAMPTZ,
    second_purchase_at TIMESTAMPTZ,
    last_purchase_at   TIMESTAMPTZ,
    orders             BIGINT   NOT NULL DEFAULT 0,
    revenue_minor      BIGINT   NOT NULL DEFAULT 0,
    -- [[month index, purchases, net revenue], ...]
    months             JSONB    NOT NULL DEFAULT '[]',
    tier               SMALLINT NOT NULL DEFAULT 0,
    grid_cell          SMALLINT NOT NULL DEFAULT 0
);
CREATE INDEX customers_merged ON customers (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE purchases (
    transaction_id TEXT PRIMARY KEY,
    customer_id    UUID        NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL,
    amount_minor   BIGINT      NOT NULL,
    refund         BOOLEAN     NOT NULL
);
CREATE INDEX purchases_by_customer ON purchases (customer_id, occurred_at);
CREATE INDEX purchases_by_time ON purchases (occurred_at);

-- Inbound interactions (responses, logins, visits): the "response" of lift.
CREATE TABLE interactions (
    interaction_id TEXT PRIMARY KEY,
    customer_id    UUID        NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX interactions_by_customer ON interactions (customer_id, occurred_at);

-- Sums of customers' contributions (domain::customer::contributions).
CREATE TABLE rollups (
    rollup TEXT   NOT NULL,
    k1     INT    NOT NULL,
    k2     INT    NOT NULL,
    tag    TEXT   NOT NULL,
    n      BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    PRIMARY KEY (rollup, k1, k2, tag)
);

-- segmentation.
CREATE TABLE segment_members (
    segment_id  UUID NOT NULL,
    customer_id UUID NOT NULL,
    PRIMARY KEY (segment_id, customer_id)
);
CREATE TABLE tier_moves (
    event_id    UUID PRIMARY KEY,
    customer_id UUID        NOT NULL,
    move_time   TIMESTAMPTZ NOT NULL,
    from_tier   SMALLINT    NOT NULL,
    to_tier     SMALLINT    NOT NULL
);
CREATE INDEX tier_moves_by_customer ON tier_moves (customer_id, move_time);

-- outreach: who was in which group of which campaign, and what happened
-- within the attribution window after assignment (lift, ANA-3).
CREATE TABLE campaign_members (
    campaign_id   UUID        NOT NULL,
    customer_id   UUID        NOT NULL,
    grp           TEXT        NOT NULL,
    tier          SMALLINT    NOT NULL,
    assigned_at   TIMESTAMPTZ NOT NULL,
    converted_at  TIMESTAMPTZ,
    responded_at  TIMESTAMPTZ,
    revenue_minor BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, customer_id)
);
CREATE INDEX campaign_members_by_customer ON campaign_members (customer_id, assigned_at);

-- ANA-8: the programme against the global control group (first assignment wins).
CREATE TABLE programme_members (
    customer_id   UUID PRIMARY KEY,
    control       BOOLEAN     NOT NULL,
    assigned_at   TIMESTAMPTZ NOT NULL,
    converted_at  TIMESTAMPTZ,
    responded_at  TIMESTAMPTZ,
    revenue_minor BIGINT      NOT NULL DEFAULT 0
);

-- Members, conversions and revenue per campaign group (campaign nil = programme, grp treated/control).
CREATE TABLE lift_groups (
    campaign_id   UUID   NOT NULL,
    grp           TEXT   NOT NULL,
    members       BIGINT NOT NULL DEFAULT 0,
    converted     BIGINT NOT NULL DEFAULT 0,
    responded     BIGINT NOT NULL DEFAULT 0,
    revenue_minor BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, grp)
);

-- Messages: each outcome is set once.
CREATE TABLE messages (
    message_id    UUID PRIMARY KEY,
    campaign_id   UUID     NOT NULL,
    customer_id   UUID     NOT NULL,
    variant       TEXT     NOT NULL,
    channel       SMALLINT NOT NULL,
    tier          SMALLINT NOT NULL,
    day           INT,
    contacted_at  TIMESTAMPTZ,
    cost_minor    BIGINT   NOT NULL DEFAULT 0,
    delivered_at  TIMESTAMPTZ,
    responded_at  TIMESTAMPTZ,
    converted_at  TIMESTAMPTZ,
    revenue_minor BIGINT   NOT NULL DEFAULT 0
);

-- ANA-3 rollup by campaign, variant, channel, tier and day (targeted is
-- counted at assignment, with channel 0).
CREATE TABLE campaign_cells (
    campaign_id   UUID     NOT NULL,
    variant       TEXT     NOT NULL,
    channel       SMALLINT NOT NULL,
    tier          SMALLINT NOT NULL,
    day           INT      NOT NULL,
    targeted      BIGINT   NOT NULL DEFAULT 0,
    contacted     BIGINT   NOT NULL DEFAULT 0,
    delivered     BIGINT   NOT NULL DEFAULT 0,
    responded     BIGINT   NOT NULL DEFAULT 0,
    converted     BIGINT   NOT NULL DEFAULT 0,
    cost_minor    BIGINT   NOT NULL DEFAULT 0,
    revenue_minor BIGINT   NOT NULL DEFAULT 0,
    -- Messages decided on the channel (sent or suppressed): the "targeted" of a channel.
    attempts      BIGINT   NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, variant, channel, tier, day)
);

-- feedback.
CREATE TABLE feedback_items (
    feedback_id UUID PRIMARY KEY,
    customer_id UUID     NOT NULL,
    category    SMALLINT NOT NULL,
    day         INT      NOT NULL
);
CREATE INDEX feedback_items_by_customer ON feedback_items (customer_id);
CREATE TABLE tickets (
    ticket_id   UUID PRIMARY KEY,
    customer_id UUID     NOT NULL,
    category    SMALLINT NOT NULL,
    day         INT      NOT NULL,
    repeat      BOOLEAN  NOT NULL,
    breached    BOOLEAN  NOT NULL DEFAULT false,
    resolved    BOOLEAN  NOT NULL DEFAULT false,
    verified    BOOLEAN  NOT NULL DEFAULT false,
    -- Business seconds to first response and resolution (first resolution).
    first_response_s BIGINT,
    resolution_s     BIGINT
);
CREATE INDEX tickets_by_customer ON tickets (customer_id);
CREATE TABLE surveys (
    survey_response_id UUID PRIMARY KEY,
    customer_id        UUID     NOT NULL,
    kind               SMALLINT NOT NULL,
    score              SMALLINT NOT NULL,
    day                INT      NOT NULL
);
CREATE INDEX surveys_by_customer ON surveys (customer_id);
-- ANA-5 rollup by day: counts (n) and sums (total) of service metrics.
CREATE TABLE service_daily (
    day    INT    NOT NULL,
    metric TEXT   NOT NULL,
    key    TEXT   NOT NULL,
    n      BIGINT NOT NULL,
    total  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (day, metric, key)
);

-- SEG-7/ANA: the time of the newest event reflected (answers say how fresh they are).
CREATE TABLE freshness (
    id    BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    as_of TIMESTAMPTZ NOT NULL
);
