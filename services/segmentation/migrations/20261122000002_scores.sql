-- Results of a recompute (SEG-1 to SEG-5), one row per live customer.
CREATE TABLE customer_scores (
    customer_id       UUID PRIMARY KEY,
    tier              SMALLINT    NOT NULL,
    tier_since        TIMESTAMPTZ NOT NULL,
    tier_reason       TEXT        NOT NULL,
    recency_days      INTEGER     NOT NULL,   -- -1: never bought
    frequency         INTEGER     NOT NULL,
    monetary_minor    BIGINT      NOT NULL,
    r_score           SMALLINT    NOT NULL,
    f_score           SMALLINT    NOT NULL,
    m_score           SMALLINT    NOT NULL,
    r_percentile      SMALLINT    NOT NULL,
    f_percentile      SMALLINT    NOT NULL,
    m_percentile      SMALLINT    NOT NULL,
    rfm_segment       SMALLINT    NOT NULL,
    grid_cell         SMALLINT    NOT NULL,
    lifecycle_stage   SMALLINT    NOT NULL,
    lifecycle_since   TIMESTAMPTZ NOT NULL,
    churn_score       SMALLINT    NOT NULL,
    churn_level       SMALLINT    NOT NULL,
    churn_risk        BYTEA       NOT NULL,   -- encoded ChurnRisk with its reasons
    computed_at       TIMESTAMPTZ NOT NULL,
    as_of             TIMESTAMPTZ             -- newest event reflected (SEG-7 freshness)
);
CREATE INDEX customer_scores_tier ON customer_scores (tier);

-- SEG-2: every tier move with its reason.
CREATE TABLE tier_moves (
    id           BIGSERIAL PRIMARY KEY,
    customer_id  UUID        NOT NULL,
    from_tier    SMALLINT    NOT NULL,
    to_tier      SMALLINT    NOT NULL,
    reason       TEXT        NOT NULL,
    moved_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX tier_moves_customer ON tier_moves (customer_id, id DESC);
